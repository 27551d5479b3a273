"""The evaluation's figures as PNG bytes: confusion matrix, ROC curves, Grad-CAM overlays.

matplotlib's object API (no pyplot state), so figures are independent and the size of each
PNG is fixed: FIGSIZE inches x DPI.
"""
from __future__ import annotations

import dataclasses
import io
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn import metrics as skm

DPI = 100
CONFUSION_SIZE = (6.0, 5.0)  # inches -> 600 x 500 px
ROC_SIZE = (6.0, 5.5)  # 600 x 550 px
CELL_INCHES = 2.0  # one Grad-CAM image


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def confusion_matrix_png(cm: list[list[int]], classes: list[str]) -> bytes:
    """Counts, and each row's share of its true class, coloured by that share."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=CONFUSION_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [wrapped(c) for c in classes], rotation=20, ha="right")
    ax.set_yticks(ticks, [wrapped(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (n={cm.sum()})")
    fig.colorbar(im, ax=ax, label="share of the true class")
    return _png(fig)


LINE_STYLES = ("-", "--", "-.", (0, (1, 1.5)))
MARKERS = ("o", "s", "^", "D", "v", "P")


def along(x: np.ndarray, y: np.ndarray, start: float, step: float) -> tuple:
    """Points every ``step`` of the curve's length from ``start``: marker positions that lie
    on the curve even where it has few vertices (a perfect ROC has three)."""
    length = np.r_[0, np.cumsum(np.hypot(np.diff(x), np.diff(y)))]
    at = np.arange(start, length[-1], step)
    return np.interp(at, length, x), np.interp(at, length, y)


MARKER_STEP = 0.3  # curve length between two markers of one class (axes run 0 to 1)


def draw_curve(ax, x, y, index: int, count: int, label: str) -> None:
    """Class ``index`` of ``count``: its own dash pattern, width and markers, the markers
    placed between the other classes', so curves that coincide (equal AUCs) stay visible."""
    line, = ax.plot(x, y, linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                    linewidth=2.4 - 0.5 * (index % 3), marker=MARKERS[index % len(MARKERS)],
                    markersize=6, markerfacecolor="none", markevery=[], label=label)
    start = MARKER_STEP * (index + 0.5) / max(count, 1)
    mx, my = along(np.asarray(x, float), np.asarray(y, float), start, MARKER_STEP)
    ax.plot(mx, my, linestyle="none", marker=line.get_marker(), markersize=6,
            markerfacecolor="none", color=line.get_color())


def wrapped(name: str, width: int = 16) -> str:
    """A class name broken over lines at spaces (never cut)."""
    return "\n".join(textwrap.wrap(name, width, break_long_words=False)) or name


def roc_png(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
            operating: dict | None = None, operating_class: int | None = None) -> bytes:
    """One-vs-rest ROC curve per class with its AUC; the operating point when given."""
    fig = Figure(figsize=ROC_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for i, name in enumerate(classes):
        positive = np.asarray(y_true) == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = skm.roc_curve(positive, np.asarray(y_prob)[:, i])
        auc = skm.auc(fpr, tpr)
        draw_curve(ax, fpr, tpr, i, len(classes), f"{name} (AUC {auc:.3f})")
    if operating:
        ax.plot(1 - operating["specificity"], operating["sensitivity"], "k*", markersize=12,
                label=f"{classes[operating_class]} at p >= {operating['threshold']:.3g}: "
                      f"sens {operating['sensitivity']:.2f}, spec {operating['specificity']:.2f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC, one class vs the rest")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


@dataclasses.dataclass
class CamCell:
    """One Grad-CAM panel: the image and heatmap (same H x W), its labels and confidence."""

    image: np.ndarray
    heatmap: np.ndarray
    true: str
    predicted: str
    probability: float
    name: str = ""


def cam_title(cell: CamCell) -> str:
    """'true X' over 'pred Y 0.87', class names in full (wrapped at spaces when long)."""
    return f"{wrapped('true ' + cell.true, 30)}\n" \
        f"{wrapped(f'pred {cell.predicted} {cell.probability:.2f}', 30)}"


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image blended with the heatmap in the jet colour map, float RGB in [0, 1]."""
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image + alpha * colours, 0, 1)


def gradcam_png(rows: list[list[CamCell]], row_titles: list[str]) -> bytes:
    """A grid: one row per class, its cells side by side; green titles correct, red wrong."""
    n_cols = max(1, max((len(r) for r in rows), default=1))
    fig = Figure(figsize=(CELL_INCHES * n_cols, (CELL_INCHES + 0.35) * len(rows)), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (cells, title) in enumerate(zip(rows, row_titles)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(cells):
                if c == 0:
                    ax.text(0.5, 0.5, f"{title}: no images", ha="center", va="center")
                continue
            cell = cells[c]
            ax.imshow(overlay(cell.image, cell.heatmap))
            ok = cell.true == cell.predicted
            ax.set_title(cam_title(cell), fontsize=7, color="darkgreen" if ok else "red")
    return _png(fig)
