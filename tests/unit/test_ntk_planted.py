"""The planted-pool benchmark's construction (benchmarks/ntk_needles.py): no leakage between D,
the pool, the planted rows and the evaluation rows; planted rows look like pool rows; the
metrics against hand-computed values. No Ray, no model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from raydapt.config import load_job
from raydapt.data.qa import QAFormat, read_qa, render
from raydapt.select.planted import (
    build_needles_data,
    mc_to_pool_row,
    pool_row_to_mc,
    precision_recall,
    roc_auc,
)

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("ntk_needles", REPO / "benchmarks/ntk_needles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planted_pool_id_sets_are_disjoint(tmp_path, data_dir):
    from raydapt.recipes.ntk_select import read_data

    info = build_needles_data(data_dir, tmp_path / "data", n_general=300, n_planted=30,
                              n_arith_domain=40)
    g = {k: set(v) for k, v in info["groups"].items()}
    assert [len(g[k]) for k in ("general", "gsm8k", "medical")] == [300, 30, 30]
    assert not (g["general"] & g["gsm8k"]) and not (g["general"] & g["medical"])
    assert not (g["gsm8k"] & g["medical"])
    assert {i.split("-")[0] for i in g["medical"]} == {"medqa", "medbullets", "medexqa"}
    bench = _bench()
    job = REPO / "jobs/ntk_select/medical-smollm.cpu.yaml"
    for name in ("medical", "arith"):
        cfg = load_job(job, bench._setting_overrides(name, info, tmp_path))
        data = read_data(cfg)
        d_ids = set(data["domain"]["id"])
        pool_ids = set(data["pool"]["id"])
        eval_ids = set().union(*(set(t["id"]) for t in data["tests"].values()))
        assert pool_ids == g["general"] | g["gsm8k"] | g["medical"]  # the whole pool is read
        assert len(d_ids) == 160 if name == "medical" else len(d_ids) == 40
        assert not (d_ids & pool_ids) and not (d_ids & eval_ids) and not (eval_ids & pool_ids)
        # the planted medical rows come from files that neither D nor the evaluation read
        task_files = {t.path for t in cfg.data.tasks}
        assert not task_files & {"medical/medqa.jsonl", "medical/medbullets.jsonl",
                                 "medical/medexqa.jsonl"}
        if name == "medical":
            assert {i.split("-")[0] for i in d_ids | eval_ids} == {"pubmedqa", "medmcqa"}
            assert len(eval_ids) == 160
        else:  # AQuA is the arithmetic D and is kept out of the pool
            assert d_ids <= set(info["aqua_ids"])
            assert not any(data["pool"]["source"] == "flan/aqua")
    # planted rows are formatted exactly like pool rows: same fields, no options column
    pool, rej = read_qa(tmp_path / "data" / info["pool"])
    assert len(rej) == 0 and (pool["options"] == "{}").all()
    raw = [json.loads(x) for x in (tmp_path / "data" / info["pool"]).read_text().splitlines()]
    assert {tuple(sorted(r)) for r in raw} == {("answer", "id", "question", "rationale", "source")}


def test_pool_row_round_trip_and_rendering():
    mc = {"id": "m1", "source": "medqa", "question": "Which drug?",
          "options": {"A": "aspirin", "B": "heparin"}, "answer": "B", "rationale": "Because."}
    row = mc_to_pool_row(mc)
    assert row == {"id": "m1", "source": "medqa", "rationale": "Because.", "answer": "(B)",
                   "question": "Which drug?\nOptions:\n(A) aspirin\n(B) heparin"}
    back = pool_row_to_mc(row)
    assert back["options"] == mc["options"] and back["answer"] == "B"
    assert back["question"] == "Which drug?"
    assert pool_row_to_mc({"id": "x", "question": "no options", "answer": "1"}) is None
    prompt, resp = render({**row, "options": "{}"}, QAFormat())
    assert prompt.endswith("(B) heparin") and resp == "Because.\nThe answer is (B)."


def test_planted_metrics_hand_computed():
    # positives at scores 0.9, 0.4; negatives 0.8, 0.4, 0.1: pairs won 2 + (1 + 0.5 + 1) = 4.5/6
    assert roc_auc([0.9, 0.8, 0.4, 0.4, 0.1], [1, 0, 1, 0, 0]) == pytest.approx(4.5 / 6)
    assert np.isnan(roc_auc([1.0, 2.0], [0, 0]))
    assert precision_recall(["a", "b", "c", "d"], ["a", "c", "x"]) == (0.5, pytest.approx(2 / 3))
