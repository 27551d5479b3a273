"""bench/framing_probe.py's reframings, which docs/generalisation.md's framing figures rest on,
and its split of the films as they are into those framed to the chest and those framed wider."""
from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, drawn_chest, write_manifest


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


# Films cut through the lung tops (the lungs reach the film's top edge) or without lungs keep
# their whole frame under the chest crop; a chest on a black film does not.
TIGHT = drawn_chest(48, (-0.1, 0.05, 0.9, 0.95), surround=False)
WIDE = drawn_chest(48, (0.2, 0.15, 0.7, 0.85))


@pytest.mark.parametrize("name, film, border, framed_to_the_chest", [
    ("a chest on a black film", WIDE, 0, False),
    ("the same, its border cut", WIDE, 2, False),
    ("cut through the lung tops", TIGHT, 0, True),
    ("the same, its border cut", TIGHT, 2, True),
    ("flat grey", np.full((48, 48, 3), 128, np.uint8), 0, True),
])
def test_films_framed_to_the_chest_are_those_the_crop_keeps_whole(probe, name, film, border,
                                                                 framed_to_the_chest):
    assert probe.framed_to_the_chest(film[None], border).tolist() == [framed_to_the_chest]


def _held_out_run(root, seed: int = 28) -> str:
    """A run trained with source 'new' (six COVID-19 films) held out, three of its films framed
    to the chest and three framed wider; its folder."""
    from trainer import config as config_lib, train
    data = root / "data"
    if not data.exists():
        rows = []
        for k, label in enumerate(config_lib.TUTORIAL_CLASSES):
            (data / label).mkdir(parents=True)
            for i in range(12):
                source = "new" if label == "COVID-19" and i < 6 else "old"
                film = TIGHT if (label == "COVID-19") == (i % 2 == 0) else WIDE
                rng = np.random.default_rng(12 * k + i)  # no two films alike (the data check)
                noisy = np.clip(film + rng.integers(-3, 4, film.shape), 0, 255).astype(np.uint8)
                (data / label / f"{i}.png").write_bytes(tf.io.encode_png(noisy).numpy())
                rows.append((f"{label}/{i}.png", label, source))
        write_manifest(data, rows)
    model_dir = root / f"run-seed{seed}"
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(data), "image_size": 48, "test_per_class": 2, "seed": seed,
        "holdout_sources": ["new"], "epochs": 1, "batch_size": 8, "model_dir": str(model_dir)})
    train.run(config)
    return str(model_dir)


def test_by_framing_scores_each_group_of_the_held_out_films(tmp_path, probe):
    """The held-out films as they are, scored in two groups that part them (three framed to
    the chest, three framed wider)."""
    run = _held_out_run(tmp_path)
    got = probe.probe(run, by_framing=True)
    assert list(got) == ["as-is", "as-is, framed to the chest (3)", "as-is, framed wider (3)",
                         *probe.FORMS[1:]]
    assert all(set(scores["recall"]) == {"COVID-19"} for scores in got.values())
    assert "as-is, framed wider (3)" not in probe.probe(run)


def _predictions(probabilities, films=("a", "b", "c")) -> dict:
    return {"films": list(films), "classes": ["C", "N", "V"], "labels": np.array([0, 1, 2]),
            "probabilities": {"as-is": np.array(probabilities, np.float32)}, "tight": None}


def test_an_ensemble_scores_the_mean_of_its_members_probabilities(probe):
    """Each member gets one film of three right; their mean gets all three."""
    first = _predictions([[0.6, 0.4, 0.0], [0.0, 0.4, 0.6], [0.6, 0.0, 0.4]])
    second = _predictions([[0.0, 0.6, 0.4], [0.0, 1.0, 0.0], [0.0, 0.4, 0.6]])
    assert probe.scored(first)["as-is"]["accuracy"] == pytest.approx(1 / 3)
    mean = probe.ensemble([("r-seed1", first), ("r-seed2", second)])
    np.testing.assert_allclose(mean["probabilities"]["as-is"],
                               [[0.3, 0.5, 0.2], [0.0, 0.7, 0.3], [0.3, 0.2, 0.5]])
    assert probe.scored(mean)["as-is"]["recall"] == {"C": 0.0, "N": 1.0, "V": 1.0}


def test_an_ensemble_refuses_runs_tested_on_other_films(probe):
    with pytest.raises(SystemExit, match="r-seed2 and r-seed1 were not tested on the same"):
        probe.ensemble([("r-seed1", _predictions(np.eye(3))),
                        ("r-seed2", _predictions(np.eye(3), films=("a", "b", "d")))])


@pytest.mark.parametrize("runs, size, groups, left_out", [
    (["s1", "s2", "s3", "s4", "s5", "s6"], 3, [["s1", "s2", "s3"], ["s4", "s5", "s6"]], ""),
    (["s1", "s2", "s3", "s4", "s5"], 2, [["s1", "s2"], ["s3", "s4"]], "s5 left out"),
    (["s1", "s2"], 3, [], "s1, s2 left out"),
])
def test_ensembles_group_a_studys_runs_in_the_order_given(probe, capsys, runs, size, groups,
                                                         left_out):
    assert probe.ensembles(runs, size) == groups
    assert left_out in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1", "-2"])
def test_ensemble_of_fewer_than_two_runs_is_refused(probe, capsys, value):
    with pytest.raises(SystemExit):
        probe.main([f"--ensemble={value}", "some-run"])
    assert f"--ensemble={value}: give 2 or more runs" in capsys.readouterr().err


def test_ensemble_rows_come_beside_each_runs(tmp_path, probe, capsys):
    """Two seeds of a study: each run's rows, one ensemble's rows, and medians of both."""
    runs = [_held_out_run(tmp_path, seed) for seed in (1, 2)]
    assert probe.main(["--ensemble=2", *runs]) == 0
    out = capsys.readouterr().out
    expected = probe.scored(probe.ensemble([(run, probe.predictions(run)) for run in runs]))
    for form, result in expected.items():
        assert f"| run-seed1 + run-seed2 | {form} | {probe.cells(result)} |" in out
        assert f"| run, ensembles of 2 | {form} | 1 | {probe.cells(result)} |" in out
    assert f"| run | as-is | 2 |" in out


@pytest.mark.parametrize("only, expected", [
    (None, ["C/n1.png", "C/n2.png", "N/n2b.png"]),
    (["new2"], ["C/n2.png", "N/n2b.png"]),
    (["new1", "new2"], ["C/n1.png", "C/n2.png", "N/n2b.png"]),
    (["old"], "--sources: old not held out by the run in /r (held out: new1, new2)"),
    (["new1", "zz"], "--sources: zz not held out"),
])
def test_sources_narrow_the_held_out_films_to_those_named(tmp_path, probe, only, expected):
    from trainer import config as config_lib
    write_manifest(tmp_path, [("C/n1.png", "C", "new1"), ("C/n2.png", "C", "new2"),
                              ("N/n2b.png", "N", "new2"), ("N/o.png", "N", "old")])
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(tmp_path), "holdout_sources": ["new1", "new2"], "model_dir": "/r"})
    if isinstance(expected, str):
        with pytest.raises(SystemExit, match=re.escape(expected)):
            probe.held_out(config, only)
    else:
        got = probe.held_out(config, only)
        assert [path for path, _ in got] == [str(tmp_path / rel) for rel in expected]
        assert [label for _, label in got] == [rel[0] for rel in expected]
