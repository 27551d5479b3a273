"""gs:// end to end against the loopback GCS (tests/gcs_fixture.py): TensorFlow's own gs://
client through the TLS proxy, a training run with data_dir and model_dir in the bucket that
is SIGKILLed and resumes from its gs:// backup, and the finished run read back from there."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from trainer import checkpoints, config as config_lib, data, storage, train

pytest_plugins = ["tests.gcs_fixture"]

EPOCHS = 5
# What a finished local run leaves (tests/test_train.py checks the same list locally).
RUN_FILES = {"config.yaml", "metrics.json", "history.csv", "checkpoints/best.keras",
             "checkpoints/best.json", "checkpoints/last.keras"}


def test_tensorflow_gs_io_goes_through_the_proxy(gcs):
    base = gcs.fresh("io")
    gcs.proxy.reset_log()
    payload = os.urandom(3_000_000)  # several upload chunks
    with tf.io.gfile.GFile(f"{base}/a/b.bin", "wb") as f:
        f.write(payload)
    assert storage.read_bytes(f"{base}/a/b.bin") == payload  # no chunk framing stored
    assert {s.host for s in gcs.proxy.seen} >= {"www.googleapis.com", "storage.googleapis.com"}
    # Injected faults: TensorFlow retries a 503 on its own.
    gcs.proxy.fail_next(2, status=503, method="GET", path_contains="b.bin")
    assert storage.read_bytes(f"{base}/a/b.bin") == payload
    assert sum(s.injected for s in gcs.proxy.seen) == 2


@pytest.fixture(scope="module")
def gs_data(gcs_server, tmp_path_factory) -> str:
    from trainer import demo_data
    local = tmp_path_factory.mktemp("demo") / "data"
    demo_data.generate(local, images_per_class=20, seed=3)
    url = gcs_server.fresh("data")
    with pytest.MonkeyPatch.context() as patch:
        gcs_server.route(patch)
        assert storage.copy_tree(str(local), url) >= 60  # the images (and a README)
    return url


def _history(gcs, url: str) -> list[dict]:
    """history.csv read with google-cloud-storage (no TensorFlow stat cache in the way)."""
    bucket, name = storage.split_gcs_url(f"{url}/history.csv")
    blob = gcs.client().bucket(bucket).blob(name)
    if not blob.exists():
        return []
    return list(csv.DictReader(io.StringIO(blob.download_as_text())))


def _task(gcs, args: list[str]) -> subprocess.Popen:
    env = gcs.child_env(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def gs_run(gcs_server, gs_data) -> dict:
    """A run with data and model_dir in the bucket, SIGKILLed after two epochs, then resumed."""
    with pytest.MonkeyPatch.context() as patch:
        gcs_server.route(patch)  # for _history's client in this process
        return _killed_and_resumed_run(gcs_server, gs_data)


def _killed_and_resumed_run(gcs, gs_data: str) -> dict:
    url = gcs.fresh("run")
    args = ["--model=vanilla", f"--data_dir={gs_data}", f"--model_dir={url}", "--image_size=16",
            "--test_per_class=4", "--batch_size=8", f"--epochs={EPOCHS}", "--patience=100"]
    first = _task(gcs, args)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and len(_history(gcs, url)) < 2:
        time.sleep(0.5)
    assert first.poll() is None, "the run ended before it could be killed:\n" + first.stdout.read()
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = {"epochs_done": len(_history(gcs, url)), "objects": gcs.blob_names(url)}
    second = _task(gcs, args)
    out, _ = second.communicate(timeout=600)
    return {"url": url, "args": args, "killed": killed, "returncode": second.returncode,
            "out": out}


def test_sigkilled_gs_run_resumes_from_its_gs_backup(gcs, gs_run):
    assert gs_run["returncode"] == 0, gs_run["out"]
    killed = gs_run["killed"]
    assert "metrics.json" not in killed["objects"]
    assert any(name.startswith("backup/") for name in killed["objects"]), killed["objects"]
    out = gs_run["out"]
    assert "resuming the interrupted run" in out
    first_epoch = int(out.split("Epoch ", 1)[1].split("/", 1)[0])
    assert first_epoch >= killed["epochs_done"]  # from the gs:// backup, not from epoch 1
    assert [int(r["epoch"]) for r in _history(gcs, gs_run["url"])] == list(range(1, EPOCHS + 1))


def test_gs_run_has_the_artifacts_of_a_local_run(gcs, gs_run):
    names = set(gcs.blob_names(gs_run["url"]))
    assert RUN_FILES <= names, sorted(names)
    assert any(n.startswith("logs/train/") and "tfevents" in n for n in names)
    assert not any(n.startswith("backup/") for n in names)  # completed: nothing to resume
    assert not any(n.endswith((".tmp", ".partial")) for n in names)


def test_gs_run_checkpoint_reproduces_its_metrics(gcs, gs_run):
    url = gs_run["url"]
    config = config_lib.from_yaml_text(storage.read_text(f"{url}/config.yaml"), "config.yaml")
    saved = json.loads(storage.read_text(f"{url}/metrics.json"))
    best = checkpoints.load(f"{url}/checkpoints/best.keras")
    again = train.evaluate(best, data.make_splits(config.data).test, config)
    for name, value in saved["test"].items():
        assert again["test"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert again["confusion_matrix"] == saved["confusion_matrix"]


def test_evaluate_command_reads_a_gs_run(gcs, gs_run):
    from trainer import evaluate
    url = gs_run["url"]
    saved = json.loads(storage.read_text(f"{url}/metrics.json"))
    out_dir, results = evaluate.evaluate(evaluate.Options(model_dir=url))
    assert out_dir.startswith(url)
    assert storage.exists(storage.join(out_dir, "metrics.json"))
    assert results["confusion_matrix"] == saved["confusion_matrix"]


def test_transient_503s_are_retried_and_the_run_still_succeeds(gcs, gs_data):
    """Fault injection: the bucket answers 503 to a few reads and a few writes of a run."""
    url = gcs.fresh("flaky")
    config = config_lib.load("vanilla", overrides={
        "data_dir": gs_data, "model_dir": url, "image_size": 16, "test_per_class": 4,
        "batch_size": 16, "epochs": 2})
    gcs.proxy.reset_log()
    gcs.proxy.fail_next(3, status=503, method="GET", path_contains=".png")  # image reads
    gcs.proxy.fail_next(2, status=503, method="POST")  # starting uploads (config, checkpoints)
    # Not PUT: after a failed upload chunk TensorFlow asks for the upload's status, which the
    # emulator answers wrongly (HTTP 400 "Invalid Content-Range"); real GCS supports it.
    results = train.run(config)
    injected = [s for s in gcs.proxy.seen if s.injected]
    assert len(injected) == 5, injected
    saved = json.loads(storage.read_text(f"{url}/metrics.json"))
    assert saved["test"] == results["test"]
    for name in RUN_FILES:
        assert storage.exists(f"{url}/{name}"), name
