"""The figures of ``compare`` and ``report``, drawn with matplotlib and returned as PNG bytes."""

from __future__ import annotations

import base64
import io

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def png_base64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def forest_figure(labels: list[str], points: list[float], intervals: list[tuple[float, float]],
                  colours: list[str], xlabel: str, title: str, chance: float | None = None,
                  line_label: str = "chance") -> bytes:
    """Point + interval per row, the first row at the top; the height follows the number of rows and
    the labels are never cut (bbox_inches="tight")."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * n))
    for y, k in enumerate(reversed(range(n))):
        low, high = intervals[k]
        ax.plot([low, high], [y, y], color=colours[k], linewidth=2)
        ax.plot(points[k], y, "o", color=colours[k])
    ax.set_yticks(range(n), list(reversed(labels)), fontsize=8)
    if chance is not None:
        ax.axvline(chance, color="#aa3333", linestyle="--", linewidth=1, label=f"{line_label} ({chance:.2f})")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> str:
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=float)
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 0.45 * len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for ax, values, title, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                                   (axes[1], normalised, "row-normalised (recall on the diagonal)", "{:.2f}")):
        ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        low, span = values.min(), (values.max() - values.min()) or 1
        for i in range(len(classes)):
            for j in range(len(classes)):  # white on the dark half of the colour scale, which runs min to max
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if (values[i, j] - low) / span > 0.5 else "black")
    return _png(fig)


def roc_figure(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for k, name in enumerate(classes):
        positive = labels == name
        if 0 < positive.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positive, proba[:, k])
            ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} ({roc_auc_score(positive, proba[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC (AUROC)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def reliability_figure(labels: np.ndarray, proba: np.ndarray, classes: list[str], bins: int = 10) -> str:
    plt = _pyplot()
    confidence = proba.max(axis=1)
    correct = np.array(classes)[proba.argmax(axis=1)] == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    centres, accuracy, share = [], [], []
    for b in range(bins):
        inside = which == b
        if inside.any():
            centres.append(confidence[inside].mean())
            accuracy.append(correct[inside].mean())
            share.append(inside.mean())
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot(centres, accuracy, "o-", color="#2b6cb0", label="this run")
    for x, y, s in zip(centres, accuracy, share, strict=True):
        ax.annotate(f"{s:.0%}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, -9))
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (share of images per bin)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)
