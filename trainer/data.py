"""tf.data input: class folders, deterministic stratified splits, decode/resize/rescale, batching.

File access goes through tf.io.gfile (via ``storage``), so local paths and gs:// behave alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import tensorflow as tf
from sklearn.utils import class_weight as sk_class_weight

from trainer import storage
from trainer.config import DataConfig
from trainer.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    """One image: its full path, its path relative to its class folder, and its label."""

    path: str
    relpath: str
    label: int


@dataclasses.dataclass
class Splits:
    classes: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def counts(self) -> dict[str, list[int]]:
        """Images per class in each split."""
        return {name: np.bincount([e.label for e in getattr(self, name)],
                                  minlength=len(self.classes)).tolist() for name in SPLITS}


def find_class_dirs(root: str, classes: list[str]) -> list[str]:
    """Each class's folder under ``root``, matched by name case-insensitively."""
    if not storage.isdir(root):
        raise DataError(f"data folder not found: {root}")
    folders = [name for name in storage.listdir(root) if storage.isdir(storage.join(root, name))]
    by_lower = {name.lower(): name for name in folders}
    found = []
    for cls in classes:
        if cls.lower() not in by_lower:
            raise DataError(f"{root}: no folder for class '{cls}' (found: "
                            f"{', '.join(folders) or 'no folders'}); expected one folder per "
                            f"class named {', '.join(classes)}")
        found.append(storage.join(root, by_lower[cls.lower()]))
    return found


def list_examples(root: str, classes: list[str]) -> list[Example]:
    """Every image file under each class folder, labelled by the class's index."""
    examples = []
    for label, folder in enumerate(find_class_dirs(root, classes)):
        try:
            files = storage.walk_files(folder)
        except storage.SymlinkLoopError as err:
            raise DataError(f"{folder}: {err}; remove the link") from None
        images = [rel for rel in files if rel.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise DataError(f"{folder}: class folder holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        examples += [Example(storage.join(folder, rel), rel, label) for rel in images]
    return examples


def split_rank(relpath: str, seed: int) -> str:
    """A file's place in its class's split order: a seeded hash of its relative path."""
    return hashlib.sha256(f"{seed}:{relpath}".encode()).hexdigest()


def split_examples(examples: list[Example], n_classes: int, validation_split: float,
                   test_per_class: int, seed: int) -> dict[str, list[Example]]:
    """Deterministic stratified split: per class, order by hash, take test, then val, then train.

    The order depends only on each file's relative path and the seed, so a file lands in
    the same split whatever order the listing returned.
    """
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for label in range(n_classes):
        ranked = sorted((e for e in examples if e.label == label),
                        key=lambda e: split_rank(e.relpath, seed))
        n_test = min(test_per_class, len(ranked))
        rest = ranked[n_test:]
        n_val = int(round(len(rest) * validation_split))
        out["test"] += ranked[:n_test]
        out["val"] += rest[:n_val]
        out["train"] += rest[n_val:]
    return out


def make_splits(data: DataConfig) -> Splits:
    """Lists the data tree(s) and splits them as the config says."""
    examples = list_examples(data.data_dir, data.classes)
    held_out = 0 if data.test_dir else data.test_per_class
    parts = split_examples(examples, len(data.classes), data.validation_split, held_out, data.seed)
    if data.test_dir:
        parts["test"] = list_examples(data.test_dir, data.classes)
    splits = Splits(list(data.classes), parts["train"], parts["val"], parts["test"])
    for name, counts in splits.counts().items():
        if name == "train" and min(counts) == 0:
            raise DataError(f"{data.data_dir}: the training split has no images of class "
                            f"'{data.classes[counts.index(0)]}' ({counts}); add images or lower "
                            "--test_per_class / --validation_split")
    return splits


def decode_image(encoded: tf.Tensor, image_size: int, interpolation: str = "bilinear") -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF bytes -> float32 [size, size, 3] in [0, 1].

    Any mode (grayscale, RGB, RGBA, palette; 8 or 16 bit) becomes 3 channels scaled by the
    type's maximum, the tutorial's rescale. GIFs give their first frame. Used by training and
    by the serving export, so both see exactly the same pixels.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.float32)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method=interpolation, antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)


def load_example(path: tf.Tensor, label: tf.Tensor, n_classes: int, image_size: int,
                 interpolation: str) -> tuple[tf.Tensor, tf.Tensor]:
    image = decode_image(tf.io.read_file(path), image_size, interpolation)
    return image, tf.one_hot(label, n_classes)


def should_cache(data: DataConfig, n_images: int) -> bool:
    """Cache decoded images when asked, or when the split fits the auto budget."""
    if data.cache != "auto":
        return data.cache == "memory"
    decoded_bytes = n_images * data.image_size ** 2 * 3 * 4
    return decoded_bytes <= data.cache_limit_mb * 2 ** 20


def make_dataset(examples: list[Example], data: DataConfig, batch_size: int,
                 training: bool) -> tf.data.Dataset:
    """Decoded, resized, batched images with one-hot labels; shuffled every epoch if training."""
    paths = [e.path for e in examples]
    labels = np.array([e.label for e in examples], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: load_example(p, y, len(data.classes), data.image_size,
                                          data.interpolation),
                num_parallel_calls=tf.data.AUTOTUNE)
    if should_cache(data, len(examples)):
        ds = ds.cache()
    if training:
        ds = ds.shuffle(max(len(examples), 1), seed=data.seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def class_weights(labels: list[int], n_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights n / (k * count) from the actual training labels."""
    weights = sk_class_weight.compute_class_weight(
        "balanced", classes=np.arange(n_classes), y=np.asarray(labels))
    return {i: float(w) for i, w in enumerate(weights)}


def steps(n_images: int, batch_size: int) -> int:
    return max(1, math.ceil(n_images / batch_size))
