"""bench/geometry_probe.py: a class told by layout alone is found, and bad input is refused
with one line naming the flag or file."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import layout_film, write_manifest

REPO = Path(__file__).resolve().parents[1]
SIZE = 48


@pytest.fixture
def probe_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("geometry_probe")


def _tree(root: Path, later_per_class: int = 6) -> Path:
    """Two classes of one source 'k' (20 films each, the last ``later_per_class`` named
    '-later-') and one film of another source."""
    rng = np.random.default_rng(0)
    rows = []
    for label in ("A", "B"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(20):
            name = f"k-{'later-' if i >= 20 - later_per_class else ''}{i}.png"
            film = layout_film(rng, label == "A", SIZE)
            (root / label / name).write_bytes(tf.io.encode_png(film[..., np.newaxis]).numpy())
            rows.append((f"{label}/{name}", label, "k"))
    other = layout_film(rng, False, SIZE)[..., np.newaxis]
    (root / "A" / "other.png").write_bytes(tf.io.encode_png(other).numpy())
    rows.append(("A/other.png", "A", "elsewhere"))
    return write_manifest(root, rows)


def test_a_class_in_the_layout_is_found_and_reframing_moves_it(tmp_path, probe_module):
    rows = probe_module.probe(str(_tree(tmp_path)), "k", ["-later-"], SIZE)
    got = {(name, form): scores for name, form, scores in rows}
    assert set(got) == {(name, form) for name in probe_module.FEATURE_SETS
                        for form in probe_module.FORMS}
    assert got[("rows alone", "as-is")]["accuracy"] == 1.0
    assert got[("rows and columns", "as-is")]["accuracy"] == 1.0
    assert got[("columns alone", "as-is")]["accuracy"] < 0.9  # the columns do not carry it
    assert set(got[("rows alone", "as-is")]["recall"]) == {"A", "B"}


def test_training_on_random_crops_draws_each_film_several_times(tmp_path, probe_module):
    images = tf.zeros((5, SIZE, SIZE, 3))
    assert probe_module.aspect_draws(images, 0.0, 4).shape[0] == 5
    assert probe_module.aspect_draws(images, 0.3, 4).shape[0] == 20
    rows = probe_module.probe(str(_tree(tmp_path)), "k", ["-later-"], SIZE, aspect=0.3, draws=2)
    assert len(rows) == len(probe_module.FEATURE_SETS) * len(probe_module.FORMS)


def test_the_films_can_be_cut_to_their_lung_fields_first(tmp_path, probe_module):
    from trainer.chest_crop import ChestCrop
    films = tf.constant(np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)), tf.uint8)
    assert probe_module.framed(films, False) is films
    np.testing.assert_array_equal(probe_module.framed(films, True), ChestCrop()(films))
    rows = probe_module.probe(str(_tree(tmp_path)), "k", ["-later-"], SIZE, chest_crop=True)
    assert len(rows) == len(probe_module.FEATURE_SETS) * len(probe_module.FORMS)


LATER = "--held_out=-later-"


@pytest.mark.parametrize("args, message", [
    (["--aspect=0.5", LATER], "--aspect must be in [0, 0.5), got 0.5"),
    (["--draws=0", LATER], "--draws must be at least 1, got 0"),
    (["--image_size=4", LATER], "--image_size must be at least 8, got 4"),
    (["--held_out=(unclosed"], "--held_out='(unclosed' is not a regular expression"),
    (["--source=nowhere", LATER], "no film of source 'nowhere' (--source)"),
    (["--held_out=."], "fewer than two classes among the training films of 'k'"),
    (["--held_out=nothing-matches"], "fewer than two classes among the held-out films"),
])
def test_bad_input_is_refused_with_one_line(tmp_path, probe_module, args, message):
    data = _tree(tmp_path)
    with pytest.raises(SystemExit) as raised:
        probe_module.main([f"--data={data}", "--source=k", *args])
    assert message in str(raised.value)


def test_a_folder_without_a_manifest_is_refused(tmp_path, probe_module):
    with pytest.raises(SystemExit, match="no manifest.csv with a source column"):
        probe_module.main([f"--data={tmp_path}"])
