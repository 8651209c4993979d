"""Figures a person reads in two seconds: sorted horizontal bars with value labels, one stable
colour per method family, the legend outside the axes, the full title wrapped.

Used for the results chart on a job's parent MLflow run (:meth:`RunLogger.results_table`) and
for ``raydapt runs compare``. matplotlib is imported lazily (Agg backend)."""

from __future__ import annotations

import math
import re
import textwrap
import zlib
from pathlib import Path
from typing import Any

# fixed colours for the families raydapt's recipes produce; any other family gets a colour from
# its name's CRC32, so a family keeps its colour across runs, jobs and plots
FAMILY_COLOURS = {
    "teacher": "#4c72b0", "student": "#dd8452", "source": "#8c8c8c", "oracle": "#55a868",
    "no_adapt": "#8c8c8c", "dallmi": "#dd8452", "run": "#4c72b0",
}
_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c", "#ccb974", "#64b5cd"]


def family(name: str) -> str:
    """A result's method family: ``student:kl_sim`` / ``acc.student.kl`` -> ``student``,
    ``no_adapt`` -> ``no_adapt``. The metric prefix (``acc.``, ``map.``) is dropped."""
    parts = [p for p in re.split(r"[:./]", name) if p]
    if len(parts) > 1 and parts[0] in ("acc", "map", "map_bin", "micro_f1", "macro_f1"):
        parts = parts[1:]
    return parts[0] if parts else name


def family_colour(fam: str) -> str:
    return FAMILY_COLOURS.get(fam) or _PALETTE[zlib.crc32(fam.encode()) % len(_PALETTE)]


def bar_chart(values: dict[str, float], path: str | Path, *, title: str,
              xlabel: str = "value", families: dict[str, str] | None = None) -> dict[str, Any]:
    """Horizontal bars, best on top, one label per bar (``0.734``) right of its end; colours
    and a legend (outside the axes, right) by family. NaN values are left out.

    Returns the layout in figure pixels, for tests: ``size`` (w, h), ``axes``, ``legend`` (or
    None) and per bar ``bars`` / ``labels`` as (x0, y0, x1, y1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(((k, float(v)) for k, v in values.items() if v == v and v is not None),
                   key=lambda kv: kv[1])  # barh draws bottom-up: the best ends on top
    fams = {k: (families or {}).get(k) or family(k) for k, _ in items}
    n = max(1, len(items))
    longest = max((len(k) for k, _ in items), default=4)
    width = min(14.0, 4.5 + 0.075 * longest + 1.6)
    fig, ax = plt.subplots(figsize=(width, 1.1 + 0.32 * n))
    names = [k for k, _ in items]
    vals = [v for _, v in items]
    bars = ax.barh(range(len(items)), vals, color=[family_colour(fams[k]) for k in names],
                   height=0.7)
    ax.set_yticks(range(len(items)), names, fontsize=8)
    vmax = max([abs(v) for v in vals] + [1e-12])
    lo = min(0.0, min(vals, default=0.0))
    ax.set_xlim(lo, vmax * 1.18)  # room for the value labels
    labels = []
    for b, v in zip(bars, vals):
        labels.append(ax.text(b.get_width() + vmax * 0.01, b.get_y() + b.get_height() / 2,
                              f"{v:.3f}" if abs(v) < 100 else f"{v:.4g}", va="center",
                              ha="left", fontsize=7))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("\n".join(textwrap.wrap(title, width=int(width * 11))), fontsize=9, loc="left")
    legend = None
    used = list(dict.fromkeys(fams[k] for k in reversed(names)))
    if len(used) > 1:
        from matplotlib.patches import Patch

        legend = ax.legend(handles=[Patch(color=family_colour(f), label=f) for f in used],
                           fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                           borderaxespad=0.0, frameon=False, title="family",
                           title_fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    r = fig.canvas.get_renderer()

    def box(artist) -> tuple[float, float, float, float]:
        e = artist.get_window_extent(renderer=r)
        return (e.x0, e.y0, e.x1, e.y1)

    layout = {"size": tuple(int(math.ceil(x)) for x in fig.canvas.get_width_height()),
              "axes": box(ax), "legend": box(legend) if legend else None,
              "bars": [box(b) for b in bars], "labels": [box(t) for t in labels]}
    fig.savefig(path, dpi=fig.dpi)  # tight_layout left room for the legend right of the axes
    plt.close(fig)
    return layout
