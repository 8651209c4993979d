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
import shutil
import sys
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
    if all_runs:  # stage runs without the metric would be empty bars
        runs = [r for r in runs if any(m in r.data.metrics for m in cols)]
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


def plot(df: pd.DataFrame, cols: list[str], path: Path, title: str) -> dict:
    """Sorted horizontal bars (best on top) with value labels, one bar per run and metric, one
    colour per method family (the metric's, ``acc.student.kl`` -> student; with one metric,
    the run's method); the legend outside the axes. Returns the layout (see
    :func:`raydapt.core.plots.bar_chart`)."""
    from raydapt.core.plots import bar_chart, family

    values: dict[str, float] = {}
    families: dict[str, str] = {}
    for _, r in df.iterrows():
        for m in cols:
            if len(cols) == 1:
                key = f"{r['run']} ({r['method']})" if r["method"] else str(r["run"])
                fam = r["method"] or "run"
            else:
                key = f"{r['run']} · {m}" if len(df) > 1 else m
                fam = family(m)
            while key in values:  # two runs of the same name
                key += " "
            values[key], families[key] = r[m], fam
    xlabel = cols[0] if len(cols) == 1 else "value"
    return bar_chart(values, path, title=title, xlabel=xlabel, families=families)


def print_table(shown: pd.DataFrame, cols: list[str], width: int | None = None, *,
                fit: bool | None = None) -> None:
    """The table: metric headers without their shared prefix (``acc.``). On a terminal
    (``fit``, default: stdout is one) as many metric columns as fit its width, best value
    first, the hidden ones then listed by name; piped (a file, ``| less``, CI) every column."""
    fit = sys.stdout.isatty() if fit is None else fit
    width = width or shutil.get_terminal_size((120, 24)).columns
    prefix = os.path.commonprefix(cols).rpartition(".")[0] if len(cols) > 1 else ""
    t = shown.rename(columns={c: c[len(prefix) + 1:] for c in cols} if prefix else {})
    metric_cols = [c for c in t.columns if c not in ID_COLUMNS]
    # the best number first: a narrow terminal never hides the headline column
    order = sorted(metric_cols, key=lambda c: -(t[c].max() if t[c].notna().any() else -1e300))
    t = t[[c for c in t.columns if c in ID_COLUMNS] + order]
    metric_cols = order
    keep = len(metric_cols)
    fmt = {"display.max_columns": None, "display.width": 10_000,
           "display.float_format": "{:.4f}".format}
    with pd.option_context(*[x for kv in fmt.items() for x in kv]):
        while fit and keep > 1 and max(map(len, t.drop(columns=metric_cols[keep:]).to_string(
                index=False).splitlines())) > width:
            keep -= 1
        if prefix:
            print(f"metrics {prefix}.*")
        print(t.drop(columns=metric_cols[keep:]).to_string(index=False))
    if keep < len(metric_cols):
        hidden = metric_cols[keep:]
        print(f"(+{len(hidden)} more metric columns, in compare.csv: {', '.join(hidden)}; "
              "piped, every column is printed)")


def compare(experiment: str, *, uri: str | None = None, metric: str | None = None,
            out: str | Path | None = None, all_runs: bool = False) -> dict[str, Path]:
    """Print the table; write ``compare.csv`` and ``compare.png`` to ``out``."""
    df, cols = runs_table(experiment, uri=uri, metric=metric, all_runs=all_runs)
    out = Path(out or Path("runs") / f"compare-{experiment}")
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / "compare.csv", out / "compare.png"
    df.to_csv(csv, index=False)
    what = metric or ("acc.*" if all(c.startswith("acc.") for c in cols) else "every metric")
    plot(df, cols, png, f"{experiment}: {what} ({len(df)} runs, {len(cols)} metrics)")
    print_table(df.drop(columns=["run_id"]), cols)
    print(f"\n{len(df)} runs; table {csv}; plot {png}")
    from raydapt.core.tracking import browse_lines

    for line in browse_lines(uri or default_uri(), experiment):
        print(line)
    return {"csv": csv, "png": png}
