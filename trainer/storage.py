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
