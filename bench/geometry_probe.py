"""Geometry probe: how far does the layout of a film alone tell its class?

    python bench/geometry_probe.py --data=../shared/data/cxr3 --source=kermany \
        --held_out=NORMAL2- --held_out='person([7-9][0-9][0-9]|1[0-9][0-9][0-9])_'

Each film of one source is decoded as the trainer decodes it (``--image_size``), histogram-
equalised by the trainer's own layer and reduced to two profiles, the mean of each row and the
mean of each column (trainer/layout_weights.py, which --layout_weights uses). Profiles say
where on the film the dark lungs and the bright mediastinum, diaphragm and shoulders lie, and
next to nothing about the texture inside the lungs. A logistic
regression is fitted on the profiles of the training films and scored on the held-out films
(file names matching a ``--held_out`` regular expression) as they are and reframed as
``bench/framing_probe.py`` reframes them, with the profiles together, the columns' alone and
the rows' alone. A high score as the films are, and one that reframing overturns, show a
class cue in how the films are framed: a cue that a classifier of the whole image can use
and augmentation can blur but not remove, since it differs between the classes on average.
Nothing is written: one table on stdout.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framing_probe import FORMS, cells, decoded, reframe, scores  # noqa: E402  (beside this script)
from trainer.layout_weights import equalised, layout_model, profiles  # noqa: E402

STUDY_HELD_OUT = ("NORMAL2-", "person([7-9][0-9][0-9]|1[0-9][0-9][0-9])_")
FEATURE_SETS = ("rows and columns", "columns alone", "rows alone")


def aspect_draws(images, aspect: float, draws: int):
    """``draws`` passes of the trainer's random crop of rows or columns (``--aspect``) over
    the images, stacked; the images themselves for aspect 0."""
    import tensorflow as tf
    from trainer import augment
    if not aspect:
        return images
    return tf.concat([augment.RandomAspectCrop(aspect, seed=draw)(images, training=True)
                      for draw in range(draws)], axis=0)


def framed(pixels, chest_crop: bool):
    """Decoded films, each cut to its own lung field first with ``chest_crop`` (the trainer's
    --chest_crop layer)."""
    from trainer.chest_crop import ChestCrop
    return ChestCrop()(pixels) if chest_crop else pixels


def features(stacked: np.ndarray, feature_set: str, image_size: int) -> np.ndarray:
    """The part of stacked ``profiles`` (column means, then row means) a feature set uses."""
    return {"rows and columns": stacked, "columns alone": stacked[:, :image_size],
            "rows alone": stacked[:, image_size:]}[feature_set]


def films(data_dir: str, source: str, held_out: list[str]) -> list[tuple[str, str, bool]]:
    """(path, class, held out?) of every film of ``source`` in DATA_DIR/manifest.csv."""
    from trainer import sources, storage
    source_of = sources.from_manifest(data_dir)
    if source_of is None:
        raise SystemExit(f"{data_dir}: no manifest.csv with a source column; the probe "
                         "needs one to pick the films of --source")
    rules = [re.compile(rule) for rule in held_out]
    chosen = [(storage.join(data_dir, rel), rel.split("/", 1)[0],
               any(rule.search(rel.rsplit("/", 1)[-1]) for rule in rules))
              for rel, name in sorted(source_of.items()) if name == source]
    if not chosen:
        raise SystemExit(f"{data_dir}/manifest.csv: no film of source '{source}' (--source)")
    for part, held in (("training", False), ("held-out", True)):
        if len({label for _, label, h in chosen if h == held}) < 2:
            raise SystemExit(f"--held_out leaves fewer than two classes among the {part} "
                             f"films of '{source}'; it needs both sides to hold two classes")
    return chosen


def probe(data_dir: str, source: str, held_out: list[str], image_size: int,
          aspect: float = 0.0, draws: int = 4, chest_crop: bool = False) -> list[tuple]:
    """(feature set, form, ``scores``) of a logistic regression on the films' profiles,
    trained on ``draws`` random crops of each training film where ``aspect`` > 0, every film
    cut to its lung field first with ``chest_crop``."""
    import tensorflow as tf
    from trainer import storage
    chosen = films(data_dir, source, held_out)
    classes = sorted({label for _, label, _ in chosen})
    pixels = [tf.io.decode_image(storage.read_bytes(path), channels=3,
                                 expand_animations=False).numpy() for path, _, _ in chosen]
    labels = np.array([classes.index(label) for _, label, _ in chosen])
    held = np.array([h for _, _, h in chosen])
    train_images = equalised(framed(decoded([p for p, h in zip(pixels, held) if not h],
                                            image_size), chest_crop))
    train = profiles(aspect_draws(train_images, aspect, draws))
    train_labels = np.tile(labels[~held], len(train) // len(train_images))
    tests = {form: profiles(equalised(framed(decoded([reframe(p, form) for p, h in
                                                      zip(pixels, held) if h], image_size),
                                             chest_crop))) for form in FORMS}
    rows = []
    for name in FEATURE_SETS:
        model = layout_model()
        model.fit(features(train, name, image_size), train_labels)
        for form in FORMS:
            predicted = model.predict(features(tests[form], name, image_size))
            rows.append((name, form, scores(labels[held], predicted, classes)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="data folder with manifest.csv")
    parser.add_argument("--source", default="kermany", help="the source whose films are probed")
    parser.add_argument("--held_out", action="append", metavar="REGEX",
                        help="a film whose file name matches is held out (repeatable; "
                             f"default: {' and '.join(STUDY_HELD_OUT)}, the study's later "
                             "normal films and unseen patients)")
    parser.add_argument("--image_size", type=int, default=50, help="decode size (default 50)")
    parser.add_argument("--aspect", type=float, default=0.0,
                        help="train on random crops of rows or columns of up to this fraction, "
                             "the trainer's --aspect (default 0: the films as they are)")
    parser.add_argument("--draws", type=int, default=4,
                        help="with --aspect, random crops of each training film (default 4)")
    parser.add_argument("--chest_crop", action="store_true",
                        help="cut every film to its own lung field first (the trainer's "
                             "--chest_crop): does the layout still tell the class?")
    args = parser.parse_args(argv)
    held_out = args.held_out or list(STUDY_HELD_OUT)
    if not 0 <= args.aspect < 0.5:
        raise SystemExit(f"--aspect must be in [0, 0.5), got {args.aspect}")
    if args.draws < 1:
        raise SystemExit(f"--draws must be at least 1, got {args.draws}")
    if args.image_size < 8:
        raise SystemExit(f"--image_size must be at least 8, got {args.image_size}")
    for rule in held_out:
        try:
            re.compile(rule)
        except re.error as err:
            raise SystemExit(f"--held_out={rule!r} is not a regular expression ({err})")
    print("| profiles | form | accuracy | macro-F1 | recall per class |")
    print("|---|---|---|---|---|")
    for name, form, got in probe(args.data, args.source, held_out, args.image_size,
                                 args.aspect, args.draws, args.chest_crop):
        print(f"| {name} | {form} | {cells(got)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
