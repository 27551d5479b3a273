"""Prepared data as a TensorFlow Datasets dataset: written by ``trainer.prepare``, read by training,
and by any TF program with ``tfds.builder_from_directory(DIR).as_dataset(split="train")``.

DIR holds TFRecord shards named as TFDS's own sequential writer names them
(``covid_cxr-train.tfrecord-00000``), ``features.json`` (image, label, relpath, source),
``dataset_info.json`` (splits train / validation / test with their shard lengths) and
``metadata.json`` (the settings, the class weights, and every image's source path, label,
sha256 and source). ``dataset_info.json`` is written last: a directory without it is unfinished,
and ``progress.json`` records its finished shards so that the same command resumes it. Shards
are written here, through tf.io.gfile (local or gs://), and TFDS's ``write_metadata`` adds the
metadata; TFDS itself is imported only where it is used, and never downloads anything (its GCS
lookups are off: only ``builder_from_directory`` and ``write_metadata`` are called).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Callable

import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.config import DataConfig
from trainer.errors import ConfigError, DataError

NAME = "covid_cxr"  # the TFDS dataset name, the prefix of every shard
FORMAT = "covid-cxr-tfds"  # metadata.json's format marker
FORMAT_VERSION = 1
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> TFDS's names
DATASET_INFO = "dataset_info.json"
PROGRESS = "progress.json"
LEGACY_MANIFEST = "manifest.json"  # the TFRecord + manifest format of earlier versions


def tfds():
    """tensorflow_datasets, imported on first use (it is not needed to train from folders)."""
    import tensorflow_datasets
    return tensorflow_datasets


def features(classes: list[str]):
    """What each record holds: the stored image bytes (decoded to 3 channels by TFDS), its
    class, its path inside the class's image folder, and its source ('' when unknown)."""
    f = tfds().features
    return f.FeaturesDict({"image": f.Image(shape=(None, None, 3)),
                           "label": f.ClassLabel(names=list(classes)),
                           "relpath": f.Text(), "source": f.Text()})


def shard_name(split: str, index: int) -> str:
    return f"{NAME}-{TFDS_SPLITS[split]}.tfrecord-{index:05d}"


# ----------------------------------------------------------------------------- what a dir is


def is_prepared(root: str) -> bool:
    """True when ``root`` is a finished prepared dataset (it holds dataset_info.json)."""
    return bool(root) and storage.exists(storage.join(root, DATASET_INFO))


def refuse_unreadable(root: str) -> None:
    """A clear error for a folder that is prepared data this version cannot train from: the
    old manifest.json format, or a prepare that has not finished."""
    if not root or is_prepared(root):
        return
    if storage.exists(storage.join(root, LEGACY_MANIFEST)):
        source = _legacy_source(root)
        raise DataError(f"{root} was prepared by an earlier version (TFRecords + {LEGACY_MANIFEST}), "
                        "which is no longer read; prepare it again as a TFDS dataset: python -m "
                        f"trainer.prepare --src={source or 'IMAGE_TREE'} --dst=NEW_DIR")
    if storage.exists(storage.join(root, PROGRESS)):
        raise DataError(f"{root} is an unfinished trainer.prepare ({PROGRESS}, no {DATASET_INFO}); "
                        "run the same prepare command again to finish it")


def _legacy_source(root: str) -> str:
    try:
        return str(json.loads(storage.read_text(storage.join(root, LEGACY_MANIFEST))).get("source", ""))
    except (ValueError, AttributeError):
        return ""


def builder(root: str):
    """TFDS's reader of the dataset in ``root`` (reads its metadata files only)."""
    return tfds().builder_from_directory(root)


def read_metadata(root: str) -> dict:
    """metadata.json of a prepared dataset, checked to be this trainer's format."""
    path = storage.join(root, "metadata.json")
    try:
        meta = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); prepare the data again") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{root}: a TFDS dataset, but not one written by trainer.prepare "
                        f"({path} says format {meta.get('format')!r}, expected {FORMAT!r}); pass "
                        "the image folders or a trainer.prepare output as --data_dir")
    return meta


# ----------------------------------------------------------------------------- reading


def load_splits(data: DataConfig):
    """The dataset's splits as Examples that name the TFDS split holding them (no image read)."""
    from trainer.data import Example, Splits
    root = data.data_dir
    meta = read_metadata(root)
    classes = meta["classes"]
    if [c.lower() for c in classes] != [c.lower() for c in data.classes]:
        raise DataError(f"{root}: prepared for classes {classes}, but the config says "
                        f"{list(data.classes)} (--classes); prepare again or change --classes")
    settings = meta.get("settings", {})
    differ = [k for k in ("seed", "validation_split", "test_per_class", "group_by",
                          "holdout_sources", "val_sources")
              if k in settings and list_or_value(settings[k]) != list_or_value(getattr(data, k))]
    if differ:
        logging.warning("%s: the splits come from the prepared dataset, made with %s; the "
                        "config's %s are ignored", root, {k: settings[k] for k in differ},
                        {k: getattr(data, k) for k in differ})
    if settings.get("max_side") and data.image_size > settings["max_side"]:
        logging.warning("%s: images were stored at most %d px; --image_size=%d upsamples them",
                        root, settings["max_side"], data.image_size)
    trees = {name: meta.get("source", root) for name in TFDS_SPLITS}
    if meta.get("test_source"):
        trees["test"] = meta["test_source"]

    def example(f: dict, tree: str, split: str):
        mask = storage.join(tree, *f["mask"].split("/")) if f.get("mask") else ""
        return Example(storage.join(tree, *f["path"].split("/")), f["relpath"], int(f["label"]),
                       prepared=(root, split), mask=mask, source=f.get("source", ""))

    parts = {name: [example(f, trees[name], split) for f in meta["files"].get(split, [])]
             for name, split in TFDS_SPLITS.items()}
    if data.test_dir:
        from trainer.data import list_examples
        parts["test"] = list_examples(data.test_dir, data.classes)
    splits = Splits(list(data.classes), parts["train"], parts["val"], parts["test"])
    if min(splits.counts()["train"]) == 0:
        raise DataError(f"{root}: the prepared training split has a class with no images "
                        f"({splits.counts()['train']})")
    return splits


def list_or_value(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def record_key(label, relpath):
    """The key that names one image inside a prepared split: 'label/relpath'."""
    if isinstance(relpath, str):
        return f"{label}/{relpath}"
    return tf.strings.join([tf.strings.as_string(label), relpath], "/")


def make_dataset(examples: list, data: DataConfig, batch_size: int,
                 training: bool, whole_batches: bool = False, weights=None) -> tf.data.Dataset:
    """Like data.make_dataset, from the TFDS split holding ``examples``: the image bytes as
    stored (TFDS's own decoding skipped), decoded by the pipeline's decoder, so the pixels
    equal those trained from the files. Training reads the shards interleaved in a shuffled
    order (seeded); evaluation in the stored order (load_splits' order), so predictions line up
    with ``examples``. Records of images not in ``examples`` (a subset) are skipped. Given
    ``weights`` (one per example), each record carries its example's, found by its key."""
    from trainer import data as data_lib
    root, split = examples[0].prepared
    reader = builder(root)
    n_shards = len(reader.info.splits[split].shard_lengths)
    config = tfds().ReadConfig(
        shuffle_seed=data.seed, shuffle_reshuffle_each_iteration=True, try_autocache=False,
        interleave_cycle_length=min(n_shards, 8) if training else 1, interleave_block_length=1)
    ds = reader.as_dataset(split=split, shuffle_files=training, read_config=config,
                           decoders={"image": tfds().decode.SkipDecoding()})
    if len(examples) != reader.info.splits[split].num_examples:
        wanted = _by_key(examples, tf.ones([len(examples)], tf.int32), 0)
        ds = ds.filter(lambda ex: wanted(ex) > 0)
    weight_of = _weight_lookup(examples, weights)
    ds = ds.map(lambda ex: (data_lib.decode_pixels(ex["image"], data.image_size,
                                                   data.interpolation),
                            tf.cast(ex["label"], tf.int32)) + weight_of(ex),
                num_parallel_calls=tf.data.AUTOTUNE)
    return data_lib.cache_shuffle_batch(ds, data, len(examples), batch_size, training,
                                        whole_batches)


def _by_key(examples: list, values: tf.Tensor, default):
    """record -> the value of its example (``values``, one per example), found by the
    record's key; ``default`` for a record of no example."""
    keys = tf.constant([record_key(e.label, e.relpath) for e in examples])
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default)
    return lambda record: table.lookup(record_key(record["label"], record["relpath"]))


def _weight_lookup(examples: list, weights):
    """record -> (its example's weight,) found by its key; record -> () without ``weights``."""
    if weights is None:
        return lambda record: ()
    weight = _by_key(examples, tf.constant(weights, tf.float32), 1.0)
    return lambda record: (weight(record),)


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass
class Encoded:
    """One image ready for its record: the bytes to store, the source file's sha256, and
    whether the bytes are the source's ("source") or a shrunk PNG ("resized")."""

    image: bytes
    sha256: str
    stored: str


def check_destination(dst: str, settings: dict) -> dict | None:
    """The finished dataset's metadata when ``dst`` already holds this very prepare (nothing to
    do); None when ``dst`` is new, empty, or an unfinished prepare with the same settings.
    Anything else there (another prepare, the old format, files of the user's) is refused, so
    nothing is overwritten."""
    if is_prepared(dst):
        meta = read_metadata(dst)
        if meta.get("settings") == _jsonable(settings):
            return meta
        raise ConfigError(f"{dst} already holds data prepared with other settings "
                          f"({meta.get('settings')}); choose another --dst")
    if storage.exists(storage.join(dst, LEGACY_MANIFEST)):
        raise ConfigError(f"{dst} holds data prepared by an earlier version ({LEGACY_MANIFEST}); "
                          "choose another --dst (or delete that folder yourself)")
    if storage.isdir(dst):
        ours = {PROGRESS, PROGRESS + ".tmp"}
        theirs = [name for name in storage.listdir(dst)
                  if name not in ours and not name.startswith(f"{NAME}-")]
        if theirs:
            raise ConfigError(f"--dst {dst} is not empty ({', '.join(theirs[:5])}); choose an "
                              "empty or new folder")
    return None


def _jsonable(value):
    return json.loads(json.dumps(value))


def read_progress(dst: str, settings: dict) -> dict:
    path = storage.join(dst, PROGRESS)
    if not storage.exists(path):
        return {"settings": _jsonable(settings), "shards": {}}
    progress = json.loads(storage.read_text(path))
    if progress.get("settings") != _jsonable(settings):
        raise ConfigError(f"{dst} holds an unfinished prepare with other settings "
                          f"({progress.get('settings')}); use the same flags to resume, "
                          "or another --dst")
    return progress


def write_split(name: str, examples: list, entries_of: Callable, dst: str, shard_bytes: int,
                progress: dict, encode: Callable, feats, bar, pool) -> list[dict]:
    """Writes one split's shards in order, keeping the finished ones; returns its file entries.

    ``entries_of(example, encoded)`` gives an image's metadata entry; ``encode(example)`` its
    Encoded bytes; ``pool`` runs the encoding in parallel."""
    done = progress["shards"].setdefault(name, [])
    entries: list[dict] = []
    position = 0
    for shard in done:  # finished shards cover a prefix of the ordered split
        keys = [record_key(e.label, e.relpath) for e in examples[position:position + shard["count"]]]
        if keys != [record_key(f["label"], f["relpath"]) for f in shard["files"]] or \
                not storage.exists(storage.join(dst, shard["file"])):
            raise DataError(f"{dst}: finished shard {shard['file']} does not match the source "
                            "any more; prepare into a new --dst")
        entries += shard["files"]
        position += shard["count"]
        bar.update(shard["count"])
        logging.info("keeping finished shard %s (%d images)", shard["file"], shard["count"])
    while position < len(examples):
        file = shard_name(name, len(done))
        files, size = [], 0
        with tf.io.TFRecordWriter(storage.join(dst, file)) as writer:
            while position < len(examples) and size < shard_bytes:
                window = examples[position:position + 32]
                for example, encoded in zip(window, pool.map(encode, window)):
                    record = feats.serialize_example({
                        "image": encoded.image, "label": example.label,
                        "relpath": example.relpath, "source": example.source})
                    writer.write(record)
                    size += len(record)
                    files.append(entries_of(example, encoded))
                    bar.update()
                    position += 1
                    if size >= shard_bytes:
                        break
        done.append({"file": file, "count": len(files), "bytes": size, "files": files})
        storage.write_text_atomic(storage.join(dst, PROGRESS), json.dumps(progress))
        entries += files
    return entries


def finish(dst: str, classes: list[str], progress: dict, metadata: dict) -> None:
    """Writes the TFDS metadata (dataset_info.json last, so that it marks the dataset complete)
    and drops progress.json."""
    t = tfds()
    splits = []
    for name, shards in progress["shards"].items():
        if not shards or not sum(s["count"] for s in shards):
            continue  # an empty split has no files; TFDS lists only splits with data
        template = t.core.ShardedFileTemplate(data_dir=dst, template=TEMPLATE, dataset_name=NAME,
                                              split=TFDS_SPLITS[name], filetype_suffix="tfrecord")
        splits.append(t.core.SplitInfo(name=TFDS_SPLITS[name],
                                       shard_lengths=[s["count"] for s in shards],
                                       num_bytes=sum(s["bytes"] for s in shards),
                                       filename_template=template))
    t.folder_dataset.write_metadata(
        data_dir=dst, features=features(classes), split_infos=splits, filename_template=TEMPLATE,
        check_data=False, description=DESCRIPTION, supervised_keys=("image", "label"),
        metadata=t.core.MetadataDict(metadata))
    storage.remove_tree(storage.join(dst, PROGRESS))


DESCRIPTION = ("Chest X-rays prepared by covid-cxr-trainer (trainer.prepare): one record per "
               "image with its encoded bytes (the source file's when it fits max_side, else a "
               "shrunk PNG), class label, path inside its class's image folder, and source. "
               "Splits as training makes them (seeded, stratified); see metadata.json.")


def metadata(classes: list[str], source: str, test_source: str, settings: dict, counts: dict,
             class_weights: list[float], entries: dict) -> dict:
    """metadata.json: what training needs besides the records (the splits without reading
    them), with counts per TFDS split and class and the balanced class weights of train."""
    return {"format": FORMAT, "version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "classes": list(classes), "source": source, "test_source": test_source,
            "settings": _jsonable(settings),
            "counts": {TFDS_SPLITS[name]: n for name, n in counts.items()},
            "class_weights": class_weights,
            "files": {TFDS_SPLITS[name]: files for name, files in entries.items()}}


def source_path(root: str, path: str) -> str:
    """``path`` relative to the source tree ``root``, with '/' separators."""
    return path[len(root.rstrip("/")) + 1:].replace(os.sep, "/")
