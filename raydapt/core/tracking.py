"""MLflow tracking: one parent run per job, one child run per stage / student / trial.

The driver owns the runs; Ray Train workers log through :class:`RunLogger` with an explicit run id
(rank 0 only), so nothing depends on MLflow's thread-local "active run" inside Ray workers.
With ``tracking.enabled: false`` every call is a no-op.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# secrets never reach MLflow: params are redacted, tags and text artifacts scrubbed
from raydapt.core.secrets import redact, scrub  # re-exported
from raydapt.core.telemetry import timed_stage

__all__ = ["RunLogger", "Tracker", "absolute_tracking_uri", "flatten", "job_links", "redact",
           "scrub", "ui_base_url"]

# MLflow 3 opens an experiment on its GenAI page ("Traces") unless the experiment says it is for
# model development; this tag (value from MLflow's ExperimentKind) selects the training view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description MLflow shows on experiment and run pages


def experiment_description(name: str) -> str:
    return (f"raydapt experiment `{name}`. One parent run per job (its params are the resolved "
            "config; `results.csv` / `results.png` compare every method of the job); child runs "
            "per stage, student and trial carry the tags `raydapt.method`, `raydapt.stage` and "
            "`raydapt.variant`. Compare jobs with `raydapt runs compare --experiment "
            f"{name}`.")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params (values truncated to 500 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
            out[key] = out[key][:500]
    return out


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative SQLite / file store URI absolute, so Ray workers (which run in other
    working directories) write to the same store as the driver."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def git_sha() -> str | None:
    return _git_sha_at(os.getcwd())


@functools.lru_cache(maxsize=8)  # once per working directory, not once per child run
def _git_sha_at(cwd: str) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True, cwd=cwd).stdout.strip() or None
    except Exception:
        return None


def child_tags(name: str, method: str) -> dict[str, str]:
    """The tags every child run has, to filter and group by in MLflow: ``raydapt.method`` (the
    job's), ``raydapt.stage`` (the run name up to its first ``-``: ``student-kl`` -> ``student``)
    and ``raydapt.variant`` (``-`` unless the recipe names one)."""
    return {"raydapt.method": method or "-", "raydapt.stage": name.split("-")[0] or name,
            "raydapt.variant": "-"}


def standard_tags(source_type: str = "LOCAL") -> dict[str, str]:
    """MLflow's own run metadata, which ``MlflowClient.create_run`` (unlike ``mlflow.start_run``)
    does not fill in: user, source (the command line, secrets scrubbed), source type, commit."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    cmd = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                    *sys.argv[1:]])
    tags = {"mlflow.user": user, "mlflow.source.name": scrub(cmd)[:500],
            "mlflow.source.type": source_type}
    sha = git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    return tags


class RunLogger:
    """Logs to one MLflow run by id; safe to pickle into Ray workers."""

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.uri, self.run_id = uri, run_id
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.uri and self.run_id)

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step or 0) for k, v in values.items() if v == v]
        if not ms:
            return
        try:
            self._client().log_batch(self.run_id, metrics=ms)
        except Exception as exc:  # a tracking outage must not kill a training run
            if not self._warned:
                print(f"raydapt: warning: MLflow metric logging to {self.uri} failed: {exc}",
                      flush=True)
                self._warned = True

    def params(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        ps = [Param(k, str(v)[:500]) for k, v in flatten(redact(values)).items()]
        for i in range(0, len(ps), 100):
            self._client().log_batch(self.run_id, params=ps[i : i + 100])

    def tags(self, values: dict[str, str]) -> None:
        if self.enabled:
            from mlflow.entities import RunTag

            self._client().log_batch(self.run_id, tags=[
                RunTag(k, scrub(str(v))) for k, v in values.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            p = Path(path)
            if p.is_dir():
                self._client().log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self._client().log_artifact(self.run_id, str(p), artifact_path)

    def results_table(self, results: dict[str, float], *, metric: str = "accuracy",
                      details: dict[str, dict[str, Any]] | None = None,
                      seeds: list[int] | None = None, title: str | None = None,
                      out_dir: str | Path | None = None) -> None:
        """Results at a glance: ``results.csv`` (also as an MLflow table, ``results_table.json``:
        one row per method with family, metric, value and the ``details`` known for it, e.g.
        rows / epochs / steps) and ``results.png`` (sorted bars, see :mod:`raydapt.core.plots`),
        written to ``out_dir`` (the job's output folder; also with tracking off) and logged.
        Recipes call it once with their results dict."""
        if not results or (not self.enabled and out_dir is None):
            return
        import pandas as pd

        from raydapt.core.plots import bar_chart, family

        rows = []
        for k, v in results.items():
            row = {"method": k, "family": family(k), "metric": metric, "value": float(v)}
            row.update((details or {}).get(k, {}))
            if seeds is not None:
                row["seeds"] = " ".join(str(s) for s in seeds)
            rows.append(row)
        df = pd.DataFrame(rows).sort_values("value", ascending=False, kind="stable")
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(out_dir) if out_dir is not None else Path(tmp)
            d.mkdir(parents=True, exist_ok=True)
            df.to_csv(d / "results.csv", index=False)
            bar_chart(dict(zip(df["method"], df["value"])), d / "results.png",
                      title=title or f"{metric} per method", xlabel=metric)
            if not self.enabled:
                return
            self.artifact(d / "results.csv")
            self.artifact(d / "results.png")
        self._client().log_table(self.run_id, df.astype(object).where(df.notna(), None),
                                 "results_table.json")

    def curves(self, rows: list[dict[str, Any]], *, x: str, y: str, series: tuple[str, ...],
               name: str, title: str, best: dict[str, Any] | None = None,
               out_dir: str | Path | None = None) -> None:
        """A family of curves (e.g. accuracy over lam, one curve per (k, tau)) as MLflow
        shows them truthfully: the rows as a table artifact ``<name>.json`` (MLflow's table
        viewer; one row per point) and ``<name>.png``, a line plot with ``x`` on its x-axis,
        one line per ``series`` value, ``best`` marked. Not metric steps: MLflow would label
        ``x`` "Step", and its table would show each curve's last point, not its best."""
        if not rows or (not self.enabled and out_dir is None):
            return
        import pandas as pd

        df = pd.DataFrame(rows)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(out_dir) if out_dir is not None else Path(tmp)
            d.mkdir(parents=True, exist_ok=True)
            line_chart(df, d / f"{name}.png", x=x, y=y, series=series, title=title, best=best)
            if not self.enabled:
                return
            self.artifact(d / f"{name}.png")
        self._client().log_table(self.run_id, df.astype(object).where(df.notna(), None),
                                 f"{name}.json")

    def datasets(self, fingerprints: dict[str, str], sources: dict[str, str] | None = None
                 ) -> None:
        """The job's data files as MLflow dataset inputs (name, digest = raydapt's sha256
        fingerprint, source = the file), shown on the run page and in the runs table."""
        if not self.enabled or not fingerprints:
            return
        from mlflow.entities import Dataset, DatasetInput

        inputs = [DatasetInput(Dataset(name=str(k), digest=str(fp), source_type="local",
                                       source=json.dumps({"uri": str((sources or {}).get(k, k))})))
                  for k, fp in fingerprints.items()]
        try:
            self._client().log_inputs(self.run_id, datasets=inputs)
        except Exception as exc:  # bookkeeping: never fail the job for it
            print(f"raydapt: warning: MLflow dataset inputs not logged: {exc}", flush=True)

    def text(self, text: str, name: str) -> None:
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / name
            f.write_text(scrub(text))
            self.artifact(f)


def line_chart(df: Any, path: str | Path, *, x: str, y: str, series: tuple[str, ...],
               title: str, best: dict[str, Any] | None = None) -> None:
    """``y`` over ``x``, one line per combination of the ``series`` columns (labelled
    ``k=8 tau=1.0``), the ``best`` point circled and labelled; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    groups = df.groupby(list(series), sort=True) if series else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values(x)
        label = " ".join(f"{s}={v}" for s, v in zip(series, key))
        ax.plot(g[x], g[y], marker="o", markersize=3, linewidth=1.2, label=label)
    if best is not None:
        ax.scatter([best[x]], [best[y]], s=120, facecolors="none", edgecolors="black",
                   linewidths=1.5, zorder=5)
        what = " ".join(f"{s}={best[s]}" for s in series)
        ax.annotate(f"best: {y} {best[y]:.4f}\n{what} {x}={best[x]}", (best[x], best[y]),
                    textcoords="offset points", xytext=(8, -28), fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _driver_tags() -> dict[str, str]:
    import socket

    return {"raydapt.driver_host": socket.gethostname(), "raydapt.driver_pid": str(os.getpid())}


def _q(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def close_stale_runs(client, experiment_id: str, name: str) -> list[str]:
    """Mark KILLED the RUNNING parent runs of job ``name`` whose driver is gone (same host, its
    pid no longer alive: e.g. SIGKILLed, so it never closed them), with their RUNNING child
    runs. Runs of a live driver (a concurrent run of the same job) and runs started on another
    host are left alone. Returns the ids closed."""
    import socket

    host = socket.gethostname()
    closed: list[str] = []
    try:
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.runName = '{_q(name)}' and "
            "attributes.status = 'RUNNING'", max_results=200)
        for r in runs:
            t = r.data.tags
            if "mlflow.parentRunId" in t or t.get("raydapt.driver_host") != host:
                continue
            pid = t.get("raydapt.driver_pid", "")
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            stack = [r.info.run_id]
            while stack:
                rid = stack.pop()
                client.set_terminated(rid, status="KILLED")
                closed.append(rid)
                stack += [c.info.run_id for c in client.search_runs(
                    [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}' and "
                    "attributes.status = 'RUNNING'", max_results=1000)]
    except Exception as exc:  # bookkeeping must not stop a job
        print(f"raydapt: warning: could not close stale MLflow runs of {name}: {exc}",
              flush=True)
    if closed:
        print(f"raydapt: marked {len(closed)} MLflow run(s) of a killed earlier run of {name} "
              "as KILLED", flush=True)
    return closed


class Tracker:
    """Parent run for a job; :meth:`child` opens nested runs for stages and students."""

    @classmethod
    def from_section(cls, t, *, enabled: bool | None = None, uri: str | None = None) -> Tracker:
        """From a job's ``tracking`` section (enabled, uri, experiment, artifact_location)."""
        return cls(enabled=t.enabled if enabled is None else enabled,
                   uri=t.uri if uri is None else uri, experiment=t.experiment,
                   artifact_location=t.artifact_location)

    def __init__(self, *, enabled: bool, uri: str, experiment: str, artifact_location: str) -> None:
        self.enabled = enabled
        self.uri = absolute_tracking_uri(uri)
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.parent: RunLogger = RunLogger(None, None)
        self._experiment_id: str | None = None
        self._job_tags = {"method": "", "run": ""}  # Ray metric tags of child stages
        self._stage_params: dict[str, dict[str, Any]] = {}

    def _ensure_experiment(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before raydapt set the kind
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri=self.uri).set_experiment_tag(
                    exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        loc = self.artifact_location
        if loc and "://" not in loc:
            loc = Path(loc).resolve().as_uri()
        return mlflow.create_experiment(self.experiment, artifact_location=loc, tags={
            EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
            NOTE_TAG: experiment_description(self.experiment)})

    @contextmanager
    def job(self, name: str, *, tags: dict[str, str] | None = None,
            run_id: str | None = None) -> Iterator[RunLogger]:
        """Open (or, with ``run_id`` / ``RAYDAPT_PARENT_RUN_ID``, reattach to) the parent run."""
        self._job_tags = {"method": str((tags or {}).get("raydapt.method", "")), "run": name}
        if not self.enabled:
            yield self.parent
            return
        from mlflow.tracking import MlflowClient

        self._experiment_id = self._ensure_experiment()
        client = MlflowClient(tracking_uri=self.uri)
        run_id = run_id or os.environ.get("RAYDAPT_PARENT_RUN_ID")
        if run_id is None:
            close_stale_runs(client, self._experiment_id, name)
            all_tags = {"mlflow.runName": name, **standard_tags(), **(tags or {}),
                        **_driver_tags()}
            run_id = client.create_run(self._experiment_id, tags=all_tags, run_name=name).info.run_id
        self.parent = RunLogger(self.uri, run_id)
        status = "FAILED"
        try:
            yield self.parent
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (raydapt.core.runtime.Terminated)
            status = "KILLED"
            raise
        finally:
            client.set_terminated(run_id, status=status)

    def stage_params(self, name: str, params: dict[str, Any]) -> None:
        """Params for the child run ``name`` that a helper opens later (e.g. a sharded
        pass): logged when it opens, so every stage run says what it ran with."""
        self._stage_params[name] = {**self._stage_params.get(name, {}), **params}

    @contextmanager
    def child(self, name: str, *, tags: dict[str, str] | None = None,
              params: dict[str, Any] | None = None) -> Iterator[RunLogger]:
        """A child run for one stage, with ``params`` (and those given to
        :meth:`stage_params` for ``name``); its wall time also goes to the Ray metric
        ``raydapt_stage_seconds{stage=name}`` (raydapt.core.telemetry), tracking on or off."""
        with timed_stage(name, **self._job_tags), self._child_run(name, tags=tags) as log:
            merged = {**self._stage_params.pop(name, {}), **(params or {})}
            if merged:
                log.params(merged)
            yield log

    @contextmanager
    def _child_run(self, name: str, *, tags: dict[str, str] | None = None
                   ) -> Iterator[RunLogger]:
        if not (self.enabled and self.parent.enabled):
            yield RunLogger(None, None)
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        all_tags = {"mlflow.parentRunId": self.parent.run_id, "mlflow.runName": name,
                    **standard_tags(), **child_tags(name, self._job_tags["method"]), **(tags or {})}
        run_id = client.create_run(self._experiment_id, tags=all_tags, run_name=name).info.run_id
        status = "FAILED"
        try:
            yield RunLogger(self.uri, run_id)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            client.set_terminated(run_id, status=status)


# --------------------------------------------------------------------------------------------
# Where to look: links into the MLflow UI
# --------------------------------------------------------------------------------------------

UI_PORT = 5000
"""The port ``raydapt ui`` (and ``mlflow ui``) serves on by default."""


def ui_base_url(uri: str, port: int = UI_PORT, host: str = "127.0.0.1") -> str:
    """The UI of a tracking URI: an http(s) tracking server serves its own; a local store
    (sqlite, file) is served by ``raydapt ui`` on ``host:port``."""
    uri = str(uri)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return f"http://{host}:{port}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table. ``workflowType=machine_learning``: MLflow 3 opens an
    experiment on its GenAI overview otherwise (its sidebar switch lives in the browser's local
    storage and starts on GenAI, whatever the experiment's ``mlflow.experimentKind``)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page: its overview lists every metric (each method's accuracy on a job's
    parent run) with params, tags and artifacts (``results.png``)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of ``run_ids``: one column per run; params and metrics as rows."""
    from urllib.parse import quote

    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    exps = quote(json.dumps([experiment_id]), safe="")
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}&workflowType=machine_learning"


def job_links(uri: str, experiment: str, run_name: str | None = None, *,
              base: str | None = None) -> dict[str, str]:
    """Links for a job: ``runs`` (the experiment's runs table), and for the newest parent run
    named ``run_name`` (without it: the newest parent run): ``job`` (its page: every method's
    accuracy in its metrics table) and ``compare`` (the compare view of its student / method
    child runs, one column each). Empty if the store or experiment is not there."""
    from mlflow.tracking import MlflowClient

    uri = absolute_tracking_uri(uri)
    base = base or ui_base_url(uri)
    cl = MlflowClient(tracking_uri=uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    eid = exp.experiment_id
    links = {"runs": runs_url(base, eid)}
    # the job's newest parent run (any job's without run_name)
    filt = f"tags.mlflow.runName = '{_q(run_name)}'" if run_name else ""
    runs = cl.search_runs([eid], filter_string=filt, order_by=["start_time DESC"],
                          max_results=200)
    parent = next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)
    if parent is not None:
        links["job"] = run_url(base, eid, parent.info.run_id)
        kids = cl.search_runs([eid], filter_string="tags.mlflow.parentRunId = "
                              f"'{parent.info.run_id}'", max_results=1000)
        # the runs that carry a headline metric: students (SimDA), methods (DALLMi) ...
        heads = [r for r in kids if r.data.tags.get("raydapt.variant", "-") != "-"
                 or r.data.tags.get("raydapt.stage") == "student"]
        if heads:
            ids = [r.info.run_id for r in sorted(heads, key=lambda r: r.info.run_name)]
            links["compare"] = compare_url(base, eid, ids)
    return links


def browse_lines(uri: str, experiment: str, run_name: str | None = None) -> list[str]:
    """What a job prints last: how to open its MLflow runs (best effort: [] on any error)."""
    try:
        links = job_links(uri, experiment, run_name)
    except Exception:
        return []
    if not links:
        return []
    uri = absolute_tracking_uri(uri)
    lines = []
    if not uri.startswith(("http://", "https://")):
        lines.append(f"MLflow: raydapt ui --tracking-uri {uri} --experiment {experiment}  "
                     "(serves the store; then open:)")
    lines.append(f"  runs:    {links['runs']}")
    if "job" in links:
        what = "this job" if run_name else "the newest job"
        lines.append(f"  {what} (accuracy per method, results.png): {links['job']}")
    if "compare" in links:
        lines.append(f"  methods side by side: {links['compare']}")
    return lines
