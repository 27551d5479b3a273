"""Where the first epoch goes: per-image decode/resize cost, and tf.data's end-of-pass stalls.

    python bench/decode_cost.py --data=/tmp/cxr-bench-1024/scale-0.3 --size=256

Part 1, cost per image on one thread (autotuner off, so passes are steady), minimum of --reps
passes over the same encoded bytes held in memory (no disk):
  decode           the decoder alone, at the image's own channel count
  decode rgb       the decoder expanding to 3 channels (what image_dataset_from_directory asks)
  b: rgb+bilinear  image_dataset_from_directory's load_image (no antialiasing)
  ours             data.decode_pixels as the pipeline calls it for these files (area average
                   from the 8-bit pixels, after 4 x 4 block means for large grayscale images;
                   RGB; the JPEG format test only if a name says JPEG)
Part 2, whole first-epoch passes of our training pipeline (data.make_dataset over a tree with
one folder per class) on all cores, --passes times with --autotune on and off (off is the
default): seconds per pass. Passes held back by the autotuner end at its period (10 ms
doubling: 2.56, 5.12, 10.24 s).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tensorflow as tf  # noqa: E402

from trainer import config as config_lib, data  # noqa: E402

def image_files(root: str) -> list[str]:
    return sorted(str(f) for f in Path(root).rglob("*")
                  if f.suffix.lower() in data.IMAGE_EXTENSIONS)


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def per_image_ms(encoded: tf.data.Dataset, fn, n: int, reps: int) -> float:
    """Milliseconds per image of ``fn`` on one thread: the fastest of ``reps`` passes."""
    ds = without_autotune(encoded.map(lambda e: fn(e)[:1, :1], num_parallel_calls=1).batch(50))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in ds:
            pass
        best = min(best, (time.perf_counter() - start) / n * 1000)
    return best


def decoders(size: int, jpeg_shrink: bool) -> dict:
    def native(e):
        image = tf.io.decode_image(e, channels=0, expand_animations=False)
        image.set_shape([None, None, None])
        return image

    def rgb(e):
        return tf.io.decode_image(e, channels=3, expand_animations=False)

    return {"decode": native, "decode rgb": rgb,
            "b: rgb+bilinear": lambda e: tf.image.resize(rgb(e), [size, size]),
            "ours": lambda e: data.decode_pixels(e, size, jpeg_shrink=jpeg_shrink)}


def first_epoch(root: str, size: int, autotune: bool) -> tf.data.Dataset:
    """Our training pipeline (data.make_dataset, cache in memory) over every image of a tree
    with one folder per class; the first pass over it is a first epoch."""
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    config = config_lib.load("vanilla", overrides={
        "data_dir": root, "classes": classes, "image_size": size, "cache": "memory",
        "test_per_class": 0, "validation_split": 0.0, "autotune": autotune})
    splits = data.make_splits(config.data)
    return data.make_dataset(splits.train, config.data, 15, training=True)


def pass_seconds(ds: tf.data.Dataset) -> float:
    start = time.perf_counter()
    for _ in ds:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an image tree with one folder per class")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=0, help="use the first N images (0: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    tree = image_files(args.data)
    files = tree[:args.limit] if args.limit else tree
    if not files:
        sys.exit(f"error: no images ({', '.join(data.IMAGE_EXTENSIONS)}) under {args.data}")
    encoded = tf.data.Dataset.from_tensor_slices(files).map(tf.io.read_file).cache()
    for _ in encoded:  # read once: part 1 measures decoding, not the disk
        pass
    print(f"{len(files)} images from {args.data}, size {args.size}")
    print("\nper image, one thread (fastest of %d passes)" % args.reps)
    for name, fn in decoders(args.size, data.has_jpeg_names(files)).items():
        print(f"  {name:18s} {per_image_ms(encoded, fn, len(files), args.reps):6.2f} ms")
    whole_tree = len(tree)  # part 2 reads every image, --limit or not
    print(f"\nfirst-epoch passes over all {whole_tree} images, on all cores "
          "(seconds; images/s of the median)")
    for autotune in (True, False):
        seconds = [pass_seconds(first_epoch(args.data, args.size, autotune))
                   for _ in range(args.passes)]
        median = statistics.median(seconds)
        print(f"  autotune {'on ' if autotune else 'off'}  "
              + " ".join(f"{s:5.2f}" for s in seconds)
              + f"   median {median:5.2f} s = {whole_tree / median:6.1f} img/s")


if __name__ == "__main__":
    main()
