"""The one training-loop skeleton (raydapt.train.loop) and the one step rule (issue 27): the
skeleton trains exactly as a hand-written loop does, stops at the step budget mid-epoch, and the
rule reproduces the step counts each of the three fits had before it existed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydapt import RaydaptError
from raydapt.core.tracking import RunLogger
from raydapt.train import Steps, per_worker_batch, plan_steps, steps_per_epoch
from raydapt.train.loop import Fit, Loop, TorchOptimiser, run, warmup_decay
from raydapt.train.settings import FitTrain, LoRATrain, StudentTrain


class _Regression(Fit):
    """y = x @ w on 10 rows, batches of 3 in a seeded order per epoch."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 1)
        self.seen: list[list[int]] = []

    def batches(self, epoch):
        order = np.random.default_rng(epoch).permutation(10)
        for s in range(10 // 3):
            yield order[s * 3 : (s + 1) * 3]

    def loss(self, rows):
        self.seen.append(list(rows))
        return torch.nn.functional.mse_loss(self.model(self.x[rows]).squeeze(-1), self.y[rows])

    def end_epoch(self, epoch, metrics, run):
        metrics["steps"] = run.step


def _fit_and_loop(steps: Steps, **kw):
    fit = _Regression()
    opt = TorchOptimiser(fit.model.parameters(), lr=0.1, weight_decay=0.01, total=steps.total,
                         warmup_ratio=0.25)
    return fit, Loop(name="t", steps=steps, optimiser=opt, log=RunLogger(None, None),
                     log_every=2, rows_per_step=3, ray=False, **kw)


def test_skeleton_trains_as_a_hand_written_loop(capsys):
    steps = plan_steps(10, workers=1, per_worker_batch=3, epochs=2, name="t")
    assert steps == Steps(per_epoch=3, total=6, epochs=2)
    fit, loop = _fit_and_loop(steps)
    history = run(fit, loop)
    # the reference: the same model, batches, AdamW, warm-up / decay, clipping, by hand
    ref = _Regression()
    opt = torch.optim.AdamW(ref.model.parameters(), lr=0.1, weight_decay=0.01)
    warm = int(0.25 * 6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (6 - s) / max(1, 6 - warm)))
    losses = []
    for epoch in range(2):
        for rows in ref.batches(epoch):
            loss = ref.loss(rows)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(ref.model.parameters()), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    for a, b in zip(fit.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)
    assert fit.seen == ref.seen
    assert [h["epoch"] for h in history] == [1, 2] and [h["steps"] for h in history] == [3, 6]
    assert history[0]["loss"] == pytest.approx(np.mean(losses[:3]))
    assert history[1]["loss"] == pytest.approx(np.mean(losses[3:]))
    out = capsys.readouterr().out  # progress every 2 steps and at the last one
    assert "[t] epoch 1/2 step 2/6 loss" in out and "[t] epoch 2/2 step 6/6 loss" in out
    assert "step 3/6" not in out and "steps/s (" in out and "ETA" in out


def test_a_step_budget_stops_mid_epoch():
    """steps=5 at 3 per epoch: 2 epochs, the second cut after 2 steps (a step-matched student)."""
    steps = plan_steps(10, workers=1, per_worker_batch=3, epochs=9, steps=5, name="t")
    assert steps == Steps(per_epoch=3, total=5, epochs=2)
    fit, loop = _fit_and_loop(steps)
    history = run(fit, loop)
    assert len(fit.seen) == 5 and [h["steps"] for h in history] == [3, 5]
    assert loop.optimiser.sched.last_epoch == 5


def test_warmup_decay_schedule_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_decay(opt, total=10, warmup_ratio=0.2)  # 2 warm-up steps
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])


@pytest.mark.parametrize("rows", [1, 7, 16, 31, 100, 257])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 4, 8, 20, 32])
def test_the_rule_gives_each_fit_the_count_it_had(rows, workers, batch):
    """The step counts the three loops computed each in its own way before the skeleton."""
    # SimDA student: per worker batch // W rows, rows // W each, drop last
    pw = max(1, batch // workers)
    old_student = (rows // workers) // pw
    st = StudentTrain(num_workers=workers, batch_size=batch, epochs=3)
    if old_student == 0:
        with pytest.raises(RaydaptError, match="no optimiser step"):
            st.steps_for(rows)
    else:
        assert st.steps_for(rows) == Steps(old_student, 3 * old_student, 3)
    # DALLMi: ceil(n / batch) batches per epoch over all workers, ceil(that / W) per worker
    old_dallmi = math.ceil(max(1, math.ceil(rows / batch)) / workers)
    assert FitTrain(num_workers=workers, batch_size=batch, epochs=2).steps_for(rows) == \
        Steps(old_dallmi, 2 * old_dallmi, 2)
    # LoRA: micro = batch // (W * accum), (rows // W) // micro micro steps per epoch
    for accum in (1, 2):
        micro = max(1, batch // (workers * accum))
        old_lora = (rows // workers) // micro
        lt = LoRATrain(num_workers=workers, batch_size=batch, grad_accum=accum)
        assert micro == per_worker_batch(batch, workers, accum)
        if old_lora == 0:
            with pytest.raises(RaydaptError):
                lt.steps_for(rows)
        else:
            assert lt.steps_for(rows).total == old_lora
            assert lt.optimiser_steps(lt.steps_for(rows)) == max(1, old_lora // accum)


def test_steps_per_epoch_rounding_up_and_no_rows():
    assert steps_per_epoch(10, workers=3, per_worker_batch=2, name="s", drop_last=False) == 2
    assert steps_per_epoch(10, workers=3, per_worker_batch=2, name="s") == 1  # 3 // 2
    with pytest.raises(RaydaptError, match="0 training rows"):
        steps_per_epoch(0, workers=1, per_worker_batch=2, name="s", drop_last=False)
