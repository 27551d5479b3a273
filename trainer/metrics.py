"""The metrics compiled into the model, and the per-class clinical metrics computed after it.

One definition used by training and evaluation. The compiled counts are Keras' thresholded
one-hot counts over all outputs (the tutorial's), so TP + FN equals the number of images.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

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
    """Per-class table plus the confusion matrix (rows true, columns predicted)."""
    classes = report["classes"]
    width = max(len(c) for c in classes) + 2
    head = f"{'class':<{width}}{'sensitivity':>12}{'specificity':>12}{'precision':>11}" \
           f"{'f1':>8}{'support':>9}"
    lines = [head]
    for name in classes:
        r = report["per_class"][name]
        lines.append(f"{name:<{width}}{r['sensitivity']:>12.3f}{r['specificity']:>12.3f}"
                     f"{r['precision']:>11.3f}{r['f1']:>8.3f}{r['support']:>9d}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f"{c[:10]:>12}" for c in classes))
    for name, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>12d}" for v in row))
    return "\n".join(lines)
