"""The planted-pool benchmark's construction (benchmarks/ntk_needles.py): no leakage between D,
the pool, the planted rows and the evaluation rows; on the format-matched pool no surface
feature (question length, response length, empty rationale, layout) separates planted from
general rows, while the original pool fails the same checks; the metrics against hand-computed
values. No Ray, no model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raydapt.config import load_job
from raydapt.data.qa import QAFormat, read_qa, render
from raydapt.select.planted import (
    build_matched_needles_data,
    build_needles_data,
    format_features,
    format_only_auc,
    layout_of,
    matching_stats,
    mc_to_pool_row,
    parse_pool_options,
    pool_row_to_mc,
    precision_recall,
    render_template,
    roc_auc,
)

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("ntk_needles", REPO / "benchmarks/ntk_needles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planted_pool_id_sets_are_disjoint(tmp_path, data_dir):
    from raydapt.recipes.ntk_select import read_data, read_pool_frame

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
        data["pool"], _ = read_pool_frame(cfg)
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


# the format-matched variant (issue 26): no surface feature tells planted rows from general ones


@pytest.fixture(scope="module")
def both_pools(tmp_path_factory, data_dir):
    out = {}
    for name, build in (("original", build_needles_data), ("matched", build_matched_needles_data)):
        root = tmp_path_factory.mktemp(name)
        info = build(data_dir, root / "data")
        rows = [json.loads(x) for x in (root / "data" / info["pool"]).read_text().splitlines()]
        out[name] = (info, rows, format_features(rows))
    return out


def test_matched_pool_gives_nothing_away_by_format(both_pools):
    info, rows, feats = both_pools["matched"]
    g = info["groups"]
    assert [len(g[k]) for k in ("general", "medical", "arith")] == [1000, 100, 100]
    assert len({r["id"] for r in rows}) == 1200
    pool, rej = read_qa(Path(info["root"]) / info["pool"])
    assert len(rej) == 0 and len(pool) == 1200
    # the same general rows as the original pool's (only their template / rationale differ)
    assert set(g["general"]) == set(both_pools["original"][0]["groups"]["general"])
    # AQuA is in the pool (the arithmetic group: a decoy for the medical D), none of D's rows
    assert {r["source"] for r in rows if r["id"] in set(g["arith"])} == {"flan/aqua"}
    assert not set(g["arith"]) & set(info["aqua_ids"])
    assert {i.split("-")[0] for i in g["medical"]} == {"medqa", "medbullets", "medexqa"}
    # the old giveaways: the "(A)" layout and the empty rationale occur in general rows too
    general = feats[feats["id"].isin(set(g["general"]))]
    assert (general["layout"] == "paren/letter").mean() > 0.1
    assert general["empty_rationale"].mean() > 0.2
    for grp in ("medical", "arith"):
        st = matching_stats(feats, g[grp])
        assert set(st) == {"q_words", "resp_words", "empty_rationale", "layout"}
        for f, r in st.items():
            assert r["pvalue"] > 0.05, (grp, f, r)  # no feature separates the groups
            if r["test"] == "ks":
                assert r["statistic"] < 0.15, (grp, f, r)
        # and no combination of the four: a classifier on them is at chance
        assert format_only_auc(feats, g[grp]) < 0.6


def test_original_pool_fails_the_same_checks(both_pools):
    """The checks above can fail: on the first pool the medical rows are told apart by every
    feature (issue 26's giveaway: "(A)" layout and empty rationales only in planted rows)."""
    info, rows, feats = both_pools["original"]
    med = set(info["groups"]["medical"])
    st = matching_stats(feats, med)
    assert all(r["pvalue"] < 1e-6 for r in st.values()), st
    assert st["layout"]["planted_share"] == {"paren/letter": 1.0}
    assert "paren/letter" not in st["layout"]["general_share"]
    assert format_only_auc(feats, med) > 0.95
    # the exact substring of the issue: in the 100 planted medical rows and no other row
    hits = {r["id"] for r in rows if "\nOptions:\n(A)" in r["question"]}
    assert hits == med
    # the issue's hand rules, as benchmarks/ntk_needles.py reports them: 86, 71 and 99 of 100
    rules = _bench().issue_rules(rows, med, 100)
    assert (rules["letter_then_longest_question"], rules["longest_question"]) == (0.86, 0.71)
    gsm = set(info["groups"]["gsm8k"])
    assert _bench().issue_rules(rows, gsm, 100)["most_equals_in_rationale"] == 0.99


def test_render_template_and_parse_round_trip():
    row = {"id": "e1", "source": "flan/ecqa", "answer": "cake",
           "question": "What is sweet?\nOptions:\n- salt\n- cake"}
    stem, opts, ans = parse_pool_options(row)
    assert (stem, opts, ans) == ("What is sweet?", {"A": "salt", "B": "cake"}, "B")
    assert render_template(stem, opts, ans, "", "letter") == (
        "What is sweet?\nOptions:\n(A) salt\n(B) cake", "(B)")
    assert render_template(stem, opts, ans, "", "text") == (
        "What is sweet?\nOptions:\n- salt\n- cake", "cake")
    assert render_template(stem, opts, ans, "", "open") == ("What is sweet?", "cake")
    q = {"id": "q", "question": "Which?\nOptions:\n- (A) x\n- (B) y", "answer": "(B)"}
    assert parse_pool_options(q)[1:] == ({"A": "x", "B": "y"}, "B")
    assert parse_pool_options({"id": "s", "question": "Is it?", "answer": "yes"}) == (
        "Is it?", None, "yes")
    with pytest.raises(ValueError, match="open template"):
        render_template("Is it?", None, "yes", "", "letter")
    assert layout_of("Q\nOptions:\n(A) x", "(A)") == "paren/letter"
    assert layout_of("Q\nOptions:\n- (A) x", "(A)") == "dash-paren/letter"
    assert layout_of("Q\nOptions:\n- x", "x") == "dash/text"
    assert layout_of("Q", "7") == "none/text"


def test_matching_stats_hand_checked():
    import pandas as pd
    from scipy.stats import chi2_contingency

    feats = pd.DataFrame({"id": list("abcdef"), "q_words": [1, 2, 3, 10, 11, 12],
                          "resp_words": [5, 5, 5, 5, 5, 5],
                          "empty_rationale": [True, True, False, False, False, False],
                          "layout": ["x", "x", "x", "y", "y", "y"]})
    st = matching_stats(feats, ["a", "b", "c"])
    assert st["q_words"]["statistic"] == 1.0 and st["resp_words"]["statistic"] == 0.0
    # planted: 2 empty / 1 not; others 0 / 3
    assert st["empty_rationale"]["statistic"] == pytest.approx(
        chi2_contingency([[1, 3], [2, 0]], correction=False)[0])
    assert st["layout"]["planted_share"] == {"x": 1.0}


def test_per_task_selections_hand_computed():
    """Per-task ḡ selections (issue 26): a quota of N per task from each task's own ranking,
    and the best z-normalised per-task score; hand-computed on four candidates."""
    sel = _bench().per_task_selections
    ids = ["c1", "c2", "c3", "c4"]
    scores = {"a": pd.Series([3.0, 2.0, 1.0, 0.0], index=ids),
              "b": pd.Series([0.0, 1.0, 5.0, 4.0], index=ids)}
    got = sel(scores, {"a": 2 / 3, "b": 1 / 3}, 3)
    # quota: a fills 2 (c1, c2), then b its 1 from its own order (c3)
    assert got["ntk_task_quota"][0] == ["c1", "c2", "c3"]
    # z (ddof 1): a -> 1.16, 0.39, -0.39, -1.16; b -> -1.05, -0.63, 1.05, 0.63; max per row
    z_max = got["ntk_task_max"][1]
    np.testing.assert_allclose(z_max.to_numpy(), [1.5 / np.sqrt(5 / 3), 0.5 / np.sqrt(5 / 3),
                                                  2.5 / np.sqrt(17 / 3), 1.5 / np.sqrt(17 / 3)])
    assert got["ntk_task_max"][0] == ["c1", "c3", "c4"]
    # the quota's ranking puts its picks first, in pick order
    q = got["ntk_task_quota"][1]
    assert list(q.sort_values(ascending=False).index[:3]) == ["c1", "c2", "c3"]
    # a task that would pick an id another took moves on to its next one
    dup = {"a": pd.Series([3.0, 2.0, 1.0, 0.0], index=ids),
           "b": pd.Series([9.0, 1.0, 5.0, 4.0], index=ids)}
    assert sel(dup, {"a": 0.5, "b": 0.5}, 2)["ntk_task_quota"][0] == ["c1", "c3"]
