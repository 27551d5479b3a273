"""Input pipeline benchmark: images per second for one pass, and peak memory.

    python bench/input_pipeline.py --data=../shared/data/cxr3            # a real tree
    python bench/input_pipeline.py --generate --scale=0.3                # 1024x1024 PNG set

Methods, each at the tutorial's two settings (50 px, batch 250; 256 px, batch 15), each in
its own subprocess (so peak memory is its own), --reps repetitions, medians reported:
  a  ImageDataGenerator(rescale=1/255).flow_from_directory (the tutorial, tf-keras)
  b  keras.utils.image_dataset_from_directory
  c1 our pipeline from files, first epoch;  c2 the same dataset, a later epoch (cached)
  d  our pipeline from prepared shards (trainer.prepare, max_side = the larger setting), first epoch
Rates are for the whole pass and, because tf.data's autotuner can hold back the end of a short
pass, also up to the last batch. 'wait' reports how much of a vanilla training step waits on
input (first and later epoch against in-memory batches).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CLASSES = ["COVID-19", "NORMAL", "Viral Pneumonia"]
ORIGINAL_COUNTS = (219, 1341, 1345)  # the COVID-19 Radiography Database (first release)
SETTINGS = ((50, 250), (256, 15))
METHODS = ("a", "b", "c", "d")


def generate(root: Path, scale: float, side: int = 1024, seed: int = 0) -> Path:
    """1024x1024 8-bit grayscale PNGs in the original database's class ratio (smooth shapes
    plus noise, so they compress like radiographs rather than like flat images)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for cls, count in zip(CLASSES, ORIGINAL_COUNTS):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(max(1, round(count * scale))):
            path = folder / f"{i:05d}.png"
            if path.exists():
                continue
            cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.2, 0.4)]
            body = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            image = 60 + 150 * body + rng.normal(0, 12, (side, side))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").save(path)
    return root


def timed_pass(iterable, n_images: int) -> dict:
    start = time.perf_counter()
    stamps = []
    for _ in iterable:
        stamps.append(time.perf_counter() - start)
    total = stamps[-1]
    n_batches = len(stamps)
    before_last = stamps[-2] if n_batches > 1 else total
    per_batch = n_images / n_batches
    return {"seconds": total, "img_s": n_images / total,
            "img_s_to_last_batch": (n_batches - 1) * per_batch / before_last if n_batches > 1
            else n_images / total}


def count_images(root: str) -> int:
    from trainer import data
    return sum(1 for c in Path(root).iterdir() if c.is_dir() for f in c.rglob("*")
               if f.suffix.lower() in data.IMAGE_EXTENSIONS)


def worker(method: str, root: str, prepared: str, size: int, batch: int, reps: int) -> dict:
    """Runs one method ``reps`` times in this process; returns its passes and peak memory."""
    from trainer import config as config_lib, data
    from trainer.keras_api import keras
    n = count_images(root)
    passes = []
    for _ in range(reps):
        if method == "a":
            gen = keras.preprocessing.image.ImageDataGenerator(rescale=1 / 255).flow_from_directory(
                root, target_size=(size, size), batch_size=batch, class_mode="categorical",
                shuffle=True, seed=1)
            steps = math.ceil(gen.samples / batch)
            passes.append(timed_pass((gen[i] for i in range(steps)), gen.samples))
        elif method == "b":
            ds = keras.utils.image_dataset_from_directory(
                root, image_size=(size, size), batch_size=batch, label_mode="categorical",
                shuffle=True, seed=1)
            passes.append(timed_pass(ds, n))
        else:
            source = root if method == "c" else prepared
            config = config_lib.load("vanilla", overrides={
                "data_dir": source, "image_size": size, "cache": "memory", "classes": CLASSES,
                "test_per_class": 0, "validation_split": 0.0})
            examples = data.make_splits(config.data)
            examples = examples.train + examples.val + examples.test
            ds = data.make_dataset(examples, config.data, batch, training=True)
            first = timed_pass(ds, len(examples))
            if method == "c":
                later = timed_pass(ds, len(examples))
                passes.append({"first": first, "later": later})
            else:
                passes.append(first)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"passes": passes, "peak_mb": peak_mb, "images": n}


def wait_worker(root: str, size: int, batch: int, epochs: int = 5) -> dict:
    """Share of a vanilla training step spent waiting on input: epoch times fed by the pipeline
    (first epoch, median of later ones) against the same model fed the same batches already
    in memory (the pipeline's output cached, median of ``epochs``)."""
    from trainer import config as config_lib, data, models
    from trainer.keras_api import keras
    config = config_lib.load("vanilla", overrides={"data_dir": root, "image_size": size,
                                                   "cache": "memory", "classes": CLASSES,
                                                   "test_per_class": 0, "validation_split": 0.0})
    splits = data.make_splits(config.data)
    ds = data.make_dataset(splits.train, config.data, batch, training=True)
    model = models.build(config.model, size, 3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    fed = _epoch_times(model, ds, 1 + epochs)
    in_memory = ds.cache()
    for _ in in_memory:  # fill the cache: later passes only hand over finished batches
        pass
    compute = statistics.median(_epoch_times(model, in_memory, epochs))
    later = statistics.median(fed[1:])
    return {"first_epoch_s": fed[0], "later_epoch_s": later, "compute_only_s": compute,
            "wait_first": max(0.0, 1 - compute / fed[0]), "wait_later": max(0.0, 1 - compute / later)}


def _epoch_times(model, ds, epochs: int) -> list[float]:
    """Seconds of each epoch of one model.fit, as training runs them."""
    from trainer.keras_api import keras
    times = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: times.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: times.__setitem__(-1, times[-1] + time.perf_counter()))
    model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer])
    return times


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(values) -> float:
    return statistics.median(values)


def benchmark(root: str, reps: int, methods: tuple) -> dict:
    from trainer import config as config_lib, prepare
    results = {}
    prepared = tempfile.mkdtemp(prefix="bench-prepared-")
    if "d" in methods:
        config = config_lib.load("vanilla", overrides={"classes": CLASSES, "check": False,
                                                         "test_per_class": 0,
                                                         "validation_split": 0.0})
        start = time.perf_counter()
        prepare.prepare(config, root, prepared, max_side=max(s for s, _ in SETTINGS), shard_mb=150)
        results["prepare_s"] = time.perf_counter() - start
    for size, batch in SETTINGS:
        row = {}
        for method in methods:
            got = run_worker([method, root, prepared, str(size), str(batch), str(reps)])
            if method == "c":
                row["c1"] = _summary([p["first"] for p in got["passes"]], got["peak_mb"])
                row["c2"] = _summary([p["later"] for p in got["passes"]], got["peak_mb"])
            else:
                row[method] = _summary(got["passes"], got["peak_mb"])
            results["images"] = got["images"]
        results[f"{size}px/b{batch}"] = row
    results["wait_50px"] = run_worker(["wait", root, "", "50", "250", "1"])
    return results


def _summary(passes: list[dict], peak_mb: float) -> dict:
    return {"img_s": median(p["img_s"] for p in passes),
            "img_s_to_last_batch": median(p["img_s_to_last_batch"] for p in passes),
            "all_img_s": [round(p["img_s"], 1) for p in passes], "peak_mb": round(peak_mb)}


def report(name: str, results: dict) -> str:
    lines = [f"## {name}: {results['images']} images"
             + (f", prepare took {results['prepare_s']:.1f} s" if "prepare_s" in results else "")]
    for key, row in results.items():
        if not key.endswith(tuple(f"b{b}" for _, b in SETTINGS)):
            continue
        base = row["a"]["img_s"]
        lines.append(f"\n{key}  (median of passes; x = ratio to ImageDataGenerator)")
        lines.append(f"{'method':44s} {'img/s':>9s} {'to last':>9s} {'x':>6s} {'peak MB':>8s}")
        labels = {"a": "a  ImageDataGenerator.flow_from_directory",
                  "b": "b  image_dataset_from_directory",
                  "c1": "c1 ours, files, first epoch", "c2": "c2 ours, files, later epoch",
                  "d": "d  ours, prepared shards, first epoch"}
        for method, label in labels.items():
            if method in row:
                r = row[method]
                lines.append(f"{label:44s} {r['img_s']:9.1f} {r['img_s_to_last_batch']:9.1f} "
                             f"{r['img_s'] / base:6.2f} {r['peak_mb']:8d}")
    w = results["wait_50px"]
    lines.append(f"\nvanilla 50 px batch 250, training split: epoch {w['first_epoch_s']:.2f} s "
                 f"first / {w['later_epoch_s']:.2f} s later, {w['compute_only_s']:.2f} s on "
                 f"in-memory batches -> waiting on input {100 * w['wait_first']:.0f}% (first), "
                 f"{100 * w['wait_later']:.0f}% (later)")
    return "\n".join(lines)


def targets(results: dict) -> list[tuple[str, float, float]]:
    """The issue's goals on the 1024x1024 set: (what, measured ratio, goal)."""
    rows = []
    for size, batch in SETTINGS:
        row = results.get(f"{size}px/b{batch}", {})
        if not {"a", "b", "c1", "c2"} <= set(row):
            continue
        a = row["a"]["img_s"]
        rows += [(f"{size} px: c1 first epoch / b", row["c1"]["img_s"] / row["b"]["img_s"], 1.0),
                 (f"{size} px: c1 first epoch / a", row["c1"]["img_s"] / a, 1.5),
                 (f"{size} px: c2 later epoch / a", row["c2"]["img_s"] / a, 20.0)]
        if size == max(s for s, _ in SETTINGS) and "d" in row:
            rows.append((f"{size} px: d shards / a", row["d"]["img_s"] / a, 5.0))
    return rows


def targets_report(results: dict) -> str:
    lines = [f"\n{'target':34s} {'ratio':>8s} {'goal':>6s}  met"]
    for what, ratio, goal in targets(results):
        lines.append(f"{what:34s} {ratio:8.2f} {goal:6.1f}  {'yes' if ratio >= goal else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, root, prepared, size, batch, reps = sys.argv[2:8]
        if method == "wait":
            print(json.dumps(wait_worker(root, int(size), int(batch))))
        else:
            print(json.dumps(worker(method, root, prepared, int(size), int(batch), int(reps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="an image tree with one folder per class")
    parser.add_argument("--generate", action="store_true",
                        help="benchmark a generated 1024x1024 grayscale PNG set")
    parser.add_argument("--scale", type=float, default=0.3,
                        help="fraction of the original database's 2905 images to generate "
                             "(0.3: 872 images, first-epoch passes of several seconds)")
    parser.add_argument("--gen_dir", default=os.path.join(tempfile.gettempdir(), "cxr-bench-1024"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="abcd")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    load = os.getloadavg()
    out = {}
    generated = f"generated 1024x1024 PNG, scale {args.scale}"  # the set the targets are for
    if args.data:
        out[f"{args.data}"] = benchmark(args.data, args.reps, tuple(args.methods))
    if args.generate:
        root = generate(Path(args.gen_dir) / f"scale-{args.scale}", args.scale)
        out[generated] = benchmark(str(root), args.reps, tuple(args.methods))
    print(f"load before: {load}; after: {os.getloadavg()}; cpus: {os.cpu_count()}")
    for name, results in out.items():
        print(report(name, results))
        if name == generated:
            print(targets_report(results))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
