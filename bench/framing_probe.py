"""Framing probe: does a trained run read the class from how a film is framed?

    python bench/framing_probe.py [--by_framing] [--sources=NAME[,NAME]] [--ensemble=K] RUN [RUN ...]

For each run trained with ``--holdout_sources``, its held-out images (by DATA_DIR/manifest.csv)
are predicted four ways: as they are; "narrowed", the middle 3/4 of the rows cut out and
stretched back to a square (the content looks taller and narrower, as in cxr3's Kermany films,
which were squashed to a square upstream); "widened", the middle 3/4 of the columns (the
content looks wider); and "zoomed", the middle 3/4 of both (the content larger, its
proportions kept: a film framed more tightly, with the same chest). Every form is re-encoded
as a JPEG and read by the trainer's own decode. A model that learnt the lungs should call a
film the same class in all four forms; a large fall shows a geometric shortcut, and a fall
narrowed that zooming does not give points at the proportions of the chest, not its framing.
Where the held-out images hold several classes (e.g.
``--holdout_sources=cxnet,kermany-later,kermany-p1200``), each form also gets its macro-F1 over
those classes and the recall of each: a model that calls everything NORMAL keeps its accuracy
on held-out normals whatever the framing. ``--by_framing`` also scores the films as they are
in two groups: those already framed to the chest (the chest crop, trainer/chest_crop.py, finds
no lung box in them and keeps the whole frame, as in most of cxr3's COVID-19 films) and those
framed wider (a box is found, as in nearly all of Kermany's): a model that reads the framing
finds one group's films far more often than the other's. ``--sources=NAME[,NAME]`` scores
only those of a run's held-out sources, so runs that hold out more (e.g. a source held out of
one run and validated on in another) are compared on the same films. ``--ensemble=K`` also
scores the mean of the probabilities of each K runs of a study (run folders that differ only in
-seedN, in the order given: seeds 1 to 3, then 4 to 6), an ensemble of its recipe, beside the
runs alone. Nothing is written: one line per run (or ensemble) and form on stdout.
"""
from __future__ import annotations

import argparse
import functools
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP = 0.75  # the fraction of rows (narrowed), columns (widened) or both (zoomed) kept
FORMS = ("as-is", "narrowed", "widened", "zoomed")
WHOLE = 0.99  # a chest-crop box over this share of the film is the whole frame


def reframe(pixels, form: str):
    """uint8 [H, W, C] -> the same size after keeping the middle KEEP of the rows, the
    columns or both (``form``), resized back."""
    import tensorflow as tf
    height, width = pixels.shape[0], pixels.shape[1]
    if form == "as-is":
        return pixels
    rows = int(height * (1 - KEEP) / 2) if form in ("narrowed", "zoomed") else 0
    cols = int(width * (1 - KEEP) / 2) if form in ("widened", "zoomed") else 0
    part = pixels[rows:height - rows, cols:width - cols]
    resized = tf.image.resize(tf.cast(part, tf.float32), (height, width), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decoded(films_pixels: list, image_size: int, interpolation: str = "bilinear"):
    """uint8 [H, W, 3] films -> uint8 [N, image_size, image_size, 3]: each re-encoded as a JPEG
    and read by the trainer's own decode, as a file of that form would be."""
    import tensorflow as tf
    from trainer import data
    return tf.stack([data.decode_pixels(tf.io.encode_jpeg(pixels, quality=90), image_size,
                                        interpolation) for pixels in films_pixels])


def framed_to_the_chest(images, border: int = 0):
    """bool [N]: for uint8 [N, H, W, 3] films, whether the chest crop keeps the whole frame
    (finds no lung box) once ``border`` px are cut off each side, as the model's border crop
    does: films framed to the chest already."""
    import numpy as np
    import tensorflow as tf
    from trainer import chest_crop
    height, width = images.shape[1], images.shape[2]
    inner = tf.cast(images[:, border:height - border, border:width - border], tf.float32)
    top, left, bottom, right = np.moveaxis(chest_crop.lung_boxes(inner).numpy(), 1, 0)
    return (bottom - top) * (right - left) > WHOLE


def held_out(config, only: list[str] | None = None) -> list[tuple[str, str]]:
    """(path, label) of every image of the run's held-out sources (``only`` those named, which
    must be some of them), from the data manifest."""
    from trainer import sources, storage
    source_of = sources.from_manifest(config.data.data_dir) or {}
    wanted = set(config.data.holdout_sources)
    if only:
        if not set(only) <= wanted:
            raise SystemExit(f"--sources: {', '.join(sorted(set(only) - wanted))} not held out "
                             f"by the run in {config.output.model_dir} (held out: "
                             f"{', '.join(sorted(wanted)) or 'none'})")
        wanted = set(only)
    return [(storage.join(config.data.data_dir, rel), rel.split("/", 1)[0])
            for rel, source in sorted(source_of.items()) if source in wanted]


def scores(labels, predicted, classes: list[str]) -> dict:
    """Accuracy, macro-F1 over the classes present in ``labels`` (None for one class) and the
    recall of each of them."""
    import numpy as np
    from sklearn.metrics import f1_score, recall_score
    present = sorted(set(labels.tolist()))
    recall = recall_score(labels, predicted, labels=present, average=None, zero_division=0)
    return {"accuracy": float(np.mean(predicted == labels)),
            "macro_f1": (float(f1_score(labels, predicted, labels=present, average="macro",
                                        zero_division=0)) if len(present) > 1 else None),
            "recall": {classes[c]: float(r) for c, r in zip(present, recall)}}


@functools.lru_cache(maxsize=2)
def reframed(films: tuple[str, ...], image_size: int, interpolation: str) -> dict:
    """uint8 [N, image_size, image_size, 3] of the films in each form, as the trainer decodes
    them; kept for the next runs tested on the same films (seeds of one study; two sets, for
    runs of two held-out sets given seed by seed)."""
    import tensorflow as tf
    from trainer import storage
    originals = [tf.io.decode_image(storage.read_bytes(path), channels=3).numpy()
                 for path in films]
    return {form: decoded([reframe(pixels, form) for pixels in originals], image_size,
                          interpolation).numpy() for form in FORMS}


def predictions(model_dir: str, by_framing: bool = False,
                only: list[str] | None = None) -> dict:
    """A run's best checkpoint on its held-out films (``only`` those sources where given):
    "films" (paths), "labels", "classes", "probabilities" per form and, with ``by_framing``,
    "tight" (which films as they are the chest crop keeps whole)."""
    import numpy as np
    from trainer import models, runs
    from trainer.config import border_pixels
    config = runs.read_config(model_dir)
    items = held_out(config, only)
    if not items:
        raise SystemExit(f"{model_dir}: no held-out images (trained without --holdout_sources, "
                         "or DATA_DIR/manifest.csv is gone)")
    model = runs.load_model(runs.checkpoint_path(model_dir, "best"))
    classes = config.data.classes
    got = {"films": [path for path, _ in items], "classes": classes,
           "labels": np.array([classes.index(label) for _, label in items]),
           "probabilities": {}, "tight": None}
    forms = reframed(tuple(got["films"]), config.data.image_size, config.data.interpolation)
    for form, images in forms.items():
        got["probabilities"][form] = model.predict(models.feed(model, images), verbose=0)
        if by_framing and form == "as-is":
            got["tight"] = framed_to_the_chest(images, border_pixels(config.data.image_size,
                                                                     config.model.border_crop))
    return got


def scored(got: dict) -> dict[str, dict]:
    """``scores`` of ``predictions`` in each form and, where it has "tight", of the films as
    they are in the two framings."""
    labels, classes = got["labels"], got["classes"]
    result = {}
    for form, probabilities in got["probabilities"].items():
        predicted = probabilities.argmax(axis=1)
        result[form] = scores(labels, predicted, classes)
        if got["tight"] is not None and form == "as-is":
            tight = got["tight"]
            for name, chosen in (("framed to the chest", tight), ("framed wider", ~tight)):
                if chosen.any():
                    result[f"as-is, {name} ({chosen.sum()})"] = scores(
                        labels[chosen], predicted[chosen], classes)
    return result


def probe(model_dir: str, by_framing: bool = False,
          only: list[str] | None = None) -> dict[str, dict]:
    """Held-out scores (``scores``) of a run's best checkpoint in each form, on ``only`` those
    held-out sources where given; with ``by_framing``, also of the films as they are framed
    to the chest and framed wider."""
    return scored(predictions(model_dir, by_framing, only))


def ensemble(members: list[tuple[str, dict]]) -> dict:
    """The mean of several runs' ``predictions`` (the framing groups of the first): runs of one
    study that differ only in their seed, an ensemble of its recipe."""
    import numpy as np
    first_dir, first = members[0]
    for model_dir, got in members[1:]:
        if got["films"] != first["films"] or got["classes"] != first["classes"]:
            raise SystemExit(f"--ensemble: {model_dir} and {first_dir} were not tested on the "
                             "same held-out films and classes")
    return {**first, "probabilities": {
        form: np.mean([got["probabilities"][form] for _, got in members], axis=0)
        for form in first["probabilities"]}}


def ensembles(study_runs: list[str], size: int) -> list[list[str]]:
    """One study's runs in groups of ``size``, in the order given; runs left over are left out
    (with a line on stderr)."""
    whole = len(study_runs) - len(study_runs) % size
    if whole < len(study_runs):
        print(f"--ensemble={size}: {', '.join(study_runs[whole:])} left out (not a whole "
              "ensemble)", file=sys.stderr)
    return [study_runs[k:k + size] for k in range(0, whole, size)]


def study_of(model_dir: str) -> str:
    """A run folder's study: its name without -seedN."""
    return re.sub(r"-seed\d+$", "", Path(model_dir).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (model_dir)")
    parser.add_argument("--by_framing", action="store_true",
                        help="also score the films as they are, framed to the chest and wider")
    parser.add_argument("--sources", default="", metavar="NAME[,NAME]",
                        help="score only these of each run's held-out sources (runs that hold "
                             "out more sources than they are compared on)")
    parser.add_argument("--ensemble", type=int, default=0, metavar="K",
                        help="also score the mean of each K runs of a study (in the order "
                             "given), as one model")
    args = parser.parse_args(argv)
    if args.ensemble == 1 or args.ensemble < 0:
        parser.error(f"--ensemble={args.ensemble}: give 2 or more runs per ensemble (0: none)")
    only = [name for name in args.sources.split(",") if name]
    print("| run | form | accuracy | macro-F1 | recall per class |")
    print("|---|---|---|---|---|")
    studies: dict[tuple[str, str], list[dict]] = {}
    kept: dict[str, dict] = {}
    by_study: dict[str, list[str]] = {}
    for model_dir in args.runs:
        got = predictions(model_dir, args.by_framing, only)
        study = study_of(model_dir)
        if args.ensemble:
            kept[model_dir] = got
            by_study.setdefault(study, []).append(model_dir)
        for form, result in scored(got).items():
            print(f"| {model_dir} | {form} | {cells(result)} |", flush=True)
            studies.setdefault((study, form), []).append(result)
    if args.ensemble:
        for study, study_runs in by_study.items():
            for group in ensembles(study_runs, args.ensemble):
                name = " + ".join(Path(model_dir).name for model_dir in group)
                mean = ensemble([(model_dir, kept[model_dir]) for model_dir in group])
                for form, result in scored(mean).items():
                    print(f"| {name} | {form} | {cells(result)} |", flush=True)
                    studies.setdefault((f"{study}, ensembles of {args.ensemble}", form),
                                       []).append(result)
    print("\nMedians over the runs of each study (run folders that differ only in -seedN):\n")
    print("| study | form | runs | accuracy | macro-F1 | recall per class |")
    print("|---|---|---|---|---|---|")
    for (study, form), results in studies.items():
        print(f"| {study} | {form} | {len(results)} | {cells(median_scores(results))} |")
    return 0


def median_scores(runs: list[dict]) -> dict:
    """Per-figure medians of several runs' ``scores``."""
    f1s = [r["macro_f1"] for r in runs if r["macro_f1"] is not None]
    return {"accuracy": statistics.median(r["accuracy"] for r in runs),
            "macro_f1": statistics.median(f1s) if f1s else None,
            "recall": {c: statistics.median(r["recall"][c] for r in runs)
                       for c in runs[0]["recall"]}}


def cells(got: dict) -> str:
    """'accuracy | macro-F1 | recall per class' table cells."""
    f1 = "-" if got["macro_f1"] is None else f"{got['macro_f1']:.3f}"
    recall = ", ".join(f"{c} {r:.3f}" for c, r in got["recall"].items())
    return f"{got['accuracy']:.3f} | {f1} | {recall}"


if __name__ == "__main__":
    sys.exit(main())
