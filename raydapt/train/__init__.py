"""Training: models, samplers (plain PyTorch) and Ray Train loops."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """One progress line from a Ray Train worker (rank 0), shown once on the driver.

    Not ``print``: Ray Train patches ``print`` in its workers to write the line and also log it
    to the root logger, and the driver then shows every line twice.
    """
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def steps_per_epoch(rows: int, *, workers: int, per_worker_batch: int, name: str) -> int:
    """Optimiser steps per epoch when each of ``workers`` trains on ``rows // workers`` rows in
    full batches of ``per_worker_batch`` (the last partial batch is dropped, so every worker
    steps in lockstep). Zero steps is an error: a student that never steps would still report
    a loss and an accuracy (the untrained model's), which reads like a result.

    Raises:
        RaydaptError: the rows per worker do not fill one batch.
    """
    from raydapt import RaydaptError

    per = rows // max(1, workers)
    steps = per // max(1, per_worker_batch)
    if steps == 0:
        raise RaydaptError(
            f"{name}: {rows} training rows over {workers} worker(s) is {per} per worker, fewer "
            f"than the per-worker batch of {per_worker_batch}: no optimiser step would run. "
            "Lower the batch size or the number of workers, or give it more rows")
    return steps
