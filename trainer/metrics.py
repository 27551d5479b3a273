"""The metrics compiled into the model, and the per-class clinical metrics computed after it.

One definition used by training and evaluation. The compiled counts are Keras' thresholded
one-hot counts over all outputs (the tutorial's), so TP + FN equals the number of images.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
AVERAGED = ("sensitivity", "specificity", "ppv", "npv", "f1", "auc")
LOSS = "categorical_crossentropy"  # the loss every model is compiled with (train, checkpoints)
TUTORIAL_NAMES = ("loss", "accuracy", "tp", "fp", "tn", "fn", "precision", "recall", "auc")


def compiled_metrics() -> list:
    from trainer.keras_api import keras
    m = keras.metrics
    return ["accuracy", m.TruePositives(name="tp"), m.FalsePositives(name="fp"),
            m.TrueNegatives(name="tn"), m.FalseNegatives(name="fn"),
            m.Precision(name="precision"), m.Recall(name="recall"), m.AUC(name="auc")]


def per_class(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict:
    """Per-class sensitivity, specificity, precision, F1 and support, plus the confusion matrix.

    ``y_true`` holds class indices, ``y_prob`` the softmax outputs; predictions are argmax.
    """
    labels = np.arange(len(classes))
    y_pred = np.argmax(y_prob, axis=1)
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    rows = {}
    total = cm.sum()
    for i, name in enumerate(classes):
        tp = cm[i, i]
        fp = cm[:, i].sum() - tp
        fn = cm[i, :].sum() - tp
        tn = total - tp - fp - fn
        rows[name] = {
            "sensitivity": float(recall[i]),
            "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
            "precision": float(precision[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
    return {"classes": list(classes), "per_class": rows, "confusion_matrix": cm.tolist(),
            "accuracy": float(skm.accuracy_score(y_true, y_pred))}


def format_named(values: dict) -> str:
    """The tutorial's table: one metric per line, by name."""
    lines = ["Test metrics"]
    for name in TUTORIAL_NAMES:
        if name in values:
            value = values[name]
            text = f"{value:.0f}" if name in ("tp", "fp", "tn", "fn") else f"{value:.4f}"
            lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def format_per_class(report: dict) -> str:
    """Per-class table plus the confusion matrix (rows true, columns predicted), every class
    name in full."""
    head = ["class", "sensitivity", "specificity", "precision", "f1", "support"]
    rows = [[name, *(f"{r[k]:.3f}" for k in head[1:5]), str(r["support"])]
            for name, r in ((n, report["per_class"][n]) for n in report["classes"])]
    return "\n".join([format_table(head, rows), "", _confusion_table(report)])


def wilson_interval(successes: int, n: int, z: float = Z_95) -> list[float] | None:
    """Wilson score interval for a binomial proportion (95% by default); None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def one_vs_rest_auc(y_true: np.ndarray, y_prob: np.ndarray, index: int) -> float | None:
    """ROC AUC of one class against the rest; None when the set lacks positives or negatives."""
    positive = np.asarray(y_true) == index
    if positive.all() or not positive.any():
        return None
    return float(skm.roc_auc_score(positive, np.asarray(y_prob)[:, index]))


def clinical(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict:
    """``per_class`` extended for screening: per class PPV, NPV, one-vs-rest ROC AUC and Wilson
    95% intervals of sensitivity and specificity; macro and weighted averages; accuracy with
    its interval. Zero denominators give 0 (sklearn's zero_division=0), undefined AUCs None.
    """
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    report = per_class(y_true, y_prob, classes)
    cm = np.asarray(report["confusion_matrix"])
    total = int(cm.sum())
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        fp = int(cm[:, i].sum()) - tp
        fn = int(cm[i, :].sum()) - tp
        tn = total - tp - fp - fn
        row = report["per_class"][name]
        row.update(
            ppv=row["precision"], npv=_ratio(tn, tn + fn), auc=one_vs_rest_auc(y_true, y_prob, i),
            tp=tp, fp=fp, tn=tn, fn=fn,
            sensitivity_ci95=wilson_interval(tp, tp + fn),
            specificity_ci95=wilson_interval(tn, tn + fp))
    rows = [report["per_class"][name] for name in classes]
    support = np.array([r["support"] for r in rows], dtype=float)
    averages = {}
    for kind in ("macro", "weighted"):
        averages[kind] = {}
        for key in AVERAGED:
            values = [r[key] for r in rows]
            if any(v is None for v in values):
                averages[kind][key] = None
            elif kind == "macro":
                averages[kind][key] = float(np.mean(values))
            else:
                averages[kind][key] = float(np.average(values, weights=support)) \
                    if support.sum() else 0.0
    correct = int(np.trace(cm))
    report.update(averages=averages, n=total, accuracy_ci95=wilson_interval(correct, total))
    return report


def operating_point(y_true: np.ndarray, y_prob: np.ndarray, index: int,
                    target_sensitivity: float) -> dict | None:
    """The highest threshold on P(class ``index``) whose sensitivity reaches the target, and the
    specificity it leaves, next to the argmax rule's. None without positives or negatives.

    "Positive" means score >= threshold.
    """
    y_true, scores = np.asarray(y_true), np.asarray(y_prob)[:, index]
    positive = y_true == index
    if positive.all() or not positive.any():
        return None
    fpr, tpr, thresholds = skm.roc_curve(positive, scores, drop_intermediate=False)
    reach = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
    i = int(reach[0])
    threshold = float(min(thresholds[i], 1.0))
    flagged = scores >= threshold
    tp, fn = int((flagged & positive).sum()), int((~flagged & positive).sum())
    fp, tn = int((flagged & ~positive).sum()), int((~flagged & ~positive).sum())
    argmax = np.argmax(y_prob, axis=1) == index
    argmax_tn = int((~argmax & ~positive).sum())
    argmax_spec = _ratio(argmax_tn, int((~positive).sum()))
    specificity = _ratio(tn, tn + fp)
    return {
        "target_sensitivity": float(target_sensitivity), "threshold": threshold,
        "sensitivity": _ratio(tp, tp + fn), "specificity": specificity,
        "sensitivity_ci95": wilson_interval(tp, tp + fn),
        "specificity_ci95": wilson_interval(tn, tn + fp),
        "tp": tp, "fn": fn, "fp": fp, "tn": tn,
        "argmax_sensitivity": _ratio(int((argmax & positive).sum()), int(positive.sum())),
        "argmax_specificity": argmax_spec,
        "specificity_cost": argmax_spec - specificity,
    }


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "n/a"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def clinical_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the clinical per-class table (plus macro and weighted averages)."""
    head = ["class", "sensitivity", "95% CI", "specificity", "95% CI", "PPV", "NPV", "F1",
            "AUC", "support"]
    rows = []
    for name in report["classes"]:
        r = report["per_class"][name]
        rows.append([name, _num(r["sensitivity"]), _ci(r["sensitivity_ci95"]),
                     _num(r["specificity"]), _ci(r["specificity_ci95"]), _num(r["ppv"]),
                     _num(r["npv"]), _num(r["f1"]), _num(r["auc"]), str(r["support"])])
    for kind, avg in report["averages"].items():
        rows.append([f"{kind} avg", _num(avg["sensitivity"]), "", _num(avg["specificity"]), "",
                     _num(avg["ppv"]), _num(avg["npv"]), _num(avg["f1"]), _num(avg["auc"]),
                     str(report["n"])])
    return head, rows


def format_table(head: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head)] + [line(r) for r in rows])


def format_clinical(report: dict) -> str:
    """The clinical per-class table, accuracy with its interval, and the confusion matrix."""
    head, rows = clinical_rows(report)
    acc = f"accuracy {report['accuracy']:.3f} (95% CI {_ci(report['accuracy_ci95'])}, " \
          f"n={report['n']})"
    return "\n".join([format_table(head, rows), "", acc, "", _confusion_table(report)])


def _confusion_table(report: dict) -> str:
    head = ["true \\ predicted"] + report["classes"]
    rows = [[name] + [str(v) for v in row]
            for name, row in zip(report["classes"], report["confusion_matrix"])]
    return format_table(head, rows)


def tutorial_metrics(y_true: np.ndarray, y_prob: np.ndarray, n_classes: int) -> dict:
    """The compiled metrics (and the loss) computed from saved predictions, exactly as
    ``model.evaluate`` computes them, so one prediction pass gives every number."""
    import tensorflow as tf
    from trainer.keras_api import keras
    onehot = tf.one_hot(np.asarray(y_true), n_classes)
    probs = tf.constant(np.asarray(y_prob), tf.float32)
    values = {"loss": float(keras.losses.CategoricalCrossentropy()(onehot, probs))}
    for metric in compiled_metrics():
        if metric == "accuracy":  # what Keras resolves "accuracy" to for one-hot labels
            metric = keras.metrics.CategoricalAccuracy(name="accuracy")
        metric.update_state(onehot, probs)
        values[metric.name] = float(metric.result())
    return values


def one_class_warning(labels, preds, classes: list[str]) -> str | None:
    """A warning when a model gave every image one class though the images hold several: it
    has not learnt (early stopping can keep such a checkpoint), however well it scores on a
    held-out set of that one class. None otherwise."""
    present, called = set(np.asarray(labels).tolist()), set(np.asarray(preds).tolist())
    if len(present) < 2 or len(called) != 1:
        return None
    return (f"the model calls every one of the {len(preds)} images {classes[int(called.pop())]}, "
            f"though they hold {len(present)} classes: it has not learnt to tell "
            "them apart. Train again with another --seed, a lower --learning_rate or a larger "
            "--patience.")


def source_breakdown(sources: list[str], labels, preds, classes: list[str]) -> dict:
    """Per data source: images, true, predicted and correctly predicted classes (so recall and
    F1 per class follow for a source of several classes), accuracy with its Wilson interval; and
    the classes whose sources no other class shares (class and source confounded)."""
    sources, labels, preds = np.asarray(sources), np.asarray(labels), np.asarray(preds)
    table = {}
    for source in sorted(set(sources.tolist())):
        mine = sources == source
        correct = int((labels[mine] == preds[mine]).sum())
        n = int(mine.sum())
        table[source] = {
            "n": n, "accuracy": correct / n, "accuracy_ci95": wilson_interval(correct, n),
            "true": {c: int((labels[mine] == i).sum()) for i, c in enumerate(classes)},
            "predicted": {c: int((preds[mine] == i).sum()) for i, c in enumerate(classes)},
            "correct": {c: int(((labels[mine] == i) & (preds[mine] == i)).sum())
                        for i, c in enumerate(classes)}}
    of_class = {c: set(sources[labels == i].tolist()) for i, c in enumerate(classes)}
    confounded = [c for c in classes if of_class[c] and not any(
        of_class[c] & of_class[o] for o in classes if o != c)]
    return {"by_source": table, "class_sources": {c: sorted(s) for c, s in of_class.items()},
            "confounded_classes": confounded}
