"""The serving export written at the end of training: reload it, call it on image bytes."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import train_tiny_run
from trainer import checkpoints, config as config_lib, data, export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("export"), images_per_class=20, image_size=24,
                          test_per_class=4, epochs=2, seed=2)


def _encoded(mode: str, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        array = rng.integers(0, 65535, size=(40, 52), dtype=np.uint16)
        image = Image.fromarray(array)  # 16-bit grayscale
    else:
        image = Image.fromarray(rng.integers(0, 255, size=(40, 52, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("P", "PNG"),
          ("RGB", "JPEG"), ("L", "JPEG")]


def test_training_writes_the_export(run_dir):
    assert (run_dir / "export" / "saved_model.pb").is_file()
    assert not (run_dir / "export.partial").exists()
    signature = export.load_signature(str(run_dir / "export"))
    assert set(signature.structured_input_signature[1]) == {"image_bytes"}
    assert set(signature.structured_outputs) == {"probabilities", "class_index", "class_name"}


@pytest.mark.parametrize("mode, fmt", IMAGES)
def test_export_round_trip_equals_in_process_predictions(run_dir, mode, fmt):
    config = config_lib.from_yaml_text((run_dir / "config.yaml").read_text(), "config.yaml")
    model = checkpoints.load(str(run_dir / "checkpoints" / "best.keras"))
    serve = export.load_signature(str(run_dir / "export"))
    batch = [_encoded(mode, fmt, seed) for seed in range(3)]
    out = serve(image_bytes=np.array(batch, dtype=object))
    images = np.stack([data.decode_pixels(b, config.data.image_size,
                                          config.data.interpolation).numpy() for b in batch])
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)
    names = [n.decode() for n in out["class_name"].numpy()]
    assert names == [config.data.classes[i] for i in expected.argmax(axis=1)]
    assert out["class_index"].numpy().tolist() == expected.argmax(axis=1).tolist()


def test_export_replaces_an_old_one(run_dir, tmp_path):
    model = checkpoints.load(str(run_dir / "checkpoints" / "last.keras"))
    config = config_lib.from_yaml_text((run_dir / "config.yaml").read_text(), "config.yaml")
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    export.save(model, config, str(target))
    assert (target / "saved_model.pb").is_file() and not (target / "stale.txt").exists()
