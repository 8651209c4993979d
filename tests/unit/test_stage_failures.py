"""Row failures inside a Ray Data stage batch: the batch still becomes one Arrow block.

Found running the vLLM engine for real (tests/vllm_cpu): a batch where some rows were rejected
(prompt too long) and others scored held arrays and nulls in ``llm_logp``; Ray stored that block
as pickled objects, the tensor blocks of other batches could not be unified with it, and the
whole pass died ("Found columns with both objects and tensors").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from ray.data.block import BlockAccessor, BlockType

from raydapt.stages.common import run_isolating_failures


def _score(batch: pd.DataFrame) -> pd.DataFrame:
    if (batch["x"] < 0).any():
        raise ValueError("negative input")
    return pd.DataFrame({"id": batch["id"],
                         "v": [np.array([x, 2 * x], np.float32) for x in batch["x"]],
                         "n": batch["x"] * 10})


def test_failed_rows_keep_array_columns_as_tensors():
    batch = pd.DataFrame({"id": ["a", "b", "c"], "x": [1, -1, 2]})
    out = run_isolating_failures(batch, _score, stage="s")
    assert out["id"].tolist() == ["a", "b", "c"]  # order kept, no row lost
    assert out["_error"].tolist() == ["", "s: ValueError: negative input", ""]
    np.testing.assert_array_equal(out["v"][2], [2, 4])
    assert out["v"][1].shape == (2,) and np.isnan(out["v"][1]).all()
    schema = BlockAccessor.batch_to_block(out, block_type=BlockType.ARROW).schema
    assert "pickled" not in str(schema.field("v").type), schema
    good = run_isolating_failures(batch.iloc[[0, 2]], _score, stage="s")
    assert BlockAccessor.batch_to_block(good, block_type=BlockType.ARROW).schema.field(
        "v").type == schema.field("v").type  # same type as a block without failures


def test_all_rows_failing_gives_ids_and_reasons():
    out = run_isolating_failures(pd.DataFrame({"id": ["a"], "x": [-1]}), _score, stage="s")
    assert out.to_dict("list") == {"id": ["a"], "_error": ["s: ValueError: negative input"]}


def test_teacher_batch_whose_every_row_fails_becomes_rejects():
    """Issue 28: when every row of a teacher batch failed, the pass crashed in the token count
    ('numpy.float64' object has no attribute 'fillna'). The rows come back as rejects, with the
    columns (and Arrow schema) of a scored batch."""
    from raydapt.stages.common import split_errors
    from raydapt.stages.teacher import TeacherScore

    kw = dict(engine={"backend": "hf", "model": "pkg:smollm2-135m-instruct", "max_length": 64,
                      "chat": False, "num_threads": 2},
              label_words=[" negative", " positive"], text_max_tokens=16)
    batch = pd.DataFrame({"id": ["a", "b"], "text": ["good pan", "bad pan"]})
    good = TeacherScore(template="Review: {text}\nThe sentiment is", **kw)(batch)
    # a template the stage cannot render (config validation stops this one in a job): every
    # row fails
    out = TeacherScore(template="Review: {txt}\nThe sentiment is", **kw)(batch)
    assert out["id"].tolist() == ["a", "b"]
    assert out["_error"].tolist() == ["teacher: KeyError: 'txt'"] * 2
    assert list(out.columns) == list(good.columns)
    assert out["llm_logp"][0].shape == (2,) and np.isnan(out["llm_logp"][0]).all()
    assert out["hidden"][1].shape == good["hidden"][1].shape
    assert out["prompt_tokens"].tolist() == [0, 0]
    schema = BlockAccessor.batch_to_block(out, block_type=BlockType.ARROW).schema
    assert schema == BlockAccessor.batch_to_block(good, block_type=BlockType.ARROW).schema
    kept, rej = split_errors(out, "teacher")
    assert kept.empty and rej["id"].tolist() == ["a", "b"]
    assert set(rej["reason"]) == {"teacher: KeyError: 'txt'"}
