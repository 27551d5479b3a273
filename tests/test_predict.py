"""python -m trainer.predict on good and bad files, in every output format."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import float_input_model
from trainer import checkpoints, config as config_lib, models, predict
from trainer.errors import ConfigError

CLASSES = ["COVID-19", "NORMAL", "Viral Pneumonia"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with an (untrained) checkpoint: enough to predict with."""
    root = tmp_path_factory.mktemp("predict") / "run"
    config = config_lib.load("vanilla", overrides={"image_size": 16, "model_dir": str(root)})
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(config_lib.to_yaml(config))
    model = models.build(config.model, 16, 3)  # uncompiled: no optimizer state to skip on load
    checkpoints.save(model, str(root / "checkpoints" / "best.keras"))
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8)
    (root / "folder" / "sub").mkdir(parents=True)
    paths = {"png": root / "a.png", "jpeg": root / "b.jpg", "gray": root / "folder" / "c.png",
             "nested": root / "folder" / "sub" / "d.bmp"}
    Image.fromarray(pixels).save(paths["png"])
    Image.fromarray(pixels).save(paths["jpeg"])
    Image.fromarray(pixels[..., 0]).save(paths["gray"])
    Image.fromarray(pixels).save(paths["nested"])
    (root / "text.png").write_text("not an image")
    truncated = paths["png"].read_bytes()
    (root / "truncated.png").write_bytes(truncated[:len(truncated) // 3])
    (root / "empty").mkdir()
    (root / "folder" / "notes.txt").write_text("ignored: not an image extension")
    for sub in ("images", "masks"):  # a class folder of the current database
        (root / "COVID" / sub).mkdir(parents=True)
    paths["xray"] = root / "COVID" / "images" / "COVID-1.png"
    Image.fromarray(pixels[..., 0]).save(paths["xray"])
    Image.fromarray(pixels[..., 0] > 128).save(root / "COVID" / "masks" / "COVID-1.png")
    out = {k: str(v) for k, v in paths.items()}
    out.update(text=str(root / "text.png"), truncated=str(root / "truncated.png"),
               missing=str(root / "missing.png"), folder=str(root / "folder"),
               empty=str(root / "empty"), database_class=str(root / "COVID"))
    return out


CASES = [
    (["png"], ["png"], []),
    (["png", "jpeg"], ["png", "jpeg"], []),
    (["folder"], ["gray", "nested"], []),
    (["database_class"], ["xray"], []),  # its mask is no image to predict
    (["text", "png"], ["png"], ["text.png: cannot read it as an image"]),
    (["truncated", "jpeg"], ["jpeg"], ["truncated.png: cannot read it as an image"]),
    (["missing", "png"], ["png"], ["missing.png: no such file or folder"]),
    (["empty"], [], ["folder holds no images"]),
]


@pytest.mark.parametrize("given, predicted, errors", CASES)
def test_good_files_are_predicted_and_bad_ones_reported(run_dir, files, given, predicted, errors):
    text, bad = predict.predict(str(run_dir), [files[k] for k in given], kind="json")
    rows = json.loads(text) if text else []
    assert [r["path"] for r in rows] == [files[k] for k in predicted]
    for row in rows:
        assert set(row["probabilities"]) == set(CLASSES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["class"] == max(row["probabilities"], key=row["probabilities"].get)
    assert len(bad) == len(errors)
    for line, expected in zip(bad, errors):
        assert expected in line and "\n" not in line and "{{" not in line


def test_formats_agree(run_dir, files):
    paths = [files["png"], files["jpeg"]]
    rows = json.loads(predict.predict(str(run_dir), paths, kind="json")[0])
    table = list(csv.DictReader(io.StringIO(predict.predict(str(run_dir), paths, kind="csv")[0])))
    plain = predict.predict(str(run_dir), paths, kind="table")[0].splitlines()
    assert [r["path"] for r in table] == paths and plain[0].split()[:2] == ["path", "class"]
    for row, line, entry in zip(rows, plain[1:], table):
        words = row["class"].split()  # "Viral Pneumonia" is two words in the table
        assert entry["class"] == row["class"] and line.split()[1:1 + len(words)] == words
        for c in CLASSES:
            assert float(entry[c]) == pytest.approx(row["probabilities"][c], abs=1e-6)


def test_no_images_given_is_a_usage_error(run_dir):
    with pytest.raises(ConfigError, match="no images given"):
        predict.predict(str(run_dir), [])


def test_cli_reports_bad_files_and_continues(run_dir, files):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "trainer.predict", f"--model_dir={run_dir}",
                           "--format=csv", files["text"], files["png"], files["missing"]],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["path"] for r in rows] == [files["png"]]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr


def test_a_float_input_checkpoint_still_gets_unit_range_images(files, tmp_path):
    """Checkpoints written before models took uint8 pixels are fed [0, 1] floats, as then."""
    from trainer import data
    old = float_input_model(16)
    results, errors = predict.predict_files(old, [files["png"]], 16, "bilinear")
    expected = old.predict(data.decode_image(Path(files["png"]).read_bytes(), 16)[None], verbose=0)
    assert not errors
    np.testing.assert_allclose(results[0][1], expected[0], rtol=1e-6)


def test_cli_console_shows_no_tensorflow_start_up_lines(run_dir, files):
    """Without the user's TF_CPP_MIN_LOG_LEVEL, TensorFlow's import and device start print
    nothing (on a CPU machine they printed a cuInit 'E0000' line and CUDA-driver notices)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "trainer.predict", f"--model_dir={run_dir}",
                           files["png"]], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[1].startswith(files["png"])


def _tree(root: Path, kind: str) -> str:
    """A data folder of the given kind for the synthetic-data cases."""
    from trainer import demo_data
    if kind == "demo":
        demo_data.generate(root / "demo", images_per_class=2)
        return str(root / "demo")
    if kind == "prepared-demo":
        (root / "prepared").mkdir()
        (root / "prepared" / "metadata.json").write_text(json.dumps(
            {"source": _tree(root, "demo")}))
        return str(root / "prepared")
    if kind == "own":
        (root / "own" / "NORMAL").mkdir(parents=True)
        return str(root / "own")
    return kind  # "" or a bucket path: not looked into


@pytest.mark.parametrize("recorded, data_dir, warns", [
    (True, "", True),                   # recorded in config.yaml by trainer.task
    (False, "demo", True),              # a run from before it was recorded: the tree says so
    (False, "prepared-demo", True),     # prepared from the demo tree
    (False, "own", False),
    (False, "", False),
    (False, "gs://bucket/cxr", False),
])
def test_runs_on_the_synthetic_demo_data_are_recognised(tmp_path, recorded, data_dir, warns):
    from trainer import runs
    config = config_lib.load("vanilla", overrides={"data_dir": _tree(tmp_path, data_dir)})
    config.data.synthetic = recorded
    warning = runs.synthetic_warning(config, "RUN")
    assert (warning is not None) is warns
    if warns:
        assert warning.startswith("RUN was trained on the built-in SYNTHETIC demo data")


def test_predict_on_a_demo_run_warns_on_stderr_every_time(run_dir, files, tmp_path, capsys):
    demo_run = tmp_path / "demo-run"
    (demo_run / "checkpoints").mkdir(parents=True)
    (demo_run / "checkpoints" / "best.keras").symlink_to(run_dir / "checkpoints" / "best.keras")
    config = config_lib.from_yaml_text((run_dir / "config.yaml").read_text(), "config.yaml")
    config.data.synthetic = True
    (demo_run / "config.yaml").write_text(config_lib.to_yaml(config))
    for _ in range(2):
        text, errors = predict.predict(str(demo_run), [files["png"]], kind="json")
        assert json.loads(text)[0]["path"] == files["png"] and not errors  # stdout stays data
        err = capsys.readouterr().err
        assert err.startswith(f"warning: {demo_run} was trained on the built-in SYNTHETIC demo")
        assert len(err.splitlines()) == 1


@pytest.mark.parametrize("classes", [CLASSES, ["Lung Opacity (bacterial pneumonia)", "NORMAL"]])
def test_table_shows_class_names_in_full(classes):
    probs = [1.0 / len(classes)] * len(classes)
    head, row = predict.format_results([("a.png", probs)], classes, "table").splitlines()
    assert all(c in head for c in classes)
    assert len(row) == len(head)
