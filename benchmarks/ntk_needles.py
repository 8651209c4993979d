"""NTK-Selector on a planted pool: does each selector find the in-domain rows hidden in it?

    python benchmarks/ntk_needles.py [--settings medical,arith] [key=value ...]
        → benchmarks/results/ntk-needles-cpu.json

Pool (``raydapt.select.planted.build_needles_data``, written under --work): 1,000 FLAN-CoT rows
(every FLAN source but AQuA) + 100 GSM8K train rows + 100 medical rows (MedQA, MedBullets,
MedExQA — files the medical D and evaluation never read — as FLAN-AQuA-style pool rows, with the
MedBullets rationale), 1,200 rows. Two settings on that same pool, each with the recipe's own
stages and selectors (jobs/ntk_select/medical-smollm.cpu.yaml's model, format, LoRA and warm-up;
N = 100, M = 150, K = 64):

- ``medical``: D = 80 PubMedQA + 80 MedMCQA train items (the CPU job's D); planted = the 100
  medical rows, the 100 GSM8K rows count as general;
- ``arith``: D = 160 FLAN-AQuA algebra word problems (as multiple-choice items); planted = the
  100 GSM8K rows, the medical rows count as general — selection must follow D, not "looks like
  an exam question".

--pool matched (issue 26; raydapt.select.planted.build_matched_needles_data, settings stored as
'matched-<name>'): the same 1,000 general rows, 100 planted medical rows and 100 FLAN-AQuA rows
(group 'arith', planted for the arith D, a decoy for the medical D; no GSM8K), every row in one
of the same three templates and each planted row matched to a general twin's template,
rationale presence and lengths, so no surface feature tells planted from general rows (the
two-sample tests per feature go into 'format_matching'). --trivial-only runs the model-free
selectors alone (format, length, tfidf; raydapt.select.selectors) and random, no model; every
full run reports them too, with the issue's hand rules ('issue_rules') and 'bar_issue26': NTK
>= 5x random's exact expectation and >= every trivial selector, the existing embedding (stage-1
votes alone) among them, as the issue lists it (--rebar recomputes it for stored settings, and 'selection_seeds': NTK's precision over
selection seeds). --selection-seed S seeds the
warm-up fit and the projection (select.proj_seed), D and the pool fixed: NTK's selection
seeds, like random's. --per-task also scores the candidates against each task of D's own ḡ
('per_task') and selects by a per-task quota of N or the best z-normalised per-task score
(selectors ntk_task_quota, ntk_task_max).

Per selector (ntk = stage 1 + 2, less, embedding = stage-1 votes alone, random over seeds 0-2):
precision / recall of the planted rows among the N selected, ROC-AUC of its ranking over the whole
pool (ntk / less: candidates by their stage-2 score above the non-candidates, which keep their
vote order), and — what stage 2 adds — ROC-AUC of the stage-2 score and of the votes *within the
M candidates*, and how many planted rows the candidates hold (the most stage 2 can find).

Expected result (full size, benchmarks/results/ntk-needles-cpu.json): medical -- stage 1 keeps
94 of the 100 medical rows among its 150 candidates, NTK selects 86 (precision 0.86 = 10.3x
random's exact expectation 100 / 1,200; votes alone 85, LESS 82); arith -- stage 1 keeps only 15 of the 100 GSM8K rows, NTK
puts all 15 in its top 100 (AUC 0.95 within the candidates; votes 0.50) for a precision of 0.15 =
1.8x random's expectation (votes 0.11, LESS 0.13): the bar is met on medical and missed on
arith, by stage 1's recall. With --m-factor 6 (M = 600) NTK selects 59 GSM8K rows (7.1x
random) and with --m-factor 12 (the whole pool through stage 2) 74 (8.9x), while the medical D
drops to 75 there: stage 2 costs ~0.2 s per candidate. Cost on 2 idle cores, from an empty
--work: arith 12.5 min (warm-up 5 min, stage 1 4 min, NTK and LESS scores ~1.7 min each);
medical about the same (its warm-up, stage 1 and NTK scores are shared with
benchmarks/ntk_heldout.py through --work). ~3 GB RAM. Caches under --work (a rerun reuses every
finished stage). --merge adds a setting to an existing --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.config import load_job  # noqa: E402
from raydapt.select.planted import (  # noqa: E402
    build_matched_needles_data,
    build_needles_data,
    format_features,
    format_only_auc,
    matching_stats,
    precision_recall,
    roc_auc,
)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def _setting_overrides(name: str, info: dict, work: Path, *, n: int = 100,
                       n_domain: int = 160) -> list[str]:
    run = f"needles-{name}" if info.get("variant", "original") == "original" else (
        f"needles-{info['variant']}-{name}")
    common = [f"data.root={info['root']}", f"data.pool=[{info['pool']}]", "data.max_pool_rows=null",
              f"select.n={n}", "select.m_factor=1.5", "select.k=64", f"run.name={run}",
              f"run.cache_dir={work / 'cache'}", f"run.output_dir={work / 'out'}",
              "tracking.enabled=false"]
    if name == "arith":
        task = (f"{{path: {info['aqua_domain']}, name: aqua, domain_rows: {n_domain}, "
                "eval_rows: 1}")
        common.append(f"data.tasks=[{task}]")
    return common


def warmup_and_stage1(cfg, cache, tracker, *, dom: pd.DataFrame, pool: pd.DataFrame,
                      inputs, out: Path, secs: dict[str, float] | None = None,
                      warmup_seed: int | None = None):
    """The recipe's warm-up LoRA and stage 1 (embed D ∪ pool, votes, the M candidates) with its
    own stage functions and cache; fills ``inputs`` (votes) and returns (warm-up adapter,
    candidates). ``secs`` gets the two stages' seconds. ``warmup_seed`` (default run.seed)
    seeds the warm-up fit alone (LoRA init, data order): D's rows stay the ones given."""
    from raydapt.recipes.ntk_select import embed_rows, fit_lora_cached, stage1_candidates
    from raydapt.stages.common import split_errors

    secs = {} if secs is None else secs
    t0 = time.time()
    cfg_w = cfg
    if warmup_seed is not None and warmup_seed != cfg.run.seed:
        cfg_w = cfg.model_copy(deep=True)
        cfg_w.run.seed = warmup_seed
    warm = fit_lora_cached(cfg_w, cache, tracker, stage="lora", label="warmup", rows=dom,
                           train=cfg.warmup, storage=out / "train")
    secs["warmup"] = time.time() - t0
    t0 = time.time()
    emb, _ = split_errors(embed_rows(cfg, cache, tracker, adapter=warm, label="D + pool",
                                     rows=pd.concat([dom, pool], ignore_index=True)), "embed")
    _, m = cfg.select.sizes(len(dom), len(pool))  # the recipe's N and M
    _, cand = stage1_candidates(emb, dom, pool, inputs, k=cfg.select.k, m=m, seed=cfg.run.seed)
    secs["stage1"] = time.time() - t0
    return warm, cand


def pool_text(rows: pd.DataFrame, cfg) -> list[tuple[str, str]]:
    """Rendered (prompt, response) per row, as the recipe renders them before the chat
    template: what the trivial selectors read."""
    from raydapt.data.qa import render
    from raydapt.recipes.ntk_select import qa_format

    fmt = qa_format(cfg)
    return [render(r, fmt) for r in rows.to_dict("records")]


def per_task_scores(cfg, cache, tracker, *, adapter: Path, dom: pd.DataFrame,
                    dom_task: np.ndarray, cand: pd.DataFrame) -> dict[str, pd.Series]:
    """Stage-2 NTK scores of the candidates against each task's own ḡ (the mean projected
    gradient of D's rows of that task, instead of all of D's): task -> score by candidate id.
    The recipe's own stages and caches (D's gradients are the ones the one-ḡ score used)."""
    from raydapt.recipes.ntk_select import (
        candidate_source,
        candidates_file,
        domain_grads_frame,
        read_scores,
        stage2_scores,
    )

    g = domain_grads_frame(cfg, cache, tracker, adapter=adapter, rows=dom, objective="logit_sum")
    task_of = pd.Series(dom_task, index=dom["id"].to_numpy())
    gt = task_of.loc[g["id"]].to_numpy()
    G = np.stack(g["g"].to_numpy()).astype(np.float32)
    path = candidates_file(cfg, cache, tracker, ids=list(cand["id"]), parts={"frame": True},
                           rows=lambda: cand)
    out = {}
    for t in sorted(set(gt)):
        sc = read_scores(stage2_scores(
            cfg, cache, tracker, adapter=adapter, kind="ntk", against=G[gt == t].mean(0),
            source=candidate_source(path, cfg.select.shard_rows)))
        out[str(t)] = sc[sc["_error"] == ""].set_index("id")["score"]
    return out


def per_task_selections(scores: dict[str, pd.Series], task_share: dict[str, float], n: int
                        ) -> dict[str, tuple[list[str], pd.Series]]:
    """Two ways to use per-task scores, each → (N selected ids, a score over the candidates):

    - ``ntk_task_quota``: each task fills its share of N (D's task proportions) from its own
      ranking, best first, skipping ids another task took;
    - ``ntk_task_max``: each candidate's best per-task score, every task's scores z-normalised
      over the candidates first (the ḡ's differ in norm, so raw products do not compare).
    """
    ids = scores[next(iter(scores))].index
    z = pd.DataFrame({t: (s.reindex(ids) - s.mean()) / (s.std() or 1.0)
                      for t, s in scores.items()})
    best = z.max(axis=1)
    quota = {t: int(round(n * task_share[t])) for t in scores}
    quota[max(quota, key=quota.get)] += n - sum(quota.values())  # rounding: N in all
    taken: list[str] = []
    for t in sorted(scores, key=lambda t: -quota[t]):
        order = scores[t].sort_values(ascending=False, kind="stable").index
        seen = set(taken)
        taken += [i for i in order if i not in seen][:quota[t]]
    rank = pd.Series(0.0, index=ids)
    for r, i in enumerate(taken):
        rank[i] = len(taken) - r + best.max() + 1.0  # the quota's picks above the rest
    rank = rank.where(rank > 0, best)
    return {"ntk_task_quota": (taken, rank),
            "ntk_task_max": (list(best.sort_values(ascending=False, kind="stable").index[:n]),
                             best)}


def run_setting(name: str, cfg, planted_ids: set[str], random_seeds: list[int],
                kinds: tuple[str, ...] = ("ntk", "less"), *, trivial_only: bool = False,
                warmup_seed: int | None = None, per_task: bool = False) -> dict:
    """The recipe's stages up to the selections (no fine-tunes) and the planted-row metrics,
    with the trivial selectors (format, length, tfidf) and random beside them; with
    ``trivial_only`` no model runs (no warm-up, stage 1 or 2; the pool is read, not encoded)."""
    from raydapt.core.cache import StageCache
    from raydapt.core.tracking import Tracker
    from raydapt.recipes.ntk_select import (
        STAGE_VERSIONS,
        encode_rows,
        frame_candidate_scores,
        read_data,
        read_pool_frame,
        tokenizer,
    )
    from raydapt.select.selectors import SELECTORS, TRIVIAL, SelectionInputs
    from raydapt.stages.common import split_errors

    t_all = time.time()
    secs: dict[str, float] = {}
    data = read_data(cfg)
    data["pool"], _ = read_pool_frame(cfg)  # a small planted pool: in memory
    n = cfg.select.n
    if trivial_only:
        dom, pool, rej, kinds = data["domain"], data["pool"], [], ()
        inputs = SelectionInputs(pool_ids=pool["id"].to_numpy())
    else:
        cache = StageCache(cfg.run.cache_dir, versions=STAGE_VERSIONS)
        tracker = Tracker(enabled=False, uri=cfg.tracking.uri, experiment="needles",
                          artifact_location=cfg.tracking.artifact_location)
        out = Path(cfg.run.output_dir) / cfg.run.name
        out.mkdir(parents=True, exist_ok=True)
        tok = tokenizer(cfg.model)
        dom, _ = encode_rows(data["domain"], tok, cfg)
        pool, rej = encode_rows(data["pool"], tok, cfg)
        inputs = SelectionInputs(pool_ids=pool["id"].to_numpy())
        warm, cand = warmup_and_stage1(cfg, cache, tracker, dom=dom, pool=pool, inputs=inputs,
                                       out=out, secs=secs, warmup_seed=warmup_seed)
        for kind in kinds:
            t0 = time.time()
            sc, _ = split_errors(frame_candidate_scores(cfg, cache, tracker, adapter=warm,
                                                         dom=dom, cand=cand, kind=kind),
                                  f"scores-{kind}")
            inputs.scores[kind] = sc.set_index("id")["score"]
            secs[f"stage2_{kind}"] = time.time() - t0
        if per_task:
            t0 = time.time()
            dom_task = data["domain"].set_index("id").loc[dom["id"], "task"].to_numpy()
            task_scores = per_task_scores(cfg, cache, tracker, adapter=warm, dom=dom,
                                          dom_task=dom_task, cand=cand)
            share = pd.Series(dom_task).value_counts(normalize=True).to_dict()
            secs["stage2_ntk_per_task"] = time.time() - t0
    by_id = data["pool"].set_index("id")
    inputs.pool_text = pool_text(by_id.loc[pool["id"]].reset_index(), cfg)
    inputs.domain_text = pool_text(data["domain"].set_index("id").loc[dom["id"]].reset_index(),
                                   cfg)

    ids = pool["id"].to_numpy()
    y = np.array([i in planted_ids for i in ids])
    n_planted = int(y.sum())
    res: dict = {"sizes": {"D": len(dom), "pool": len(pool), "planted_in_pool": n_planted,
                           "N": n, "pool_encode_rejects": len(rej)}, "selectors": {}}

    def report(sel_ids, full_score) -> dict:
        p, r = precision_recall(sel_ids, planted_ids)
        return {"precision": p, "recall": r, "planted_selected": int(round(p * len(sel_ids))),
                "auc_pool": roc_auc(full_score, y)}

    for kind in TRIVIAL:  # no model: the rendered text's layout, length, words
        selector = SELECTORS[kind](seed=cfg.run.seed)
        res["selectors"][kind] = report(selector.select(inputs, n)["id"],
                                        selector.pool_scores(inputs))
    if not trivial_only:
        res.update(_model_selectors(res, cfg, inputs, cand, ids, y, planted_ids, n, kinds,
                                    report))
    if per_task and not trivial_only:  # issue 26: one ḡ per task of D instead of D's mean
        votes_rank = _votes_rank(inputs, ids)
        for key, (sel_ids, sc) in per_task_selections(task_scores, share, n).items():
            res["selectors"][key] = _stage2_report(report, sel_ids, sc, ids,
                                                   pd.Series(ids).isin(sc.index).to_numpy(),
                                                   votes_rank, planted_ids)
        res["per_task"] = {
            "tasks": {t: {"share_of_D": round(float(share[t]), 4),
                          "auc_within_candidates": roc_auc(
                              sc.to_numpy(), np.array([i in planted_ids for i in sc.index])),
                          "planted_in_its_top_n": int(sum(
                              i in planted_ids for i in sc.sort_values(
                                  ascending=False, kind="stable").index[:n]))}
                      for t, sc in task_scores.items()},
            "note": "stage-2 NTK scores against each task's own mean gradient; ntk_task_quota "
                    "fills each task's share of N from its ranking, ntk_task_max ranks by the "
                    "best z-normalised per-task score"}
    rnd = []
    for seed in random_seeds:
        sel = SELECTORS["random"](seed=seed).select(inputs, n)
        u = pd.Series(-sel["score"].to_numpy(), index=sel["id"]).reindex(ids).fillna(-2.0)
        rnd.append(report(sel["id"], u.to_numpy()))
    res["selectors"]["random"] = {
        "seeds": random_seeds, "per_seed": rnd,
        **{f"{k}_mean": float(np.mean([x[k] for x in rnd])) for k in ("precision", "recall")},
        "precision_std": float(np.std([x["precision"] for x in rnd], ddof=1)),
        "precision_expected": n_planted / len(pool)}
    base = res["selectors"]["random"]["precision_expected"]
    res["precision_over_random"] = {
        k: round(v["precision"] / base, 2) for k, v in res["selectors"].items() if k != "random"}
    res["selected_sources"] = {}
    src = data["pool"].set_index("id")["source"]
    for kind in (*kinds, *(() if trivial_only else ("embedding",)), *TRIVIAL):
        sel = SELECTORS[kind](seed=cfg.run.seed).select(inputs, n)
        res["selected_sources"][kind] = src.loc[sel["id"]].value_counts().to_dict()
    sels = res["selectors"]
    if "ntk" in sels:
        res["bar"] = {  # issue 14: ntk precision ≥ 5x random's and ≥ the stage-1 votes' alone
            "ntk_precision": sels["ntk"]["precision"],
            "random_precision_mean": sels["random"]["precision_mean"],
            "votes_precision": sels["embedding"]["precision"],
            "passed": bool(sels["ntk"]["precision"] >= 5 * sels["random"]["precision_mean"]
                           and sels["ntk"]["precision"] >= sels["embedding"]["precision"])}
        res["bar_issue26"] = issue26_bar(sels)
    res["stage_seconds"] = secs
    res["seconds"] = time.time() - t_all
    return res


#: the issue-26 bar's "trivial selectors": the model-free rules (raydapt.select.selectors.TRIVIAL)
#: and the existing embedding (stage-1 votes alone), which the issue lists among them
BAR26_AGAINST = ("format", "length", "tfidf", "embedding")


def issue26_bar(sels: dict) -> dict:
    """NTK precision >= 5x random's exact expectation and >= every selector of BAR26_AGAINST."""
    base = sels["random"]["precision_expected"]
    against = [k for k in BAR26_AGAINST if k in sels]
    best = max(against, key=lambda k: sels[k]["precision"])
    ntk = sels["ntk"]["precision"]
    return {"ntk_precision": ntk, "random_expected": base,
            "ntk_over_expected": round(ntk / base, 2), "against": against,
            "best_trivial": best, "best_trivial_precision": sels[best]["precision"],
            "passed": bool(ntk >= 5 * base and all(ntk >= sels[k]["precision"]
                                                  for k in against))}


def selection_seed_summary(settings: dict) -> dict:
    """NTK's precision per selection seed (a setting ``<key>`` is seed 0, ``<key>-sS`` seed S),
    mean and std (ddof 1) over the seeds, per setting that has a seeded rerun."""
    out = {}
    for key, res in settings.items():
        base, _, seed = key.rpartition("-s")
        if not (base in settings and seed.isdigit() and "ntk" in res.get("selectors", {})):
            continue
        ent = out.setdefault(base, {"seeds": [0], "ntk_precision": [
            settings[base]["selectors"]["ntk"]["precision"]]})
        ent["seeds"].append(int(seed))
        ent["ntk_precision"].append(res["selectors"]["ntk"]["precision"])
    for ent in out.values():
        x = np.asarray(ent["ntk_precision"])
        ent["mean"], ent["std"] = round(float(x.mean()), 4), round(float(x.std(ddof=1)), 4)
    return out


def _votes_rank(inputs, ids) -> pd.Series:
    """The pool in stage 1's order: votes, ties broken by summed similarity."""
    return pd.Series(inputs.votes + inputs.vote_sim / (inputs.vote_sim.max() + 1.0) * 0.999,
                     index=ids)


def _stage2_report(report, sel_ids, sc: pd.Series, ids, in_cand: np.ndarray,
                   votes_rank: pd.Series, planted_ids: set[str]) -> dict:
    """A stage-2 selector's metrics: its ranking of the pool puts the candidates (``in_cand``)
    above the rest, by their stage-2 score ``sc``, and the rest in vote order; plus the AUC of
    ``sc`` within the scored candidates."""
    rank = pd.Series(sc.rank(method="average").reindex(ids).to_numpy(), index=ids)
    full = np.where(in_cand, 1e6 + rank.fillna(0).to_numpy(), votes_rank.to_numpy())
    r = report(sel_ids, full)
    r["auc_within_candidates"] = roc_auc(sc.to_numpy(), np.array([i in planted_ids
                                                                  for i in sc.index]))
    return r


def _model_selectors(res, cfg, inputs, cand, ids, y, planted_ids, n, kinds, report) -> dict:
    """embedding / ntk / less metrics into res["selectors"]; returns the stage-1 keys."""
    from raydapt.select.selectors import SELECTORS

    votes_rank = _votes_rank(inputs, ids)
    cand_ids = list(cand["id"])
    in_cand = pd.Series(ids).isin(cand_ids).to_numpy()
    extra = {"candidates_planted": int(pd.Series(cand_ids).isin(planted_ids).sum())}
    extra["candidates_recall"] = extra["candidates_planted"] / max(int(y.sum()), 1)
    res["sizes"]["M"] = len(cand)
    res["selectors"]["embedding"] = report(
        SELECTORS["embedding"](seed=cfg.run.seed).select(inputs, n)["id"], votes_rank.to_numpy())
    for kind in kinds:
        sel = SELECTORS[kind](seed=cfg.run.seed).select(inputs, n)
        res["selectors"][kind] = _stage2_report(report, sel["id"], inputs.scores[kind], ids,
                                                in_cand, votes_rank, planted_ids)
    cy = np.array([i in planted_ids for i in cand_ids])
    extra["votes_auc_within_candidates"] = roc_auc(votes_rank.loc[cand_ids].to_numpy(), cy)
    return extra


def issue_rules(rows: list[dict], planted_ids: set[str], n: int) -> dict:
    """Issue 26's hand rules on raw pool rows (precision in the top n): answer a bracketed
    letter, then the longest question; the longest question; the most ``=`` in the rationale.
    Question length in characters (options included), as the issue counted."""
    df = pd.DataFrame(rows)
    q = df["question"].astype(str).str.len()
    letter = df["answer"].astype(str).str.fullmatch(r"\([A-J]\)")
    eq = df["rationale"].fillna("").astype(str).str.count("=")
    out = {}
    for name, key in (("letter_then_longest_question", letter * 1e6 + q),
                      ("longest_question", q), ("most_equals_in_rationale", eq + q * 1e-6)):
        top = df.loc[key.sort_values(ascending=False, kind="stable").index[:n], "id"]
        out[name] = precision_recall(top, planted_ids)[0]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(REPO / "jobs/ntk_select/medical-smollm.cpu.yaml"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--work", default="/tmp/ntk-needles")
    ap.add_argument("--settings", default="medical,arith")
    ap.add_argument("--out", default=str(RESULTS / "ntk-needles-cpu.json"))
    ap.add_argument("--n-general", type=int, default=1000, help="general FLAN rows in the pool")
    ap.add_argument("--n-planted", type=int, default=100, help="rows per planted group")
    ap.add_argument("--n-domain", type=int, default=160, help="|D| of the arith setting")
    ap.add_argument("--n", type=int, default=100, help="N selected (M = 1.5 N)")
    ap.add_argument("--m-factor", type=float, default=1.5,
                    help="M = ceil(m_factor N) stage-1 candidates; 12 scores the whole 1,200-row "
                    "pool with stage 2 (stored as setting '<name>-m<M>')")
    ap.add_argument("--kinds", default="ntk,less", help="stage-2 selectors to score")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's settings to an existing --out file")
    ap.add_argument("--pool", choices=("original", "matched"), default="original",
                    help="original: the first pool (planted rows told apart by format); "
                    "matched: every row in the same templates, planted rows matched to general "
                    "twins (settings stored as 'matched-<name>')")
    ap.add_argument("--trivial-only", action="store_true",
                    help="only the model-free selectors (format, length, tfidf) and random: "
                    "no warm-up, no stage 1 or 2 (settings stored as '<key>-trivial')")
    ap.add_argument("--rebar", action="store_true",
                    help="only recompute bar_issue26 of the settings stored in --out")
    ap.add_argument("--selection-seed", type=int, default=0,
                    help="seeds the warm-up fit and the projection (select.proj_seed); D and "
                    "the pool stay fixed (settings other than 0 stored as '<key>-s<seed>')")
    ap.add_argument("--per-task", action="store_true",
                    help="also score the candidates against each task's own ḡ and select by "
                    "per-task quota / best per-task score (selectors ntk_task_quota, "
                    "ntk_task_max)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.rebar:  # recompute bar_issue26 of every stored setting with an NTK selection
        report = json.loads(Path(args.out).read_text())
        for res in report["settings"].values():  # (a setting without the model-free
            sels = res.get("selectors", {})  # selectors beside NTK has none: they ran apart)
            if "ntk" in sels and all(k in sels for k in BAR26_AGAINST):
                res["bar_issue26"] = issue26_bar(sels)
            else:
                res.pop("bar_issue26", None)
        report["selection_seeds"] = selection_seed_summary(report["settings"])
        Path(args.out).write_text(json.dumps(report, indent=2))
        return report
    work = Path(args.work)
    build = build_needles_data if args.pool == "original" else build_matched_needles_data
    info = build(args.data, work / ("data" if args.pool == "original" else "data-matched"),
                 n_general=args.n_general, n_planted=args.n_planted, n_arith_domain=args.n_domain)
    info.setdefault("variant", args.pool)
    cmd = "python benchmarks/ntk_needles.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"benchmark": "ntk-needles", "command": cmd, "machine": describe(),
              "job": str(Path(args.job).relative_to(REPO)) if Path(args.job).is_relative_to(REPO)
              else args.job, "pool_groups": {k: len(v) for k, v in info["groups"].items()},
              "settings": {}}
    if args.merge and Path(args.out).exists():
        report = {**json.loads(Path(args.out).read_text()), "machine": report["machine"]}
        report["command"] = "one run per setting: see settings.<name>.command"
    from raydapt.core.runtime import init_ray_for

    pool_rows = [json.loads(x) for x in (Path(info["root"]) / info["pool"]).read_text(
        encoding="utf-8").splitlines()]
    feats = format_features(pool_rows)
    m_ov = [] if args.m_factor == 1.5 else [f"select.m_factor={args.m_factor}"]
    s_ov = [] if args.selection_seed == 0 else [f"select.proj_seed={args.selection_seed}"]
    for name in args.settings.split(","):
        ov = _setting_overrides(name, info, work, n=args.n, n_domain=args.n_domain) + m_ov + (
            s_ov + list(args.overrides))
        cfg = load_job(args.job, ov)
        if not args.trivial_only:
            init_ray_for(cfg.ray)
        group = "medical" if name == "medical" else (
            "gsm8k" if args.pool == "original" else "arith")
        planted = set(info["groups"][group])
        res = run_setting(name, cfg, planted, [0, 1, 2], tuple(args.kinds.split(",")),
                          trivial_only=args.trivial_only, warmup_seed=args.selection_seed,
                          per_task=args.per_task)
        res["pool"] = args.pool
        res["pool_groups"] = {k: len(v) for k, v in info["groups"].items()}
        res["planted_group"] = group
        res["format_matching"] = {  # two-sample tests, planted vs every other pool row
            "per_feature": matching_stats(feats, planted),
            "format_only_classifier_auc": format_only_auc(feats, planted)}
        res["issue_rules"] = issue_rules(pool_rows, planted, args.n)
        if args.selection_seed:
            res["selection_seed"] = {"warmup_seed": args.selection_seed,
                                     "proj_seed": args.selection_seed}
        res["overrides"] = ov
        res["machine"] = report["machine"]  # per setting: --merge adds runs of other hours
        res["command"] = cmd
        key = name if args.pool == "original" else f"matched-{name}"
        key += f"-m{res['sizes']['M']}" if m_ov else ""
        key += f"-s{args.selection_seed}" if args.selection_seed else ""
        key += "-trivial" if args.trivial_only else ""
        report["settings"][key] = res
        print(json.dumps({key: {k: res.get(k) for k in (
            "candidates_planted", "precision_over_random", "bar_issue26")}}), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
