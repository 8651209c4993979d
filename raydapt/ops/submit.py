"""Submit a job to a Ray cluster through Ray's Job Submission API, and manage submitted jobs.

    raydapt submit JOB.yaml [key=value ...] --address http://head:8265 [--follow] [--no-pip]
    raydapt jobs status|logs|stop ID --address http://head:8265

What :func:`submit` does, in order:

1. resolves and validates the job config with the overrides *locally* (a bad key fails here,
   with the same message as ``raydapt run``, before anything reaches the cluster);
2. picks the submission id: ``run.name``, or ``run.name-<6 hex>`` when a job with that id
   already exists on the cluster (Ray refuses to reuse a submission id);
3. creates the MLflow parent run (name = submission id; tags: method, config hash, git sha,
   submission id, address; params ``plan.*`` from :mod:`raydapt.ops.plan` when a plan exists) so the
   job on the cluster logs *under* it: the job gets ``RAYDAPT_PARENT_RUN_ID``, which
   :meth:`raydapt.core.tracking.Tracker.job` honours;
4. builds the runtime_env: ``working_dir`` = the project (minus ``.venv``, ``runs/``,
   ``mlruns*``, ``.raydapt/``, ``.git`` ...), ``pip`` = the direct dependencies pinned to their
   ``constraints.txt`` versions (ray itself excluded: the cluster's Ray must match its image;
   ``--no-pip`` where the image already has the stack), ``env_vars`` = tracking URI, experiment,
   parent run id and the job config;
5. submits ``python -m raydapt.ops.entrypoint`` as the entrypoint. That entrypoint writes the shipped job
   YAML (overrides applied, ``${VAR}`` placeholders left for the cluster's environment; base64 in
   ``RAYDAPT_JOB_CONFIG_B64`` because Ray itself expands ``${VAR}`` in env_vars) to a temporary
   file and runs it with ``raydapt run``.

Authentication: Ray 2.60 turns token auth on by default for clusters started with ``ray start``;
the client must then send the token. We switch the client to ``RAY_AUTH_MODE=token`` when a token
is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and turn an
authentication failure into one clear message.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raydapt import RaydaptError
from raydapt.config import ConfigError, apply_overrides, config_hash, validate_job
from raydapt.core.tracking import Tracker, git_sha, standard_tags
from raydapt.ops.plan import PlanError, make_plan

PROJECT = Path(__file__).resolve().parents[2]

#: Paths never uploaded as the working_dir (Ray's gitignore-style patterns; .gitignore is
#: honoured too).
WORKING_DIR_EXCLUDES = [".venv", ".venv-*", "venv", "runs", "mlruns", "mlruns*", "mlruns.db",
                        "mlruns-artifacts", ".raydapt", ".git", "**/__pycache__", "*.pyc",
                        ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info", "build",
                        "dist", ".whl", ".gl"]

#: Exit codes of ``submit --follow`` / ``jobs status``: the job's terminal status.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}

ENV_CONFIG = "RAYDAPT_JOB_CONFIG_B64"  # base64: Ray expands ${VAR} inside env_vars values
ENV_PARENT = "RAYDAPT_PARENT_RUN_ID"


# --------------------------------------------------------------------------------------------
# Client, auth
# --------------------------------------------------------------------------------------------


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    p = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(p).is_file() if p else (Path.home() / ".ray" / "auth_token").is_file()


def client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (or RAY_API_SERVER_ADDRESS / RAY_ADDRESS)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RaydaptError("no cluster address: pass --address http://HEAD:8265 (the Ray "
                           "dashboard, e.g. through an SSH tunnel) or set RAY_ADDRESS")
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray's C++ config on first use
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray[default] is a dependency
        raise RaydaptError(f"job submission needs ray[default]: pip install 'ray[default]' "
                           f"({exc})") from None
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise RaydaptError(
            f"the cluster at {address} refused the request: {str(exc).splitlines()[0]}. Ray 2.60 "
            "clusters use token auth by default: copy the head's token (`ray get-auth-token` on "
            "the head) to ~/.ray/auth_token or set RAY_AUTH_TOKEN, and RAY_AUTH_MODE=token"
        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise RaydaptError(f"cannot reach the Ray job server at {address}: "
                           f"{str(exc).splitlines()[0]}") from None


def job_exists(cl, submission_id: str) -> bool:
    try:
        cl.get_job_info(submission_id)
        return True
    except RuntimeError:
        return False


def unique_submission_id(cl, name: str) -> str:
    """``name`` if free on the cluster, else ``name-<6 hex>``. Ray ids: letters, digits, - _ ."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", name).strip("-") or "raydapt"
    if not job_exists(cl, base):
        return base
    for _ in range(10):
        cand = f"{base}-{secrets.token_hex(3)}"
        if not job_exists(cl, cand):
            return cand
    raise RaydaptError(f"could not find a free submission id for {base!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# runtime_env
# --------------------------------------------------------------------------------------------


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned_requirements(project: Path = PROJECT) -> list[str]:
    """pyproject's direct dependencies pinned to their constraints.txt versions (extras kept),
    without ray (the cluster image provides Ray; a second Ray in the job env would not match)."""
    import tomllib

    deps = tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    for line in (project / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            pins[_name(line)] = line.split("==", 1)[1].strip()
    out = []
    for dep in deps:
        name = _name(dep)
        if name == "ray":
            continue
        m = re.match(r"\s*([A-Za-z0-9_.-]+(\[[^\]]*\])?)", dep)
        spec = m.group(1) if m else name
        out.append(f"{spec}=={pins[name]}" if name in pins else dep)
    return out


def build_runtime_env(*, env_vars: dict[str, str], pip: bool = True,
                      project: Path = PROJECT, extra: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The runtime_env of a submitted job (see the module docstring); ``extra`` (from
    ``--runtime-env FILE``) is merged on top, ``env_vars`` merged key by key."""
    env: dict[str, Any] = {"working_dir": str(project), "excludes": list(WORKING_DIR_EXCLUDES),
                           "env_vars": dict(env_vars)}
    if pip:
        env["pip"] = {"packages": pinned_requirements(project), "pip_check": False}
    for k, v in (extra or {}).items():
        if k == "env_vars":
            env["env_vars"].update({str(a): str(b) for a, b in (v or {}).items()})
        elif v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# --------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------


def prepare(job: str | Path, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """Validate locally; returns (resolved config, raw mapping with the overrides applied and
    ``${VAR}`` placeholders kept for the cluster side)."""
    p = Path(job)
    if not p.is_file():
        raise ConfigError(f"job file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    raw = apply_overrides(raw, list(overrides))
    return validate_job(raw), raw


def _create_parent_run(cfg, submission_id: str, address: str, plan_params: dict[str, Any]
                       ) -> tuple[str, str]:
    """Create the MLflow parent run the submitted job will attach to. Returns (uri, run id)."""
    from mlflow.tracking import MlflowClient

    tr = Tracker.from_section(cfg.tracking, enabled=True)
    exp_id = tr._ensure_experiment()
    tags = {"mlflow.runName": submission_id, "raydapt.method": cfg.method,
            "raydapt.config_hash": config_hash(cfg), "raydapt.submission_id": submission_id,
            "raydapt.address": address}
    tags.update(standard_tags("JOB"))
    cl = MlflowClient(tracking_uri=tr.uri)
    run_id = cl.create_run(exp_id, tags=tags, run_name=submission_id).info.run_id
    if plan_params:
        from mlflow.entities import Param

        ps = [Param(k, str(v)[:500]) for k, v in plan_params.items()]
        for i in range(0, len(ps), 100):
            cl.log_batch(run_id, params=ps[i:i + 100])
    return tr.uri, run_id


def submit(job: str | Path, overrides: list[str], *, address: str | None, pip: bool = True,
           follow: bool = False, runtime_env_file: str | None = None,
           env: list[str] | None = None, entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, plan: bool = True,
           cluster_tracking_uri: str | None = None, node_types: str = "auto") -> int:
    """Submit a job; with ``follow`` stream its logs and return its exit code (EXIT_CODES).

    ``node_types``: check every actor pool / Ray Train section against the node types of
    ``cluster/node_types.yaml`` before anything is submitted (:func:`check_node_types`), so a
    stage asking for a resource no node type offers fails here instead of waiting forever for
    the autoscaler. ``auto``: the local half when ``address`` is the ``raydapt cluster up
    --local`` cluster, else the cloud half; ``none``: no check (a cluster of your own).

    ``cluster_tracking_uri``: the MLflow URI as the cluster sees it, when it differs from the
    one this machine uses (``tracking.uri``, e.g. a port-forwarded http://localhost:5000 here
    and http://mlflow.raydapt.svc.cluster.local:5000 there). Both must name the same server."""
    cfg, raw = prepare(job, overrides)
    check_node_types(cfg, address, node_types)
    extra_env: dict[str, str] = {}
    for item in env or []:
        if "=" not in item:
            raise RaydaptError(f"--env {item!r} is not of the form KEY=VALUE")
        k, _, v = item.partition("=")
        extra_env[k] = v
    extra = None
    if runtime_env_file:
        extra = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
        if not isinstance(extra, dict):
            raise RaydaptError(f"{runtime_env_file}: a runtime_env must be a mapping")
    cl = client(address)
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ["RAY_ADDRESS"]
    sid = unique_submission_id(cl, cfg.run.name)

    plan_params: dict[str, Any] = {}
    if plan:
        try:
            plan_params = make_plan(cfg).mlflow_params()
        except PlanError as exc:
            print(f"raydapt: no plan logged: {exc}", file=sys.stderr)

    env_vars = {ENV_CONFIG: _b64(raw), "RAYDAPT_SUBMISSION_ID": sid,
                **extra_env}
    run_id = None
    if cfg.tracking.enabled:
        uri, run_id = _create_parent_run(cfg, sid, addr, plan_params)
        uri = cluster_tracking_uri or uri
        # the job logs to the same store, under the parent created here
        raw.setdefault("tracking", {})
        raw["tracking"]["uri"] = uri
        raw["tracking"]["experiment"] = cfg.tracking.experiment
        env_vars.update({ENV_CONFIG: _b64(raw), ENV_PARENT: run_id,
                         "MLFLOW_TRACKING_URI": uri,
                         "MLFLOW_EXPERIMENT_NAME": cfg.tracking.experiment})
        if uri.startswith(("sqlite:", "file:")):
            print(f"raydapt: note: tracking store {uri} is a local file; the cluster must share "
                  "this filesystem (use an MLflow server URI on a real cluster)", file=sys.stderr)
    runtime_env = build_runtime_env(env_vars=env_vars, pip=pip, extra=extra)
    metadata = {"raydapt.method": cfg.method, "raydapt.config_hash": config_hash(cfg),
                "raydapt.run_name": cfg.run.name, "raydapt.git_sha": _git_sha() or "unknown",
                "raydapt.job_file": str(job)}
    if run_id:
        metadata.update({"raydapt.mlflow_run_id": run_id,
                         "raydapt.mlflow_uri": env_vars["MLFLOW_TRACKING_URI"]})
    kw: dict[str, Any] = {}
    if entrypoint_num_cpus is not None:
        kw["entrypoint_num_cpus"] = entrypoint_num_cpus
    if entrypoint_num_gpus is not None:
        kw["entrypoint_num_gpus"] = entrypoint_num_gpus
    try:
        cl.submit_job(entrypoint="python -m raydapt.ops.entrypoint", submission_id=sid,
                      runtime_env=runtime_env, metadata=metadata, **kw)
    except Exception as exc:
        if run_id:
            _terminate_parent(metadata, "FAILED")
        raise RaydaptError(f"submission to {addr} failed: {str(exc).splitlines()[0]}") from None
    print(f"submitted {sid} to {addr}" + (f" (MLflow parent run {run_id})" if run_id else ""))
    print(f"  status: raydapt jobs status {sid} --address {addr}")
    print(f"  logs:   raydapt jobs logs {sid} --address {addr} [--follow]")
    print(f"  stop:   raydapt jobs stop {sid} --address {addr}")
    if not follow:
        return 0
    return follow_job(cl, sid)


def check_node_types(cfg, address: str | None, which: str = "auto") -> dict[str, list[str]]:
    """Section -> node types its actors / workers fit on; raises (naming the section, the
    resource and the node types) when one fits nowhere. ``which``: auto | cloud | local |
    none (see :func:`submit`)."""
    from raydapt.ops import local_cluster, node_types

    if which == "none":
        return {}
    if which == "auto":
        addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or \
            os.environ.get("RAY_ADDRESS") or ""
        st = local_cluster.read_state()
        which = "local" if st and addr.rstrip("/") in (st["dashboard"], st["address"]) \
            else "cloud"
    nt = node_types.local() if which == "local" else node_types.cloud()
    try:
        return node_types.placement(cfg, nt)
    except node_types.NodeTypesError as exc:
        raise RaydaptError(f"not submitted: {exc}. The autoscaler could never add a node for "
                           "it; fix the job's resources, or the node types in "
                           "cluster/node_types.yaml (or --node-types none for a cluster of "
                           "your own)") from None


def _b64(raw: dict[str, Any]) -> str:
    """The job YAML for the env var. Base64, because Ray substitutes ``${VAR}`` in runtime_env
    env_vars values from the cluster's environment — our placeholders (``${VAR:-default}``) must
    reach :func:`raydapt.config.load_job` on the cluster untouched."""
    return base64.b64encode(yaml.safe_dump(raw, sort_keys=False).encode()).decode()


def _git_sha() -> str | None:
    cwd = os.getcwd()
    try:
        os.chdir(PROJECT)
        return git_sha()
    finally:
        os.chdir(cwd)


def _terminate_parent(metadata: dict[str, str], status: str) -> None:
    """Close the parent run when the job ended without closing it (failed before the recipe
    attached, or stopped)."""
    run_id, uri = metadata.get("raydapt.mlflow_run_id"), metadata.get("raydapt.mlflow_uri")
    if not (run_id and uri):
        return
    from mlflow.tracking import MlflowClient

    try:
        c = MlflowClient(tracking_uri=uri)
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, status=status)
    except Exception as exc:  # tracking must not hide the job's own status
        print(f"raydapt: warning: could not close MLflow run {run_id}: {exc}", file=sys.stderr)


def _status(cl, sid: str) -> str:
    return str(getattr(cl.get_job_status(sid), "value", cl.get_job_status(sid)))


def follow_job(cl, sid: str) -> int:
    """Stream a job's logs until it ends; returns EXIT_CODES[status]."""
    async def tail() -> None:
        async for lines in cl.tail_job_logs(sid):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the log stream can drop; fall back to polling the status
        print(f"raydapt: log stream ended ({exc}); polling the job status", file=sys.stderr)
    return wait(cl, sid)


def wait(cl, sid: str, timeout_s: float | None = None) -> int:
    t0 = time.time()
    while True:
        info = cl.get_job_info(sid)
        st = str(getattr(info.status, "value", info.status))
        if st in EXIT_CODES:
            if st != "SUCCEEDED":
                _terminate_parent(info.metadata or {}, "KILLED" if st == "STOPPED" else "FAILED")
            print(f"job {sid}: {st}" + (f" ({info.message})" if st != "SUCCEEDED" and
                                         info.message else ""), file=sys.stderr)
            return EXIT_CODES[st]
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise RaydaptError(f"job {sid} still {st} after {timeout_s:.0f}s")
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------
# jobs status | logs | stop
# --------------------------------------------------------------------------------------------


def jobs(action: str, sid: str, *, address: str | None, follow: bool = False) -> int:
    cl = client(address)
    if not job_exists(cl, sid):
        raise RaydaptError(f"no job {sid!r} on the cluster")
    if action == "status":
        info = cl.get_job_info(sid)
        st = str(getattr(info.status, "value", info.status))
        md = info.metadata or {}
        dur = ""
        if info.start_time:
            end = info.end_time or time.time() * 1000
            dur = f", {(end - info.start_time) / 1000:.0f}s"
        print(f"{sid}: {st}{dur}")
        if info.message:
            print(f"  message: {info.message.splitlines()[0][:300]}")
        for k in ("raydapt.method", "raydapt.config_hash", "raydapt.git_sha",
                  "raydapt.mlflow_run_id"):
            if k in md:
                print(f"  {k.split('.', 1)[1]}: {md[k]}")
        return EXIT_CODES.get(st, 0) if st in EXIT_CODES else 0
    if action == "logs":
        if follow:
            return follow_job(cl, sid)
        print(cl.get_job_logs(sid), end="")
        return 0
    if action == "stop":
        stopped = cl.stop_job(sid)
        print(f"{sid}: stop requested" if stopped else f"{sid}: already finished")
        if stopped:
            _terminate_parent(cl.get_job_info(sid).metadata or {}, "KILLED")
        return 0
    raise RaydaptError(f"unknown jobs action {action!r}")  # pragma: no cover
