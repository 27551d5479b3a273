"""Lung-field crop: one box, measured on the training images' lung masks, cut from every image.

Masks come with training data (the COVID-19 Radiography Database's ``CLASS/masks/``) but not
with the films a hospital sends to ``predict`` or to the serving model, so the crop cannot be
per image. The trainer measures once where the lungs lie across the training masks (the box
that holds, on each side, the lungs of ``COVERAGE`` of them, widened by a margin), records it
as ``model.lung_box`` in the run's config, and the model crops that box and resizes it back to
``image_size``: training, evaluation, prediction and serving crop alike.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np

from trainer.errors import DataError

COVERAGE = 0.95  # each side of the box holds the lungs of 95% of the masks (a few are wrong)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(top, left, bottom, right) of a mask's lung pixels as fractions of its height and width,
    bottom and right exclusive; None for a mask without lung pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    height, width = mask.shape[:2]
    return (rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width)


def field_box(boxes: Sequence[Sequence[float]], margin: float,
              coverage: float = COVERAGE) -> list[float]:
    """The box whose every side holds ``coverage`` of ``boxes``, widened by ``margin`` of its
    height and width on each side and clipped to the image: [top, left, bottom, right]."""
    tops, lefts, bottoms, rights = np.asarray(boxes, dtype=float).T
    low = (1 - coverage) * 100
    top, left = np.percentile(tops, low), np.percentile(lefts, low)
    bottom, right = np.percentile(bottoms, 100 - low), np.percentile(rights, 100 - low)
    grow_y, grow_x = margin * (bottom - top), margin * (right - left)
    sides = (max(0.0, top - grow_y), max(0.0, left - grow_x), min(1.0, bottom + grow_y),
             min(1.0, right + grow_x))
    return [_outwards(v, 10_000, up=i >= 2) / 10_000 for i, v in enumerate(sides)]


def _outwards(value: float, scale: int, up: bool) -> int:
    """``value * scale`` rounded outwards (up for bottom and right) so that the lungs stay
    inside; the 1e-6 absorbs float error (0.14 * 1e4 is 1399.9999...)."""
    scaled = value * scale
    return math.ceil(scaled - 1e-6) if up else math.floor(scaled + 1e-6)


def pixel_crop(box: Sequence[float], image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``box`` (fractions) as Cropping2D's ((top, bottom), (left, right)) pixels cut off an
    ``image_size`` image, rounding outwards so that the lungs stay inside."""
    top, left, bottom, right = (_outwards(v, image_size, up=i >= 2) for i, v in enumerate(box))
    return (top, image_size - bottom), (left, image_size - right)


def read_mask(path: str) -> np.ndarray:
    """A mask file as a boolean array (lung where the grey level is above half)."""
    from PIL import Image

    from trainer import storage
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
            return np.asarray(image.convert("L")) > 127
    except Exception as err:  # unreadable or missing: name the file
        raise DataError(f"--lung_crop: cannot read the lung mask {path} "
                        f"({str(err).splitlines()[0][:200]})") from None


def measure(examples: Sequence, classes: Sequence[str], margin: float) -> list[float]:
    """The lung-field box of the training ``examples``' masks (logs what it read)."""
    from absl import logging

    from trainer.progress import Progress
    with_mask = [e for e in examples if e.mask]
    if not with_mask:
        raise DataError("--lung_crop needs lung masks: none of the training images has one (the "
                        "database layout keeps them in CLASS/masks/ beside CLASS/images/, with "
                        "the image's name); drop --lung_crop or add the masks")
    unmasked = sorted({classes[e.label] for e in examples} - {classes[e.label] for e in with_mask})
    if unmasked:
        logging.warning("--lung_crop: no lung masks for class(es) %s; the lung field is measured "
                        "on the other classes' masks", ", ".join(unmasked))
    bar = Progress(len(with_mask), "lung masks", "masks")
    boxes = []
    for example in with_mask:
        box = mask_box(read_mask(example.mask))
        if box is not None:
            boxes.append(box)
        bar.update()
    if not boxes:
        raise DataError(f"--lung_crop: all {len(with_mask)} lung masks are empty (no pixel above "
                        f"half grey), e.g. {with_mask[0].mask}")
    box = field_box(boxes, margin)
    logging.info("lung field from %d of %d training images' masks: top %.3f, left %.3f, bottom "
                 "%.3f, right %.3f of the image (recorded as model.lung_box)", len(boxes),
                 len(examples), *box)
    return box


def with_box(config, examples: Sequence):
    """``config`` with model.lung_box measured on ``examples`` (a copy; unchanged without
    --lung_crop)."""
    if not config.model.lung_crop:
        return config
    box = measure(examples, config.data.classes, config.model.lung_margin)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, lung_box=box))


def crop_layers(box: Sequence[float], image_size: int) -> list:
    """The model's first layers for ``box``: crop it, then resize it back to ``image_size``
    (none for an empty box)."""
    if not box:
        return []
    from trainer.keras_api import keras
    return [keras.layers.Cropping2D(pixel_crop(box, image_size), name="lung_crop",
                                    dtype="float32"),
            keras.layers.Resizing(image_size, image_size, name="lung_resize", dtype="float32")]
