"""MultiWorkerMirroredStrategy with two real ``python -m trainer.task`` processes on loopback:
a complete run, and SIGKILL of both workers mid-training followed by a resume."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.yaml", "checkpoints", "logs", "history.csv", "metrics.json"}
if importlib.util.find_spec("trainer.export"):  # the serving export, where the trainer has it
    RUN_FILES.add("export")
TIMEOUT = 600  # two TensorFlow processes share two busy cores: be generous


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from trainer import demo_data
    root = tmp_path_factory.mktemp("mw-data")
    demo_data.generate(root, images_per_class=20, seed=2)
    return root


class Cluster:
    """Two worker processes (worker 0 is the chief) sharing one model_dir, each with its own
    TMPDIR so that what a worker leaves behind can be seen."""

    def __init__(self, root: Path, data_dir: Path, epochs: int, *extra: str):
        self.root, self.model_dir = root, root / "run"
        self.args = [sys.executable, "-m", "trainer.task", "--model=vanilla",
                     f"--data_dir={data_dir}", f"--model_dir={self.model_dir}", "--image_size=16",
                     "--test_per_class=4", "--batch_size=4", f"--epochs={epochs}",
                     "--patience=100", "--strategy=multi_worker", *extra]
        self.procs: list[subprocess.Popen] = []
        self.attempt = 0

    def tmpdir(self, index: int) -> Path:
        """A fresh TMPDIR per attempt, as a restarted pod gets (SIGKILL cleans up nothing)."""
        return self.root / f"tmp{index}-attempt{self.attempt}"

    def log(self, index: int) -> Path:
        return self.root / f"worker{index}-attempt{self.attempt}.log"

    def start(self) -> None:
        self.attempt += 1
        workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]  # new ports, as new pods would get
        self.procs = []
        for index in range(2):
            self.tmpdir(index).mkdir(exist_ok=True)
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO),
                   "TMPDIR": str(self.tmpdir(index)),
                   "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                            "task": {"type": "worker", "index": index}})}
            with open(self.log(index), "w") as out:
                self.procs.append(subprocess.Popen(self.args, cwd=REPO, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))

    def wait(self) -> list[int]:
        try:
            return [p.wait(timeout=TIMEOUT) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def text(self, index: int) -> str:
        return self.log(index).read_text()


def _history_epochs(model_dir: Path) -> list[int]:
    with open(model_dir / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _assert_complete(cluster: Cluster, epochs: int) -> None:
    model_dir = cluster.model_dir
    assert RUN_FILES <= set(os.listdir(model_dir)), os.listdir(model_dir)
    assert not (model_dir / "backup").exists()  # removed once training completed
    assert {"best.keras", "last.keras", "best.json"} <= set(os.listdir(model_dir / "checkpoints"))
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["test"]["tp"] + metrics["test"]["fn"] == 12  # 4 test images x 3 classes
    assert _history_epochs(model_dir) == list(range(1, epochs + 1))
    assert os.listdir(cluster.tmpdir(1)) == []  # the non-chief worker left nothing behind
    assert not list(model_dir.rglob("workertemp_*"))


def test_two_workers_train_and_the_chief_writes_the_run(tmp_path, data_dir):
    cluster = Cluster(tmp_path, data_dir, 2)
    cluster.start()
    codes = cluster.wait()
    assert codes == [0, 0], cluster.text(0)[-3000:] + cluster.text(1)[-3000:]
    _assert_complete(cluster, 2)
    chief, worker = cluster.text(0), cluster.text(1)
    assert "replicas: 2" in chief and "global batch 8 = 4 per replica x 2 replicas" in chief
    assert "this is worker 0 (chief)" in chief and "this is worker 1 (non-chief)" in worker
    assert "Test metrics" in chief and "Test metrics" not in worker
    # 9 validation images on one device of the chief, its figures shared with the worker.
    with open(cluster.model_dir / "history.csv") as f:
        assert all(float(r["val_tp"]) + float(r["val_fn"]) == 9 for r in csv.DictReader(f))
    val_losses = [re.findall(r"Epoch \d+/2 .*val_loss: ([0-9.]+)", log) for log in (chief, worker)]
    assert len(val_losses[0]) == 2 and val_losses[0] == val_losses[1], val_losses


def _saved_epoch(model_dir: Path) -> int | None:
    """The last epoch (1-based) in the chief's backup checkpoint, once one exists."""
    folder = model_dir / "backup" / "chief"
    if not (folder / "checkpoint").is_file():
        return None
    code = ("import sys, tensorflow as tf; r = tf.train.load_checkpoint(sys.argv[1]); "
            "print([int(r.get_tensor(k)) for k in r.get_variable_to_shape_map() "
            "if k.startswith('ckpt_saved_epoch')][0])")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return int(done.stdout.split()[-1]) + 1 if done.returncode == 0 else None


def _wait_for_first_backup(cluster) -> None:
    """Until the chief's backup exists, while both workers still run."""
    deadline = time.monotonic() + TIMEOUT
    while not (cluster.model_dir / "backup" / "chief" / "checkpoint").is_file():
        assert time.monotonic() < deadline, "no backup was written"
        assert all(p.poll() is None for p in cluster.procs), cluster.text(0)[-3000:]
        time.sleep(0.2)


def test_sigkill_both_workers_then_restart_resumes_and_completes(tmp_path, data_dir):
    epochs = 30
    cluster = Cluster(tmp_path, data_dir, epochs)
    cluster.start()
    _wait_for_first_backup(cluster)
    cluster.kill()  # SIGKILL both mid-training: no chance to save anything more
    saved = _saved_epoch(cluster.model_dir)
    assert saved is not None and saved < epochs

    cluster.start()
    codes = cluster.wait()
    assert codes == [0, 0], cluster.text(0)[-3000:] + cluster.text(1)[-3000:]
    for index in range(2):
        first = re.search(r"Epoch (\d+)/%d" % epochs, cluster.text(index))
        assert first and int(first.group(1)) == saved + 1, (saved, cluster.text(index)[-2000:])
    assert "resuming the interrupted run" in cluster.text(0)
    _assert_complete(cluster, epochs)


def test_a_lost_worker_ends_its_peer_with_exit_75(tmp_path, data_dir):
    """SIGKILL one worker: the other fails inside a collective and exits 75 (retry), so the Job
    restarts both pods and they resume from the backup (as in the test above)."""
    cluster = Cluster(tmp_path, data_dir, 30)
    cluster.start()
    _wait_for_first_backup(cluster)
    cluster.procs[1].send_signal(signal.SIGKILL)
    try:
        code = cluster.procs[0].wait(timeout=TIMEOUT)
    finally:
        cluster.kill()
    assert code == 75, cluster.text(0)[-3000:]
    assert "error: lost contact with another worker" in cluster.text(0)
    assert (cluster.model_dir / "backup" / "chief" / "checkpoint").is_file()  # kept for the restart
