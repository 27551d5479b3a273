"""Clinical metrics against sklearn, evaluate on a saved run, plots, Grad-CAM, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from conftest import float_input_model, train_tiny_run
from trainer import metrics

CLASSES = ["COVID-19", "NORMAL", "Viral Pneumonia"]


def _random_case(seed: int, n: int, skill: float):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + skill * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


def _never_predicts_last():
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    p = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.6, .3, .1],
                  [.5, .4, .1], [.2, .5, .3], [.9, .05, .05], [.1, .8, .1]])
    return y, p


METRIC_CASES = {
    "random": _random_case(0, 60, 0.0),
    "skilled": _random_case(1, 200, 2.5),
    "imbalanced": (np.r_[np.zeros(5, int), np.ones(40, int), np.full(15, 2)],
                   _random_case(2, 60, 0.0)[1]),
    "perfect": (np.array([0, 1, 2, 2, 1, 0]), np.eye(3)[[0, 1, 2, 2, 1, 0]] * 0.9 + 0.1 / 3),
    "never_predicts_a_class": _never_predicts_last(),
}


@pytest.mark.parametrize("case", METRIC_CASES)
def test_clinical_metrics_equal_sklearn(case):
    y, p = METRIC_CASES[case]
    pred = p.argmax(axis=1)
    report = metrics.clinical(y, p, CLASSES)
    labels = [0, 1, 2]
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels,
                                                                 zero_division=0)
    for i, name in enumerate(CLASSES):
        row = report["per_class"][name]
        pos, hit = y == i, pred == i
        assert row["sensitivity"] == pytest.approx(rec[i])
        assert row["ppv"] == row["precision"] == pytest.approx(prec[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
        assert row["specificity"] == pytest.approx(skm.recall_score(~pos, ~hit, zero_division=0))
        assert row["npv"] == pytest.approx(skm.precision_score(~pos, ~hit, zero_division=0))
        assert row["auc"] == pytest.approx(skm.roc_auc_score(pos, p[:, i]))
    for kind in ("macro", "weighted"):
        s_prec, s_rec, s_f1, _ = skm.precision_recall_fscore_support(
            y, pred, labels=labels, average=kind, zero_division=0)
        avg = report["averages"][kind]
        assert (avg["ppv"], avg["sensitivity"], avg["f1"]) == pytest.approx((s_prec, s_rec, s_f1))
        assert avg["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr",
                                                             average=kind))
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert report["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    low, high = report["accuracy_ci95"]
    assert low <= report["accuracy"] <= high


def test_auc_is_none_for_a_class_absent_from_the_labels():
    y = np.array([0, 1, 0, 1])
    p = np.array([[.7, .2, .1], [.2, .7, .1], [.6, .3, .1], [.1, .8, .1]])
    report = metrics.clinical(y, p, CLASSES)
    assert report["per_class"]["Viral Pneumonia"]["auc"] is None
    assert report["averages"]["macro"]["auc"] is None
    json.dumps(report)  # None, not NaN: valid JSON


# Published Wilson 95% intervals (Newcombe 1998, table I; Brown, Cai & DasGupta 2001).
WILSON_CASES = [
    (0, 10, (0.0, 0.2775)),
    (5, 10, (0.2366, 0.7634)),
    (10, 10, (0.7225, 1.0)),
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
]


@pytest.mark.parametrize("k, n, expected", WILSON_CASES)
def test_wilson_interval(k, n, expected):
    assert metrics.wilson_interval(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_of_nothing_is_none():
    assert metrics.wilson_interval(0, 0) is None


@pytest.mark.parametrize("case", ["random", "skilled", "imbalanced"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_operating_point_is_the_highest_threshold_reaching_the_target(case, target):
    y, p = METRIC_CASES[case]
    op = metrics.operating_point(y, p, 0, target)
    pos, score = y == 0, p[:, 0]
    flagged = score >= op["threshold"]
    assert op["sensitivity"] == pytest.approx(flagged[pos].mean()) and op["sensitivity"] >= target
    assert op["specificity"] == pytest.approx((~flagged[~pos]).mean())
    higher = score[score > op["threshold"]]
    if higher.size:  # the next threshold up misses the target
        assert (score[pos] >= higher.min()).mean() < target
    assert op["specificity_cost"] == pytest.approx(op["argmax_specificity"] - op["specificity"])


# --- a saved run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny vanilla run on generated images (trained once for this module)."""
    return train_tiny_run(tmp_path_factory.mktemp("eval"), images_per_class=30, image_size=16,
                          test_per_class=6, epochs=3, seed=1)


@pytest.fixture(scope="module")
def evaluated(run_dir):
    from trainer import evaluate
    out_dir, results = evaluate.evaluate(evaluate.Options(str(run_dir), gradcam=2))
    return Path(out_dir), results


def test_evaluate_reproduces_the_training_time_metrics(run_dir, evaluated):
    out_dir, results = evaluated
    assert out_dir == run_dir / "eval" / "best-test"
    trained = json.loads((run_dir / "metrics.json").read_text())
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for name, value in trained["test"].items():
        assert saved["test"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert saved["confusion_matrix"] == trained["confusion_matrix"]
    assert saved["accuracy"] == trained["accuracy"]
    for name in CLASSES:
        for key, value in trained["per_class"][name].items():
            assert saved["per_class"][name][key] == pytest.approx(value), (name, key)
    assert saved["counts"]["test"] == [6, 6, 6]
    assert "identical" in (out_dir / "report.md").read_text()


PNGS = [("confusion_matrix.png", (600, 500)), ("roc.png", (600, 550)),
        ("gradcam.png", (400, 705))]  # Grad-CAM: 2 per class x 3 classes, 200 x 235 px each


@pytest.mark.parametrize("name, size", PNGS)
def test_plots_are_pngs_of_the_expected_size(evaluated, name, size):
    path = evaluated[0] / name
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # something was drawn


@pytest.mark.parametrize("classes", [
    ["COVID-19", "NORMAL", "Viral Pneumonia"],
    ["a", "b"],
    ["Lung Opacity (bacterial pneumonia)", "NORMAL", "COVID-19", "Viral Pneumonia"],
])
def test_class_names_are_never_cut(classes):
    """In the console tables (they cut 'Viral Pneu') and the Grad-CAM titles ('Viral Pneumo')."""
    from trainer import plots
    n = len(classes)
    y = np.arange(4 * n) % n
    report = metrics.per_class(y, np.eye(n)[y] * 0.8 + 0.2 / n, classes)
    text = metrics.format_per_class(report)
    header = next(line for line in text.splitlines() if line.startswith("true \\ predicted"))
    assert all(c in header for c in classes)
    cell = plots.CamCell(np.zeros((4, 4, 3)), np.zeros((4, 4)), classes[-1], classes[0], 0.5)
    assert plots.cam_title(cell).replace("\n", " ") == f"true {classes[-1]} pred {classes[0]} 0.50"


def test_roc_curves_with_equal_auc_stay_distinguishable():
    """Each class has its own dash pattern and marker, and its markers sit between the other
    classes' on the curve (a perfect ROC for every class drew one green line before)."""
    from matplotlib.figure import Figure
    from trainer import plots
    ax = Figure().add_subplot()
    x, y = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0])  # the perfect ROC
    for i in range(3):
        plots.draw_curve(ax, x, y, i, 3, f"class {i}")
    curves, markers = ax.lines[0::2], ax.lines[1::2]
    assert len({(str(c.get_linestyle()), c.get_marker()) for c in curves}) == 3
    positions = [tuple(zip(m.get_xdata(), m.get_ydata())) for m in markers]
    assert all(len(p) >= 5 for p in positions) and not set(positions[0]) & set(positions[1])
    for p in positions:  # on the curve: the left or the top edge
        assert all(px == 0.0 or py == 1.0 for px, py in p)


@pytest.mark.parametrize("name, must_contain", [
    ("report.md", ["## Per class", "![ROC curves](roc.png)", "COVID-19 operating point",
                   "gradcam.png", "95% CI", "macro avg", "image_size: 16"]),
    ("report.html", ["<table>", "<img src='confusion_matrix.png'", "weighted avg"]),
    ("predictions.csv", ["path,true,predicted,p_COVID-19,p_NORMAL,p_Viral Pneumonia"]),
])
def test_report_files(evaluated, name, must_contain):
    text = (evaluated[0] / name).read_text()
    for piece in must_contain:
        assert piece in text, piece


def test_a_run_on_the_demo_data_says_so_in_the_reports_first_line(evaluated):
    out_dir, results = evaluated
    assert results["synthetic_data"] is True  # the run's data is a generated demo tree
    first = (out_dir / "report.md").read_text().splitlines()[0]
    assert first.startswith("# SYNTHETIC DEMO DATA, NOT X-RAYS: evaluation of ")
    assert "<h1>SYNTHETIC DEMO DATA, NOT X-RAYS" in (out_dir / "report.html").read_text()


def test_source_breakdown_flags_a_confounded_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 2, 2, 2])
    out = metrics.source_breakdown(["a", "b", "k", "k", "k", "k"], labels, preds, CLASSES)
    assert out["confounded_classes"] == ["COVID-19"]
    assert out["by_source"]["k"]["accuracy"] == 0.75
    assert out["by_source"]["k"]["predicted"] == {"COVID-19": 0, "NORMAL": 1,
                                                  "Viral Pneumonia": 3}
    assert out["by_source"]["k"]["correct"] == {"COVID-19": 0, "NORMAL": 1,
                                                "Viral Pneumonia": 2}


@pytest.mark.parametrize("labels, preds, expected", [
    ([0, 1, 2, 2], [2, 2, 2, 2], "calls every one of the 4 images Viral Pneumonia, though they "
                                 "hold 3 classes"),
    ([1, 2], [0, 0], "calls every one of the 2 images COVID-19, though they hold 2 classes"),
    ([0, 1, 2, 2], [0, 2, 2, 2], None),  # two classes predicted
    ([1, 1, 1], [1, 1, 1], None),  # a one-class set: one predicted class is no sign
    ([1, 1, 1], [2, 2, 2], None),
])
def test_one_class_warning(labels, preds, expected):
    got = metrics.one_class_warning(labels, preds, CLASSES)
    if expected is None:
        assert got is None
    else:
        assert expected in got and "another --seed" in got


@pytest.mark.parametrize("n, expected", [
    (0, [[], [], []]),
    (1, [[0], [2], [3]]),  # a wrong one where there is one
    (2, [[1, 0], [4, 2], [3, 5]]),  # correct ones first in the row, then the wrong ones
    (3, [[1, 0], [4, 2], [3, 5]]),  # no more images than the class has
])
def test_gradcam_picks_wrong_and_correct_images(n, expected):
    from trainer import evaluate
    labels = [0, 0, 1, 2, 1, 2]
    preds = [1, 0, 0, 2, 1, 2]
    assert evaluate.pick_for_gradcam(labels, preds, n, 3) == expected


# --- Grad-CAM -----------------------------------------------------------------------------

LESION = (slice(3, 9), slice(18, 24))  # rows, columns of the bright square in 32 x 32 images


def _lesion_images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 103, size=(n, 32, 32, 3), dtype=np.uint8)  # pixels, as models take them
    y = np.arange(n) % 2
    x[y == 1, LESION[0], LESION[1], :] = 255
    return x, y


@pytest.mark.parametrize("crop, window", [
    ({}, ((0, 0), (0, 0))),
    ({"border_crop": 0.0625}, ((2, 2), (2, 2))),
    ({"lung_box": [0.0, 0.25, 0.5, 1.0]}, ((0, 16), (8, 0))),  # the heatmap maps back to the box
])
def test_gradcam_heatmap_peaks_on_the_lesion_the_model_learned(crop, window):
    from trainer import gradcam, models
    from trainer.config import ModelConfig
    from trainer.keras_api import keras
    keras.utils.set_random_seed(3)
    model = models.build(ModelConfig(**crop), 32, 2)
    assert gradcam.input_window(model) == window
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    x, y = _lesion_images(200, 0)
    model.fit(x, keras.utils.to_categorical(y, 2), epochs=4, batch_size=32, verbose=0)
    test_x, test_y = _lesion_images(8, 1)
    assert (model.predict(test_x, verbose=0).argmax(axis=1) == test_y).all()
    lesion = test_x[test_y == 1]
    maps, probs = gradcam.heatmaps(model, lesion, class_indices=[1] * len(lesion))
    assert maps.shape == (len(lesion), 32, 32)
    assert maps.max() == pytest.approx(1.0) and maps.min() >= 0
    for heat in maps:
        row, col = np.unravel_index(heat.argmax(), heat.shape)
        assert LESION[0].start - 2 <= row < LESION[0].stop + 2, (row, col)
        assert LESION[1].start - 2 <= col < LESION[1].stop + 2, (row, col)
        inside = heat[LESION].mean()
        assert inside > 2 * heat.mean()
        (top, bottom), (left, right) = window
        assert not heat[:top].any() and not heat[32 - bottom:].any()
        assert not heat[:, :left].any() and not heat[:, 32 - right:].any()


FRAMINGS = [(0.2, 0.15, 0.75, 0.85), (0.35, 0.3, 0.7, 0.7), (0.1, 0.1, 0.9, 0.9)]


def _framed_lesion_images(n: int, seed: int):
    """Drawn chests at three framings; class 1 has a bright square in the right-hand lung.
    Returns the images, labels and each square's centre (row, column) in the image."""
    from conftest import drawn_chest
    rng = np.random.default_rng(seed)
    images, labels, centres = [], [], []
    for i in range(n):
        lungs = FRAMINGS[i % len(FRAMINGS)]
        film = drawn_chest(64, lungs, seed=int(rng.integers(1 << 30)))
        top, left, bottom, right = (v * 64 for v in lungs)
        centre = (int((top + bottom) / 2), int(right - (right - left) * 0.13))
        if i % 2:
            film[centre[0] - 3:centre[0] + 3, centre[1] - 3:centre[1] + 3] = 255
        images.append(film)
        labels.append(i % 2)
        centres.append(centre)
    return np.stack(images), np.array(labels), centres


@pytest.mark.parametrize("crop", [{"chest_crop": True}, {"two_views": True}])
def test_gradcam_under_a_chest_crop_lands_on_each_films_own_lesion(crop):
    """The chest crop cuts a different box from each film: the heatmap goes back onto it (for
    two views, the mean of the whole film's map and the crop's, each tower trained)."""
    from trainer import gradcam, models, two_views
    from trainer.config import ModelConfig
    from trainer.keras_api import keras
    keras.utils.set_random_seed(3)
    model = models.build(ModelConfig(chest_margin=0.1, **crop), 64, 2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    two_views.use(model)
    x, y, _ = _framed_lesion_images(240, 0)
    model.fit(x, keras.utils.to_categorical(y, 2), epochs=12, batch_size=32, verbose=0)
    test_x, test_y, centres = _framed_lesion_images(12, 1)
    for each in two_views.towers(model) or [model]:
        assert (each.predict(test_x, verbose=0).argmax(axis=1) == test_y).all(), each.name
    ill = test_y == 1
    maps, _ = gradcam.heatmaps(model, test_x[ill], class_indices=[1] * int(ill.sum()))
    for heat, (row, col) in zip(maps, [c for c, sick in zip(centres, ill) if sick]):
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert abs(peak[0] - row) <= 4 and abs(peak[1] - col) <= 4, (peak, (row, col))


@pytest.mark.parametrize("architecture, size, layer", [("vanilla", 24, "conv"),
                                                        ("inception", 75, "inception_v3"),
                                                        ("densenet121", 32, "densenet121"),
                                                        ("small_cnn", 32, "conv4")])
def test_gradcam_finds_the_last_convolution(architecture, size, layer):
    from trainer import gradcam, models
    from trainer.config import ModelConfig
    model = models.build(ModelConfig(architecture=architecture, weights="none"), size, 3)
    assert gradcam.last_conv_layer(model).name == layer
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    maps, probs = gradcam.heatmaps(model, images)
    assert maps.shape == (2, size, size) and probs.shape == (2, 3)
    assert np.isfinite(maps).all()


# --- the command line ---------------------------------------------------------------------

def _evaluate_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "trainer.evaluate", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_named_evaluation(run_dir):
    proc = _evaluate_cli([f"--model_dir={run_dir}", "--checkpoint=last", "--eval_name=mine",
                          "--covid_sensitivity=0.9"])
    assert proc.returncode == 0, proc.stderr
    assert "Test metrics" in proc.stdout and "specificity" in proc.stdout
    assert "operating point" in proc.stdout
    assert f"\nwarning: {run_dir} was trained on the built-in SYNTHETIC" in "\n" + proc.stderr
    saved = json.loads((run_dir / "eval" / "mine" / "metrics.json").read_text())
    assert saved["checkpoint"].endswith("last.keras")
    assert saved["operating_point"]["target_sensitivity"] == 0.9


@pytest.mark.parametrize("args, message", [
    (["--model_dir=/no/such/run"], "--model_dir /no/such/run holds no run"),
    (["--image_size=32"], "--image_size cannot be changed when evaluating"),
    (["--checkpoint=/no/such.keras"], "--checkpoint: no such checkpoint"),
])
def test_cli_errors_are_one_line(run_dir, args, message):
    if not any(a.startswith("--model_dir") for a in args):
        args = [f"--model_dir={run_dir}", *args]
    proc = _evaluate_cli(args)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_float_input_checkpoint_is_evaluated_on_unit_range_images(tiny_config):
    """Runs saved before models took uint8 pixels: evaluate feeds their float input [0, 1]."""
    from trainer import data, evaluate
    size = tiny_config.data.image_size
    old = float_input_model(size)
    examples = data.make_splits(tiny_config.data).test
    probs = evaluate.predict_probabilities(old, examples, tiny_config)
    pixels = np.stack([data.decode_image(Path(e.path).read_bytes(), size).numpy()
                       for e in examples])
    np.testing.assert_allclose(probs, old.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6)
