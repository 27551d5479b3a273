"""trainer.prepare: the same split as training, shards that decode to the same images, resume,
dry run, and a prepared directory in the bucket that training reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer import config as config_lib, data, prepare, train

pytest_plugins = ["tests.gcs_fixture"]


@pytest.fixture
def small_config(demo_tree, tmp_path):
    return config_lib.load("vanilla", overrides={
        "data_dir": str(demo_tree), "image_size": 16, "test_per_class": 6, "batch_size": 16,
        "epochs": 1, "model_dir": str(tmp_path / "run")})


def _keys(examples) -> list[str]:
    return sorted(data.record_key(e.label, e.relpath) for e in examples)


def test_prepared_splits_and_pixels_match_training_from_files(small_config, tmp_path):
    dst = str(tmp_path / "prepared")
    manifest = prepare.prepare(small_config, small_config.data.data_dir, dst, max_side=64,
                               shard_mb=1)
    from_files = data.make_splits(small_config.data)
    prepared_config = config_lib.from_dict({"data": {"data_dir": dst}}, "test",
                                           config_lib.load("vanilla"))
    prepared_config.data.image_size = 16
    from_shards = data.make_splits(prepared_config.data)
    for name in data.SPLITS:
        assert _keys(getattr(from_shards, name)) == _keys(getattr(from_files, name)), name
    assert manifest["counts"] == from_files.counts()
    assert manifest["class_weights"] == pytest.approx(
        list(data.class_weights([e.label for e in from_files.train], 3).values()))
    assert all(len(f["sha256"]) == 64 for f in manifest["files"]["train"])
    # 64x64 sources fit max_side: stored as they are, so the decoded pixels are identical.
    by_key = {data.record_key(e.label, e.relpath): e for e in from_files.test}
    shard_ds = data.make_dataset(from_shards.test, prepared_config.data, 50, training=False)
    file_ds = data.make_dataset([by_key[data.record_key(e.label, e.relpath)]
                                 for e in from_shards.test], small_config.data, 50, training=False)
    (xs, ys), (xf, yf) = next(iter(shard_ds)), next(iter(file_ds))
    np.testing.assert_array_equal(xs.numpy(), xf.numpy())
    np.testing.assert_array_equal(ys.numpy(), yf.numpy())


def test_large_images_are_shrunk_to_max_side(small_config, tmp_path):
    manifest = prepare.prepare(small_config, small_config.data.data_dir, str(tmp_path / "p"),
                               max_side=20, shard_mb=150)
    assert {f["stored"] for f in manifest["files"]["train"]} == {"resized"}
    record = next(iter(data.tf.data.TFRecordDataset(str(tmp_path / "p" / "train-00000.tfrecord"))))
    image, _, _ = data.parse_record(record)
    assert max(data.tf.io.decode_image(image).shape[:2]) == 20


def test_rerun_keeps_finished_shards(small_config, tmp_path):
    dst = tmp_path / "p"
    prepare.prepare(small_config, small_config.data.data_dir, str(dst), max_side=64, shard_mb=1)
    manifest_text = (dst / "manifest.json").read_text()
    # An interrupted prepare: the manifest was not written yet, the first train shard was.
    progress = json.loads(manifest_text)
    (dst / "manifest.json").unlink()
    first = dst / "train-00000.tfrecord"
    stamp = first.stat().st_mtime_ns
    entries = progress["files"]["train"]
    shard = {"file": first.name, "count": len(entries), "bytes": first.stat().st_size,
             "files": [{**f, "key": data.record_key(f["label"], f["relpath"])} for f in entries]}
    (dst / prepare.PROGRESS).write_text(json.dumps(
        {"settings": progress["settings"], "shards": {"train": [shard]}}))
    again = prepare.prepare(small_config, small_config.data.data_dir, str(dst), max_side=64,
                            shard_mb=1)
    assert first.stat().st_mtime_ns == stamp  # kept, not rewritten
    assert again["counts"] == progress["counts"] and again["files"] == progress["files"]
    assert not (dst / prepare.PROGRESS).exists()


def test_dry_run_writes_nothing(demo_tree, tmp_path):
    dst = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "trainer.prepare", f"--src={demo_tree}",
                           f"--dst={dst}", "--test_per_class=6", "--dry_run"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr
    assert "train     57 images" in proc.stdout and "dry run: nothing written" in proc.stdout
    assert not dst.exists()


def test_bad_image_stops_prepare_with_status_3(demo_tree, tmp_path):
    (demo_tree / "NORMAL" / "broken.png").write_bytes(b"not a png")
    proc = subprocess.run([sys.executable, "-m", "trainer.prepare", f"--src={demo_tree}",
                           f"--dst={tmp_path / 'p'}", "--test_per_class=6"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 3, proc.stderr
    assert "broken.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_prepare_into_the_bucket_and_train_from_its_shards(gcs, small_config, tmp_path):
    dst = gcs.fresh("prepared")
    manifest = prepare.prepare(small_config, small_config.data.data_dir, dst, max_side=32,
                               shard_mb=1)
    assert {"manifest.json", "train-00000.tfrecord"} <= set(gcs.blob_names(dst))
    small_config.data.data_dir = dst
    small_config.train.epochs = 2
    results = train.run(small_config)
    assert results["counts"] == manifest["counts"]
    assert results["class_weights"] == pytest.approx(manifest["class_weights"])
    assert Path(small_config.output.model_dir, "metrics.json").exists()
