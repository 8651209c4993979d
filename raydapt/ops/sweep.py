"""``raydapt sweep``: Ray Tune over a job's config keys, with ASHA early stopping and one MLflow
child run per trial under one parent run.

A sweep file names a base job and a search space over its dotted keys::

    job: pubmed-male-to-female.cpu.yaml       # relative to the sweep file
    overrides: [methods=[dallmi]]              # fixed for every trial
    metric: map                                # what trials report (max or min)
    mode: max
    num_samples: 8
    scheduler: {type: asha, max_t: 3, grace_period: 1, reduction_factor: 2}
    search_space:
      adapt.alpha: {uniform: [0.1, 1.0]}
      adapt.lam: {loguniform: [0.1, 10.0]}
      annotate.k: {choice: [8, 16, 32]}

Distributions: ``uniform [lo, hi]``, ``loguniform [lo, hi]``, ``quniform [lo, hi, q]``,
``randint [lo, hi)``, ``choice [...]``, ``grid [...]`` (every value, times num_samples).

Each trial validates its own job config (base + overrides + sampled values) and runs the method's
trial function (its ``trial`` in :mod:`raydapt.methods`): DALLMi runs one adaptation from the cached source checkpoint
and reports per epoch (ASHA stops weak trials early when the loop runs in-trial,
``adapt.in_process: true``; with a TorchTrainer per trial the epochs are reported after the fit);
SimDA reruns its recipe, reusing the cached teacher stages, so only kNN / annotation / students
run, and reports once. The best trial's values are printed and logged to the parent run (params
``best.<key>``, metric ``best_<metric>``, artifact ``best.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from raydapt.config import (
    ConfigError,
    Section,
    _expand_env,
    apply_overrides,
    format_validation_error,
    validate_job,
)
from raydapt.core.storage import OutputDir, is_uri
from raydapt.core.tracking import (
    RunLogger,
    Tracker,
    absolute_tracking_uri,
    child_tags,
    standard_tags,
)
from raydapt.methods import METHODS, names

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")


class SchedulerSection(Section):
    """Early stopping of weak trials."""

    type: Literal["asha", "none"] = "asha"
    max_t: int = Field(3, ge=1, description="Most reports (epochs) a trial runs.")
    grace_period: int = Field(1, ge=1, description="Reports before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(Section):
    """A sweep file: base job, fixed overrides, search space, objective, budget."""

    job: str = Field(..., description="Base job YAML (relative to the sweep file).")
    name: str = Field("sweep", description="Parent MLflow run name and Tune run name.")
    overrides: list[str] = Field(default_factory=list, description="Fixed job overrides.")
    search_space: dict[str, dict[str, list[Any]]] = Field(
        ..., min_length=1, description="dotted job key -> {distribution: [args]}.")
    metric: str = Field(..., description="Metric trials report (e.g. map, student.kl_sim).")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(1, ge=1, description="Trials at once.")
    seed: int = Field(0, ge=0, description="Seed of the random search.")
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trial_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Resources reserved per trial (a trial that starts its own TorchTrainer or "
        "actor pools needs little here: those reserve their own).")


def build_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """YAML search space -> Ray Tune domains, keyed by dotted job key."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"search_space.{key}: give exactly one distribution, one of "
                              f"{', '.join(DISTRIBUTIONS)} (got {spec!r})")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"search_space.{key}: unknown distribution {dist!r}; one of "
                              f"{', '.join(DISTRIBUTIONS)}")
        n = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}.get(dist)
        if not isinstance(args, list) or (n is not None and len(args) != n) or not args:
            want = f"[{n} numbers]" if n else "a non-empty list"
            raise ConfigError(f"search_space.{key}.{dist}: needs {want}, got {args!r}")
        if dist in ("uniform", "loguniform", "quniform", "randint"):
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"search_space.{key}.{dist}: arguments must be numbers, "
                                  f"got {args!r}")
            if args[0] >= args[1] or (dist == "loguniform" and args[0] <= 0):
                raise ConfigError(f"search_space.{key}.{dist}: need lo < hi"
                                  f"{' and lo > 0' if dist == 'loguniform' else ''}, got {args}")
        out[key] = {"uniform": lambda a: tune.uniform(*a),
                    "loguniform": lambda a: tune.loguniform(*a),
                    "quniform": lambda a: tune.quniform(*a),
                    "randint": lambda a: tune.randint(*a),
                    "choice": lambda a: tune.choice(a),
                    "grid": lambda a: tune.grid_search(a)}[dist](args)
    return out


def _example_values(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """One value per key (the first / lower bound) to validate the job config up front."""
    vals = {}
    for key, spec in space.items():
        (dist, args), = spec.items()
        vals[key] = args[0] if dist != "loguniform" else float(args[0])
    return vals


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]  # JSON is YAML


_PATH_KEYS = ("run.output_dir", "run.cache_dir", "tracking.artifact_location", "data.root")


def load_sweep(path: str | Path, overrides: list[str] | None = None
               ) -> tuple[SweepSpec, dict[str, Any], Section]:
    """Read a sweep file. Overrides whose first key is a sweep field (``num_samples=2``,
    ``scheduler.max_t=2``) apply to the sweep; all others to the base job.

    Returns ``(spec, base job as a plain dict with absolute paths, validated base job)``.
    Raises :class:`ConfigError` naming the bad key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a sweep file must be a YAML mapping")
    sweep_ov = [o for o in overrides or [] if o.split("=", 1)[0].split(".")[0]
                in SweepSpec.model_fields]
    job_ov = [o for o in overrides or [] if o not in sweep_ov]
    raw = apply_overrides(raw, sweep_ov)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(SweepSpec, err).replace(
            "invalid job config", "invalid sweep file")) from None
    build_space(spec.search_space)  # distribution errors now, not in a trial
    job_path = (p.parent / spec.job) if not Path(spec.job).is_absolute() else Path(spec.job)
    if not job_path.is_file():
        raise ConfigError(f"job: base job {job_path} not found (relative to the sweep file)")
    job_raw = yaml.safe_load(job_path.read_text()) or {}
    job_raw = apply_overrides(job_raw, [*spec.overrides, *job_ov])
    base = validate_job(job_raw)
    validate_job(apply_overrides(job_raw, _overrides(_example_values(spec.search_space))))
    plain = _expand_env(base.model_dump(mode="json"))
    for key in _PATH_KEYS:  # trials run in other working directories
        sec, _, leaf = key.partition(".")
        if sec in plain and isinstance(plain[sec], dict) and plain[sec].get(leaf) and not \
                is_uri(plain[sec][leaf]):  # an s3:// location stays as it is
            plain[sec][leaf] = str(Path(plain[sec][leaf]).resolve())
    plain["tracking"]["uri"] = absolute_tracking_uri(plain["tracking"]["uri"])
    return spec, plain, base


def _trainable(config: dict[str, Any], *, base: dict[str, Any], parent_run_id: str | None,
               experiment_id: str | None) -> None:
    """One Tune trial: validate its job config, open its child run, run the method's trial."""
    from ray import tune

    values = dict(config["params"])
    cfg = validate_job(apply_overrides(base, _overrides(values)))
    uri = cfg.tracking.uri if cfg.tracking.enabled else None
    log = RunLogger(None, None)
    client = None
    ctx = tune.get_context()
    trial = ctx.get_trial_name() or "trial"
    if uri and parent_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(experiment_id, run_name=trial, tags={
            **standard_tags(), **child_tags("trial", cfg.method), "raydapt.variant": trial,
            "mlflow.parentRunId": parent_run_id, "mlflow.runName": trial,
            "raydapt.trial": trial, "raydapt.trial_id": ctx.get_trial_id() or ""})
        log = RunLogger(uri, run.info.run_id)
        log.params(values)
    step = {"i": 0}

    def report(metrics: dict[str, Any]) -> None:
        step["i"] += 1
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        log.metrics({f"trial_{k}": v for k, v in clean.items()}, step["i"])
        tune.report(clean)

    status = "FAILED"
    try:
        METHODS[cfg.method].load("trial")(cfg, report=report, run_log=log)
        status = "FINISHED"
    finally:
        if client is not None:
            client.set_terminated(log.run_id, status=status)


def _close_trial_runs(grid, tracker, parent_run_id: str | None, max_t: int) -> None:
    """A trial that ASHA stops is ended from outside, so its child run may be left RUNNING (or
    FAILED by the stop): mark it FINISHED with ``raydapt.stopped_early``; real errors stay
    FAILED."""
    if not (tracker.enabled and parent_run_id):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker.uri)
    by_id = {r.metrics.get("trial_id"): r for r in grid if r.metrics}
    runs = client.search_runs([tracker._experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    for run in runs:
        res = by_id.get(run.data.tags.get("raydapt.trial_id"))
        if res is None or run.info.status == "FINISHED":
            continue
        if res.error is None:
            it = res.metrics.get("training_iteration") or 0
            client.set_tag(run.info.run_id, "raydapt.stopped_early", str(it < max_t).lower())
            client.set_terminated(run.info.run_id, status="FINISHED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED")


def run_sweep(spec: SweepSpec, base: dict[str, Any], cfg: Section) -> dict[str, Any]:
    """Run the sweep; returns ``{"best": values, "best_metric": x, "trials": [...]}``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from raydapt.core.runtime import init_ray_for
    method = METHODS[cfg.method]
    if method.trial is None:
        raise ConfigError(f"method {cfg.method!r} has no sweep trial; sweepable: "
                          f"{names('trial')}")
    init_ray_for(cfg.ray)
    t = cfg.tracking
    tracker = Tracker(enabled=t.enabled, uri=base["tracking"]["uri"], experiment=t.experiment,
                      artifact_location=base["tracking"]["artifact_location"])
    # a URI output_dir: a local mirror, best.json uploaded at the end (Tune's own storage
    # stays in the mirror)
    output = OutputDir(base["run"]["output_dir"], f"sweep-{spec.name}")
    out = output.local
    t0 = time.time()
    with tracker.job(f"sweep-{spec.name}", tags={"raydapt.method": cfg.method,
                                                 "raydapt.ops.sweep": spec.name}) as parent:
        parent.params({"sweep": spec.model_dump(mode="json"), "job": base})
        if method.sweep_setup:  # shared, cached work (e.g. the DALLMi source model) first
            method.load("sweep_setup")(cfg, tracker)
        sched = None
        if spec.scheduler.type == "asha":
            sched = ASHAScheduler(time_attr="training_iteration", max_t=spec.scheduler.max_t,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
        fn = tune.with_parameters(_trainable, base=base, parent_run_id=parent.run_id,
                                  experiment_id=tracker._experiment_id)
        tuner = tune.Tuner(
            tune.with_resources(fn, {k.lower(): v for k, v in spec.trial_resources.items()}),
            param_space={"params": build_space(spec.search_space)},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=sched, max_concurrent_trials=spec.max_concurrent,
                search_alg=BasicVariantGenerator(random_state=spec.seed)),
            run_config=tune.RunConfig(name=f"sweep-{spec.name}",
                                      storage_path=str((out / "tune").resolve()), verbose=1),
        )
        grid = tuner.fit()
        _close_trial_runs(grid, tracker, parent.run_id, spec.scheduler.max_t)
        trials = []
        for r in grid:
            if r.error:
                trials.append({"params": r.config["params"], "error": str(r.error)[:500]})
                continue
            trials.append({"params": r.config["params"],
                           "metric": r.metrics.get(spec.metric),
                           "iterations": r.metrics.get("training_iteration")})
        ok = [tr for tr in trials if tr.get("metric") is not None]
        if not ok:
            raise ConfigError(f"no trial reported {spec.metric!r}: "
                              f"{[tr.get('error') for tr in trials]}")
        best_r = grid.get_best_result(spec.metric, spec.mode, scope="last")
        best = dict(best_r.config["params"])
        summary = {"sweep": spec.name, "metric": spec.metric, "mode": spec.mode,
                   "best": best, "best_metric": best_r.metrics[spec.metric],
                   "best_overrides": _overrides(best), "trials": trials,
                   "seconds": round(time.time() - t0, 1)}
        (out / "best.json").write_text(json.dumps(summary, indent=2))
        output.sync()
        parent.params({f"best.{k}": v for k, v in best.items()})
        parent.metrics({f"best_{spec.metric}": summary["best_metric"],
                        "trials": len(trials), "seconds": summary["seconds"]})
        parent.artifact(out / "best.json")
        print(f"[sweep] best {spec.metric} = {summary['best_metric']:.4f} with "
              f"{' '.join(summary['best_overrides'])} ({len(trials)} trials, "
              f"{summary['seconds']:.0f}s); {output.where('best.json')}", flush=True)
        return summary
