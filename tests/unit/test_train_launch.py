"""The one Ray Train launcher: what a train section's fields become per worker, and the typed
loop configs the three fits hand to it (issue 15)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from raydapt.train.launch import Workers


def test_workers_from_a_train_section_carry_cpus_gpu_and_custom_resources():
    from raydapt.train.launch import ScalingFields

    w = ScalingFields(num_workers=4, cpus_per_worker=2, use_gpu=True,
                      resources={"train_gpu": 1}, max_failures=3).workers
    assert (w.num_workers, w.max_failures, w.keep_checkpoints) == (4, 3, 1)
    assert w.per_worker() == {"CPU": 2.0, "GPU": 1.0, "train_gpu": 1}
    cpu = Workers(num_workers=1, max_failures=0, keep_checkpoints=None)
    assert cpu.per_worker() == {"CPU": 1.0}
    assert (cpu.max_failures, cpu.keep_checkpoints, cpu.use_gpu) == (0, None, False)


def test_typed_fit_configs_take_exactly_their_sections_fields():
    """Each fit's typed config is built from its job section: a field renamed on one side
    only would fail here, not as a KeyError inside a Ray Train worker."""
    from raydapt.recipes.dallmi import _fit_train
    from raydapt.recipes.dallmi_config import DALLMiJob
    from raydapt.recipes.ntk_select_config import NTKSelectJob
    from raydapt.recipes.simda_config import SimDAJob
    from raydapt.train.lora import LoRATrain
    from raydapt.train.student import StudentTrain

    d = SimDAJob().distill
    loss = {"beta", "temperature", "sim_tau", "sim_loss", "sim_center"}
    st = StudentTrain(**d.model_dump(exclude={"student", "variants", "seed", *loss}),
                      **d.model_dump(include=loss), min_confidence=0.0)
    assert (st.batch_size, st.lr, st.steps) == (d.batch_size, d.lr, d.steps)
    assert st.workers.per_worker() == {"CPU": float(d.cpus_per_worker)}
    lt = LoRATrain(**NTKSelectJob().finetune.model_dump(mode="json"))
    assert lt.workers.max_failures == 0 and lt.workers.keep_checkpoints is None
    ft = _fit_train(DALLMiJob().adapt)
    assert {f.name for f in fields(ft)} <= set(DALLMiJob().adapt.model_dump())
    with pytest.raises(TypeError):  # an unknown key is an error, not silently ignored
        StudentTrain(learning_rate=1e-3)
