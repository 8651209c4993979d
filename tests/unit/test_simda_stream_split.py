"""``data.stream_target_train``: the seeded split as a per-row rule (:class:`TrainSplit`) keeps
exactly the target-train rows that :func:`split_and_subsample` keeps, and the config refuses
the settings that need every target row at once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydapt.config import ConfigError, validate_job
from raydapt.data.readers import split_and_subsample, unit_hash
from raydapt.recipes.simda import TrainSplit


@pytest.mark.parametrize("seed, frac, cap", [(0, 0.5, None), (0, 0.5, 37), (3, 0.2, 1),
                                             (1, 0.8, 500)])
def test_the_rule_keeps_the_train_rows_of_split_and_subsample(seed, frac, cap):
    df = pd.DataFrame({"id": [f"r{i}" for i in range(400)], "text": "t", "y": 0})
    train, _ = split_and_subsample(df, seed=seed, test_fraction=frac, max_rows=cap)
    side = df[unit_hash(df["id"], seed=seed, salt="split") >= frac]
    u = np.sort(unit_hash(side["id"], seed=seed, salt="subsample"))
    n = min(len(u), cap or len(u))
    rule = TrainSplit(seed, frac, float(u[n - 1]) if cap and n < len(u) else None)
    kept = df[rule(df)]
    assert set(kept["id"]) == set(train["id"]) and len(kept) == n
    assert eval(repr(rule), {"TrainSplit": TrainSplit}) == rule  # the repr keys the pass


@pytest.mark.parametrize("setting, says", [
    ({"annotate": {"select_on_target": True}}, "annotate.select_on_target"),
    ({"annotate": {"calibrate_llm": "prior", "calibrate_prior": "em"}},
     "annotate.calibrate_prior=em"),
    ({"annotate": {"teacher_prompt": "knn_prompt"}}, "annotate.teacher_prompt=knn_prompt"),
    ({"data": {"max_target_test_rows": None}}, "needs data.max_target_test_rows"),
])
def test_stream_target_train_refuses_what_needs_every_row(setting, says):
    job = {"method": "simda", "data": {"stream_target_train": True, "max_target_test_rows": 100}}
    for k, v in setting.items():
        job[k] = {**job.get(k, {}), **v}
    with pytest.raises(ConfigError, match=says):
        validate_job(job)
    job["data"]["stream_target_train"] = False
    if "max_target_test_rows" not in says:
        validate_job(job)  # the same settings without streaming are fine
