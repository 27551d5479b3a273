"""bench/framing_probe.py's reframings, which docs/generalisation.md's framing figures rest on."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import REPO


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("framing_probe")


def _film() -> np.ndarray:
    """64 x 48 (rows x columns): a bright square in the middle of a dark film."""
    film = np.zeros((64, 48, 1), np.uint8)
    film[24:40, 16:32] = 200
    return film


def _bright_box(film) -> tuple[int, int]:
    """(rows, columns) of the bright part."""
    bright = np.asarray(film)[..., 0] > 100
    return int(bright.any(axis=1).sum()), int(bright.any(axis=0).sum())


@pytest.mark.parametrize("form, rows, cols", [
    ("as-is", 16, 16),
    ("narrowed", 21, 16),  # rows stretched by 1 / 0.75, columns as they were
    ("widened", 16, 21),
    ("zoomed", 21, 21),  # both: larger, its proportions kept
])
def test_each_form_stretches_what_it_says(probe, form, rows, cols):
    reframed = probe.reframe(_film(), form)
    assert np.asarray(reframed).shape == (64, 48, 1)
    assert np.asarray(reframed).dtype == np.uint8
    got_rows, got_cols = _bright_box(reframed)
    assert abs(got_rows - rows) <= 1 and abs(got_cols - cols) <= 1, (got_rows, got_cols)


def test_every_form_is_probed(probe):
    assert probe.FORMS == ("as-is", "narrowed", "widened", "zoomed")


def test_scores_give_macro_f1_over_the_classes_present(probe):
    got = probe.scores(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]), ["C", "N", "V"])
    assert got["accuracy"] == 0.75
    assert got["recall"] == {"N": 0.5, "V": 1.0}
    assert got["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert probe.scores(np.array([1, 1]), np.array([1, 2]), ["C", "N", "V"])["macro_f1"] is None
