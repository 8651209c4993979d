"""One Ray Train launcher for every fit (SimDA students, DALLMi classifiers, NTK LoRA).

Each fit module owns its per-worker loop (:mod:`raydapt.train.settings` its settings); how the
loop reaches Ray Train — workers, CPUs / GPUs and custom resources per worker, the
process-group backend, retries, checkpoint retention, run name and storage — is decided here
once, from a :class:`Workers`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: seconds Ray Train waits for its workers' nodes (the autoscaler's time to add one); the
#: environment's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S wins
WORKER_START_TIMEOUT_S = 900


@dataclass(frozen=True)
class Workers:
    """Where and how a fit runs: the scaling and fault-tolerance half of a train section.

    ``resources`` are custom Ray resources per worker (e.g. ``{"train_gpu": 1}``, which steers
    workers to the node type that offers them, cluster/); ``max_failures`` worker failures Ray
    Train retries; ``keep_checkpoints`` how many checkpoints the run keeps (None = all)."""

    num_workers: int
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    resources: Mapping[str, float] = field(default_factory=dict)
    max_failures: int = 0
    keep_checkpoints: int | None = 1

    def per_worker(self) -> dict[str, float]:
        """Ray resources of one worker: its CPUs, one GPU when ``use_gpu``, custom ones."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}),
                **dict(self.resources)}


def launch(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], *, name: str,
           storage: str | Path, workers: Workers, datasets: dict[str, Any] | None = None,
           dataset_config: Any = None):
    """Run ``loop(config)`` on ``workers.num_workers`` Ray Train workers; return the
    :class:`ray.train.Result` of a successful fit.

    The run is ``name`` under ``storage``: Ray Train restores the latest checkpoint of a run
    with the same name and storage path, so callers put a hash of everything that determines
    the training into ``name`` and a killed fit resumes. Workers use NCCL on GPUs, gloo on CPUs.
    ``storage`` may be an object-store URI (``s3://...``) or lie under a job's local mirror of
    one (:class:`raydapt.core.storage.OutputDir`): checkpoints then go to the object store; the
    lock that keeps two identical runs apart stays a local file (this machine's runs only).

    Raises:
        the fit's error (after ``workers.max_failures`` retries).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydapt.core.runtime import exclusive, verbose
    from raydapt.core.storage import filesystem, is_uri, remote_of, scratch_dir

    # Ray Train gives up on a worker group whose nodes are not there within 60 s, but an
    # autoscaler adding (or replacing, after a node loss) a training node takes longer: a
    # cloud GPU node minutes. The driver's value is propagated to Ray Train's controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    # an object store (a URI, or a path under a job's local mirror of a URI output_dir):
    # Ray Train reads and writes its checkpoints there through our pyarrow filesystem
    remote = remote_of(storage)
    if remote is not None:
        fs, base = filesystem(remote)
        where = {"storage_path": base, "storage_filesystem": fs}
    else:
        where = {"storage_path": str(Path(storage).resolve())}
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                     resources_per_worker=workers.per_worker()),
        run_config=RunConfig(
            name=name, **where,
            failure_config=FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=workers.keep_checkpoints),
            # Ray Train's own INFO lines (worker group start, every report and checkpoint: ~10
            # per epoch) stay in its session log files unless `raydapt run --verbose`
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
        datasets=datasets or {},
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    # two identical runs at once would share this run's checkpoints: the second waits
    lock_dir = scratch_dir(str(storage), "locks") if is_uri(storage) else Path(storage)
    with exclusive(lock_dir / f".{name}.lock", f"Ray Train run {name}"):
        result = trainer.fit()
    if result.error:
        raise result.error
    return result
