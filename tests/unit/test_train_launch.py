"""The one Ray Train launcher: what a train section's fields become per worker, and the typed
loop configs the three fits hand to it (issue 15)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from raydapt.train.launch import Workers


def test_workers_from_a_train_section_carry_cpus_gpu_and_custom_resources():
    from raydapt.train.settings import OptimFields

    w = OptimFields(num_workers=4, cpus_per_worker=2, use_gpu=True,
                      resources={"train_gpu": 1}, max_failures=3).workers
    assert (w.num_workers, w.max_failures, w.keep_checkpoints) == (4, 3, 1)
    assert w.per_worker() == {"CPU": 2.0, "GPU": 1.0, "train_gpu": 1}
    cpu = Workers(num_workers=1, max_failures=0, keep_checkpoints=None)
    assert cpu.per_worker() == {"CPU": 1.0}
    assert (cpu.max_failures, cpu.keep_checkpoints, cpu.use_gpu) == (0, None, False)


def test_typed_fit_configs_take_exactly_their_sections_fields():
    """Each fit's typed config is built from its job section by the one builder
    (from_section): a field renamed on one side only fails here, not as a KeyError inside a Ray
    Train worker."""
    from raydapt.recipes.dallmi import _fit_train
    from raydapt.recipes.dallmi_config import DALLMiJob
    from raydapt.recipes.ntk_select_config import NTKSelectJob
    from raydapt.recipes.simda_config import SimDAJob
    from raydapt.train.settings import LoRATrain, StudentTrain, from_section

    d = SimDAJob().distill
    st = from_section(StudentTrain, d, min_confidence=0.0)
    assert (st.batch_size, st.lr, st.steps) == (d.batch_size, d.lr, d.steps)
    assert st.workers.per_worker() == {"CPU": float(d.cpus_per_worker)}
    lt = from_section(LoRATrain, NTKSelectJob().finetune)
    assert lt.workers.max_failures == 0 and lt.workers.keep_checkpoints is None
    ft = _fit_train(DALLMiJob().adapt)
    assert {f.name for f in fields(ft)} <= set(DALLMiJob().adapt.model_dump())
    with pytest.raises(TypeError):  # an unknown key is an error, not silently ignored
        StudentTrain(learning_rate=1e-3)
    with pytest.raises(TypeError, match=r"not a field: \['learning_rate'\]"):
        from_section(StudentTrain, d, min_confidence=0.0, learning_rate=1e-3)
    with pytest.raises(TypeError, match=r"neither in the section nor given: \['min_confidence'\]"):
        from_section(StudentTrain, d)  # distill has no min_confidence: the recipe must give it
