"""``TeacherScore(micro_batch=...)``: a batch scored in length-sorted engine calls gives what one
call gives, row for row, in the batch's order (the streamed SimDA teacher uses it: its rows come
in file order)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raydapt.config import validate_job
from raydapt.recipes.simda import teacher_kwargs
from raydapt.stages.teacher import TeacherScore


def test_micro_batches_sorted_by_length_give_the_one_call_outputs_in_row_order():
    cfg = validate_job({"method": "simda", "teacher": {"text_max_tokens": 48}})
    words = ["great", "awful blender, broke at once and the lid leaked everywhere", "ok",
             "sharp knives, a lovely set that I would buy again for my sister", "meh",
             "the kettle whistles too loud", "fine"]
    batch = pd.DataFrame({"id": [f"r{i}" for i in range(len(words))], "text": words})
    one = TeacherScore(**teacher_kwargs(cfg, keep_hidden=True, stage="t"))
    many = TeacherScore(**teacher_kwargs(cfg, keep_hidden=True, stage="t", micro_batch=2))
    calls: list[list[int]] = []
    score = many.engine.score
    many.engine.score = lambda prompts: calls.append([len(p) for p in prompts]) or score(prompts)
    a, b = one.process(batch), many.process(batch)
    assert list(b["id"]) == list(batch["id"])
    np.testing.assert_allclose(np.stack(b["llm_logp"]), np.stack(a["llm_logp"]), atol=2e-4)
    np.testing.assert_allclose(np.stack(b["hidden"]), np.stack(a["hidden"]), atol=2e-3,
                               rtol=1e-3)
    assert list(b["prompt_tokens"]) == list(a["prompt_tokens"])
    # 4 engine calls of <= 2 prompts, shortest first across the calls
    assert [len(c) for c in calls] == [2, 2, 2, 1]
    flat = [n for c in calls for n in c]
    assert flat == sorted(flat)
