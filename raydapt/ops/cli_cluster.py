"""CLI commands for running at cluster scale (registered by :func:`raydapt.cli.build_parser`).

    raydapt submit JOB.yaml [key=value ...] --address URL [--follow] [--no-pip]
    raydapt jobs status|logs|stop ID --address URL [--follow]
    raydapt plan JOB.yaml [key=value ...] [--gpu h100] [--json]
    raydapt runs compare --experiment NAME [--metric M] [--out DIR]
    raydapt cluster up --local | down | status [--state FILE]
"""

from __future__ import annotations

import argparse
import json

from raydapt import RaydaptError
from raydapt.config import load_job
from raydapt.ops.plan import make_plan
from raydapt.ops.submit import jobs, submit


def _submit(args: argparse.Namespace) -> int:
    return submit(args.job, args.overrides, address=args.address, pip=not args.no_pip,
                  follow=args.follow, runtime_env_file=args.runtime_env, env=args.env,
                  entrypoint_num_cpus=args.entrypoint_num_cpus,
                  entrypoint_num_gpus=args.entrypoint_num_gpus, plan=not args.no_plan,
                  cluster_tracking_uri=args.cluster_tracking_uri, node_types=args.node_types)


def _cluster(args: argparse.Namespace) -> int:
    from raydapt.ops import local_cluster as lc

    if args.action == "up":
        if not args.local:
            raise RaydaptError("only `raydapt cluster up --local` starts a cluster here; a cloud "
                               "cluster starts with `ray up cluster/aws.yaml` (cluster/README.md)")
        lc.up(state=args.state, node_types_file=args.node_types_file)
        return 0
    if args.action == "down":
        lc.down(state=args.state)
        return 0
    st = lc.read_state(args.state)
    if st is None or not lc.cluster_processes(st["temp_dir"]):
        print("no local cluster running" + (f" (stale state {st['state_file']})" if st else ""))
        return 1
    print(lc.render(st))
    print(f"  processes: {len(lc.cluster_processes(st['temp_dir']))}")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    return jobs(args.action, args.id, address=args.address, follow=args.follow)


def _plan(args: argparse.Namespace) -> int:
    cfg = load_job(args.job, args.overrides)
    plan = make_plan(cfg, gpu=args.gpu)
    if args.node_types != "none":
        from raydapt.ops.plan import place_on_node_types

        place_on_node_types(plan, cfg, args.node_types)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0


def _runs(args: argparse.Namespace) -> int:
    from raydapt.ops.compare import compare

    compare(args.experiment, uri=args.tracking_uri, metric=args.metric, out=args.out,
            all_runs=args.all_runs)
    return 0


def _gpu_types() -> list[str]:
    from raydapt.ops.plan import load_table

    return sorted(d for d in load_table()["devices"] if d != "cpu")


def add_commands(sub) -> None:
    """Add submit / jobs / plan / runs to the ``raydapt`` sub-parsers."""
    s = sub.add_parser("submit", help="submit a job to a Ray cluster (Job Submission API)")
    s.add_argument("job", help="job YAML")
    s.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    s.add_argument("--address", default=None,
                   help="Ray dashboard / job server, e.g. http://127.0.0.1:8265 "
                   "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)")
    s.add_argument("--follow", action="store_true",
                   help="stream the logs; exit with the job's status (0 ok, 1 failed, 3 stopped)")
    s.add_argument("--no-pip", action="store_true",
                   help="do not pip-install the pinned stack (the cluster image has it)")
    s.add_argument("--runtime-env", default=None,
                   help="YAML merged into the runtime_env (a key set to null removes it)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the job (repeatable)")
    s.add_argument("--entrypoint-num-cpus", type=float, default=None)
    s.add_argument("--entrypoint-num-gpus", type=float, default=None)
    s.add_argument("--no-plan", action="store_true", help="do not log plan.* params")
    s.add_argument("--cluster-tracking-uri", default=None,
                   help="MLflow URI as the cluster reaches it, if not tracking.uri (which this "
                   "machine uses to create the parent run), e.g. over a port-forward")
    s.add_argument("--node-types", default="auto", choices=["auto", "cloud", "local", "none"],
                   help="check every stage's resources against these node types "
                   "(cluster/node_types.yaml) before submitting: auto = local when the address "
                   "is the `raydapt cluster up --local` cluster, else cloud; none = no check")
    s.set_defaults(fn=_submit)

    j = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    j.add_argument("action", choices=["status", "logs", "stop"], help="what to do with the job")
    j.add_argument("id", help="submission id (printed by raydapt submit)")
    j.add_argument("--address", default=None,
                   help="Ray dashboard / job server (default: RAY_API_SERVER_ADDRESS or "
                   "RAY_ADDRESS)")
    j.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    j.set_defaults(fn=_jobs)

    p = sub.add_parser("plan", help="rows, LLM tokens, GPU-hours and resources per stage")
    p.add_argument("job", help="job YAML")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    p.add_argument("--gpu", default="h100", choices=_gpu_types(),
                   help="GPU type of the throughput table (default h100)")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument("--node-types", default="cloud", choices=["cloud", "local", "none"],
                   help="say which node type of cluster/node_types.yaml each stage lands on "
                   "(default cloud; none: leave it out)")
    p.set_defaults(fn=_plan)

    c = sub.add_parser("cluster", help="a local multi-node autoscaling Ray cluster (rehearsal)")
    c.add_argument("action", choices=["up", "down", "status"],
                   help="up --local: head + autoscaler + fake multi-node provider; down: stop "
                   "all of it; status: addresses and node types")
    c.add_argument("--local", action="store_true",
                   help="on this machine (the only kind `raydapt cluster` starts)")
    c.add_argument("--state", default=None,
                   help="state file (default RAYDAPT_LOCAL_CLUSTER or ~/.raydapt/local-cluster.json)")
    c.add_argument("--node-types-file", default=None,
                   help="node types (default cluster/node_types.yaml, its local half)")
    c.set_defaults(fn=_cluster)

    runs = sub.add_parser("runs", help="compare runs of an MLflow experiment")
    runs_sub = runs.add_subparsers(dest="action", required=True, metavar="compare")
    r = runs_sub.add_parser(
        "compare", help="table and chart of the runs of one experiment",
        description="Compare the job runs of one MLflow experiment: a table (terminal,\n"
        "compare.csv) and a chart (compare.png: sorted bars, one colour per method family).",
        epilog="example:\n  raydapt runs compare --experiment simda --metric 'acc.student.*'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--experiment", required=True, help="MLflow experiment name (the method "
                   "name unless tracking.experiment is set)")
    r.add_argument("--metric", default=None, help="metric name or glob (default acc.*)")
    r.add_argument("--out", default=None, help="output dir (default runs/compare-<experiment>)")
    r.add_argument("--tracking-uri", default=None,
                   help="default MLFLOW_TRACKING_URI, else sqlite:///mlruns.db")
    r.add_argument("--all-runs", action="store_true",
                   help="include child (stage) runs that have the metric")
    r.set_defaults(fn=_runs)
