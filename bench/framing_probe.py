"""Framing probe: does a trained run read the class from how a film is framed?

    python bench/framing_probe.py RUN [RUN ...]

For each run trained with ``--holdout_sources``, its held-out images (by DATA_DIR/manifest.csv)
are predicted three ways: as they are; "narrowed", the middle 3/4 of the rows cut out and
stretched back to a square (the content looks taller and narrower, as in cxr3's Kermany films,
which were squashed to a square upstream); and "widened", the middle 3/4 of the columns (the
content looks wider). Every form is re-encoded as a JPEG and read by the trainer's own decode.
A model that learnt the lungs should call a film the same class in all three forms; a large
fall shows a geometric shortcut. Nothing is written: one line per run on stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP = 0.75  # the fraction of rows (narrowed) or columns (widened) kept
FORMS = ("as-is", "narrowed", "widened")


def reframe(pixels, form: str):
    """uint8 [H, W, C] -> the same size after cutting the middle KEEP of rows or columns."""
    import tensorflow as tf
    height, width = pixels.shape[0], pixels.shape[1]
    if form == "as-is":
        return pixels
    if form == "narrowed":
        cut = int(height * (1 - KEEP) / 2)
        part = pixels[cut:height - cut]
    else:
        cut = int(width * (1 - KEEP) / 2)
        part = pixels[:, cut:width - cut]
    resized = tf.image.resize(tf.cast(part, tf.float32), (height, width), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def held_out(config) -> list[tuple[str, str]]:
    """(path, label) of every image of the run's held-out sources, from the data manifest."""
    from trainer import sources, storage
    source_of = sources.from_manifest(config.data.data_dir) or {}
    wanted = set(config.data.holdout_sources)
    return [(storage.join(config.data.data_dir, rel), rel.split("/", 1)[0])
            for rel, source in sorted(source_of.items()) if source in wanted]


def probe(model_dir: str) -> dict[str, float]:
    """Held-out accuracy of a run's best checkpoint in each form."""
    import numpy as np
    import tensorflow as tf
    from trainer import data, models, runs, storage
    config = runs.read_config(model_dir)
    items = held_out(config)
    if not items:
        raise SystemExit(f"{model_dir}: no held-out images (trained without --holdout_sources, "
                         "or DATA_DIR/manifest.csv is gone)")
    model = runs.load_model(runs.checkpoint_path(model_dir, "best"))
    classes = config.data.classes
    labels = np.array([classes.index(label) for _, label in items])
    originals = [tf.io.decode_image(storage.read_bytes(path), channels=3).numpy()
                 for path, _ in items]
    accuracy = {}
    for form in FORMS:
        images = np.stack([
            data.decode_pixels(tf.io.encode_jpeg(reframe(pixels, form), quality=90),
                               config.data.image_size, config.data.interpolation).numpy()
            for pixels in originals])
        predicted = model.predict(models.feed(model, images), verbose=0).argmax(axis=1)
        accuracy[form] = float(np.mean(predicted == labels))
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (model_dir)")
    args = parser.parse_args(argv)
    print("| run | " + " | ".join(FORMS) + " |")
    print("|---|" + "---|" * len(FORMS))
    for model_dir in args.runs:
        accuracy = probe(model_dir)
        print(f"| {model_dir} | " + " | ".join(f"{accuracy[f]:.3f}" for f in FORMS) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
