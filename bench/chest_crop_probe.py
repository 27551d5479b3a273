"""Chest-crop probe: where does --chest_crop cut each group of films, and does its box move with
the chest when a film is reframed?

    python bench/chest_crop_probe.py --data=../shared/data/cxr3 [--per_group=80]

Films are grouped by the manifest's source and class (files whose name matches an
``--apart`` regular expression in a group of their own: by default Kermany's later normal
films, NORMAL2-), decoded as the trainer decodes them (``--image_size``) and given to the
trainer's own ``chest_crop.lung_boxes``. Per group: how many keep their whole frame (nothing
trusted was found), the median box, and, for each reframing of ``bench/framing_probe.py``,
the median height and width of the box found on the reframed film over the film's own box
mapped into that frame (1.00: the box moves with the chest; a framing cue the crop removes).
Nothing is written: one table on stdout.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framing_probe import FORMS, KEEP, WHOLE, decoded, reframe  # noqa: E402  (beside this script)


def groups(data_dir: str, per_group: int, apart: list[str] = (),
           seed: int = 0) -> dict[str, list[str]]:
    """'source: class' (with ' [REGEX]' for files whose name matches one of ``apart``) -> up
    to ``per_group`` film paths, drawn at random with ``seed``."""
    from trainer import sources, storage
    source_of = sources.from_manifest(data_dir)
    if source_of is None:
        raise SystemExit(f"{data_dir}: no manifest.csv with a source column; the probe groups "
                         "films by source")
    rules = [re.compile(rule) for rule in apart]
    found: dict[str, list[str]] = {}
    for rel, source in sorted(source_of.items()):
        matched = [rule.pattern for rule in rules if rule.search(rel.rsplit("/", 1)[-1])]
        name = f"{source}: {rel.split('/', 1)[0]}" + (f" [{matched[0]}]" if matched else "")
        found.setdefault(name, []).append(storage.join(data_dir, rel))
    rng = random.Random(seed)
    return {name: rng.sample(paths, min(per_group, len(paths)))
            for name, paths in sorted(found.items())}


def expected(boxes: np.ndarray, form: str) -> np.ndarray:
    """Boxes of the films as they are, mapped into the frame of ``form`` (clipped to it)."""
    cut = (1 - KEEP) / 2
    mapped = boxes.copy()
    axes = {"narrowed": [0], "widened": [1], "zoomed": [0, 1]}.get(form, [])
    for axis in axes:  # 0: rows (top, bottom), 1: columns (left, right)
        sides = [axis, axis + 2]
        mapped[:, sides] = (np.clip(mapped[:, sides], cut, 1 - cut) - cut) / KEEP
    return mapped


def sides(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths of [N, 4] (top, left, bottom, right) boxes."""
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def probe(paths: list[str], image_size: int) -> dict:
    """One group's figures: share kept whole, median box, and per reframing the median
    height and width ratios (found / expected)."""
    import tensorflow as tf
    from trainer import chest_crop, storage
    films = [tf.io.decode_image(storage.read_bytes(path), channels=3,
                                expand_animations=False).numpy() for path in paths]

    def boxes(form: str) -> np.ndarray:
        images = decoded([reframe(film, form) for film in films], image_size)
        return chest_crop.lung_boxes(tf.cast(images, tf.float32)).numpy()

    as_is = boxes("as-is")
    height, width = sides(as_is)
    result = {"films": len(films), "whole": float(np.mean(height * width > WHOLE)),
              "box": np.median(as_is, axis=0).tolist(), "ratios": {}}
    for form in FORMS[1:]:
        (found_h, found_w), (want_h, want_w) = sides(boxes(form)), sides(expected(as_is, form))
        result["ratios"][form] = (float(np.median(found_h / want_h)),
                                  float(np.median(found_w / want_w)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="data folder with manifest.csv")
    parser.add_argument("--image_size", type=int, default=50, help="decode size (default 50)")
    parser.add_argument("--per_group", type=int, default=80,
                        help="films drawn from each source and class (default 80)")
    parser.add_argument("--apart", action="append", metavar="REGEX",
                        help="films whose file name matches form a group of their own "
                             "(repeatable; default: NORMAL2-, Kermany's later normal films)")
    args = parser.parse_args(argv)
    apart = args.apart or ["NORMAL2-"]
    for rule in apart:
        try:
            re.compile(rule)
        except re.error as err:
            raise SystemExit(f"--apart={rule!r} is not a regular expression ({err})")
    if args.image_size < 16:
        raise SystemExit(f"--image_size must be at least 16, got {args.image_size}")
    if args.per_group < 1:
        raise SystemExit(f"--per_group must be at least 1, got {args.per_group}")
    forms = FORMS[1:]
    print("| group | films | whole frame | median box (top, left, bottom, right) | "
          + " | ".join(f"{form}: height, width" for form in forms) + " |")
    print("|---|---|---|---|" + "---|" * len(forms))
    for name, paths in groups(args.data, args.per_group, apart).items():
        got = probe(paths, args.image_size)
        box = ", ".join(f"{v:.2f}" for v in got["box"])
        ratios = " | ".join("{:.2f}, {:.2f}".format(*got["ratios"][form]) for form in forms)
        print(f"| {name} | {got['films']} | {got['whole']:.2f} | {box} | {ratios} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
