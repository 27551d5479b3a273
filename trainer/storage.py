"""Path helpers that treat local paths and gs:// alike (through tf.io.gfile), and bulk
downloads from a bucket (google-cloud-storage)."""
from __future__ import annotations

import dataclasses
import os
import posixpath

import tensorflow as tf


def is_remote(path: str) -> bool:
    return "://" in path


def join(*parts: str) -> str:
    return posixpath.join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
    return tf.io.gfile.isdir(path)


def listdir(path: str) -> list[str]:
    """Entries of a folder, without the trailing '/' that gs:// listings add."""
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path))


def makedirs(path: str) -> None:
    tf.io.gfile.makedirs(path)


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def write_text_atomic(path: str, text: str) -> None:
    """Writes to a temporary name, then renames, so readers never see half a file."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def remove_tree(path: str) -> None:
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def walk_files(root: str) -> list[str]:
    """Every file below ``root``, as paths relative to it with '/' separators, sorted.

    Local trees are walked following symlinks, and a link back into a folder already being
    walked is an error (tf.io.gfile.walk would loop forever on it).
    """
    if is_remote(root):
        found = []
        for folder, _, files in tf.io.gfile.walk(root):
            rel = folder[len(root.rstrip("/")):].strip("/")
            found += [posixpath.normpath(posixpath.join(rel, name)) for name in files]
        return sorted(found)
    return sorted(_walk_local(root, root, frozenset()))


def _walk_local(root: str, folder: str, ancestors: frozenset) -> list[str]:
    real = os.path.realpath(folder)
    if real in ancestors:
        raise SymlinkLoopError(f"symlink loop: {folder} leads back to {real}")
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():  # follows symlinks
            found += _walk_local(root, entry.path, ancestors | {real})
        elif entry.is_file():
            found.append(os.path.relpath(entry.path, root).replace(os.sep, "/"))
    return found


class SymlinkLoopError(OSError):
    """A folder tree whose symlinks lead back into itself."""


def copy_tree(src: str, dst: str, overwrite: bool = False) -> int:
    """Copies every file below ``src`` to the same place below ``dst`` (local or gs:// on either
    side, through tf.io.gfile); returns the number of files copied."""
    files = walk_files(src)
    for rel in files:
        target = join(dst, *rel.split("/"))
        parent = posixpath.dirname(target) if is_remote(target) else os.path.dirname(target)
        if not is_remote(target):
            makedirs(parent)
        tf.io.gfile.copy(join(src, *rel.split("/")), target, overwrite=overwrite)
    return len(files)


# Bulk transfers from a bucket use google-cloud-storage (imported only when needed): it lists
# objects with their size and CRC32C in one call, which tf.io.gfile cannot. Credentials come
# from the environment only (Application Default Credentials, Workload Identity).


@dataclasses.dataclass(frozen=True)
class RemoteObject:
    """One object below a gs:// prefix: its name relative to the prefix, size and CRC32C
    (base64, as the JSON API reports it)."""

    name: str
    size: int
    crc32c: str


def split_gcs_url(url: str) -> tuple[str, str]:
    """gs://bucket/some/prefix -> ('bucket', 'some/prefix')."""
    if not url.startswith("gs://") or len(url) <= len("gs://"):
        raise ValueError(f"not a gs:// URL: {url}")
    bucket, _, name = url[len("gs://"):].partition("/")
    return bucket, name.strip("/")


def gcs_client():
    from google.cloud import storage as gcs  # bulk transfers only
    return gcs.Client()


def list_objects(url: str, client=None) -> list[RemoteObject]:
    """Every object below the gs:// prefix ``url`` (folder markers left out), sorted by name."""
    bucket, prefix = split_gcs_url(url)
    prefix = prefix + "/" if prefix else ""
    client = client or gcs_client()
    found = [RemoteObject(blob.name[len(prefix):], int(blob.size or 0), blob.crc32c or "")
             for blob in client.list_blobs(bucket, prefix=prefix)
             if not blob.name.endswith("/")]
    return sorted(found, key=lambda o: o.name)


def download_object(url: str, local_path: str, client=None) -> None:
    """Downloads one gs:// object to ``local_path`` (the library checks its CRC32C too)."""
    bucket, name = split_gcs_url(url)
    client = client or gcs_client()
    client.bucket(bucket).blob(name).download_to_filename(local_path, checksum="crc32c")


def crc32c_of_file(path: str) -> str:
    """A local file's CRC32C, base64 of the big-endian value (as GCS reports it)."""
    import base64

    import google_crc32c
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode()
