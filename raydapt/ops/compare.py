"""``raydapt runs compare --experiment NAME [--metric M] [--out DIR]``: runs side by side.

Reads the job (parent) runs of one MLflow experiment — or every run with ``--all-runs`` — and
writes a table (printed, and ``compare.csv``) and a bar plot (``compare.png``) of the chosen
metric(s). ``--metric`` is an exact metric name or a glob (``acc.student.*``); by default every
``acc.*`` metric, else every metric. The tracking URI comes from ``--tracking-uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db`` (the embedded default of the jobs).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pandas as pd

from raydapt import RaydaptError
from raydapt.core.tracking import absolute_tracking_uri

ID_COLUMNS = ["run", "method", "status", "start", "run_id"]


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"


def runs_table(experiment: str, *, uri: str | None = None, metric: str | None = None,
               all_runs: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """One row per run (newest first): identity columns + the matched metrics' last values.

    Returns (table, metric columns). Raises RaydaptError for an unknown experiment or a metric
    no run has."""
    from mlflow.tracking import MlflowClient

    uri = absolute_tracking_uri(uri or default_uri())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise RaydaptError(f"no MLflow store at {uri} (pass --tracking-uri or set "
                           "MLFLOW_TRACKING_URI)")
    cl = MlflowClient(tracking_uri=uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in cl.search_experiments())
        raise RaydaptError(f"no experiment {experiment!r} in {uri}; experiments: {names}")
    runs = cl.search_runs([exp.experiment_id], max_results=5000, order_by=["start_time DESC"])
    if not all_runs:
        runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise RaydaptError(f"experiment {experiment!r} has no runs")
    names = sorted({k for r in runs for k in r.data.metrics})
    if metric:
        cols = [m for m in names if fnmatch.fnmatchcase(m, metric)]
        if not cols:
            raise RaydaptError(f"no run in {experiment!r} has a metric matching {metric!r}; "
                               f"metrics: {names}")
    else:
        cols = [m for m in names if m.startswith("acc.")] or names
    rows = []
    for r in runs:
        row = {"run": r.data.tags.get("mlflow.runName", r.info.run_id[:8]),
               "method": r.data.tags.get("raydapt.method", ""),
               "status": r.info.status,
               "start": pd.to_datetime(r.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M"),
               "run_id": r.info.run_id}
        row.update({m: r.data.metrics.get(m, float("nan")) for m in cols})
        rows.append(row)
    return pd.DataFrame(rows, columns=ID_COLUMNS + cols), cols


def plot(df: pd.DataFrame, cols: list[str], path: Path, title: str) -> None:
    """Grouped bars: one group per run, one bar per metric (colour), value labels on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r}\n({m})" if m else str(r) for r, m in zip(df["run"], df["method"])]
    n, k = len(df), len(cols)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + n * (0.5 + 0.35 * k)), 4.2))
    x = np.arange(n)
    for j, m in enumerate(cols):
        vals = df[m].to_numpy(dtype=float)
        bars = ax.bar(x + (j - (k - 1) / 2) * width, np.nan_to_num(vals), width, label=m)
        if k <= 4:
            for b, v in zip(bars, vals):
                if v == v:
                    ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3g}",
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=7, rotation=30 if n > 6 else 0, ha="right" if n > 6
                  else "center")
    ax.set_title(title, fontsize=9)
    if k > 1:
        ax.legend(fontsize=7, ncol=min(k, 3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(experiment: str, *, uri: str | None = None, metric: str | None = None,
            out: str | Path | None = None, all_runs: bool = False) -> dict[str, Path]:
    """Print the table; write ``compare.csv`` and ``compare.png`` to ``out``."""
    df, cols = runs_table(experiment, uri=uri, metric=metric, all_runs=all_runs)
    out = Path(out or Path("runs") / f"compare-{experiment}")
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / "compare.csv", out / "compare.png"
    df.to_csv(csv, index=False)
    what = metric or ", ".join(cols[:3]) + (", ..." if len(cols) > 3 else "")
    plot(df, cols, png, f"{experiment}: {what}")
    shown = df.drop(columns=["run_id"])
    with pd.option_context("display.max_columns", 50, "display.width", 200,
                           "display.float_format", "{:.4f}".format):
        print(shown.to_string(index=False))
    print(f"\n{len(df)} runs; table {csv}; plot {png}")
    return {"csv": csv, "png": png}
