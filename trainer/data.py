"""tf.data input: class folders, deterministic stratified splits, decode/resize to uint8, batching.

File access goes through tf.io.gfile (via ``storage``), so local paths and gs:// behave alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from sklearn.utils import class_weight as sk_class_weight

from trainer import layout, prepared, sources, storage
from trainer.config import DataConfig
from trainer.errors import DataError
from trainer.layout import IMAGE_EXTENSIONS
JPEG_EXTENSIONS = (".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    """One image: its full path, its path relative to its class's image folder (the class
    folder, or its images/ sub-folder), and its label."""

    path: str
    relpath: str
    label: int
    prepared: tuple = ()  # (dataset dir, TFDS split) holding it, for a prepared data_dir
    mask: str = ""  # its lung mask (the database's masks/, same name), if there is one
    source: str = ""  # where it came from, when the data stores it (a prepared dataset)


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


def scan_classes(root: str, classes: list[str]) -> list[layout.ClassFolder]:
    """Each class folder's listing (layout.scan_class), in class order."""
    found = []
    for folder in find_class_dirs(root, classes):
        try:
            found.append(layout.scan_class(folder))
        except storage.SymlinkLoopError as err:
            raise DataError(f"{folder}: {err}; remove the link") from None
    return found


def list_examples(root: str, classes: list[str]) -> list[Example]:
    """Every X-ray of each class folder (its images/ sub-folder when it has one; never its
    masks/), labelled by the class's index and paired with its mask where there is one."""
    examples = []
    for label, folder in enumerate(scan_classes(root, classes)):
        if not folder.images:
            raise DataError(f"{folder.image_root}: class folder holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        examples += [Example(storage.join(folder.image_root, rel), rel, label,
                             mask=folder.masks.get(rel, "")) for rel in folder.images]
    others = layout.top_level_files(root)
    if others:
        logging.info("%s: not class images (metadata sheets, readme): %s", root,
                     ", ".join(others))
    return examples


def split_rank(relpath: str, seed: int) -> str:
    """A file's place in its class's split order: a seeded hash of its relative path."""
    return hashlib.sha256(f"{seed}:{relpath}".encode()).hexdigest()


def split_examples(examples: list[Example], n_classes: int,
                   validation_split: float | Sequence[float], test_per_class: int, seed: int,
                   group_by: str = "") -> dict[str, list[Example]]:
    """Deterministic stratified split: per class, order by hash, take test, then val, then train.

    ``validation_split`` is one share for every class, or a share per class.

    The order depends only on each file's relative path and the seed, so a file lands in
    the same split whatever order the listing returned. With ``group_by`` (a regex; see
    ``split_group``) whole groups are ordered by the hash of their key and fill test, then
    val, then train, each until it holds its share of the class (a group may overshoot it);
    a group found in several classes goes to the first split (test, val, train) any of its
    classes gave it, so no group's images are ever in two splits. Without it every file is
    its own group: today's split, image for image.
    """
    pattern = re.compile(group_by) if group_by else None
    shares = (list(validation_split) if isinstance(validation_split, (list, tuple))
              else [validation_split] * n_classes)
    fill_order = ("test", "val", "train")
    first = {}  # group -> the earliest split (in fill_order) any class put it in
    by_class = []
    for label in range(n_classes):
        members = [e for e in examples if e.label == label]
        groups: dict[tuple, list[Example]] = {}
        for e in sorted(members, key=lambda e: (split_rank(e.relpath, seed), e.relpath)):
            groups.setdefault(split_group(e, pattern), []).append(e)
        ranked = sorted(groups.items(), key=lambda item: (split_rank(item[0][-1], seed), item[0]))
        n_test = min(test_per_class, len(members))
        taken = {name: 0 for name in SPLITS}
        for key, files in ranked:
            if taken["test"] < n_test:
                name = "test"
            elif taken["val"] < int(round((len(members) - taken["test"]) * shares[label])):
                name = "val"
            else:
                name = "train"
            taken[name] += len(files)
            first[key] = min(first.get(key, name), name, key=fill_order.index)
        by_class.append(ranked)
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for ranked in by_class:
        for name in SPLITS:
            out[name] += [e for key, files in ranked if first[key] == name for e in files]
    return out


def split_group(example: Example, pattern: re.Pattern | None) -> tuple:
    """The group an example is split with: ('group', key) where ``pattern`` matches its
    relative path (key: the first capture group that took part in the match), otherwise
    ('file', label, relpath), a group of its own."""
    match = pattern.search(example.relpath) if pattern else None
    if match:
        key = next((g for g in match.groups() if g is not None), match.group(0))
        return ("group", key)
    return ("file", example.label, example.relpath)


SOURCES_FILE = sources.SOURCES_FILE


def read_sources(root: str, examples: list[Example]) -> list[str] | None:
    """Each example's source (trainer.sources: the prepared dataset, ROOT/manifest.csv or the
    database's metadata sheets), or None when nothing says."""
    return sources.read_sources(root, examples)


def hold_out_sources(examples: list[Example], data: DataConfig) -> tuple[list, list, list]:
    """Splits off every image of the ``holdout_sources`` (hospitals never seen in training)
    and of the ``val_sources`` (hospitals that choose the checkpoint, never trained on).

    Returns (examples to split as usual, images that all go to the validation split, images
    that all go to the test split).
    """
    named = [(flag, list(getattr(data, flag))) for flag in ("holdout_sources", "val_sources")]
    named = [(flag, wanted) for flag, wanted in named if wanted]
    if not named:
        return examples, [], []
    found = read_sources(data.data_dir, examples)
    if found is None:
        raise DataError(f"--{named[0][0]} needs {storage.join(data.data_dir, SOURCES_FILE)} "
                        "with relpath and source columns, or the database's CLASS"
                        f"{sources.SHEET_SUFFIX} sheets")
    for flag, wanted in named:
        unknown = sorted(set(wanted) - set(found))
        if unknown:
            raise DataError(f"--{flag}: no images from {', '.join(unknown)} in "
                            f"{sources.origin(data.data_dir)} (sources: "
                            f"{', '.join(sorted(set(found)))})")
    held, val = set(data.holdout_sources), set(data.val_sources)
    keep = [e for e, s in zip(examples, found) if s not in held | val]
    validation = [e for e, s in zip(examples, found) if s in val]
    unseen = [e for e, s in zip(examples, found) if s in held]
    if held:
        logging.info("holding out %d images from %s: test only, never trained on", len(unseen),
                     ", ".join(sorted(held)))
    if val:
        logging.info("validating on the %d images from %s (never trained on)", len(validation),
                     ", ".join(sorted(val)))
    return keep, validation, unseen


def validation_shares(data: DataConfig, validation: list[Example]) -> list[float]:
    """The share of each class's remaining images that goes to validation: none for a class
    the ``val_sources`` hold (their images choose the checkpoint), ``validation_split`` for the
    others, so every class is validated even when the val sources hold one class."""
    held = {e.label for e in validation}
    return [0.0 if label in held else data.validation_split for label in range(len(data.classes))]


def make_splits(data: DataConfig) -> Splits:
    """Lists the data tree(s) and splits them as the config says."""
    if is_prepared(data.data_dir):
        return prepared.load_splits(data)
    prepared.refuse_unreadable(data.data_dir)
    examples = list_examples(data.data_dir, data.classes)
    examples, validation, unseen = hold_out_sources(examples, data)
    held_out = 0 if data.test_dir else data.test_per_class
    shares = validation_shares(data, validation)
    if validation and any(shares):
        logging.info("validating the classes the val sources lack (%s) on validation_split "
                     "(%g) of their training images",
                     ", ".join(c for c, share in zip(data.classes, shares) if share),
                     data.validation_split)
    parts = split_examples(examples, len(data.classes), shares, held_out, data.seed,
                           data.group_by)
    if data.test_dir:
        parts["test"] = list_examples(data.test_dir, data.classes)
    parts["val"] += validation
    parts["test"] += unseen
    splits = Splits(list(data.classes), parts["train"], parts["val"], parts["test"])
    for name, counts in splits.counts().items():
        if name == "train" and min(counts) == 0:
            raise DataError(f"{data.data_dir}: the training split has no images of class "
                            f"'{data.classes[counts.index(0)]}' ({counts}); add images or lower "
                            "--test_per_class / --validation_split")
    return splits


JPEG_RATIOS = (1, 2, 4, 8)


def decode_pixels(encoded: tf.Tensor, image_size: int, interpolation: str = "bilinear",
                  jpeg_shrink: bool = True) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF bytes -> uint8 [size, size, 3]: the form the pipeline caches.

    Any mode (grayscale, RGB, RGBA, palette; 8 or 16 bit) becomes 3 channels (16-bit images
    are read at 8 bits); GIFs give their first frame. Kept at 8 bits, a cached image takes a
    quarter of the memory of float32. Shrinks average the pixels each output pixel covers;
    enlargements use the interpolation (``_resize_uint8``). Speed: images are resized from
    their 8-bit pixels at their own channel count (a grayscale X-ray is 1 channel, not 3), not
    at all when already at size, JPEGs are shrunk by 2, 4 or 8 inside the decoder while
    still at least image_size, and grayscale images 4x or 16x the size and more are averaged
    in 4 x 4 blocks first (``_shrink``). ``jpeg_shrink=False`` (sets without JPEG file names)
    drops the format test that routes JPEGs there: a conditional around the decoder cost
    about 8% of a first epoch over 1024 px PNGs. A JPEG read that way is decoded in full, so
    its pixels may differ slightly (within 2% on average) from the shrunk decode.
    """
    if jpeg_shrink:
        pixels = tf.cond(tf.io.is_jpeg(encoded),
                         lambda: _decode_jpeg_shrunk(encoded, image_size),
                         lambda: tf.io.decode_image(encoded, channels=0, expand_animations=False))
    else:
        pixels = tf.io.decode_image(encoded, channels=0, expand_animations=False)
    pixels.set_shape([None, None, None])
    pixels = tf.cond(_at_size(pixels, image_size), lambda: pixels,
                     lambda: _resize_uint8(pixels, image_size, interpolation))
    return tf.cond(tf.shape(pixels)[-1] < 3,  # gray or gray+alpha -> RGB; RGBA -> RGB
                   lambda: _gray_to_rgb(pixels, image_size), lambda: pixels[..., :3])


def _gray_to_rgb(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """The first channel three times: broadcast_to costs about half of grayscale_to_rgb's tile
    on a 256 px image."""
    return tf.broadcast_to(pixels[..., :1], [image_size, image_size, 3])


def _at_size(image: tf.Tensor, image_size: int) -> tf.Tensor:
    return tf.reduce_all(tf.shape(image)[:2] == image_size)


def _resize_uint8(pixels: tf.Tensor, image_size: int, interpolation: str) -> tf.Tensor:
    """uint8 in, uint8 out. A shrink (both sides at least image_size) averages the pixels each
    output pixel covers (``_shrink``: antialiased by construction, and cheaper than an
    antialiased kernel); an enlargement of either side uses the interpolation, antialiased
    where a side shrinks (``_enlarge``); ``nearest`` samples. The filters read the 8-bit
    pixels as they are: a float copy of a 1024 px image costs more than the shrink
    (bench/decode_cost.py)."""
    size = [image_size, image_size]
    if interpolation == "nearest":  # samples pixels: no arithmetic, stays uint8
        return tf.image.resize(pixels, size, method="nearest")
    shrink = tf.reduce_all(tf.shape(pixels)[:2] >= image_size)
    image = tf.cond(shrink, lambda: _shrink(pixels, image_size),
                    lambda: _enlarge(pixels, image_size, interpolation))
    if interpolation in OVERSHOOTING:
        image = tf.clip_by_value(image, 0.0, 255.0)
    return tf.cast(tf.round(image), tf.uint8)


def _enlarge(pixels: tf.Tensor, image_size: int, interpolation: str) -> tf.Tensor:
    """At least one side grows. Where none shrinks, antialiasing leaves the filter as it is,
    and bilinear takes TensorFlow's plain kernel: the same triangle filter upward (within
    0.01 of a grey level) at half the cost of the antialiased resampler (decoding a 224 px
    JPEG and enlarging it to 256 px: 1.2 against 2.5 ms of CPU). Bicubic's plain kernel is
    another cubic, so it keeps the resampler."""
    size = [image_size, image_size]
    if interpolation != "bilinear":
        return tf.image.resize(pixels, size, method=interpolation, antialias=True)
    grows_only = tf.reduce_all(tf.shape(pixels)[:2] <= image_size)
    return tf.cond(grows_only, lambda: tf.image.resize(pixels, size, method="bilinear"),
                   lambda: tf.image.resize(pixels, size, method="bilinear", antialias=True))


def _shrink(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """Area resize, uint8 -> float32. A grayscale image with sides divisible by 4 and exactly
    4x image_size, or at least 16x, first becomes exact 4 x 4 block means (``_box4_mean``: about
    half the cost of TensorFlow's area kernel on a 1024 px X-ray). At 4x that is area's
    result; at 16x or more the area of the block means, which keeps every pixel within a
    grey level of area's (blocks cut by an output pixel's edge count in proportion)."""
    size = [image_size, image_size]
    height, width, channels = tf.unstack(tf.shape(pixels))
    exact = (height == 4 * image_size) & (width == 4 * image_size)
    large = (height >= 16 * image_size) & (width >= 16 * image_size)
    boxable = (channels == 1) & (height % 4 == 0) & (width % 4 == 0) & (exact | large)

    def boxed():
        means = _box4_mean(pixels)
        return tf.cond(exact, lambda: means, lambda: tf.image.resize(means, size, method="area"))

    return tf.cond(boxable, boxed, lambda: tf.image.resize(pixels, size, method="area"))


def _box4_mean(gray: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, 1] (h and w divisible by 4) -> float32 [h/4, w/4, 1]: the mean of each 4 x 4
    block. Four pixels are read as one 32-bit word and summed in two 16-bit lanes (no sum
    exceeds 2,040), so each step touches a quarter as many elements as a per-pixel sum; the
    lanes are added at the end, which makes the result independent of byte order."""
    height, width = tf.shape(gray)[0], tf.shape(gray)[1]
    words = tf.bitcast(tf.reshape(gray, [height, width // 4, 4]), tf.uint32)
    lanes = tf.constant(0x00FF00FF, tf.uint32)
    pairs = (tf.bitwise.bitwise_and(words, lanes)
             + tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, 8), lanes))
    blocks = tf.reduce_sum(tf.reshape(pairs, [height // 4, 4, width // 4]), axis=1)
    sums = tf.bitwise.bitwise_and(blocks, 0xFFFF) + tf.bitwise.right_shift(blocks, 16)
    return tf.cast(sums, tf.float32)[..., None] / 16.0


# Kernels with negative lobes can leave [0, 255]; bilinear and area are weighted means.
OVERSHOOTING = ("bicubic",)


def rescale(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1] (the tutorial's rescale=1/255); works on batches."""
    return tf.cast(pixels, tf.float32) / 255.0


def decode_image(encoded: tf.Tensor, image_size: int, interpolation: str = "bilinear") -> tf.Tensor:
    """Encoded image bytes -> float32 [size, size, 3] in [0, 1]: the pixels training sees, as
    the [0, 1] floats that plots draw (models take ``decode_pixels``, see models.feed)."""
    return rescale(decode_pixels(encoded, image_size, interpolation))


def _decode_jpeg_shrunk(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """A JPEG decoded at 1/1, 1/2, 1/4 or 1/8 size: the smallest still >= image_size."""
    shorter = tf.reduce_min(tf.io.extract_jpeg_shape(encoded)[:2])
    fits = tf.stack([shorter // r >= image_size for r in JPEG_RATIOS[1:]])
    index = tf.reduce_sum(tf.cast(fits, tf.int32))  # ratios that fit form a prefix
    branches = [lambda r=r: tf.io.decode_jpeg(encoded, ratio=r) for r in JPEG_RATIOS]
    return tf.switch_case(index, branches)


def has_jpeg_names(paths: list[str]) -> bool:
    """Whether any file is named like a JPEG: only then does decoding test each file's format."""
    return any(path.lower().endswith(JPEG_EXTENSIONS) for path in paths)


def should_cache(data: DataConfig, n_images: int) -> bool:
    """Cache decoded images when asked, or when the split fits the auto budget."""
    if data.cache != "auto":
        return data.cache == "memory"
    return n_images <= _images_in_budget(data)


def shuffle_buffer(data: DataConfig, n_images: int) -> int:
    """Decoded images held for shuffling: all of a cached split (a full shuffle every epoch);
    otherwise no more than the cache budget holds, so an uncached split stays within it."""
    limit = n_images if should_cache(data, n_images) else _images_in_budget(data)
    return max(1, min(n_images, limit))


def _images_in_budget(data: DataConfig) -> int:
    return data.cache_limit_mb * 2 ** 20 // (data.image_size ** 2 * 3)  # uint8 pixels


def make_dataset(examples: list[Example], data: DataConfig, batch_size: int,
                 training: bool, whole_batches: bool = False,
                 weights: np.ndarray | None = None) -> tf.data.Dataset:
    """Decoded, resized, batched uint8 images, one-hot labels (and, given ``weights``, one
    per example, the example's weight); shuffled every epoch if training.

    ``whole_batches`` drops a short last batch (see ``cache_shuffle_batch``)."""
    if examples and examples[0].prepared:
        return prepared.make_dataset(examples, data, batch_size, training, whole_batches,
                                     weights)
    paths = [e.path for e in examples]
    labels = np.array([e.label for e in examples], dtype=np.int32)
    columns = (paths, labels) if weights is None else (paths, labels,
                                                        np.asarray(weights, np.float32))
    ds = tf.data.Dataset.from_tensor_slices(columns)
    stream = training and not should_cache(data, len(examples))
    if stream:  # uncached: shuffle the file list; decoded images stream through
        ds = ds.shuffle(max(len(paths), 1), seed=data.seed, reshuffle_each_iteration=True)
    jpeg_shrink = has_jpeg_names(paths)
    ds = ds.map(lambda p, y, *w: (decode_pixels(tf.io.read_file(p), data.image_size,
                                                data.interpolation, jpeg_shrink), y, *w),
                num_parallel_calls=tf.data.AUTOTUNE)
    return cache_shuffle_batch(ds, data, len(examples), batch_size, training and not stream,
                               whole_batches)


def cache_shuffle_batch(ds: tf.data.Dataset, data: DataConfig, n_images: int, batch_size: int,
                        shuffle: bool, whole_batches: bool = False) -> tf.data.Dataset:
    """The common tail for (uint8 image, label[, weight]) elements: cache them if they fit,
    reshuffle every epoch (``shuffle_buffer``), batch, one-hot the labels. Images stay uint8: the
    models scale them on the device (models.py), which saves the CPU a float copy of every
    batch (first epoch over 1024 px PNGs at 256 px: 6% more images/s, docs/benchmarks.md).
    tf.data's autotuner is off unless data.autotune: with it, passes stalled until its next
    period (10 ms doubling; bench/decode_cost.py). ``whole_batches`` drops a short last batch:
    split across replicas, it could leave one with no image (after a reshuffle each epoch
    leaves out other images)."""
    if should_cache(data, n_images):
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer(data, n_images), seed=data.seed,
                        reshuffle_each_iteration=True)
    n_classes = len(data.classes)
    ds = ds.batch(batch_size, drop_remainder=whole_batches).map(
        lambda images, labels, *weights: (images, tf.one_hot(labels, n_classes), *weights),
        num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = data.autotune
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def class_weights(labels: list[int], n_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights n / (k * count) over the k classes the labels hold (a
    class they lack weighs 1: no image carries it)."""
    present = np.unique(np.asarray(labels, np.int64))
    weights = sk_class_weight.compute_class_weight("balanced", classes=present,
                                                   y=np.asarray(labels))
    return {i: 1.0 for i in range(n_classes)} | dict(zip(present.tolist(), map(float, weights)))


def is_prepared(root: str) -> bool:
    """True when ``root`` is a dataset written by trainer.prepare (a TFDS dataset, prepared.py):
    its splits are read from it, not made from folders."""
    return prepared.is_prepared(root)


record_key = prepared.record_key
