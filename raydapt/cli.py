"""The ``raydapt`` command.

    raydapt run JOB.yaml [key=value ...]        run a job (local Ray unless ray.address is set)
    raydapt sweep SWEEP.yaml [key=value ...]    Ray Tune over a job's keys (ASHA, MLflow runs)
    raydapt config show JOB.yaml [key=value]    print the resolved config
    raydapt config schema [--method simda]      print the JSON schema of job configs
    raydapt models prepare [REF ...]            resolve / de-quantise packaged models once
    raydapt cache ls | rm [--stage S]           list or remove cached stage outputs
    raydapt ui [JOB.yaml] [--experiment E]      MLflow UI on the job's store, links to its runs
    raydapt dashboards generate [--check]       regenerate dashboards/grafana/raydapt.json
    raydapt submit | jobs | plan | runs         cluster scale (see raydapt/ops/cli_cluster.py)
    raydapt cluster up --local | down           a local autoscaling multi-node Ray cluster

User errors (bad config, missing data, missing model package) print one clear message and exit 2;
no stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from raydapt import RaydaptError, __version__
from raydapt.config import json_schema, load_job, to_yaml
from raydapt.core.assets import PACKAGED, PackagedModel, resolve_model
from raydapt.core.runtime import Terminated, handle_sigterm, terminated
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
    if cfg.tracking.enabled:  # the last lines: where to look (straight to the runs)
        from raydapt.core.tracking import browse_lines

        for line in browse_lines(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name):
            print(line, flush=True)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from raydapt.ops.compare import default_uri
    from raydapt.ops.ui import ui

    run_name = None
    if args.job:
        cfg = load_job(args.job, args.overrides)
        uri, experiment, run_name = cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name
    else:
        uri, experiment = default_uri(), None
    ui(args.tracking_uri or uri, args.experiment or experiment, run_name, host=args.host,
       port=args.port, wait=not args.no_wait)
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
        print(f"{'MODEL':<28} {'PREPARED':<24} {'INSTALL':<40} LICENSE")
        for m in PACKAGED.values():
            print(f"pkg:{m.alias:<24} {_prepared(m):<24} {m.install:<40} {m.license}")
        return 0
    for ref in refs:
        rm = resolve_model(ref)
        print(f"{ref} -> {rm.path} (fingerprint {rm.fingerprint})")
    return 0


def _prepared(m: PackagedModel) -> str:
    """yes / no (GGUF not yet de-quantised: raydapt models prepare) / not installed."""
    from raydapt.core.assets import _packaged_file, cache_root

    try:
        _packaged_file(m)
    except Exception:
        return "not installed"
    if m.kind == "dir" or any(cache_root().glob(f"{m.alias}-*/SOURCE")):
        return "yes"
    return "no (models prepare)"


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
            cache.remove(e["path"])
        print(f"removed {len(entries)} cached stage outputs")
    return 0


DESCRIPTION = """\
raydapt: Ray-native domain adaptation. A job YAML names a method (SimDA, DALLMi, NTK-Selector)
and its data; raydapt runs it on local Ray or a Ray cluster, caches every stage by content,
and tracks it in MLflow (one parent run per job: config, results table, comparison chart)."""

EPILOG = """\
examples:
  raydapt run jobs/simda/amazon-books-to-kitchen.cpu.yaml      the CPU SimDA job (minutes)
  raydapt plan jobs/simda/amazon-mistral7b.gpu.yaml --gpu a100  cost before running
  raydapt runs compare --experiment simda                       compare the jobs' results
  raydapt ui jobs/simda/amazon-books-to-kitchen.cpu.yaml        open the job's MLflow runs
  raydapt COMMAND --help                                        each command's options"""

# per command: (one-line description, example); shown by `raydapt COMMAND --help`
COMMAND_HELP = {
    "run": ("Run a job YAML (local Ray unless ray.address is set); a rerun resumes from the "
            "cached stages.",
            "raydapt run jobs/simda/amazon-books-to-kitchen.cpu.yaml distill.epochs=1"),
    "sweep": ("Ray Tune sweep over a job's keys (search space and scheduler in a sweep YAML); "
              "each trial is an MLflow child run.",
              "raydapt sweep jobs/simda/amazon.sweep.yaml num_samples=2"),
    "config": ("Print a job's resolved config (defaults and overrides applied) or the JSON "
               "schema of job configs.",
               "raydapt config show jobs/simda/amazon-books-to-kitchen.cpu.yaml annotate.k=8\n"
               "  raydapt config schema --method simda | head"),
    "models": ("List the packaged models (installed? prepared?) or prepare them once "
               "(de-quantise GGUF weights).",
               "raydapt models list\n  raydapt models prepare pkg:smollm2-135m-instruct"),
    "cache": ("List or remove cached stage outputs (keyed by content; removing one makes the "
              "next run recompute that stage).",
              "raydapt cache ls --dir .raydapt/cache\n  raydapt cache rm --stage teacher"),
    "dashboards": ("Regenerate the Grafana dashboard JSON from its Python spec (--check: fail "
                   "if the committed file differs).",
                   "raydapt dashboards generate --check"),
    "submit": ("Submit a job to a Ray cluster (Job Submission API); the MLflow parent run is "
               "created here first.",
               "raydapt submit jobs/simda/amazon-mistral7b.gpu.yaml --address "
               "http://127.0.0.1:8265 --follow"),
    "jobs": ("Status, logs or stop of a job submitted with raydapt submit.",
             "raydapt jobs logs raydapt-simda-1a2b3c --address http://127.0.0.1:8265 --follow"),
    "plan": ("Estimate a job before running it: rows, LLM tokens, GPU-hours and Ray resources "
             "per stage, and one rendered prompt.",
             "raydapt plan jobs/simda/amazon-mistral7b.gpu.yaml --gpu a100"),
    "cluster": ("Start / stop a multi-node autoscaling Ray cluster on this machine (real "
                "autoscaler, fake multi-node provider, node types of cluster/node_types.yaml): "
                "rehearse a cluster job before paying for GPUs.",
                "raydapt cluster up --local\n  raydapt submit JOB.yaml --address "
                "http://127.0.0.1:PORT --follow\n  raydapt cluster down"),
    "ui": ("Serve a job's MLflow store (mlflow ui) and print links straight to its runs, to the "
           "job's run (accuracy per method) and to its methods side by side.",
           "raydapt ui jobs/simda/amazon-books-to-kitchen.cpu.yaml\n"
           "  raydapt ui --tracking-uri sqlite:///mlruns.db --experiment simda"),
    "runs": ("Compare the runs of an MLflow experiment (terminal table, compare.csv, "
             "compare.png).",
             "raydapt runs compare --experiment simda --metric 'acc.student.*'"),
}


def _describe(sub) -> None:
    """Give every sub-command its description and example (argparse epilog)."""
    for name, sp in sub.choices.items():
        desc, example = COMMAND_HELP.get(name, (None, None))
        sp.description = sp.description or (textwrap.fill(desc, 90) if desc else None)
        if example and not sp.epilog:
            sp.epilog = f"example:\n  {example}"
        sp.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydapt", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"raydapt {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a job YAML")
    r.add_argument("job", help="job YAML (jobs/<method>/*.yaml)")
    r.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    r.add_argument("--verbose", action="store_true",
                   help="show Ray's full console stream (INFO logs, progress bars, warnings)")
    r.set_defaults(fn=_run)
    w = sub.add_parser("sweep", help="Ray Tune sweep over a job's keys (search space in YAML)")
    w.add_argument("sweep", help="sweep YAML (jobs/<method>/*.sweep.yaml)")
    w.add_argument("overrides", nargs="*", default=[], help="sweep keys (num_samples=2) or job keys")
    w.set_defaults(fn=_sweep)
    c = sub.add_parser("config", help="show a resolved config or the JSON schema")
    c.add_argument("action", choices=["show", "schema"],
                   help="show: the resolved config of JOB; schema: the JSON schema")
    c.add_argument("job", nargs="?", help="job YAML (for show)")
    c.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides (for show)")
    c.add_argument("--method", default=None, choices=sorted(METHODS),
                   help="schema of one method's job config (default: all)")
    c.set_defaults(fn=_config)
    m = sub.add_parser("models", help="list or prepare packaged models")
    m.add_argument("action", choices=["list", "prepare"],
                   help="list: packaged models; prepare: resolve / de-quantise REFs")
    m.add_argument("refs", nargs="*", default=[], metavar="REF",
                   help="pkg:<alias>, hf:<repo>[@rev] or a directory (default: the packaged "
                   "student and teacher)")
    m.set_defaults(fn=_models)
    k = sub.add_parser("cache", help="list or remove cached stage outputs")
    k.add_argument("action", choices=["ls", "rm"], help="ls: list; rm: remove")
    k.add_argument("--dir", default=".raydapt/cache", help="cache directory (run.cache_dir)")
    k.add_argument("--stage", default=None, help="only this stage (e.g. teacher)")
    k.set_defaults(fn=_cache)
    u = sub.add_parser("ui", help="serve a job's MLflow store and print links to its runs")
    u.add_argument("job", nargs="?", help="job YAML (its tracking.uri, experiment and run)")
    u.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    u.add_argument("--tracking-uri", default=None, help="MLflow store or server (default: the "
                   "job's tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    u.add_argument("--experiment", default=None, help="experiment to link (default: the job's)")
    u.add_argument("--host", default="127.0.0.1", help="interface to serve on")
    u.add_argument("--port", type=int, default=5000, help="port (a free one if taken)")
    u.add_argument("--no-wait", action="store_true",
                   help="print the links and stop the server (for scripts)")
    u.set_defaults(fn=_ui)
    add_dashboards_command(sub)  # dashboards generate [--check]
    add_cluster_commands(sub)  # submit, jobs, plan, runs compare
    _describe(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handle_sigterm()  # SIGTERM ends a job as Ctrl-C does (again after ray.init: init_ray)
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["RAYDAPT_VERBOSE"] = "1"  # raydapt.core.runtime: Ray's full stream
    try:
        return args.fn(args)
    except RaydaptError as exc:
        print(f"raydapt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `raydapt config schema | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the flush at exit must not fail again
        return 141  # 128 + SIGPIPE, as a shell tool killed by it
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        term = isinstance(exc, Terminated) or terminated()  # ray.get re-raises it plain
        what = "terminated (SIGTERM)" if term else "interrupted"
        print(f"raydapt: {what}; rerun the same command to resume from cached stages",
              file=sys.stderr)
        return 143 if term else 130


if __name__ == "__main__":
    sys.exit(main())
