"""Packaging for covid-cxr-trainer (import package: ``trainer``)."""
from setuptools import find_packages, setup

setup(
    name="covid-cxr-trainer",
    version="0.1.0",
    description="Distributed TensorFlow trainer for chest X-ray classifiers "
    "(COVID-19 / NORMAL / Viral Pneumonia).",
    packages=find_packages(include=["trainer", "trainer.*"]),
    # The YAML recipes travel with non-editable installs (e.g. the container).
    data_files=[("share/covid-cxr-trainer/configs", ["configs/vanilla.yaml", "configs/inception.yaml",
                                                     "configs/robust.yaml",
                                                     "configs/robust-densenet.yaml"])],
    python_requires=">=3.10",
    install_requires=[
        # TensorFlow and tf-keras move in lock-step: Keras 2 for TF 2.21.
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorboard>=2.20,<2.22",  # TF 2.21 no longer pulls it in; the TensorBoard callback needs it
        "absl-py>=2.1,<3",
        "PyYAML>=6,<7",
        "numpy>=1.26,<3",
        "scikit-learn>=1.5,<2",
        "Pillow>=10,<14",
        "matplotlib>=3.7,<4",  # evaluation plots and Grad-CAM overlays
        "google-cloud-storage>=2.14,<4",  # bulk bucket transfers (trainer.pull)
        "google-crc32c>=1.5,<2",
        "openpyxl>=3.1,<4",  # the COVID-19 Radiography Database's metadata sheets (sources)
        "tensorflow-datasets>=4.9.10,<5",  # prepared data (trainer.prepare); 4.9.10 runs on TF 2.21
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "gcp-storage-emulator>=2026.7,<2027",  # GCS JSON API on loopback for the bucket tests
            "cryptography>=42,<49",  # the throw-away CA of the TLS proxy in front of it
        ],
    },
)
