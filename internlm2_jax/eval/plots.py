"""Plots of eval results (matplotlib, Agg backend): the needle heat map and a bar chart of suite scores."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def needle_heatmap(grid: Sequence[Sequence[float]], context_lengths: Sequence[int], depths: Sequence[float],
                   path: str, title: str = "Needle in a haystack") -> str:
    """Writes the report-style heat map: x = context length, y = depth % (0 at top), color = score.

    `grid` is `[len(context_lengths)][len(depths)]` scores in [0, 1] (transposed for display).
    Returns `path`.
    """
    plt = _pyplot()
    scores = np.asarray(grid, np.float32).reshape(len(context_lengths), len(depths)).T  # [D, L]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(context_lengths) + 2.5), max(3.0, 0.35 * len(depths) + 1.5)))
    im = ax.imshow(scores, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(context_lengths)), [_length_label(int(n)) for n in context_lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (%)")
    ax.set_title(f"{title} (mean {float(scores.mean()):.2f})" if scores.size else title)
    if scores.size <= 400:
        for (i, j), v in np.ndenumerate(scores):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black")
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scores_bar_chart(scores: Mapping[str, float], path: str, title: str = "Eval scores") -> str:
    """Horizontal bars of named scores in [0, 1] (accuracies, needle mean). Returns `path`."""
    plt = _pyplot()
    names = list(scores)
    fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(names) + 1.2))
    ax.barh(range(len(names)), [float(scores[n]) for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0.0, 1.0)
    ax.invert_yaxis()
    ax.set_xlabel("score")
    ax.set_title(title)
    for i, n in enumerate(names):
        ax.text(min(float(scores[n]) + 0.01, 0.9), i, f"{float(scores[n]):.3f}", va="center", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
