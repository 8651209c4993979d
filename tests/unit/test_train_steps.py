"""A student that would take no optimiser step is an error, never a silent 'loss 0.0' (issue 16)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydapt import RaydaptError
from raydapt.train import steps_per_epoch


def test_steps_per_epoch_counts_full_per_worker_batches():
    assert steps_per_epoch(100, workers=2, per_worker_batch=8, name="s") == 6  # 50 // 8
    assert steps_per_epoch(16, workers=2, per_worker_batch=8, name="s") == 1
    with pytest.raises(RaydaptError, match=r"s: 15 training rows over 2 worker\(s\) .* 7 per "
                                           r"worker.* batch of 8.*no optimiser step"):
        steps_per_epoch(15, workers=2, per_worker_batch=8, name="s")


@pytest.mark.timeout(300)
def test_fit_student_with_fewer_rows_than_a_batch_fails_before_training(ray_local, tmp_path):
    from raydapt.train.student import StudentTrain, fit_student

    df = pd.DataFrame({"text": [f"t{i}" for i in range(6)], "y": [0, 1] * 3})
    with pytest.raises(RaydaptError, match="no optimiser step"):
        fit_student(name="tiny", objective="supervised", train_ds=ray_local.data.from_pandas(df),
                    eval_df=df, num_classes=2, student="pkg:all-minilm-l6-v2",
                    train=StudentTrain(num_workers=1, batch_size=8, epochs=1, lr=1e-3,
                                       weight_decay=0.0, warmup_ratio=0.0, max_length=16),
                    seed=0, storage=str(tmp_path))
    assert not (tmp_path / "tiny").exists()  # no Ray Train run was started


@pytest.mark.timeout(600)
def test_rerun_of_a_finished_student_reports_it_and_does_not_train(ray_local, tmp_path, capsys):
    from raydapt.train.student import StudentTrain, fit_student

    df = pd.DataFrame({"text": [f"text number {i}" for i in range(8)], "y": [0, 1] * 4})
    kw = dict(name="tiny", objective="supervised", eval_df=df, num_classes=2,
              student="pkg:all-minilm-l6-v2", seed=0, storage=str(tmp_path),
              train=StudentTrain(num_workers=1, batch_size=4, epochs=2, lr=1e-3,
                                 weight_decay=0.0, warmup_ratio=0.0, max_length=8,
                                 eval_every_epoch=False))
    first = fit_student(train_ds=ray_local.data.from_pandas(df), **kw)
    assert first["steps"] == 4 and first["epoch"] == 2 and not first.get("resumed")
    # evaluated after the last epoch even with eval_every_epoch off: all 8 rows counted
    assert 0 <= first["accuracy"] <= 1 and np.asarray(first["confusion"]).sum() == 8
    capsys.readouterr()
    again = fit_student(train_ds=ray_local.data.from_pandas(df), **kw)
    assert again["resumed"] is True
    assert {k: again[k] for k in ("accuracy", "loss", "steps", "confusion")} == \
        {k: first[k] for k in ("accuracy", "loss", "steps", "confusion")}
    assert "step" not in capsys.readouterr().out  # no training progress: nothing trained


def test_simda_students_are_step_matched_whatever_their_rows():
    """The SimDA end-to-end test's students (24 pseudo-labelled target rows, 40 source rows,
    batch 8 over 2 workers, 1 epoch): every student trains the distillation set's 3 steps,
    source-only too although its 40 rows would give 5; ``source_only_all`` keeps its epochs;
    ``distill.steps`` fixes the budget for all."""
    from raydapt.config import validate_job
    from raydapt.recipes.simda import matched_steps, student_steps
    from raydapt.train.settings import StudentTrain, from_section

    def distill(**kw):
        return validate_job({"method": "simda", "distill": {
            "variants": ["source_only", "kl_sim", "source_only_all"], "epochs": 1,
            "batch_size": 8, "num_workers": 2, **kw}}).distill

    d = distill()
    assert matched_steps(24, 8, 2, 1) == 3  # 12 rows per worker, 4 per step: 3 full steps
    budget = student_steps(d, 24)
    assert budget == {"source_only": 3, "kl_sim": 3, "source_only_all": None}
    ran = {v: from_section(StudentTrain, d, steps=s, min_confidence=0.0).steps_for(
        {"kl_sim": 24}.get(v, 40)).total for v, s in budget.items()}
    assert ran == {"source_only": 3, "kl_sim": 3, "source_only_all": 5}  # 20 per worker // 4
    assert set(student_steps(distill(steps=54), 24).values()) == {54, None}
    # only the reference: no distillation set needed, nothing counted
    assert student_steps(distill(variants=["source_only_all"]), 0) == {"source_only_all": None}
    with pytest.raises(RaydaptError, match="no optimiser step"):
        student_steps(d, 6)  # 3 rows per worker: not one batch of 4
