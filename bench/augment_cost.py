"""What augmentation costs: the input pipeline with and without it, and the train step.

    python bench/augment_cost.py --data=../shared/data/cxr3 --reps=7 --steps=4
    python bench/augment_cost.py --generate --reps=3         # 600 generated 224 px JPEGs

Augmentation lives in the model (trainer/augment.py), so ``data.make_dataset`` should not
change at all when the config turns it on. Part 1 (pipeline) times full passes over the
training split at 50 px (fresh dataset each pass: decode, resize, cache, batch 250) with
augment off and on, alternating, and reports the median (and best) images/s of each and their
ratios (expected ~1.0: the same pipeline), and the same pipeline with ``--mixup=0.2``
(trainer/mixup.py: the one training option that works in the input pipeline, blending each
batch's films with per-image weights). Part 2 (step) times the vanilla model's train step
(50 px, batch 250, uint8 batches already in memory) without augmentation, with the default
augmentation (zoom, shift, rotation, brightness, contrast, gamma), with configs/robust.yaml's
(the default plus the aspect change, ``aspect``), with every layer on (plus blur and noise),
with the robust augmentation after the chest crop (``--chest_crop``), and with it in both
towers of ``--two_views`` (the whole film and the chest crop), all on the first 250 training
films of --data (noise without it): median seconds per step over --reps repetitions of
--steps steps (and the best), after a warm-up, ratios against the plain model. All in one
process, interleaved, so the ratios come from the same machine state; on a shared machine the
best-of figures are the steadier estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SIZE, BATCH = 50, 250
MIXUP = 0.2  # the --mixup the pipeline part times


def generate(root: Path, per_class: int = 200, seed: int = 0) -> Path:
    """224 px grey JPEGs in the three class folders (smooth shapes plus noise)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224
    for cls in ("COVID-19", "NORMAL", "Viral Pneumonia"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.2, 0.4)]
            body = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            image = 60 + 150 * body + rng.normal(0, 12, (224, 224))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").convert("RGB").save(
                root / cls / f"{i:04d}.jpg", quality=90)
    return root


def pipeline_pass(examples, data_config, mixup_alpha: float = 0.0) -> float:
    """Images per second for one full pass over a freshly built dataset; with
    ``mixup_alpha``, its batches carry weights and are blended as --mixup blends them."""
    import numpy as np
    from trainer import data, mixup
    if mixup_alpha:
        ds = mixup.mixed(data.make_dataset(examples, data_config, BATCH, training=True,
                                           weights=np.ones(len(examples), np.float32)),
                         mixup_alpha, data_config.seed)
    else:
        ds = data.make_dataset(examples, data_config, BATCH, training=True)
    start = time.perf_counter()
    n = sum(int(batch[0].shape[0]) for batch in ds)
    return n / (time.perf_counter() - start)


def bench_pipeline(data_dir: str, reps: int) -> dict:
    from trainer import config as config_lib, data
    results = {}
    configs = {}
    for name, on in (("off", False), ("on", True)):
        config = config_lib.load("vanilla", overrides={"data_dir": data_dir, "augment": on,
                                                       "check": False})
        configs[name] = config
    examples = data.make_splits(configs["off"].data).train
    assert data.make_splits(configs["on"].data).train == examples
    passes = {"off": (configs["off"], 0.0), "on": (configs["on"], 0.0),
              "mixup": (configs["on"], MIXUP)}
    rates = {name: [] for name in passes}
    pipeline_pass(examples, configs["off"].data)  # warm the file cache and tf.data
    order = list(passes)
    for rep in range(reps):  # rotating which goes first, so drifting load hits each alike
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            config, alpha = passes[name]
            rates[name].append(pipeline_pass(examples, config.data, alpha))
    for name, values in rates.items():
        results[name] = {"images_per_s": statistics.median(values), "best": max(values),
                         "runs": values}
    results["ratio_on_over_off"] = results["on"]["images_per_s"] / results["off"]["images_per_s"]
    results["ratio_best"] = results["on"]["best"] / results["off"]["best"]
    results["ratio_mixup_over_off"] = (results["mixup"]["images_per_s"]
                                       / results["off"]["images_per_s"])
    results["ratio_best_mixup"] = results["mixup"]["best"] / results["off"]["best"]
    results["images"] = len(examples)
    return results


def step_time(model, x, y, steps: int, reps: int) -> list[float]:
    """Seconds per train step, one value per repetition of ``steps`` steps."""
    for _ in range(3):  # trace and warm up
        model.train_on_batch(x, y)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        times.append((time.perf_counter() - start) / steps)
    return times


STEP_VARIANTS = ("default", "robust", "all", "robust+chest", "robust+two_views")


def film_batch(data_dir: str):
    """uint8 [BATCH, SIZE, SIZE, 3]: the first BATCH training films of ``data_dir`` as the
    trainer decodes them, or noise without one (the chest crop's search depends on content;
    the other layers' cost does not)."""
    import numpy as np
    from trainer import config as config_lib, data
    if not data_dir:
        return np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    config = config_lib.load("vanilla", overrides={"data_dir": data_dir, "check": False})
    ds = data.make_dataset(data.make_splits(config.data).train, config.data, BATCH,
                           training=False)
    return next(iter(ds))[0].numpy()


def bench_train_step(steps: int, reps: int, data_dir: str = "") -> dict:
    import numpy as np
    from trainer import config as config_lib, models, train, two_views
    from trainer.keras_api import keras
    config = config_lib.load("vanilla")
    robust = config_lib.load("robust").augment
    chest = dataclasses.replace(config.model, chest_crop=True)
    variants = {  # name -> (model config, augmentation)
        "none": (config.model, config_lib.AugmentConfig()),
        "default": (config.model, config_lib.AugmentConfig(augment=True)),
        "robust": (config.model, robust),
        "all": (config.model, dataclasses.replace(robust, noise=0.02, blur=1.0)),
        "robust+chest": (chest, robust),
        "robust+two_views": (dataclasses.replace(config.model, two_views=True), robust),
    }
    x = film_batch(data_dir)
    y = keras.utils.to_categorical(np.arange(BATCH) % 3, 3)
    built = {}
    for name, (model_config, augment) in variants.items():
        keras.utils.set_random_seed(28)
        model = models.build(model_config, SIZE, 3, augment)
        train.compile_model(model, config)
        two_views.use(model)
        built[name] = model
    times = {name: [] for name in variants}
    for name, model in built.items():  # warm-up of every model first
        step_time(model, x, y, 1, 1)
    order = list(built)
    for rep in range(reps):  # interleaved and rotated, so drifting load hits every variant alike
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            times[name] += step_time(built[name], x, y, steps, 1)
    results = {name: {"s_per_step": statistics.median(t), "best": min(t), "runs": t}
               for name, t in times.items()}
    for name in STEP_VARIANTS:
        results[f"ratio_{name}_over_none"] = (results[name]["s_per_step"]
                                              / results["none"]["s_per_step"])
        results[f"ratio_best_{name}_over_none"] = results[name]["best"] / results["none"]["best"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="an image tree (one folder per class)")
    parser.add_argument("--generate", action="store_true", help="use 600 generated JPEGs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="train steps per repetition")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--parts", default="pipeline,step",
                        help="which parts to run (comma-separated)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    results = {"command": " ".join(["python", "bench/augment_cost.py", *sys.argv[1:]]),
               "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        if "pipeline" in parts:
            data_dir = args.data or str(generate(Path(tmp) / "data"))
            if not args.data and not args.generate:
                print("no --data: using 600 generated 224 px JPEGs")
            results["pipeline_50px"] = bench_pipeline(data_dir, args.reps)
    if "step" in parts:
        results["train_step_vanilla_50px_batch250"] = bench_train_step(args.steps, args.reps,
                                                                       args.data)
    results["load_average_after"] = os.getloadavg()
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(results: dict, args) -> None:
    if "pipeline_50px" in results:
        report_pipeline(results["pipeline_50px"], args)
    if "train_step_vanilla_50px_batch250" in results:
        report_step(results["train_step_vanilla_50px_batch250"], args)
    print(f"load average before {results['load_average']}, after {results['load_average_after']}")


def report_pipeline(p: dict, args) -> None:
    print(f"input pipeline, {p['images']} images at {SIZE} px, batch {BATCH} (median of "
          f"{args.reps} passes each):")
    print(f"  augment off {p['off']['images_per_s']:8.0f} images/s (best {p['off']['best']:.0f})")
    print(f"  augment on  {p['on']['images_per_s']:8.0f} images/s (best {p['on']['best']:.0f})"
          f"   ratio on/off {p['ratio_on_over_off']:.3f} (best {p['ratio_best']:.3f})")
    print(f"  mixup {MIXUP}   {p['mixup']['images_per_s']:8.0f} images/s (best "
          f"{p['mixup']['best']:.0f})   ratio mixup/off {p['ratio_mixup_over_off']:.3f} "
          f"(best {p['ratio_best_mixup']:.3f})")


def report_step(t: dict, args) -> None:
    print(f"vanilla train step at {SIZE} px, batch {BATCH} (median of {args.reps} x "
          f"{args.steps} steps):")
    for name in ("none", *STEP_VARIANTS):
        ratio = t.get(f"ratio_{name}_over_none", 1.0)
        best = t.get(f"ratio_best_{name}_over_none", 1.0)
        print(f"  augmentation {name:<16} {t[name]['s_per_step'] * 1000:7.1f} ms/step (best "
              f"{t[name]['best'] * 1000:.1f})   ratio {ratio:.3f} (best {best:.3f})")


if __name__ == "__main__":
    main()
