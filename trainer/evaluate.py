"""``python -m trainer.evaluate --model_dir=RUN``: a finished run's checkpoint on its test split
(or on --test_dir), written to RUN/eval/<name>/: metrics.json, predictions.csv,
confusion_matrix.png, roc.png, gradcam.png (--gradcam=N), report.md and report.html.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import sys

from absl import flags, logging

from trainer import cli, config as config_lib, flags as trainer_flags, helptext, runs
from trainer.config import Config
from trainer.errors import ConfigError

trainer_flags.define_config_flags()
trainer_flags.define_checkpoint_flag()
flags.DEFINE_string("eval_name", "", "Output folder name under RUN/eval/. Default: "
                    "<checkpoint>-<test set>, e.g. best-test.")
flags.DEFINE_integer("gradcam", 0, "Grad-CAM overlays for N test images per class (wrong ones "
                     "first, then correct ones); 0: none.", lower_bound=0)
flags.DEFINE_float("covid_sensitivity", 0.95, "Target sensitivity of the COVID-19 operating "
                   "point (the threshold on P(COVID-19) that reaches it).",
                   lower_bound=0.0, upper_bound=1.0)

# Config fields evaluation may change: where the images are and how they are batched. The rest
# (image size, classes, interpolation, split seed, ...) is fixed by the run's config.yaml.
EVAL_OVERRIDES = ("data_dir", "test_dir", "batch_size", "cache", "cache_limit_mb", "autotune",
                  "model_dir")
DISPLAY_SIZE = 160  # Grad-CAM panels, pixels

USAGE = helptext.Usage(
    ("python -m trainer.evaluate --model_dir=RUN [--checkpoint=best|last|FILE] [--gradcam=N]",
     "python -m trainer.evaluate --model_dir=runs/vanilla-20260102-030405 --gradcam=4",
     "python -m trainer.evaluate --model_dir=RUN --checkpoint=last --test_dir=/data/hospital-b"),
    ("model_dir", "checkpoint", "eval_name", "gradcam", "covid_sensitivity",
     *EVAL_OVERRIDES[:-1]),
    defaults=helptext.RUN,
    help=(("model_dir", "The run to evaluate (the folder training wrote), local or gs://. "
           "Writes RUN/eval/<name>/: report.md and .html, metrics.json, predictions.csv, PNGs."),
          ("data_dir", "Where the run's training tree is now, if it moved: the test split is "
           "recomputed from it with the run's seed. Default: the run's data_dir."),
          ("test_dir", "Evaluate on every image of this tree (one folder per class) instead of "
           "the run's test split, e.g. another hospital's images.")))


@dataclasses.dataclass
class Options:
    model_dir: str
    checkpoint: str = "best"
    overrides: dict = dataclasses.field(default_factory=dict)
    name: str = ""
    gradcam: int = 0
    covid_sensitivity: float = 0.95


def apply_overrides(config: Config, overrides: dict) -> Config:
    """Flags on top of the run's config; fields that define the model are refused."""
    leaves = config_lib.leaf_fields()
    for name, value in overrides.items():
        if value is None or name == "model_dir":
            continue
        if name not in EVAL_OVERRIDES:
            raise ConfigError(f"--{name} cannot be changed when evaluating: the run's config.yaml "
                              f"fixes it (evaluation may change --{', --'.join(EVAL_OVERRIDES[:-1])})")
        section, _ = leaves[name]
        kind = config_lib.field_type(section, name)
        setattr(getattr(config, section), name, config_lib._coerce(value, kind, f"--{name}"))
    return config


def test_set(config: Config, other_tree: bool):
    """(examples, root, label, source roots): every image of --test_dir given here, or the
    run's own test split (its test_dir, if it had one, plus any held-out sources of its
    data_dir, as training tested). The source roots are the trees whose manifest.csv names
    the images' sources."""
    from trainer import data
    if other_tree:
        examples = data.list_examples(config.data.test_dir, config.data.classes)
        label = _slug(os.path.basename(config.data.test_dir.rstrip("/")) or "test_dir")
        return examples, config.data.test_dir, label, [config.data.test_dir]
    root = config.data.test_dir or config.data.data_dir
    return (data.make_splits(config.data).test, root, "test",
            [config.data.data_dir, config.data.test_dir])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "eval"


def positive_class(classes: list[str]) -> int:
    """The COVID-19 class for the operating point: the first name containing 'covid', else 0."""
    return next((i for i, c in enumerate(classes) if "covid" in c.lower()), 0)


def predict_probabilities(model, examples, config: Config):
    from trainer import data, models
    ds = data.make_dataset(examples, config.data, config.train.batch_size, training=False)
    return model.predict(models.feed_dataset(model, ds), verbose=0)


def pick_for_gradcam(labels, preds, n: int, n_classes: int) -> list[list[int]]:
    """Per true class, up to n indices: wrong predictions first (up to half, rounded up),
    then correct ones, then more wrong ones if there are too few correct."""
    import numpy as np
    labels, preds = np.asarray(labels), np.asarray(preds)
    picked = []
    for c in range(n_classes):
        wrong = np.flatnonzero((labels == c) & (preds != c)).tolist()
        right = np.flatnonzero((labels == c) & (preds == c)).tolist()
        take_wrong = min(len(wrong), (n + 1) // 2)
        take_right = min(len(right), n - take_wrong)
        take_wrong = min(len(wrong), n - take_right)
        picked.append(right[:take_right] + wrong[:take_wrong])
    return picked


def gradcam_figure(model, examples, picked, probs, config: Config) -> bytes:
    """Grad-CAM of the predicted class, overlaid on each picked image."""
    import numpy as np
    import tensorflow as tf
    from trainer import data, gradcam, models, plots, storage
    flat = [i for row in picked for i in row]
    if not flat:
        return plots.gradcam_png([[] for _ in picked], config.data.classes)
    size, interp = config.data.image_size, config.data.interpolation
    raw = [storage.read_bytes(examples[i].path) for i in flat]
    pixels = np.stack([data.decode_pixels(b, size, interp).numpy() for b in raw])
    maps, _ = gradcam.heatmaps(model, models.feed(model, pixels))
    shown = max(DISPLAY_SIZE, size)
    big_maps = tf.image.resize(maps[..., None], [shown, shown]).numpy()[..., 0]
    classes = config.data.classes
    cells = {}
    for k, i in enumerate(flat):
        pred = int(np.argmax(probs[i]))
        cells[i] = plots.CamCell(data.decode_image(raw[k], shown, interp).numpy(), big_maps[k],
                                 classes[examples[i].label], classes[pred], float(probs[i][pred]),
                                 examples[i].relpath)
    return plots.gradcam_png([[cells[i] for i in row] for row in picked], classes)


def evaluate(options: Options) -> tuple[str, dict]:
    """Loads, predicts, measures, draws and writes; returns the output folder and metrics."""
    import numpy as np
    from trainer import distribute, metrics, plots, sources as sources_lib, storage
    config = apply_overrides(runs.read_config(options.model_dir), options.overrides)
    warning = runs.synthetic_warning(config, options.model_dir)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    path = runs.checkpoint_path(options.model_dir, options.checkpoint)
    model = runs.load_model(path)
    runs.check_model_fits(model, config, path)
    other_tree = options.overrides.get("test_dir") is not None
    examples, root, split, source_roots = test_set(config, other_tree)
    classes = config.data.classes
    logging.info("%s", distribute.local_device_line("evaluating"))
    logging.info("evaluating %s on %d images (%s)", path, len(examples), root)

    probs = predict_probabilities(model, examples, config)
    labels = np.array([e.label for e in examples])
    preds = np.argmax(probs, axis=1)
    warning_one_class = metrics.one_class_warning(labels, preds, classes)
    if warning_one_class:
        logging.warning("%s", warning_one_class)
    covid = positive_class(classes)
    results = {"test": metrics.tutorial_metrics(labels, probs, len(classes)),
               **metrics.clinical(labels, probs, classes)}
    results["operating_point"] = {
        "class": classes[covid],
        **(metrics.operating_point(labels, probs, covid, options.covid_sensitivity) or {})}
    sources = sources_lib.tree_sources(examples, source_roots)
    if sources is not None:
        results["sources"] = metrics.source_breakdown(sources, labels, preds, classes)
    results.update(model_dir=options.model_dir, checkpoint=path, test_root=root, split=split,
                   counts={"test": np.bincount(labels, minlength=len(classes)).tolist()},
                   synthetic_data=warning is not None)

    name = _slug(options.name) if options.name else \
        f"{_slug(os.path.splitext(os.path.basename(options.checkpoint))[0])}-{split}"
    out_dir = storage.join(options.model_dir, "eval", name)
    files = {
        "metrics.json": json.dumps(results, indent=2),
        "predictions.csv": predictions_csv(examples, probs, classes, sources),
        "confusion_matrix.png": plots.confusion_matrix_png(results["confusion_matrix"], classes),
        "roc.png": plots.roc_png(labels, probs, classes, results["operating_point"]
                                 if "threshold" in results["operating_point"] else None, covid)}
    if options.gradcam:
        picked = pick_for_gradcam(labels, preds, options.gradcam, len(classes))
        files["gradcam.png"] = gradcam_figure(model, examples, picked, probs, config)
    training = training_metrics(options, split)
    sections = report_sections(results, config, files, options, training)
    from trainer import report
    title = f"Evaluation of {options.model_dir} ({os.path.basename(path)}, {split})"
    if warning:  # the report's first line says so
        title = f"SYNTHETIC DEMO DATA, NOT X-RAYS: {title[0].lower()}{title[1:]}"
        sections.insert(0, report.Section("Warning", [report.Text(warning + ".")]))
    files["report.md"] = report.to_markdown(title, sections)
    files["report.html"] = report.to_html(title, sections)
    write_files(out_dir, files)
    return out_dir, results


def training_metrics(options: Options, split: str) -> dict | None:
    """The run's own metrics.json, when this evaluation repeats it (best on its test split)."""
    from trainer import storage
    path = storage.join(options.model_dir, "metrics.json")
    if options.checkpoint != "best" or split != "test" or not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def predictions_csv(examples, probs, classes: list[str], sources) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]]
                    + (["source"] if sources else []))
    for k, (e, p) in enumerate(zip(examples, probs)):
        writer.writerow([e.path, classes[e.label], classes[int(p.argmax())],
                         *[f"{v:.6f}" for v in p]] + ([sources[k]] if sources else []))
    return out.getvalue()


def write_files(out_dir: str, files: dict) -> None:
    """Writes each file (text or bytes) into out_dir, local or gs://, replacing old ones."""
    import tensorflow as tf
    tf.io.gfile.makedirs(out_dir)
    for name, content in files.items():
        path = os.path.join(out_dir, name) if "://" not in out_dir else f"{out_dir}/{name}"
        with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_sections(results: dict, config: Config, files: dict, options: Options,
                    training: dict | None) -> list:
    from trainer import metrics
    from trainer.report import Image, Pre, Section, Table, Text
    classes = results["classes"]
    named = results["test"]
    counts = ", ".join(f"{c}: {n}" for c, n in zip(classes, results["counts"]["test"]))
    summary = [Text(f"Checkpoint {results['checkpoint']}; {results['n']} test images from "
                    f"{results['test_root']} ({results['split']} split: {counts}); images "
                    f"{config.data.image_size}x{config.data.image_size}, "
                    f"{config.data.interpolation} resize, model {config.model.architecture}.")]
    if training:
        diffs = [abs(training["test"][k] - named[k]) for k in training.get("test", {})
                 if k in named]
        same = training.get("confusion_matrix") == results["confusion_matrix"]
        summary.append(Text(f"Training-time metrics.json: accuracy {training['accuracy']:.4f}; "
                            f"this evaluation {results['accuracy']:.4f}; largest difference in "
                            f"the tutorial's metrics {max(diffs, default=0):.2g}; confusion "
                            f"matrix {'identical' if same else 'DIFFERENT'}."))
    tutorial = Table(["metric", "value"], [
        [k, f"{named[k]:.0f}" if k in ("tp", "fp", "tn", "fn") else f"{named[k]:.4f}"]
        for k in metrics.TUTORIAL_NAMES if k in named])
    head, rows = metrics.clinical_rows(results)
    acc = results["accuracy_ci95"]
    sections = [
        Section("Data and checkpoint", summary),
        Section("The tutorial's metrics", [tutorial, Text(
            "Keras' thresholded one-hot counts over all outputs (TP + FN = images).")]),
        Section("Per class", [Table(head, rows), Text(
            f"Accuracy {results['accuracy']:.3f} (95% Wilson CI {_f(acc[0])} to {_f(acc[1])}, "
            f"n={results['n']}). PPV is precision; AUC is one class vs the rest. Intervals "
            "are Wilson score intervals.")]),
        Section("Confusion matrix", [Image("confusion_matrix.png", "confusion matrix")]),
        Section("ROC curves", [Image("roc.png", "ROC curves")]),
        Section("COVID-19 operating point", _operating_blocks(results["operating_point"],
                                                              options.covid_sensitivity)),
    ]
    if "sources" in results:
        sections.append(Section("By data source", _source_blocks(results["sources"], classes)))
    if "gradcam.png" in files:
        sections.append(Section("Grad-CAM", [Text(
            f"Up to {options.gradcam} test images per true class (rows), correct (green) and "
            "wrong (red), with the heatmap of the predicted class's logit at the last "
            "convolution layer (red: most influence)."), Image("gradcam.png", "Grad-CAM")]))
    sections.append(Section("Config", [Pre(config_lib.to_yaml(config))]))
    return sections


def _operating_blocks(op: dict, target: float) -> list:
    from trainer.report import Table, Text
    if "threshold" not in op:
        return [Text(f"Not defined: the test set needs both {op['class']} and other images.")]
    ci = lambda iv: f"{_f(iv[0])} to {_f(iv[1])}" if iv else "n/a"  # noqa: E731
    return [
        Text(f"Call an image {op['class']} when P({op['class']}) >= {op['threshold']:.4g}: the "
             f"highest threshold whose sensitivity reaches the target {target:.2f}."),
        Table(["rule", "sensitivity", "95% CI", "specificity", "95% CI"], [
            [f"P >= {op['threshold']:.4g}", _f(op["sensitivity"]), ci(op["sensitivity_ci95"]),
             _f(op["specificity"]), ci(op["specificity_ci95"])],
            ["argmax (the model's class)", _f(op["argmax_sensitivity"]), "",
             _f(op["argmax_specificity"]), ""]]),
        Text(f"Specificity cost of the threshold against argmax: {op['specificity_cost']:+.3f} "
             f"(TP {op['tp']}, FN {op['fn']}, FP {op['fp']}, TN {op['tn']}). The threshold is "
             "chosen on this same test set, so its sensitivity here is optimistic; confirm it "
             "on separate images before use.")]


def _source_blocks(sources: dict, classes: list[str]) -> list:
    from trainer.report import Table, Text
    rows = []
    for source, r in sources["by_source"].items():
        true = ", ".join(f"{c} {n}" for c, n in r["true"].items() if n)
        pred = ", ".join(f"{c} {n}" for c, n in r["predicted"].items() if n)
        iv = r["accuracy_ci95"]
        rows.append([source, str(r["n"]), true, pred, f"{r['accuracy']:.3f}",
                     f"{_f(iv[0])} to {_f(iv[1])}"])
    blocks = [Table(["source", "images", "true classes", "predicted", "accuracy", "95% CI"],
                    rows)]
    if sources["confounded_classes"]:
        which = "; ".join(f"{c} only from {', '.join(sources['class_sources'][c])}"
                          for c in sources["confounded_classes"])
        blocks.append(Text(f"Warning: class and source are confounded ({which}; no other class "
                           "shares those sources). A model can score well here by recognising "
                           "the source (age, scanner, hospital markings) rather than the disease;"
                           " these metrics do not show that it detects the disease."))
    return blocks


def print_summary(out_dir: str, results: dict) -> None:
    from trainer import metrics
    print(metrics.format_named(results["test"]))
    print()
    print(metrics.format_clinical(results))
    op = results["operating_point"]
    if "threshold" in op:
        print(f"\n{op['class']} operating point: P >= {op['threshold']:.4g} gives sensitivity "
              f"{op['sensitivity']:.3f}, specificity {op['specificity']:.3f} (argmax: "
              f"{op['argmax_sensitivity']:.3f} / {op['argmax_specificity']:.3f})")
    print(f"\nwrote {out_dir}/ (report.md, report.html, metrics.json, PNGs)")


def evaluate_from_flags(argv: list[str]) -> None:
    f = trainer_flags.FLAGS
    if f.model or f.config:
        raise ConfigError("--model and --config do not apply: evaluation uses the run's "
                          "config.yaml (pass --model_dir=RUN)")
    options = Options(f.model_dir or "", f.checkpoint, trainer_flags.overrides(),
                      f.eval_name, f.gradcam, f.covid_sensitivity)
    out_dir, results = evaluate(options)
    print_summary(out_dir, results)


def run() -> None:
    cli.run(evaluate_from_flags, usage=USAGE)


if __name__ == "__main__":
    run()
