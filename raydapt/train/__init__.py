"""Training: models, samplers (plain PyTorch) and Ray Train loops."""

from __future__ import annotations

import sys
from dataclasses import dataclass


def say(msg: str) -> None:
    """One progress line from a Ray Train worker (rank 0), shown once on the driver.

    Not ``print``: Ray Train patches ``print`` in its workers to write the line and also log it
    to the root logger, and the driver then shows every line twice.
    """
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Steps:
    """A fit's step count: ``per_epoch`` steps per epoch on every worker, ``total`` steps in
    all (the run stops there, mid-epoch if need be), over ``epochs`` epochs."""

    per_epoch: int
    total: int
    epochs: int


def per_worker_batch(batch_size: int, workers: int, grad_accum: int = 1) -> int:
    """Rows one worker trains on per (micro) step: the global ``batch_size`` split over the
    workers and the accumulation steps, at least 1."""
    return max(1, batch_size // (max(1, workers) * max(1, grad_accum)))


def steps_per_epoch(rows: int, *, workers: int, per_worker_batch: int, name: str,
                    drop_last: bool = True) -> int:
    """THE step rule of every fit: steps per epoch when each of ``workers`` trains on its
    share of ``rows`` in batches of ``per_worker_batch``.

    ``drop_last`` (SimDA students, LoRA): each worker's share is ``rows // workers`` rows and
    the last partial batch is dropped, so every worker steps in lockstep. Otherwise (DALLMi)
    both divisions round up: ``ceil(ceil(rows / workers) / per_worker_batch)``. Zero steps is
    an error: a fit that never steps would still report a loss and a score (the untrained
    model's), which reads like a result.

    Raises:
        RaydaptError: the rows per worker do not fill one batch (``drop_last``), or no rows.
    """
    from raydapt import RaydaptError

    w, b = max(1, workers), max(1, per_worker_batch)
    per = rows // w if drop_last else -(-rows // w)
    steps = per // b if drop_last else -(-per // b)
    if steps <= 0:
        raise RaydaptError(
            f"{name}: {rows} training rows over {workers} worker(s) is {per} per worker, fewer "
            f"than the per-worker batch of {per_worker_batch}: no optimiser step would run. "
            "Lower the batch size or the number of workers, or give it more rows")
    return steps


def plan_steps(rows: int, *, workers: int, per_worker_batch: int, epochs: int,
               steps: int | None = None, name: str, drop_last: bool = True) -> Steps:
    """A fit's :class:`Steps` (what the training loop runs, what ``raydapt plan`` counts and
    what the recipes log): :func:`steps_per_epoch` per epoch; ``steps`` in all if given (a
    fixed step budget: the data is cycled for ``ceil(steps / per_epoch)`` epochs, the last one
    cut short), else ``epochs`` full epochs."""
    per = steps_per_epoch(rows, workers=workers, per_worker_batch=per_worker_batch, name=name,
                          drop_last=drop_last)
    total = int(steps or per * epochs)
    return Steps(per, total, -(-total // per))
