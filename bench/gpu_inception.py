"""Images/s of the inception model at 256 px on one GPU: float32 against mixed_bfloat16.

    python bench/gpu_inception.py [--batch_size=32] [--steps=40] [--warmup=10] [--policies=float32,mixed_bfloat16]

Synthetic uint8 pixels already on the device (no input pipeline), random weights (no download):
it measures the training step (forward, backward, Adam update) as train.py compiles it.
Prints one JSON line per policy, e.g. {"policy": "mixed_bfloat16", "images_per_s": ...}.
Each policy runs in its own process so the global Keras policy and XLA caches do not leak.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled


def measure(policy: str, batch_size: int, steps: int, warmup: int, jit: bool) -> dict:
    import numpy as np
    import tensorflow as tf

    from trainer import config as config_lib, models, train
    from trainer.keras_api import keras

    keras.mixed_precision.set_global_policy(policy)
    config = config_lib.load("inception", overrides={"weights": "none", "jit_compile": jit})
    model = models.build(config.model, 256, 3)
    train.compile_model(model, config)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch_size, 256, 256, 3), dtype=np.uint8))  # pixels
    y = tf.constant(np.eye(3, dtype=np.float32)[np.arange(batch_size) % 3])
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)  # trace, allocate, autotune
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    elapsed = time.perf_counter() - start
    gpus = tf.config.list_physical_devices("GPU")
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus else "cpu"
    return {"policy": policy, "device": name, "batch_size": batch_size, "steps": steps,
            "jit_compile": jit, "images_per_s": round(steps * batch_size / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one policy here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch_size, args.steps, args.warmup,
                                 args.jit_compile)), flush=True)
        return
    for policy in args.policies.split(","):
        cmd = [sys.executable, __file__, f"--one={policy}", f"--batch_size={args.batch_size}",
               f"--steps={args.steps}", f"--warmup={args.warmup}"]
        cmd += ["--jit_compile"] if args.jit_compile else []
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
