"""Process-level set-up shared by recipes: Ray start-up, seeding, quiet logs, SIGTERM."""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, spot preemption, ``ray job stop``, ``kill``), raised in the main
    thread as Ctrl-C raises KeyboardInterrupt, so a terminated job unwinds the same way: stages
    stop, MLflow runs are marked KILLED, Ray shuts down, the CLI says how to resume."""


_SIGTERM_RECEIVED = False


def terminated() -> bool:
    """Whether this process received SIGTERM. Ray's blocking calls (``ray.get``) turn the
    interrupted wait into a plain KeyboardInterrupt, not our :class:`Terminated`: the CLI asks
    this to say which one it was."""
    return _SIGTERM_RECEIVED


def _on_sigterm(signum, frame) -> None:
    global _SIGTERM_RECEIVED
    _SIGTERM_RECEIVED = True
    # one is enough: a second SIGTERM during the clean-up must not interrupt it (a SIGKILL
    # after the grace period still ends it)
    signal.signal(signal.SIGTERM, lambda *_: None)
    raise Terminated()


def handle_sigterm() -> None:
    """SIGTERM -> :class:`Terminated` in the main thread. ``ray.init`` installs its own handler
    (``sys.exit(15)``: the interpreter then exits under Ray's running threads, and its C++ core
    aborts with a crash dump, rc 134), so :func:`init_ray` calls this again after it. A no-op
    outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def exclusive(path: str | Path, what: str, say: Callable[[str], None] | None = None
              ) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created) for the block. A second process
    that wants it (two identical runs at once: same Ray Train run name and storage) says who
    holds it and waits. The lock is the kernel's (``flock``): it goes away with the process
    that held it, even one that was SIGKILLed, so no stale lock file can block a rerun."""
    import fcntl
    import socket

    say = say or (lambda m: print(m, flush=True))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            say(f"raydapt: {what} is in use by {holder} (an identical run at the same time); "
                f"waiting for it to finish ({p})")
            fcntl.flock(f, fcntl.LOCK_EX)
            say(f"raydapt: {what} is free; going on (from its last checkpoint)")
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch from the one config seed."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CLUSTER_RESOURCES: tuple[str, ...] = ("annotate_gpu", "train_gpu")
"""Custom resources the cluster configs (cluster/) put on GPU node types; GPU job YAMLs request
them per actor / worker (``*.pool.resources``, ``distill.resources``) to steer stages to the
right nodes. A local instance on a GPU machine advertises each once per GPU, so the same YAMLs
run unchanged on one box."""


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


_NO_STATE_API = "Failed to query Ray Train Controller actor state"


class _DropNoStateApi(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_STATE_API)


class _DropBarsDisabled(logging.Filter):
    """Ray Data warns once per process that its bars are off: we turned them off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def quiet_worker_logs() -> None:
    """Ray ``worker_process_setup_hook`` of local instances (started without the dashboard, so
    without the State API): silences Ray Train's PlacementGroupCleaner warning that it cannot
    query the controller (hundreds of lines per fit; the local instance goes away with the job,
    so there is nothing for the cleaner to clean), and, unless RAYDAPT_VERBOSE is set, the
    per-process noise a worker forwards to the driver's console (deprecation warnings, Ray
    Data's INFO lines)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).addFilter(_DropNoStateApi())
    _drop_cleaner_thread_crash()
    if not verbose():
        import ray
        import ray.data  # noqa: F401 - configures the ray.data logger, which we then quieten

        quiet_process()
        # Ray Train logs every worker's report ("Reporting training result ...", one line per
        # worker per epoch) on a logger named by its file path, outside ``ray.train``
        logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                                       "execution", "context.py")).setLevel(logging.WARNING)


_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def _drop_cleaner_thread_crash() -> None:
    """With several Ray instances on one machine (other jobs, other users) the cleaner's State
    API client cannot pick one ("Found multiple active Ray instances") and its monitor thread
    dies with a traceback per fit. It only cleans up after a dead controller, and a local
    instance goes away with the job: log that crash as one line in the worker's log file."""
    import threading

    previous = threading.excepthook

    def hook(args) -> None:
        if args.thread is not None and args.thread.name == _CLEANER_THREAD:
            logging.getLogger(__name__).debug("%s stopped: %s", _CLEANER_THREAD, args.exc_value)
            return
        previous(args)

    if getattr(threading.excepthook, "__name__", "") != "hook":
        threading.excepthook = hook


def verbose() -> bool:
    """``raydapt run --verbose`` (RAYDAPT_VERBOSE=1): Ray's full console stream."""
    return os.environ.get("RAYDAPT_VERBOSE", "") not in ("", "0", "false")


_QUIET_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic",
                  "filelock", "urllib3", "httpx", "transformers", "deepspeed")


def quiet_process() -> None:
    """Console of this process (driver or Ray worker): warnings of Ray / MLflow / libraries are
    not shown (deprecations, 'use expr instead of fn'), library loggers print WARNING and up
    only. Ray Data keeps writing everything to ``ray-data.log`` in the Ray session's log
    folder; only its console handler is raised to WARNING."""
    import warnings

    for cat in (DeprecationWarning, FutureWarning, PendingDeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
    try:
        from sqlalchemy.exc import SADeprecationWarning

        warnings.filterwarnings("ignore", category=SADeprecationWarning)
    except Exception:  # pragma: no cover - sqlalchemy comes with mlflow
        pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' bars
    for h in logging.getLogger("ray.data").handlers:  # handler filters see propagated records
        if not any(isinstance(f, _DropBarsDisabled) for f in h.filters):
            h.addFilter(_DropBarsDisabled())
    for name in _QUIET_LOGGERS:
        lg = logging.getLogger(name)
        if name != "ray.data":  # ray.data: DEBUG to its file handler, see below
            lg.setLevel(max(lg.level, logging.WARNING))
        for h in lg.handlers:
            if not isinstance(h, logging.FileHandler) and \
                    type(h).__name__ != "SessionFileHandler":
                h.setLevel(max(h.level, logging.WARNING))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial threshold, kept fixed


def return_freed_memory() -> dict[str, bool]:
    """Make this process give the memory it frees back to the kernel instead of keeping it for
    reuse, so its resident size follows what it holds, not the most it ever held.

    Two allocators keep freed memory by default, and a long streaming pass in the driver
    (stage 1's votes over a million embeddings: ~140 MiB of private memory at the peak while
    Arrow's live allocations stay at ~3 MiB, ``benchmarks/results/votes-memory-cpu.json``)
    pays for both:

    - Arrow's default pool (mimalloc / jemalloc) keeps freed pages: the default pool becomes
      the system allocator (``ARROW_DEFAULT_MEMORY_POOL=system``, done before the allocations
      instead of through the environment);
    - glibc raises its mmap threshold after each large free, so later large blocks (NumPy
      arrays, Arrow buffers) come from the heap, which it rarely shrinks: the threshold is
      fixed at its initial 128 KiB (``MALLOC_MMAP_THRESHOLD_=131072``), so blocks larger than
      that are mapped and unmapped and go back when freed.

    Measured (docs/scale.md): the votes over 1M rows grow the private memory by 49 MiB instead
    of 112-135, with the same votes; stage 1's driver RSS at 1M rows is 1.15x its 10K value
    instead of 1.28x, at the same rows/s. Idempotent; returns which of the two took effect
    (glibc only: on macOS or musl the second is skipped)."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    done = {"arrow_system_pool": False, "glibc_mmap_threshold": False}
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    done["arrow_system_pool"] = True
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done["glibc_mmap_threshold"] = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return done


def init_ray_for(section) -> None:
    """:func:`init_ray` with a job's ``ray`` section (``RaySection``): every setting in it, so
    a setting added there reaches each caller."""
    init_ray(section.address, section.num_cpus, section.progress, section.data_object_store_mb,
             section.driver_returns_freed_memory)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             progress: bool = True, data_object_store_mb: int | None = None,
             driver_returns_freed_memory: bool = True) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a new local instance. Idempotent.
    ``data_object_store_mb`` caps the object store a Ray Data execution started from this
    process may fill (``ray.data_object_store_mb``); None keeps Ray's default.
    ``driver_returns_freed_memory`` applies :func:`return_freed_memory` to this process (the
    driver; Ray's workers are other processes and keep their allocators' defaults).

    Without an address we pass ``address="local"``: a bare ``ray.init()`` would silently join the
    latest cluster started by ``ray start`` on this machine (/tmp/ray/ray_current_cluster).
    """
    import ray

    if driver_returns_freed_memory:
        return_freed_memory()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet = not verbose()
    if not sys.stdout.isatty():  # no colour codes around worker-line prefixes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if quiet:
        import ray.data  # noqa: F401 - configures the ray.data logger, which we then quieten

        quiet_process()
        # Ray 2.60 turns token auth on for a new local instance and warns about it on every
        # start ("Token authentication is enabled ..."): a notice, not a problem, for a local run
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
    if not ray.is_initialized():
        kw: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            kw["address"] = addr
        else:
            kw["address"] = "local"
            kw["num_cpus"] = num_cpus
            kw["include_dashboard"] = False
            # no dashboard = no State API: Ray Train's placement-group cleaner then warns once a
            # second per fit that it cannot query its controller; drop just that line
            kw["runtime_env"] = {"worker_process_setup_hook":
                                 "raydapt.core.runtime.quiet_worker_logs"}
            gpus = _local_gpus()
            if gpus:  # one machine plays every node type of cluster/
                kw["resources"] = {r: float(gpus) for r in CLUSTER_RESOURCES}
        try:
            ray.init(**kw)
        except Exception as exc:  # ray raises a bare Exception on a start-up timeout
            from raydapt import RaydaptError

            where = f"connect to the Ray cluster at {addr}" if addr else "start a local instance"
            raise RaydaptError(f"Ray could not {where}: {str(exc).splitlines()[0][:300]}"
                               + ("" if addr else " (an overloaded machine? retry, or set "
                                  "ray.address / RAY_ADDRESS to a running cluster)")) from None
        handle_sigterm()  # ray.init replaced ours (see handle_sigterm)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's bars only on a terminal: piped to a file (CI, nohup, > log) they never close
    # and fill it with cursor codes; our stages print their own rows / rate / ETA lines
    ctx.enable_progress_bars = progress and (not quiet or sys.stderr.isatty())
    ctx.verbose_progress = False
    if data_object_store_mb is not None:  # the streaming executor's limit, read per execution
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=data_object_store_mb * 2**20)
    if quiet:
        ctx.print_on_execution_start = False  # the per-dataset 'Starting execution' block
