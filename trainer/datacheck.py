"""The data check run before training: unreadable, empty or tiny images, stray files and
folders, and duplicate images within and across splits (leakage that inflates test scores).

Every image is read and decoded with the pipeline's own decoder once, so a bad file is found
before training starts instead of crashing an epoch in the middle of a run.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib

import tensorflow as tf
from absl import logging

from trainer import data as data_lib, layout, storage
from trainer.config import DataConfig
from trainer.data import SPLITS, Example, Splits
from trainer.errors import DataError
from trainer.progress import Progress

MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the check learnt about one file: its content hash, or why it cannot be used."""

    path: str
    sha256: str
    problem: str | None


@dataclasses.dataclass
class Report:
    bad: list[ImageInfo]
    duplicates: list[tuple[str, str]]  # same bytes twice inside one split
    leaks: list[tuple[str, str, str, str]]  # (path, split, path, split): same bytes in two splits
    conflicts: list[tuple[str, str]]  # same bytes under two classes
    stray_folders: list[str]
    stray_files: list[str]
    unused: list[str] = dataclasses.field(default_factory=list)  # beside a class's images/
    layouts: list[str] = dataclasses.field(default_factory=list)  # where images came from


def decode_error(raw: bytes, min_side: int = 0) -> str | None:
    """Why these bytes cannot be used: unreadable by the pipeline's decoder, or smaller than
    ``min_side``; None if they can. Decodes once."""
    if not raw:
        return "empty file (0 bytes)"
    try:
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
        detail = str(err.message).split("}}")[-1].strip().splitlines()[0]
        return f"not a readable image ({detail[:120]})"
    height, width = int(image.shape[0]), int(image.shape[1])
    if min(height, width) < min_side:
        return f"too small ({width}x{height}; --min_image_side is {min_side})"
    return None


def inspect(path: str, min_side: int) -> ImageInfo:
    """Reads and decodes one file; never raises for bad content."""
    try:
        raw = storage.read_bytes(path)
    except (OSError, tf.errors.OpError) as err:
        return ImageInfo(path, "", f"cannot be read ({str(err).splitlines()[0][:120]})")
    return ImageInfo(path, hashlib.sha256(raw).hexdigest(), decode_error(raw, min_side))


def stray_folders(root: str, classes: list[str]) -> list[str]:
    """Folders under ``root`` that are no configured class."""
    wanted = {c.lower() for c in classes}
    return [storage.join(root, name) for name in storage.listdir(root)
            if name.lower() not in wanted and storage.isdir(storage.join(root, name))]


def layout_report(root: str, classes: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(non-image files in the folders used; what was found beside a class's images/ folder
    and not used; one line per class saying where its images came from, which masks paired)."""
    folders = data_lib.scan_classes(root, classes)
    return ([path for folder in folders for path in folder.non_images],
            [path for folder in folders for path in folder.unused],
            [layout.describe(folder) for folder in folders])


def _split_of(splits: Splits) -> dict[str, tuple[str, Example]]:
    return {e.path: (name, e) for name in SPLITS for e in getattr(splits, name)}


def scan(splits: Splits, data: DataConfig, workers: int = 8) -> Report:
    """Inspects every image of every split (with a progress line on stderr when it takes
    long) and cross-checks their content hashes."""
    where = _split_of(splits)
    bar = Progress(len(where), "data check")
    infos = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for info in pool.map(lambda p: inspect(p, data.min_image_side), where):
            infos.append(info)
            bar.update()
    by_hash = collections.defaultdict(list)
    for info in infos:
        if info.problem is None:
            by_hash[info.sha256].append(info.path)
    duplicates, leaks, conflicts = [], [], []
    for paths in by_hash.values():
        first, first_split = paths[0], where[paths[0]]
        for other in paths[1:]:
            split, example = where[other]
            if example.label != first_split[1].label:
                conflicts.append((first, other))
            elif split != first_split[0]:
                leaks.append((first, first_split[0], other, split))
            else:
                duplicates.append((first, other))
    roots = [data.data_dir] + ([data.test_dir] if data.test_dir else [])
    strays, stray_files, unused, layouts = [], [], [], []
    for root in roots:
        strays += stray_folders(root, data.classes)
        files, found, lines = layout_report(root, data.classes)
        stray_files += files
        unused += found
        layouts += lines
    return Report([i for i in infos if i.problem], duplicates, leaks, conflicts,
                  strays, stray_files, unused, layouts)


def _listing(lines: list[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
    more = len(lines) - MAX_LISTED
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def regroup(splits: Splits, leaks: list[tuple[str, str, str, str]]) -> Splits:
    """Moves each later copy of an image into the split of its first copy."""
    moves = {b: sa for _, sa, b, _ in leaks}
    parts = {name: [e for e in getattr(splits, name) if e.path not in moves] for name in SPLITS}
    for name in SPLITS:
        for e in getattr(splits, name):
            if e.path in moves:
                parts[moves[e.path]].append(e)
    return Splits(splits.classes, parts["train"], parts["val"], parts["test"])


def apply(report: Report, splits: Splits, data: DataConfig) -> Splits:
    """Fails, warns or drops files as ``on_bad_image`` / ``on_leak`` say; returns usable splits."""
    for line in report.layouts:
        logging.info("%s", line)
    for folder in report.stray_folders:
        logging.warning("ignoring folder %s: not one of the classes %s", folder, data.classes)
    if report.unused:
        logging.warning("not used: %d entries beside a class's images/ folder (only images/ "
                        "holds the class's X-rays):\n%s", len(report.unused),
                        _listing(report.unused))
    if report.stray_files:
        logging.warning("ignoring %d non-image files in class folders:\n%s",
                        len(report.stray_files), _listing(report.stray_files))
    if report.duplicates:
        logging.warning("%d duplicate images inside a split (same content):\n%s",
                        len(report.duplicates), _listing([f"{a} == {b}" for a, b in report.duplicates]))
    if report.conflicts:
        raise DataError(f"{len(report.conflicts)} images appear under two classes (same content, "
                        "different labels); remove the wrong copies:\n"
                        + _listing([f"{a} == {b}" for a, b in report.conflicts]))
    ours = [leak for leak in report.leaks if not (data.test_dir and "test" in (leak[1], leak[3]))]
    if ours:  # copies our own split put apart: keep them together instead
        splits = regroup(splits, ours)
        logging.warning("kept %d copies of an image in the split of their first copy (same "
                        "content, different names):\n%s", len(ours),
                        _listing([f"{b} -> {sa} (as {a})" for a, sa, b, _ in ours]))
    users = [leak for leak in report.leaks if leak not in ours]
    if users:
        lines = [f"{a} ({sa}) == {b} ({sb})" for a, sa, b, sb in users]
        message = (f"{len(users)} images appear in two splits (leakage inflates test "
                   "scores):\n" + _listing(lines))
        if data.on_leak == "fail":
            raise DataError(message + "\nremove the copies, or pass --on_leak=warn to train anyway")
        logging.warning("%s", message)
    if not report.bad:
        return splits
    lines = [f"{info.path}: {info.problem}" for info in report.bad]
    if data.on_bad_image == "fail":
        raise DataError(f"{len(report.bad)} bad images:\n{_listing(lines)}\nfix or remove them, "
                        "or pass --on_bad_image=skip to train without them")
    kinds = collections.Counter(info.problem.split(" (")[0] for info in report.bad)
    logging.warning("--on_bad_image=skip: leaving out %d bad images (%s):\n%s", len(report.bad),
                    ", ".join(f"{n} {kind}" for kind, n in kinds.items()), _listing(lines))
    bad = {info.path for info in report.bad}
    kept = {name: [e for e in getattr(splits, name) if e.path not in bad] for name in SPLITS}
    return Splits(splits.classes, kept["train"], kept["val"], kept["test"])


def check(splits: Splits, data: DataConfig) -> Splits:
    """Runs the check (logging its progress) and returns the splits to train on."""
    total = sum(len(getattr(splits, name)) for name in SPLITS)
    logging.info("checking %d images (decode, size, duplicates, leakage)...", total)
    report = scan(splits, data)
    checked = apply(report, splits, data)
    for label, count in zip(checked.classes, checked.counts()["train"]):
        if count == 0:
            raise DataError(f"no usable training images of class '{label}' are left")
    logging.info("data check: %d bad, %d duplicates, %d leaks, %d stray files", len(report.bad),
                 len(report.duplicates), len(report.leaks), len(report.stray_files))
    return checked
