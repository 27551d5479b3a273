"""trainer.pull against the loopback GCS: download, skip, verify, refuse to overwrite."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import pull, storage
from trainer.errors import ConfigError

pytest_plugins = ["tests.gcs_fixture"]

RUN = {
    "config.yaml": b"data: {}\n",
    "metrics.json": b'{"test": {"accuracy": 0.5}}',
    "history.csv": b"epoch,loss\n1,0.9\n",
    "checkpoints/best.keras": os.urandom(300_000),
    "checkpoints/best.json": b'{"epoch": 1}',
    "checkpoints/last.keras": os.urandom(200_000),
    "logs/train/events.out": b"events",
}


@pytest.fixture
def bucket_run(gcs) -> str:
    url = gcs.fresh("run")
    bucket, prefix = storage.split_gcs_url(url)
    client = gcs.client()
    for name, content in RUN.items():
        client.bucket(bucket).blob(f"{prefix}/{name}").upload_from_string(content)
    return url


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_pull_downloads_then_skips_what_matches(bucket_run, tmp_path):
    dest = tmp_path / "run"
    first = pull.pull(bucket_run, str(dest))
    assert _tree(dest) == RUN
    assert len(first.download) == len(RUN) and not first.same
    again = pull.pull(bucket_run, str(dest))
    assert not again.download and len(again.same) == len(RUN)


def test_best_only(bucket_run, tmp_path):
    pull.pull(bucket_run, str(tmp_path / "run"), best_only=True)
    assert set(_tree(tmp_path / "run")) == set(RUN) - {"checkpoints/last.keras",
                                                         "logs/train/events.out"}


def test_a_different_local_file_is_never_replaced_without_force(bucket_run, tmp_path):
    dest = tmp_path / "run"
    (dest / "checkpoints").mkdir(parents=True)
    (dest / "checkpoints" / "best.keras").write_bytes(b"my own model")
    with pytest.raises(ConfigError, match=r"1 local files differ .*best.keras.*--force"):
        pull.pull(bucket_run, str(dest))
    assert _tree(dest) == {"checkpoints/best.keras": b"my own model"}  # nothing downloaded
    pull.pull(bucket_run, str(dest), force=True)
    assert _tree(dest) == RUN


def test_a_corrupted_download_is_refused_and_leaves_nothing(gcs, bucket_run, tmp_path):
    dest = tmp_path / "run"
    # The proxy answers the next media download with wrong bytes (and no hash header).
    gcs.proxy.fail_next(1, status=200, path_contains="best.keras", method="GET",
                        body=b"not the model")
    with pytest.raises(pull.TransferError, match="best.keras"):
        pull.pull(bucket_run, str(dest), best_only=True)
    gcs.proxy.clear_faults()
    assert not (dest / "checkpoints" / "best.keras").exists()
    assert not list(dest.rglob("*.partial"))
    pull.pull(bucket_run, str(dest), best_only=True)  # a re-run completes
    assert (dest / "checkpoints" / "best.keras").read_bytes() == RUN["checkpoints/best.keras"]


def test_cli_refusal_is_one_line_with_status_2(gcs, bucket_run, tmp_path):
    dest = tmp_path / "run"
    dest.mkdir()
    (dest / "metrics.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "trainer.pull", bucket_run, str(dest)],
                          capture_output=True, text=True, timeout=120,
                          env=gcs.child_env(TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--force" in errors[0] and "Traceback" not in proc.stderr
    assert (dest / "metrics.json").read_text() == "{}"
