"""Bar charts of evaluation metrics, drawn on matplotlib's Agg canvas.

Figures are built with the object-oriented API (``Figure`` + ``FigureCanvasAgg``),
so nothing here touches pyplot's global backend or state. Each function returns the
PNG bytes; the evaluators write them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

BASE_COLOR, NOVEL_COLOR = "#4c72b0", "#dd8452"


def figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_per_class_ap(
    values: Mapping[str, float],
    novel: Collection[str],
    title: str = "AP50 per class",
    xlabel: str = "AP50",
) -> bytes:
    """Horizontal bars of per-class AP (class name -> AP in [0, 1]), highest first;
    novel classes drawn in a distinct colour, hatched and marked with "*"."""
    items = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    fig = Figure(figsize=(7, max(2.5, 0.22 * len(items) + 1.2)))
    ax = fig.add_subplot()
    y = range(len(items))
    is_novel = [name in novel for name, _ in items]
    ax.barh(y, [v for _, v in items], color=[NOVEL_COLOR if n else BASE_COLOR for n in is_novel],
            edgecolor="none")
    for i, n in enumerate(is_novel):
        if n:
            ax.patches[i].set_hatch("//")
    ax.set_yticks(list(y), [f"{name} *" if n else name for (name, _), n in zip(items, is_novel, strict=True)],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("class (* = novel)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=BASE_COLOR, label="base"),
                       Patch(facecolor=NOVEL_COLOR, hatch="//", label="novel")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return figure_png(fig)


def plot_groups(values: Mapping[str, float], title: str = "AP", ylabel: str = "AP") -> bytes:
    """Vertical bars of a few named metrics (e.g. AP, APr, APc, APf); -1 (no ground
    truth) is drawn as an empty slot labelled "n/a"."""
    names = list(values)
    fig = Figure(figsize=(1.1 * len(names) + 1.5, 3.2))
    ax = fig.add_subplot()
    heights = [max(v, 0.0) for v in values.values()]
    ax.bar(names, heights, color=BASE_COLOR)
    for i, v in enumerate(values.values()):
        ax.text(i, max(v, 0.0) + 0.01, "n/a" if v < 0 else f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("metric")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return figure_png(fig)
