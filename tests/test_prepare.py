"""trainer.prepare: a TensorFlow Datasets dataset with the same split as training, records that
decode to the same images, read by TFDS in a process without the trainer, resume, refusals,
dry run, bad input, and a prepared dataset in the bucket that training reads."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_datacheck import (copy_our_split_puts_apart, corrupt, make_tree,
                                  same_image_two_classes)
from trainer import config as config_lib, data, datacheck, demo_data, prepare, prepared, train
from trainer.errors import ConfigError, DataError

pytest_plugins = ["tests.gcs_fixture"]
DATABASE = list(demo_data.DATABASE_CLASSES)


@pytest.fixture
def small_config(demo_tree, tmp_path):
    return config_lib.load("vanilla", overrides={
        "data_dir": str(demo_tree), "image_size": 16, "test_per_class": 6, "batch_size": 16,
        "epochs": 1, "model_dir": str(tmp_path / "run")})


def _keys(examples) -> list[str]:
    return sorted(data.record_key(e.label, e.relpath) for e in examples)


def _prepared_config(dst, classes=None):
    config = config_lib.from_dict({"data": {"data_dir": str(dst)}}, "test", config_lib.load("vanilla"))
    config.data.image_size = 16
    if classes:
        config.data.classes = classes
    return config


def test_prepared_splits_and_pixels_match_training_from_files(small_config, tmp_path):
    dst = str(tmp_path / "prepared")
    meta = prepare.prepare(small_config, small_config.data.data_dir, dst, max_side=64, shard_mb=1)
    from_files = data.make_splits(small_config.data)
    prepared_config = _prepared_config(dst)
    from_shards = data.make_splits(prepared_config.data)
    for name in data.SPLITS:
        assert _keys(getattr(from_shards, name)) == _keys(getattr(from_files, name)), name
    assert meta["counts"] == {prepared.TFDS_SPLITS[k]: v for k, v in from_files.counts().items()}
    assert meta["class_weights"] == pytest.approx(
        list(data.class_weights([e.label for e in from_files.train], 3).values()))
    assert all(len(f["sha256"]) == 64 for f in meta["files"]["train"])
    # 64x64 sources fit max_side: stored as they are, so the decoded pixels are identical.
    by_key = {data.record_key(e.label, e.relpath): e for e in from_files.test}
    shard_ds = data.make_dataset(from_shards.test, prepared_config.data, 50, training=False)
    file_ds = data.make_dataset([by_key[data.record_key(e.label, e.relpath)]
                                 for e in from_shards.test], small_config.data, 50, training=False)
    (xs, ys), (xf, yf) = next(iter(shard_ds)), next(iter(file_ds))
    np.testing.assert_array_equal(xs.numpy(), xf.numpy())
    np.testing.assert_array_equal(ys.numpy(), yf.numpy())
    # a subset of a split reads only its own records, in order
    subset = from_shards.test[1::2]
    x, y = next(iter(data.make_dataset(subset, prepared_config.data, 50, training=False)))
    np.testing.assert_array_equal(x.numpy(), xs.numpy()[1::2])
    np.testing.assert_array_equal(y.numpy().argmax(1), [e.label for e in subset])


READER = textwrap.dedent("""
    import json, socket, sys

    def no_network(*args, **kwargs):
        raise OSError("this process may not use the network")

    socket.socket.connect = socket.create_connection = no_network
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(sys.argv[1])
    out = {"features": sorted(builder.info.features), "splits": {},
           "classes": builder.info.features["label"].names}
    for split in builder.info.splits:
        rows = [(int(ex["label"]), ex["relpath"].numpy().decode(), ex["source"].numpy().decode(),
                 list(ex["image"].shape)) for ex in builder.as_dataset(split=split)]
        out["splits"][split] = rows
    out["trainer_imported"] = any(name.split(".")[0] == "trainer" for name in sys.modules)
    print(json.dumps(out))
""")


def test_tfds_reads_it_in_a_process_without_the_trainer(tmp_path):
    """Any TF program reads the dataset with tfds.builder_from_directory, without the network;
    its splits and class weights are training's from the folders."""
    root = demo_data.generate_database(tmp_path / demo_data.DATABASE_DIR, images_per_class=10,
                                       seed=6)
    config = config_lib.load("vanilla", overrides={"data_dir": str(root), "classes": DATABASE,
                                                   "test_per_class": 2})
    dst = tmp_path / "prepared"
    prepare.prepare(config, str(root), str(dst), max_side=32, shard_mb=1)
    proc = subprocess.run([sys.executable, "-c", READER, str(dst)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["trainer_imported"]
    assert out["features"] == ["image", "label", "relpath", "source"]
    assert out["classes"] == DATABASE
    from_files = data.make_splits(config.data)
    for ours, theirs in prepared.TFDS_SPLITS.items():
        rows = out["splits"][theirs]
        assert sorted((label, rel) for label, rel, _, _ in rows) == sorted(
            (e.label, e.relpath) for e in getattr(from_files, ours)), ours
        assert all(shape == [32, 32, 3] for _, _, _, shape in rows)  # 64 px stored at max_side
    assert {source for _, _, source, _ in out["splits"]["train"]} >= {"sirm.org", "bimcv.cipf.es"}
    train_labels = [label for label, _, _, _ in out["splits"]["train"]]
    assert data.class_weights(train_labels, 4) == pytest.approx(
        data.class_weights([e.label for e in from_files.train], 4))


def test_training_from_it_has_the_splits_and_class_weights_of_the_folders(tmp_path):
    root = demo_data.generate_database(tmp_path / demo_data.DATABASE_DIR, images_per_class=12,
                                       seed=7)
    overrides = {"classes": DATABASE, "test_per_class": 2, "image_size": 16, "batch_size": 16,
                 "epochs": 1}
    folders = config_lib.load("vanilla", overrides={**overrides, "data_dir": str(root),
                                                    "model_dir": str(tmp_path / "run-folders")})
    prepare.prepare(folders, str(root), str(tmp_path / "prepared"), max_side=64, shard_mb=1)
    from_tfds = config_lib.load("vanilla", overrides={**overrides,
                                                      "data_dir": str(tmp_path / "prepared"),
                                                      "model_dir": str(tmp_path / "run-tfds")})
    a, b = train.run(folders), train.run(from_tfds)
    assert a["counts"] == b["counts"] == {"train": [8] * 4, "val": [2] * 4, "test": [2] * 4}
    assert a["class_weights"] == pytest.approx(b["class_weights"])
    assert a["sources"]["by_source"].keys() == b["sources"]["by_source"].keys()


def _image(fmt: str, mode: str, value: int) -> bytes:
    array = (np.arange(40 * 48).reshape(40, 48) * 7 + value) % 256
    image = Image.fromarray(array.astype(np.uint8)).convert(mode) if mode != "I;16" else \
        Image.fromarray((array * 257).astype(np.uint16))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


# (file name, format, mode): every format and mode the pipeline reads
FORMATS = [("gray.png", "PNG", "L"), ("rgb.png", "PNG", "RGB"), ("rgba.png", "PNG", "RGBA"),
           ("palette.png", "PNG", "P"), ("deep.png", "PNG", "I;16"), ("gray.jpg", "JPEG", "L"),
           ("rgb.jpg", "JPEG", "RGB"), ("rgb.bmp", "BMP", "RGB"), ("palette.gif", "GIF", "P")]


def test_every_format_reads_back_as_the_same_pixels_and_through_tfds(tmp_path):
    for cls, offset in (("COVID-19", 0), ("NORMAL", 50), ("Viral Pneumonia", 100)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i, (name, fmt, mode) in enumerate(FORMATS):
            (tmp_path / "data" / cls / name).write_bytes(_image(fmt, mode, offset + 9 * i))
    config = config_lib.load("vanilla", overrides={"data_dir": str(tmp_path / "data"),
                                                   "test_per_class": 0, "validation_split": 0.0,
                                                   "image_size": 24})
    meta = prepare.prepare(config, config.data.data_dir, str(tmp_path / "p"), max_side=64,
                           shard_mb=1)
    stored = {f["path"].split("/")[-1]: f["stored"] for f in meta["files"]["train"]}
    assert stored["rgb.bmp"] == stored["palette.gif"] == "resized"  # re-encoded as PNG
    assert stored["gray.jpg"] == stored["deep.png"] == "source"
    reader = prepared.builder(str(tmp_path / "p"))
    assert list(reader.info.splits) == ["train"]  # empty splits have no files, so no entry
    for ex in reader.as_dataset(split="train"):  # TFDS's own decoding, as any program does
        assert ex["image"].shape == (40, 48, 3)
    prepared_config = _prepared_config(tmp_path / "p")
    prepared_config.data.image_size = 24
    ours = data.make_splits(prepared_config.data).train
    x_prepared, _ = next(iter(data.make_dataset(ours, prepared_config.data, 64, training=False)))
    by_key = {data.record_key(e.label, e.relpath): e for e in data.make_splits(config.data).train}
    x_files, _ = next(iter(data.make_dataset([by_key[data.record_key(e.label, e.relpath)]
                                              for e in ours], config.data, 64, training=False)))
    np.testing.assert_array_equal(x_prepared.numpy(), x_files.numpy())


def test_large_images_are_shrunk_to_max_side(small_config, tmp_path):
    meta = prepare.prepare(small_config, small_config.data.data_dir, str(tmp_path / "p"),
                           max_side=20, shard_mb=150)
    assert {f["stored"] for f in meta["files"]["train"]} == {"resized"}
    reader = prepared.builder(str(tmp_path / "p"))
    ex = next(iter(reader.as_dataset(split="train")))
    assert max(ex["image"].shape[:2]) == 20


def test_rerun_keeps_finished_shards(small_config, tmp_path):
    dst = tmp_path / "p"
    meta = prepare.prepare(small_config, small_config.data.data_dir, str(dst), max_side=64,
                           shard_mb=1)
    # An interrupted prepare: the first train shard was finished, nothing after it.
    first = dst / prepared.shard_name("train", 0)
    stamp = first.stat().st_mtime_ns
    for name in os.listdir(dst):
        if name != first.name:
            os.remove(dst / name)
    shard = {"file": first.name, "count": len(meta["files"]["train"]),
             "bytes": first.stat().st_size, "files": meta["files"]["train"]}
    (dst / prepared.PROGRESS).write_text(json.dumps(
        {"settings": meta["settings"], "shards": {"train": [shard]}}))
    with pytest.raises(DataError, match="unfinished trainer.prepare"):
        data.make_splits(_prepared_config(dst).data)
    again = prepare.prepare(small_config, small_config.data.data_dir, str(dst), max_side=64,
                            shard_mb=1)
    assert first.stat().st_mtime_ns == stamp  # kept, not rewritten
    assert again["counts"] == meta["counts"] and again["files"] == meta["files"]
    assert not (dst / prepared.PROGRESS).exists()
    assert prepare.prepare(small_config, small_config.data.data_dir, str(dst), max_side=64,
                           shard_mb=1)["created"] == again["created"]  # finished: nothing to do


def _legacy(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "cxr-tfrecord", "source": "/d"}))
    (folder / "train-00000.tfrecord").write_bytes(b"")


def _user_file(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")


def _other_settings(folder: Path, config) -> None:
    prepare.prepare(config, config.data.data_dir, str(folder), max_side=32, shard_mb=1)


def _foreign_tfds(folder: Path, config) -> None:
    _other_settings(folder, config)
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "format": "someone-else"}))


# (case, what is at the place, where it is given, error type, message)
REFUSALS = [
    ("old-format-as-dst", lambda f, c: _legacy(f), "dst", ConfigError, "earlier version (manifest.json)"),
    ("old-format-as-data", lambda f, c: _legacy(f), "data_dir", DataError,
     "prepare it again as a TFDS dataset: python -m trainer.prepare --src=/d --dst=NEW_DIR"),
    ("user-files-in-dst", lambda f, c: _user_file(f), "dst", ConfigError, "is not empty (notes.txt)"),
    ("dst-with-other-settings", _other_settings, "dst", ConfigError, "prepared with other settings"),
    ("not-our-tfds-dataset", _foreign_tfds, "data_dir", DataError, "not one written by trainer.prepare"),
    ("src-already-prepared", _other_settings, "src", ConfigError, "already a prepared directory"),
]


@pytest.mark.parametrize("case, make, where, error, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_leave_everything_as_it_was(small_config, tmp_path, case, make, where, error,
                                             message):
    place = tmp_path / "place"
    make(place, small_config)
    before = {p: p.read_bytes() for p in place.rglob("*") if p.is_file()}
    with pytest.raises(error) as err:
        if where == "data_dir":
            data.make_splits(_prepared_config(place).data)
        else:
            src = str(place) if where == "src" else small_config.data.data_dir
            dst = str(place) if where == "dst" else str(tmp_path / "new")
            prepare.prepare(small_config, src, dst, max_side=64, shard_mb=1)
    assert message in str(err.value)
    assert {p: p.read_bytes() for p in place.rglob("*") if p.is_file()} == before


def test_resume_with_other_settings_is_refused(small_config, tmp_path):
    dst = tmp_path / "p"
    dst.mkdir()
    (dst / prepared.PROGRESS).write_text(json.dumps({"settings": {"seed": 1}, "shards": {}}))
    with pytest.raises(ConfigError, match="unfinished prepare with other settings"):
        prepare.prepare(small_config, small_config.data.data_dir, str(dst), max_side=64, shard_mb=1)


# (case, mutation, flag overrides, error or None): the data check inside prepare, in the
# database layout; a prepared dataset holds exactly the splits the check returns.
PREPARE_CASES = [
    ("corrupt", corrupt, {}, "corrupt.png: not a readable image"),
    ("corrupt-skipped", corrupt, {"on_bad_image": "skip"}, None),
    ("copy-kept-together", copy_our_split_puts_apart, {}, None),
    ("two-classes", same_image_two_classes, {}, "1 images appear under two classes"),
    ("clean", lambda tree: None, {}, None),
]


@pytest.mark.parametrize("case, mutate, overrides, error", PREPARE_CASES,
                         ids=[c[0] for c in PREPARE_CASES])
def test_bad_input_in_prepare(tmp_path, case, mutate, overrides, error):
    tree = make_tree(tmp_path / "data", "database", images_per_class=12, seed=2)
    mutate(tree)
    config = config_lib.load("vanilla", overrides={"data_dir": str(tree.root), "classes": tree.classes,
                                                   "test_per_class": 2, **overrides})
    dst = tmp_path / "p"
    if error:
        with pytest.raises(DataError) as err:
            prepare.prepare(config, str(tree.root), str(dst), max_side=64, shard_mb=1)
        assert error in str(err.value)
        assert not (dst / prepared.DATASET_INFO).exists()
        return
    prepare.prepare(config, str(tree.root), str(dst), max_side=64, shard_mb=1)
    checked = datacheck.check(data.make_splits(config.data), config.data)
    stored = data.make_splits(_prepared_config(dst, tree.classes).data)
    for name in data.SPLITS:
        assert _keys(getattr(stored, name)) == _keys(getattr(checked, name)), name
    assert not any("/masks/" in e.path for e in stored.train + stored.val + stored.test)
    masks = lambda splits: {(e.label, e.relpath): e.mask for e in splits.train}  # noqa: E731
    assert masks(stored) == masks(checked) and any(masks(stored).values())  # pairing kept


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
    assert not (tmp_path / "p" / prepared.DATASET_INFO).exists()


def test_old_format_data_dir_stops_training_with_status_3(tmp_path):
    _legacy(tmp_path / "old")
    proc = subprocess.run([sys.executable, "-m", "trainer.task", f"--data_dir={tmp_path / 'old'}",
                           f"--model_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 3, proc.stderr
    assert "error:" in proc.stderr and "python -m trainer.prepare" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_prepare_into_the_bucket_and_train_from_its_shards(gcs, small_config, tmp_path):
    dst = gcs.fresh("prepared")
    meta = prepare.prepare(small_config, small_config.data.data_dir, dst, max_side=32, shard_mb=1)
    assert {"dataset_info.json", "metadata.json", "features.json",
            prepared.shard_name("train", 0)} <= set(gcs.blob_names(dst))
    assert "progress.json" not in gcs.blob_names(dst)
    small_config.data.data_dir = dst
    small_config.train.epochs = 2
    results = train.run(small_config)
    assert {prepared.TFDS_SPLITS[k]: v for k, v in results["counts"].items()} == meta["counts"]
    assert results["class_weights"] == pytest.approx(meta["class_weights"])
    assert Path(small_config.output.model_dir, "metrics.json").exists()
    shutil.rmtree(small_config.output.model_dir)


def test_entry_points_import_tfds_only_when_they_use_it():
    """tensorflow_datasets (and openpyxl) load only for prepared data (and metadata sheets)."""
    code = ("import sys, trainer.task, trainer.prepare, trainer.evaluate, trainer.predict; "
            "print(sorted(m for m in ('tensorflow_datasets', 'openpyxl') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_prepared_splits_follow_val_and_holdout_sources(tmp_path):
    """A class the val source lacks is validated on validation_split in the shards too."""
    from conftest import tree_with_sources
    root = tree_with_sources(tmp_path / "data", ("a", "b"), ("k", "m"))
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root), "image_size": 16, "test_per_class": 2, "validation_split": 0.25,
        "val_sources": ["m"], "holdout_sources": ["b"]})
    dst = str(tmp_path / "prepared")
    prepare.prepare(config, str(root), dst, max_side=64, shard_mb=1)
    from_files = data.make_splits(config.data)
    from_shards = data.make_splits(_prepared_config(dst).data)
    assert from_shards.counts()["val"] == from_files.counts()["val"] == [2, 10, 10]
    for name in data.SPLITS:
        assert _keys(getattr(from_shards, name)) == _keys(getattr(from_files, name)), name
