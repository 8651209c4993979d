"""The one training-loop skeleton of every fit: SimDA students (:mod:`raydapt.train.student`),
DALLMi classifiers (:mod:`raydapt.train.multilabel`) and NTK-Selector's LoRA adapters
(:mod:`raydapt.train.lora`).

A fit supplies only its model, its batches and its loss (a :class:`Fit`); :func:`run` owns the
rest, once for all three:

- the step count (:class:`Steps`, from the one rule :func:`raydapt.train.plan_steps`, which
  ``raydapt plan`` and the recipes call too) and the stop at ``steps.total``;
- the optimiser step and the LR schedule (:class:`TorchOptimiser`: AdamW, linear warm-up then
  linear decay to 0, gradient clipping; or :class:`DeepSpeedOptimiser`, whose engine runs the
  same schedule from :func:`warmup_steps`);
- resume from the Ray Train checkpoint of the run (model, optimiser, schedule, epoch, history);
- the progress / ETA line and the ``train_loss`` curve;
- checkpoint-and-report after every epoch (or one report at the end, :meth:`Fit.finish`).

::

    steps = plan_steps(rows, workers=world, per_worker_batch=b, epochs=t.epochs, name=name)
    opt = TorchOptimiser(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                         total=steps.total, warmup_ratio=t.warmup_ratio)
    run(MyFit(model, data), Loop(name=name, steps=steps, optimiser=opt, rank=rank,
                                  world=world, log=log, log_every=10, rows_per_step=b,
                                  scratch=scratch))

where ``MyFit`` defines ``batches(epoch)`` and ``loss(batch)`` (and, if it evaluates,
``end_epoch``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydapt.train import Steps, say

__all__ = ["DeepSpeedOptimiser", "Fit", "Loop", "LoopRun", "Steps", "TorchOptimiser", "run",
           "warmup_decay", "warmup_steps"]


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warm-up steps of a schedule of ``total`` steps: ``int(warmup_ratio * total)``."""
    return int(warmup_ratio * total)


def warmup_decay(opt: torch.optim.Optimizer, total: int, warmup_ratio: float):
    """Linear warm-up over :func:`warmup_steps`, then linear decay to 0 at ``total``."""
    warm = warmup_steps(total, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))


class TorchOptimiser:
    """AdamW + :func:`warmup_decay` + gradient clipping at ``clip``. ``sync`` (if given) runs
    between ``backward`` and the clipping: a fit that averages gradients itself (DALLMi,
    see :func:`raydapt.train.multilabel._sync_grads`) passes it; DDP fits do not."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float,
                 total: int, warmup_ratio: float, clip: float = 1.0,
                 sync: Callable[[], None] | None = None) -> None:
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.sched = warmup_decay(self.opt, total, warmup_ratio)
        self.clip, self.sync = clip, sync

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        if self.sync is not None:
            self.sync()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


class DeepSpeedOptimiser:
    """A DeepSpeed engine's step: it averages the gradients over workers (ZeRO), clips, and
    runs its own AdamW and WarmupDecayLR (built by :func:`raydapt.train.lora.deepspeed_config`
    from :func:`warmup_steps`)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def state_dict(self) -> dict[str, Any]:  # not resumable (see LoRAFit): nothing to save
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Fit:
    """What a fit supplies to :func:`run`: its model, its batches and its loss; the other hooks
    have defaults.

    ``model`` is the module whose ``state_dict`` the checkpoints hold (unwrapped from DDP).
    ``report_history``: every report carries the per-epoch history too (DALLMi's driver reads
    it from the last report)."""

    model: torch.nn.Module
    report_history: bool = False

    def batches(self, epoch: int) -> Iterable[Any]:
        """This worker's batches of ``epoch`` (the skeleton stops at ``steps.per_epoch``)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        """The loss of one batch (the skeleton runs backward and the optimiser step)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Before ``epoch``'s first batch (per-epoch seeds, train mode)."""

    def end_epoch(self, epoch: int, metrics: dict[str, Any], run: LoopRun) -> None:
        """After ``epoch``'s last step: add evaluation and loss parts to ``metrics`` (which
        holds ``epoch`` and ``loss``), log them; ``run.step`` is the step count so far."""

    def finish(self, run: LoopRun) -> Any:
        """After the last epoch; what :func:`run` returns (default: the history)."""
        return run.history


@dataclass
class Loop:
    """How :func:`run` drives a fit on one worker.

    ``ray``: inside a Ray Train worker (resume and report), else in-process;
    ``report_every_epoch``: report the epoch's metrics to Ray Train after every epoch (off: the
    fit's :meth:`Fit.finish` reports once); ``scratch``: where rank 0 writes the checkpoint of
    each report before Ray Train persists it (None: reports without a checkpoint);
    ``rows_per_step``: rows one worker trains on per step (the rows/s of the progress line and
    the telemetry)."""

    name: str
    steps: Steps
    optimiser: TorchOptimiser | DeepSpeedOptimiser
    log: Any  # raydapt.core.tracking.RunLogger (a no-op one off rank 0)
    log_every: int
    rows_per_step: int
    rank: int = 0
    world: int = 1
    scratch: str | None = None
    ray: bool = True
    report_every_epoch: bool = True
    resume: bool = True
    telemetry: Any = None  # raydapt.core.telemetry.StageTelemetry: one record per step


@dataclass
class LoopRun:
    """What :func:`run` has done so far (handed to :meth:`Fit.finish`)."""

    steps: Steps
    step: int = 0
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step's loss, all epochs
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's
    t0: float = field(default_factory=time.time)


def _restore(fit: Fit, loop: Loop) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
    """Resume from the Ray Train checkpoint of this run, if any: (start epoch, last metrics,
    history)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, None, []
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
    fit.model.load_state_dict(state["model"])
    loop.optimiser.load_state_dict(state)
    start = int(state["epoch"]) + 1
    if loop.rank == 0:
        say(f"[{loop.name}] resumed from the checkpoint of epoch {start}/{loop.steps.epochs}")
    return start, state.get("metrics"), list(state.get("history") or [])


def _report(fit: Fit, loop: Loop, epoch: int, metrics: dict[str, Any],
            history: list[dict[str, Any]]) -> None:
    """Checkpoint (rank 0: model, optimiser, schedule, epoch, metrics, history) and report."""
    import ray.train

    checkpoint = None
    if loop.rank == 0 and loop.scratch is not None:
        d = Path(loop.scratch) / f"ckpt-{epoch}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"model": fit.model.state_dict(), **loop.optimiser.state_dict(),
                    "epoch": epoch, "metrics": metrics, "history": history}, d / "state.pt")
        checkpoint = ray.train.Checkpoint.from_directory(str(d))
    # the scratch copy goes once Ray Train has persisted it into the run's storage
    ray.train.report({**metrics, **({"history": history} if fit.report_history else {})},
                     checkpoint=checkpoint,
                     delete_local_checkpoint_after_upload=checkpoint is not None)


def run(fit: Fit, loop: Loop) -> Any:
    """Train ``fit`` for ``loop.steps``: per epoch, up to ``steps.per_epoch`` batches (never
    past ``steps.total``), each one loss -> optimiser step; then :meth:`Fit.end_epoch` and
    checkpoint-and-report. Returns :meth:`Fit.finish`'s value (None when a restored run had
    already finished: its last metrics are reported again, with ``resumed: True``)."""
    steps, r = loop.steps, LoopRun(loop.steps)
    last = None
    if loop.ray and loop.resume:
        r.start_epoch, last, r.history = _restore(fit, loop)
    if r.start_epoch >= steps.epochs:  # restored a finished run: report its final metrics again
        import ray.train

        ray.train.report({**(last or {}), "resumed": True,
                          **({"history": r.history} if fit.report_history else {})})
        return None
    r.step = r.start_epoch * steps.per_epoch
    for epoch in range(r.start_epoch, steps.epochs):
        fit.start_epoch(epoch)
        r.epoch_losses = losses = []
        batches = iter(fit.batches(epoch))
        for _ in range(steps.per_epoch):
            if r.step >= steps.total:
                break
            try:
                batch = next(batches)
            except StopIteration:
                break
            t_batch = time.perf_counter()
            loss = fit.loss(batch)
            loop.optimiser.step(loss)
            r.step += 1
            losses.append(loss.item())
            if loop.telemetry is not None:
                loop.telemetry.record_batch(rows=loop.rows_per_step,
                                            seconds=time.perf_counter() - t_batch)
            if loop.rank == 0 and (r.step % loop.log_every == 0 or r.step == steps.total):
                _progress(loop, r, epoch, losses)
        r.losses.extend(losses)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses or [0]))}
        fit.end_epoch(epoch, metrics, r)
        r.history.append(dict(metrics))
        if loop.ray and loop.report_every_epoch:
            _report(fit, loop, epoch, metrics, r.history)
    return fit.finish(r)


def _progress(loop: Loop, r: LoopRun, epoch: int, losses: list[float]) -> None:
    """The progress / ETA line (rank 0) and the ``train_loss`` / ``lr`` curve point."""
    steps = loop.steps
    rate = (r.step - r.start_epoch * steps.per_epoch) / max(1e-9, time.time() - r.t0)
    eta = (steps.total - r.step) / max(rate, 1e-9)
    recent = float(np.mean(losses[-loop.log_every:]))
    say(f"[{loop.name}] epoch {epoch + 1}/{steps.epochs} step {r.step}/{steps.total} "
        f"loss {recent:.4f} {rate:.2f} steps/s ({rate * loop.rows_per_step * loop.world:.1f} "
        f"rows/s) ETA {eta:.0f}s")
    loop.log.metrics({"train_loss": recent, "lr": loop.optimiser.lr()}, r.step)
