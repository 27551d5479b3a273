"""Training input from prepared data: the TFDS dataset (trainer/prepared.py) against the TFRecord
shards + manifest.json of earlier versions, images per second of a first epoch, in one process.

    python bench/prepared_read.py --data=../shared/data/cxr3 --reps=5
    python bench/prepared_read.py --generate --scale=0.3 --reps=5      # 1024x1024 PNG set

The tree is prepared once (``trainer.prepare``, max_side 256, everything in the training split).
The earlier format's shards are made from the same records (the same stored image bytes, order
and shard boundaries, without the ``source`` feature) and read by a copy of the earlier reader
(``legacy_dataset``: data.make_shard_dataset as of commit 4c51014). Each pass builds a fresh
training dataset (shuffled shards, decoded, cached in memory, shuffled, batched) and reads it
once, as the first epoch of a run does; the two readers alternate pass by pass after one
warm-up pass each (in turn old-new and new-old), and the medians of ``--reps`` passes are
compared: ``new / old`` is the ratio of their median rates in this run, ``paired`` the median of
the ratios of adjacent passes, and the CPU milliseconds per image (this process, all threads)
the cost that moves least with other work on the host.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CLASSES = ["COVID-19", "NORMAL", "Viral Pneumonia"]
SETTINGS = ((50, 250), (256, 15))
MAX_SIDE = 256


def prepare_tree(root: str, dst: str) -> float:
    """Prepares ``root`` into ``dst`` (all images in train); returns the seconds it took."""
    from trainer import config as config_lib, prepare
    config = config_lib.load("vanilla", overrides={"classes": CLASSES, "check": False,
                                                   "test_per_class": 0, "validation_split": 0.0})
    start = time.perf_counter()
    prepare.prepare(config, root, dst, max_side=MAX_SIDE, shard_mb=150)
    return time.perf_counter() - start


def legacy_features():
    import tensorflow as tf
    return {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "relpath": tf.io.FixedLenFeature([], tf.string)}


def write_legacy_shards(prepared_dir: str, out: str) -> list[str]:
    """The earlier format's records (image, label, relpath) of every TFDS train shard, one
    legacy shard per TFDS shard; returns their paths."""
    import tensorflow as tf
    from trainer import prepared
    reader = prepared.builder(prepared_dir)
    paths = []
    for index, name in enumerate(reader.info.splits["train"].filenames):
        path = os.path.join(out, f"train-{index:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for record in tf.data.TFRecordDataset(os.path.join(prepared_dir, name)):
                parsed = tf.io.parse_single_example(record, legacy_features())
                features = tf.train.Features(feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[parsed["image"].numpy()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(
                        value=[int(parsed["label"])])),
                    "relpath": tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[parsed["relpath"].numpy()]))})
                writer.write(tf.train.Example(features=features).SerializeToString())
        paths.append(path)
    return paths


def legacy_dataset(shards: list[str], examples: list, data_config, batch_size: int):
    """The earlier reader, for a training split: shards shuffled and interleaved, every record
    parsed and filtered by key, decoded by the pipeline's decoder, then the common tail."""
    import tensorflow as tf
    from trainer import data
    keys = tf.constant([data.record_key(e.label, e.relpath) for e in examples])
    wanted = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, dtype=tf.int32)), 0)
    files = tf.data.Dataset.from_tensor_slices(shards).shuffle(
        len(shards), seed=data_config.seed, reshuffle_each_iteration=True)
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(shards), 8),
                          num_parallel_calls=tf.data.AUTOTUNE)

    def parse(serialized):
        record = tf.io.parse_single_example(serialized, legacy_features())
        label = tf.cast(record["label"], tf.int32)
        return record["image"], label, data.record_key(label, record["relpath"])

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.filter(lambda image, label, key: wanted.lookup(key) > 0)
    ds = ds.map(lambda image, label, key: (
        data.decode_pixels(image, data_config.image_size, data_config.interpolation), label),
        num_parallel_calls=tf.data.AUTOTUNE)
    return data.cache_shuffle_batch(ds, data_config, len(examples), batch_size, True)


def one_pass(ds, n_images: int) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image) of one pass. The CPU time (this process,
    all threads) moves little with other work on the host, the rate moves a lot."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    for _ in ds:
        pass
    return n_images / (time.perf_counter() - start), 1000 * (_cpu_seconds() - cpu) / n_images


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(prepared_dir: str, shards: list[str], reps: int) -> dict:
    """Alternating first-epoch passes of the two readers at each setting."""
    from trainer import config as config_lib, data
    results = {}
    for size, batch in SETTINGS:
        config = config_lib.load("vanilla", overrides={
            "data_dir": prepared_dir, "image_size": size, "cache": "memory", "classes": CLASSES,
            "test_per_class": 0, "validation_split": 0.0})
        examples = data.make_splits(config.data).train
        new = lambda: data.make_dataset(examples, config.data, batch, training=True)  # noqa: E731
        old = lambda: legacy_dataset(shards, examples, config.data, batch)  # noqa: E731
        one_pass(new(), len(examples)), one_pass(old(), len(examples))  # warm-up, not counted
        rates, cpu = {"new": [], "old": []}, {"new": [], "old": []}
        for i in range(reps):  # pairs of adjacent passes, in turn old-new and new-old
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                rate, ms = one_pass((old if name == "old" else new)(), len(examples))
                rates[name].append(rate)
                cpu[name].append(ms)
        medians = {k: statistics.median(v) for k, v in rates.items()}
        cpu_ms = {k: statistics.median(v) for k, v in cpu.items()}
        results[f"{size}px/b{batch}"] = {
            "images": len(examples),
            "old_img_s": medians["old"], "new_img_s": medians["new"],
            "ratio": medians["new"] / medians["old"],
            "paired_ratio": statistics.median(n / o for n, o in zip(rates["new"], rates["old"])),
            "old_cpu_ms": cpu_ms["old"], "new_cpu_ms": cpu_ms["new"],
            "cpu_ratio": cpu_ms["new"] / cpu_ms["old"],
            "old_all": [round(r, 1) for r in rates["old"]],
            "new_all": [round(r, 1) for r in rates["new"]]}
    return results


def report(name: str, prepare_s: float, results: dict) -> str:
    lines = [f"## {name} (prepare took {prepare_s:.1f} s)",
             f"{'setting':12s} {'images':>6s} {'old img/s':>10s} {'new img/s':>10s} "
             f"{'new / old':>9s} {'paired':>7s} {'old CPU ms':>10s} {'new CPU ms':>10s} "
             f"{'new / old':>9s}"]
    for key, r in results.items():
        lines.append(f"{key:12s} {r['images']:6d} {r['old_img_s']:10.1f} {r['new_img_s']:10.1f} "
                     f"{r['ratio']:9.3f} {r['paired_ratio']:7.3f} {r['old_cpu_ms']:10.3f} "
                     f"{r['new_cpu_ms']:10.3f} {r['cpu_ratio']:9.3f}")
    for key, r in results.items():
        lines.append(f"  {key} passes, img/s, old: {r['old_all']}")
        lines.append(f"  {key} passes, img/s, new: {r['new_all']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="an image tree with one folder per class")
    parser.add_argument("--generate", action="store_true",
                        help="use bench/input_pipeline.py's generated 1024x1024 PNG set")
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--gen_dir", default=os.path.join(tempfile.gettempdir(), "cxr-bench-1024"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    trees = []
    if args.data:
        trees.append((args.data, args.data))
    if args.generate:
        import input_pipeline
        root = input_pipeline.generate(Path(args.gen_dir) / f"scale-{args.scale}", args.scale)
        trees.append((f"generated 1024x1024 PNG, scale {args.scale}", str(root)))
    load = os.getloadavg()
    out = {}
    for name, root in trees:
        with tempfile.TemporaryDirectory(prefix="bench-tfds-") as work:
            prepared_dir, legacy_dir = os.path.join(work, "tfds"), os.path.join(work, "legacy")
            os.makedirs(legacy_dir)
            prepare_s = prepare_tree(root, prepared_dir)
            shards = write_legacy_shards(prepared_dir, legacy_dir)
            out[name] = {"prepare_s": prepare_s, "shards": len(shards),
                         **measure(prepared_dir, shards, args.reps)}
    print(f"load before: {load}; after: {os.getloadavg()}; cpus: {os.cpu_count()}")
    for name, results in out.items():
        print(report(name, results["prepare_s"],
                     {k: v for k, v in results.items() if "/" in k}))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
