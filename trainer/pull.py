"""``python -m trainer.pull gs://bucket/runs/NAME [DEST]``: bring a run's artifacts from the bucket.

Downloads everything below the run (or, with ``--best_only``, what is needed to use and judge
the best model: config.yaml, checkpoints/best.*, metrics.json, history.csv and export/), with
progress. A local file whose size and CRC32C already match is skipped; each download is
verified against the object's CRC32C before it replaces anything; a local file that differs
is never replaced without ``--force`` (the command then stops before downloading anything).
DEST defaults to ./runs/NAME. Credentials come from the environment only. TensorFlow (behind
trainer.storage) is imported inside the functions, after the flags are parsed.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import flags, logging

from trainer import cli, helptext
from trainer.errors import ConfigError, ExitStatus, TrainerError

BEST_ONLY = ("config.yaml", "metrics.json", "history.csv", "checkpoints/best.keras",
             "checkpoints/best.json")
BEST_ONLY_FOLDERS = ("export/",)

flags.DEFINE_boolean("best_only", False, "Only config.yaml, the best checkpoint, metrics.json, "
                     "history.csv and export/ (no last checkpoint, logs or backup).")
flags.DEFINE_boolean("force", False, "Replace local files that differ from the bucket's.")

USAGE = helptext.Usage(
    ("python -m trainer.pull gs://BUCKET/runs/NAME [DEST] [--best_only] [--force]",
     "python -m trainer.pull gs://my-bucket/runs/v1    (into ./runs/v1)",
     "python -m trainer.pull gs://my-bucket/runs/v1 /tmp/v1 --best_only"),
    ("best_only", "force"))


class TransferError(TrainerError):
    """A download that failed or did not match its checksum."""


@dataclasses.dataclass
class Plan:
    download: list  # RemoteObject
    same: list
    conflicts: list  # local files that differ

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.download)


def wanted(name: str, best_only: bool) -> bool:
    return not best_only or name in BEST_ONLY or name.startswith(BEST_ONLY_FOLDERS)


def default_dest(url: str) -> str:
    from trainer import storage
    _, prefix = storage.split_gcs_url(url)
    return os.path.join("runs", prefix.rsplit("/", 1)[-1] or "run")


def local_path(dest: str, name: str) -> str:
    return os.path.join(dest, *name.split("/"))


def same_file(path: str, obj: storage.RemoteObject) -> bool:
    from trainer import storage
    return os.path.getsize(path) == obj.size and storage.crc32c_of_file(path) == obj.crc32c


def plan(objects: list, dest: str) -> Plan:
    result = Plan([], [], [])
    for obj in objects:
        path = local_path(dest, obj.name)
        if not os.path.exists(path):
            result.download.append(obj)
        elif os.path.isfile(path) and same_file(path, obj):
            result.same.append(obj)
        else:
            result.conflicts.append(obj)
    return result


def fetch(url: str, obj: storage.RemoteObject, dest: str, client) -> None:
    """Downloads beside the target, checks the CRC32C, then renames over it."""
    from trainer import storage
    path = local_path(dest, obj.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    try:
        storage.download_object(f"{url.rstrip('/')}/{obj.name}", partial, client)
        got = storage.crc32c_of_file(partial)
        if obj.crc32c and got != obj.crc32c:
            raise TransferError(f"{url}/{obj.name}: downloaded file's CRC32C {got} does not "
                                f"match the bucket's {obj.crc32c}; nothing replaced, run again")
        os.replace(partial, path)
    except TransferError:
        raise
    except Exception as err:  # network, permission, library checksum failure
        raise TransferError(f"{url}/{obj.name}: download failed ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}); run again "
                            "to resume") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def pull(url: str, dest: str | None = None, best_only: bool = False, force: bool = False,
         client=None) -> Plan:
    """Brings the run at ``url`` to ``dest``; returns what was planned (downloaded, skipped)."""
    from trainer import storage
    if not url.startswith("gs://") or not storage.split_gcs_url(url)[1]:
        raise ConfigError(f"expected a run in a bucket, gs://BUCKET/PATH; got {url!r}")
    dest = dest or default_dest(url)
    client = client or storage.gcs_client()
    objects = [o for o in storage.list_objects(url, client) if wanted(o.name, best_only)]
    objects = [o for o in objects if not o.name.endswith((".tmp", ".partial"))]
    if not objects:
        raise ConfigError(f"{url}: no run artifacts found there")
    todo = plan(objects, dest)
    if todo.conflicts and not force:
        names = ", ".join(o.name for o in todo.conflicts[:5])
        more = f" and {len(todo.conflicts) - 5} more" if len(todo.conflicts) > 5 else ""
        raise ConfigError(f"{dest}: {len(todo.conflicts)} local files differ from the bucket's "
                          f"({names}{more}); pass --force to replace them, or choose another "
                          "DEST")
    todo.download += todo.conflicts
    logging.info("%s -> %s: %d files to download (%.1f MB), %d already up to date", url, dest,
                 len(todo.download), todo.bytes / 1e6, len(todo.same))
    start, done = time.time(), 0
    for i, obj in enumerate(todo.download, 1):
        fetch(url, obj, dest, client)
        done += obj.size
        elapsed = max(time.time() - start, 1e-9)
        rate = done / elapsed
        eta = (todo.bytes - done) / rate if rate else 0
        print(f"pull: {i}/{len(todo.download)} files, {done / 1e6:.1f}/{todo.bytes / 1e6:.1f} MB, "
              f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f}s  {obj.name}", file=sys.stderr, flush=True)
    logging.info("pulled %s into %s (%d downloaded and verified, %d skipped)", url, dest,
                 len(todo.download), len(todo.same))
    return todo


def pull_from_flags(argv: list[str]) -> int | None:
    if len(argv) not in (2, 3):
        print("error: usage: python -m trainer.pull gs://BUCKET/runs/NAME [DEST] "
              "[--best_only] [--force]", file=sys.stderr)
        return ExitStatus.USAGE
    pull(argv[1], argv[2] if len(argv) == 3 else None, flags.FLAGS.best_only, flags.FLAGS.force)
    return None


def run() -> None:
    cli.run(pull_from_flags, usage=USAGE, positional=True)


if __name__ == "__main__":
    run()
