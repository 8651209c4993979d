"""The figures a user reads: each rendered, its size and layout checked (legend outside the
axes, value labels right of their bars and apart, a confusion grid, readable cell text)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raydapt.core.plots import bar_chart, family, family_colour
from raydapt.evaluate import plot_confusions
from raydapt.ops.compare import plot, print_table

RESULTS = {"teacher:zero_shot": 0.70, "teacher:knn": 0.72, "teacher:icl_random": 0.61,
           "teacher:teacher": 0.75, "student:kl_sim": 0.74, "student:ce": 0.73,
           "student:source_only": 0.68, "student:oracle": 0.80}


def _check_bars(layout, n: int) -> None:
    w, h = layout["size"]
    assert 400 <= w <= 1500 and 150 <= h <= 60 * n + 200
    ax = layout["axes"]
    if layout["legend"] is not None:
        lg = layout["legend"]
        assert lg[0] >= ax[2] and lg[2] <= w  # right of the axes, inside the figure
    bars, labels = layout["bars"], layout["labels"]
    assert len(bars) == len(labels) == n
    for b, t in zip(bars, labels):
        assert t[0] >= b[2] - 0.5 and t[2] <= w  # right of the bar's end
    ys = sorted((t[1], t[3]) for t in labels)
    assert all(a[1] <= b[0] + 0.5 for a, b in zip(ys, ys[1:]))  # labels do not overlap
    widths = [b[2] - b[0] for b in bars]
    assert widths == sorted(widths)  # drawn bottom-up: the best bar on top


def test_results_bar_chart(tmp_path):
    png = tmp_path / "r.png"
    layout = bar_chart(RESULTS, png, title="simda tiny: target-test accuracy per method",
                       xlabel="accuracy")
    assert png.read_bytes()[:4] == b"\x89PNG"
    _check_bars(layout, len(RESULTS))
    assert layout["legend"] is not None


def test_family_and_stable_colours():
    assert family("student:kl_sim") == family("acc.student.kl") == "student"
    assert family("no_adapt") == "no_adapt" and family("stage1-embed") == "stage1-embed"
    assert family_colour("teacher") != family_colour("student")
    assert family_colour("new_family") == family_colour("new_family")


def test_compare_plot_and_table_width(tmp_path, capsys):
    cols = [f"acc.{k.replace(':', '.')}" for k in RESULTS]
    df = pd.DataFrame([{"run": f"run-{i}", "method": "simda", "status": "FINISHED",
                        "start": "2026-01-01 00:00", **{c: v - 0.01 * i
                                                        for c, v in zip(cols, RESULTS.values())}}
                       for i in range(2)])
    layout = plot(df, cols, tmp_path / "c.png", "simda: acc.* (2 runs, 8 metrics)")
    _check_bars(layout, 2 * len(cols))
    one = plot(df, cols[:1], tmp_path / "c1.png", "simda: acc.teacher.zero_shot")
    _check_bars(one, 2)
    print_table(df, cols, width=100, fit=True)  # a terminal 100 wide
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines[:-1])) <= 100  # the table; the last line names the hidden ones
    assert lines[0] == "metrics acc.*" and "more metric columns, in compare.csv" in lines[-1]
    best = max(cols, key=lambda c: df[c].max()).removeprefix("acc.")
    assert best in lines[1]  # the headline column is never the one hidden
    hidden = lines[-1].split("compare.csv: ")[1].split(";")[0].split(", ")
    assert best not in hidden and all(h not in lines[1].split() for h in hidden)
    print_table(df, cols, width=100, fit=False)  # piped: every column
    lines = capsys.readouterr().out.splitlines()
    assert all(c.removeprefix("acc.") in lines[1] for c in cols)
    assert "more metric columns" not in lines[-1]


def test_confusion_grid(tmp_path):
    rng = np.random.default_rng(0)
    cms = {k: rng.integers(0, 200, (2, 2)) for k in RESULTS}
    cms["teacher:icl_random"] = np.array([[50, 10], [20, 40]])
    out = plot_confusions(cms, ["negative", "positive"], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert out["grid"] == (2, 4)
    w, h = out["size"]
    assert w <= 1300 and w / h < 2.5  # a grid, not a 12-panel strip
    assert not any(t.startswith("teacher:teacher") for t in out["titles"])
    assert any(t.startswith("teacher\n") for t in out["titles"])
    assert "teacher:icl_random\nacc 0.750, 120 rows" in out["titles"]
    colours = dict(out["text_colours"][4 * 2:4 * 2 + 4])  # the icl_random panel's cells
    assert colours[50] == "white" and colours[10] == "black"
