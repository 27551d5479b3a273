"""bench/chest_crop_probe.py: groups by source, class and --apart; a box that moves with the
chest reads 1.00; a film without lungs reads as kept whole; bad input is refused in one line."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, drawn_chest, write_manifest

SIZE = 64


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("chest_crop_probe")


def _tree(root: Path) -> Path:
    """Source 'k': 4 drawn chests per class, the last two of class A named 'later-'; source
    'flat': 3 flat grey films of class B."""
    rows = []
    for label in ("A", "B"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            name = f"{'later-' if label == 'A' and i >= 2 else ''}k{i}.png"
            film = drawn_chest(SIZE, (0.2 + 0.02 * i, 0.15, 0.75, 0.85), seed=i)
            (root / label / name).write_bytes(tf.io.encode_png(film).numpy())
            rows.append((f"{label}/{name}", label, "k"))
    for i in range(3):
        film = np.full((SIZE, SIZE, 3), 120, np.uint8)
        (root / "B" / f"flat{i}.png").write_bytes(tf.io.encode_png(film).numpy())
        rows.append((f"B/flat{i}.png", "B", "flat"))
    return write_manifest(root, rows)


def test_groups_by_source_class_and_apart(tmp_path, probe):
    found = probe.groups(str(_tree(tmp_path)), per_group=10, apart=["^later-"])
    assert {name: len(paths) for name, paths in found.items()} == {
        "flat: B": 3, "k: A": 2, "k: A [^later-]": 2, "k: B": 4}
    assert len(probe.groups(str(tmp_path), per_group=1)["k: B"]) == 1


@pytest.mark.parametrize("form, box, mapped", [
    ("as-is", [0.2, 0.1, 0.8, 0.9], [0.2, 0.1, 0.8, 0.9]),
    ("narrowed", [0.2, 0.1, 0.8, 0.9], [0.1, 0.1, 0.9, 0.9]),        # rows stretched by 4/3
    ("widened", [0.2, 0.1, 0.8, 0.9], [0.2, 0.0, 0.8, 1.0]),         # columns, clipped
    ("zoomed", [0.5, 0.5, 0.875, 0.875], [0.5, 0.5, 1.0, 1.0]),
])
def test_boxes_map_into_each_reframing(probe, form, box, mapped):
    np.testing.assert_allclose(probe.expected(np.array([box]), form)[0], mapped, atol=1e-6)


def test_drawn_chests_move_with_the_frame_and_flat_films_keep_it(tmp_path, probe):
    found = probe.groups(str(_tree(tmp_path)), per_group=10)
    chests = probe.probe(found["k: B"], SIZE)
    assert chests["whole"] == 0.0 and chests["box"][0] > 0.1
    for form, (height, width) in chests["ratios"].items():
        assert 0.85 < height < 1.15 and 0.85 < width < 1.15, form
    assert probe.probe(found["flat: B"], SIZE)["whole"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--image_size=8"], "--image_size must be at least 16, got 8"),
    (["--per_group=0"], "--per_group must be at least 1, got 0"),
    (["--apart=(open"], "--apart='(open' is not a regular expression"),
])
def test_bad_input_is_refused_with_one_line(tmp_path, probe, args, message):
    with pytest.raises(SystemExit) as raised:
        probe.main([f"--data={_tree(tmp_path)}", *args])
    assert message in str(raised.value)


def test_a_folder_without_a_manifest_is_refused(tmp_path, probe):
    with pytest.raises(SystemExit, match="no manifest.csv with a source column"):
        probe.main([f"--data={tmp_path}"])
