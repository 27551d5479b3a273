"""Path helpers that treat local paths and gs:// alike (through tf.io.gfile)."""
from __future__ import annotations

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
    """Every file below ``root``, as paths relative to it with '/' separators, sorted."""
    found = []
    for folder, _, files in tf.io.gfile.walk(root):
        rel = os.path.relpath(folder, root) if not is_remote(root) else \
            folder[len(root.rstrip("/")):].strip("/")
        for name in files:
            found.append(posixpath.normpath(posixpath.join(rel.replace(os.sep, "/"), name)))
    return sorted(found)
