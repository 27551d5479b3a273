# The training image: the trainer installed on TensorFlow's GPU image (CUDA and cuDNN included).
#   docker build -t covid-cxr-trainer:0.1.0 .
#   docker run --rm covid-cxr-trainer:0.1.0 --model=vanilla          # trains (absl flags)
#   docker run --rm --entrypoint python covid-cxr-trainer:0.1.0 -m trainer.evaluate --help
# The base is pinned to the one TensorFlow release that setup.py allows (>=2.21,<2.22), so pip
# keeps the image's TensorFlow instead of downloading another. No data, weights or credentials
# are baked in: data and runs live in a bucket, reached through GKE Workload Identity.
FROM tensorflow/tensorflow:2.21.0-gpu

# A training Job has no endpoint to probe; Kubernetes watches the process and its exit status.
# checkov:skip=CKV_DOCKER_2:batch training container, no service to health-check

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CXR_CONFIG_DIR=/opt/covid-cxr-trainer/configs

# A fixed, high, numeric UID: Kubernetes can only enforce runAsNonRoot for a numeric USER, and
# the manifests' runAsUser uses the same number. -l keeps useradd from growing lastlog.
RUN useradd -l --uid 10001 --user-group --create-home --shell /usr/sbin/nologin trainer

WORKDIR /opt/covid-cxr-trainer
COPY setup.py README.md ./
COPY configs/ configs/
COPY trainer/ trainer/
RUN pip install --no-cache-dir .

# Run from the user's home, not the source folder, so `python -m` imports the installed package.
WORKDIR /home/trainer
USER 10001

ENTRYPOINT ["python", "-m", "trainer.task"]
