"""NTK-Selector recipe: mine a general chain-of-thought pool for a low-resource domain.

Stages, in order (each cached by content, each a child MLflow run):

1. read       domain tasks → D (train side) and test items (disjoint); the pool C → rejects
2. warmup     LoRA on D (Ray Train + DeepSpeed) → adapter + Adam second moments (cached, reused)
3. embed      stage 1 on a Ray Data actor pool: mean-pooled final hidden states of D and C with
              the warmed-up model; FAISS kNN: each domain sample votes for its K nearest pool
              samples; the top M by votes are the stage-2 candidates
4. grads      stage 2 on a sharded Ray Data actor pool: projected per-sample gradients
              g = Π ∇_θ F (θ = LoRA, same projection seed for D and C): ḡ_D, then the score of
              every candidate, streamed to parquet per shard (a rerun skips finished shards);
              LESS: Adam-preconditioned loss gradients, max cosine to the domain loss gradients
5. select     each selector (ntk, embedding, random, less) → S, |S| = N  (selected_<name>.parquet)
6. finetune   LoRA on D ∪ S for every selection, and on D alone (domain-only baseline)
7. eval       multiple-choice accuracy per task by the log-prob of each option letter, for the
              base model, domain-only and every selection → results.json

Variants run one after another (base, domain-only, then per selector: its stage-2 scores if
any, selection, fine-tune, evaluation); results.json is rewritten after each evaluation
(``complete: false`` until the end), so an interrupted run reports what it finished and a rerun
resumes from the cached stages.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.cache import ShardedOutput, StageCache
from raydapt.config import NTKSelectJob, config_hash, to_yaml
from raydapt.data.qa import QAFormat, chat_prefix, encode_pair, read_qa, render
from raydapt.data.readers import DataError, fingerprint, split_and_subsample
from raydapt.runtime import init_ray, seed_everything
from raydapt.select.selectors import SELECTORS, SelectionInputs, knn_votes
from raydapt.stages.common import pool_kwargs
from raydapt.tracking import Tracker

LETTERS = [chr(ord("A") + i) for i in range(10)]


def _say(msg: str) -> None:
    print(f"[ntk_select {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _dataset(df: pd.DataFrame, rows_per_block: int = 32):
    """A Ray Dataset from a DataFrame in several blocks (a list of frames: pandas 3 + Ray's
    ``override_num_blocks`` do not mix)."""
    import ray

    n = max(1, min(64, math.ceil(len(df) / rows_per_block)))
    return ray.data.from_pandas([df.iloc[ix] for ix in np.array_split(np.arange(len(df)), n)
                                 if len(ix)])


def _stream(ds, total: int, label: str, on_batch=None, every_s: float = 10.0) -> pd.DataFrame:
    """Iterate a dataset's output, printing rows done, rows/s and ETA; returns all rows."""
    parts, done, t0, last = [], 0, time.time(), 0.0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        parts.append(batch)
        done += len(batch)
        if on_batch is not None:
            on_batch(batch)
        now = time.time()
        if now - last >= every_s or done >= total:
            rate = done / max(now - t0, 1e-9)
            _say(f"{label}: {done}/{total} rows, {rate:.2f} rows/s, "
                 f"ETA {max(total - done, 0) / max(rate, 1e-9):.0f}s")
            last = now
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", "_error"])


def _split_errors(df: pd.DataFrame, stage: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if "_error" not in df:
        return df, pd.DataFrame(columns=["file", "id", "reason", "raw"])
    bad = df[df["_error"] != ""]
    rej = pd.DataFrame({"file": stage, "id": bad["id"], "reason": bad["_error"], "raw": ""})
    return df[df["_error"] == ""].drop(columns="_error").reset_index(drop=True), rej


def _ids_hash(ids) -> str:
    return config_hash({"ids": [str(i) for i in ids]})


# ---------------------------------------------------------------------------------------------
# 1. read
# ---------------------------------------------------------------------------------------------


def read_data(cfg: NTKSelectJob) -> dict[str, Any]:
    """Pool C, domain set D and the per-task test items (D ∩ test = ∅), rejects, fingerprints."""
    root = Path(cfg.data.root)
    rejects, fps = [], {}
    pools = []
    for rel in cfg.data.pool:
        rows, rej = read_qa(root / rel)
        fps[rel] = fingerprint(root / rel)
        pools.append(rows)
        rejects.append(rej)
    pool = pd.concat(pools, ignore_index=True)
    dup = pool["id"].duplicated()
    if dup.any():
        rejects.append(pd.DataFrame({"file": "pool", "id": pool.loc[dup, "id"],
                                     "reason": "duplicate id across pool files", "raw": ""}))
        pool = pool[~dup]
    pool, _ = split_and_subsample(pool, seed=cfg.run.seed, max_rows=cfg.data.max_pool_rows)
    domain, tests = [], {}
    for t in cfg.data.tasks:
        rows, rej = read_qa(root / t.path)
        fps[t.path] = fingerprint(root / t.path)
        rejects.append(rej)
        name = t.name or Path(t.path).stem
        bad_opts = rows["options"] == "{}"
        if bad_opts.any():
            rejects.append(pd.DataFrame({"file": t.path, "id": rows.loc[bad_opts, "id"],
                                         "reason": "domain task row without options", "raw": ""}))
            rows = rows[~bad_opts]
        has_train = (rows["split"] == "train").any()
        if has_train:
            train, _ = split_and_subsample(rows[rows["split"] == "train"], seed=cfg.run.seed,
                                           max_rows=t.domain_rows or None)
            test, _ = split_and_subsample(rows[rows["split"] != "train"], seed=cfg.run.seed,
                                          max_rows=t.eval_rows)
        else:
            train, test = split_and_subsample(rows, seed=cfg.run.seed, test_fraction=0.5,
                                              max_rows=t.domain_rows or None,
                                              max_test_rows=t.eval_rows)
        train = train.head(t.domain_rows)
        if set(train["id"]) & set(test["id"]):  # pragma: no cover - guarded by construction
            raise DataError(f"{t.path}: domain and test items overlap")
        domain.append(train.assign(task=name))
        tests[name] = test.assign(task=name).reset_index(drop=True)
    d = pd.concat(domain, ignore_index=True)
    if len(d) == 0:
        raise DataError("the domain set D is empty: set data.tasks[*].domain_rows > 0")
    overlap = set(d["id"]) & set(pool["id"])
    if overlap:
        raise DataError(f"{len(overlap)} ids occur in both the pool and D (e.g. "
                        f"{sorted(overlap)[:3]}); stages join on id")
    rej = pd.concat([r for r in rejects if len(r)], ignore_index=True) if any(
        len(r) for r in rejects) else pd.DataFrame(columns=["file", "id", "reason", "raw"])
    return {"pool": pool.reset_index(drop=True), "domain": d, "tests": tests, "rejects": rej,
            "fingerprints": fps}


def encode_rows(rows: pd.DataFrame, tok, cfg: NTKSelectJob) -> tuple[pd.DataFrame, pd.DataFrame]:
    """QA rows → id, input_ids [L], response_mask [L] (plus rejects for rows that do not fit)."""
    fmt = QAFormat(prompt=cfg.format.prompt, response=cfg.format.response,
                   answer_prefix=cfg.format.answer_prefix,
                   context_max_chars=cfg.format.context_max_chars,
                   rationale_max_chars=cfg.format.rationale_max_chars)
    ids, am, rm, bad = [], [], [], []
    for r in rows.to_dict("records"):
        try:
            e = encode_pair(tok, *render(r, fmt), max_length=cfg.format.max_length,
                            chat=cfg.format.chat)
        except (ValueError, KeyError) as exc:
            bad.append({"file": "encode", "id": r["id"], "reason": str(exc), "raw": ""})
            continue
        ids.append(r["id"])
        am.append(e["input_ids"])
        rm.append(e["response_mask"])
    return (pd.DataFrame({"id": ids, "input_ids": am, "response_mask": rm}),
            pd.DataFrame(bad, columns=["file", "id", "reason", "raw"]))


def majority_letter_accuracy(domain: pd.DataFrame, tests: dict[str, pd.DataFrame]
                             ) -> dict[str, float]:
    """Accuracy of always answering the option letter most frequent among D's answers to the
    same task (all of D for a task without domain rows): the letter prior a model can learn
    from D alone, the floor a selection has to beat to show domain knowledge."""
    acc = {}
    for name, t in tests.items():
        d = domain.loc[domain["task"] == name, "answer"]
        d = d if len(d) else domain["answer"]
        if not len(d) or not len(t):
            acc[name] = float("nan")
            continue
        letter = d.value_counts().sort_index().idxmax()  # ties → the earliest letter
        acc[name] = float((t["answer"] == letter).mean())
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def calibrated_mc_metrics(m: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Prior-free views of one variant's multiple-choice scores, per task (and their mean).

    Args:
        m: one row per test item: ``task``, ``gold`` (letter index) and ``letter_logp`` (the
            item's option-letter log-probs [n_options], or None where scoring failed).

    Returns:
        ``calibrated``: accuracy after batch calibration — the option log-probs (normalised over
        the options) minus their mean over the task's items, then argmax — so a model that
        prefers one letter for every item gains nothing from it (Zhou et al. 2023, "Batch
        Calibration"; label-free); ``gold_logprob``: mean log-prob of the gold option among the
        options (continuous, less noisy than accuracy on small test sets). A failed item counts
        as wrong and is left out of the mean log-prob.
    """
    cal, gold_lp = {}, {}
    for task, g in m.groupby("task", sort=False):
        ok = g[g["letter_logp"].map(lambda x: x is not None and len(x) > 0)]
        if len(ok) == 0:
            cal[task], gold_lp[task] = 0.0, float("nan")
            continue
        lp = np.stack([np.asarray(x, dtype=np.float64) for x in ok["letter_logp"]])  # [n, C]
        lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)  # log-softmax over options
        gold = ok["gold"].to_numpy().astype(int)
        pred = np.argmax(lp - lp.mean(axis=0, keepdims=True), axis=1)
        cal[task] = float((pred == gold).sum() / len(g))
        gold_lp[task] = float(lp[np.arange(len(ok)), gold].mean())
    for d in (cal, gold_lp):
        d["mean"] = float(np.mean(list(d.values())))
    return {"calibrated": cal, "gold_logprob": gold_lp}


def mc_prompts(test: pd.DataFrame, tok, cfg: NTKSelectJob) -> pd.DataFrame:
    """Test items → id, prompt (chat prefix + answer prefix), n_options, gold (letter index)."""
    fmt = QAFormat(prompt=cfg.format.prompt, response=cfg.format.response,
                   context_max_chars=cfg.format.context_max_chars)
    out = []
    for r in test.to_dict("records"):
        prompt, _ = render(r, fmt)
        letters = list(json.loads(r["options"]))
        out.append({"id": r["id"], "task": r["task"],
                    "prompt": chat_prefix(tok, prompt, chat=cfg.format.chat)
                    + cfg.format.answer_prefix,
                    "n_options": len(letters), "gold": letters.index(r["answer"])})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def _actor_model(cfg: NTKSelectJob, adapter: str | None, pool) -> dict[str, Any]:
    return {"model": cfg.model, "adapter": adapter, "dtype": cfg.dtype,
            "threads": pool.threads or max(1, int(round(pool.num_cpus)))}


def _fit(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, stage: str, label: str,
         rows: pd.DataFrame, train, storage: Path) -> Path:
    """A cached LoRA fit (Ray Train + DeepSpeed) on pre-tokenised rows → output directory."""
    from raydapt.train.lora import fit_lora

    tsec = train.model_dump(mode="json")
    parts = {"model": cfg.model, "lora": cfg.lora.model_dump(mode="json"), "train": tsec,
             "format": cfg.format.model_dump(mode="json"), "seed": cfg.run.seed,
             "ids": _ids_hash(rows["id"])}
    d, done = cache.get(stage, parts)
    with tracker.child(label, tags={"raydapt.stage": stage}) as run_log:
        run_log.params({"rows": len(rows), **tsec, "lora": cfg.lora.model_dump(mode="json")})
        if done:
            _say(f"{label}: cached ({d})")
            return d
        _say(f"{label}: LoRA on {len(rows)} rows, {train.epochs} epoch(s), {train.num_workers} "
             f"workers, ZeRO-{train.zero_stage}, {train.dtype}")
        # the Ray Train run is named by content (the cache key), so a changed config or data
        # never meets an earlier run's snapshot in the same storage folder
        m = fit_lora(name=f"{cfg.run.name}-{label}-{d.name[:8]}", train_ds=_dataset(rows),
                     n_rows=len(rows),
                     model=cfg.model, lora=cfg.lora.model_dump(mode="json"), train=tsec,
                     seed=cfg.run.seed, storage=str(storage), out_dir=d,
                     mlflow_uri=tracker.uri if cfg.tracking.enabled else None,
                     mlflow_run_id=run_log.run_id)
        run_log.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})
        cache.commit(d)
        return d


def stage1_embed(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                 rows: pd.DataFrame) -> pd.DataFrame:
    """Mean-pooled final hidden states of ``rows`` (D and C) with the warmed-up model."""
    from raydapt.stages.grad_score import EmbedLM

    parts = {"adapter": str(adapter.name), "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "format": cfg.format.model_dump(mode="json")}
    d, done = cache.get("embed", parts)
    with tracker.child("stage1-embed") as run_log:
        if done:
            _say(f"stage 1 embed: cached ({d})")
            return pd.read_parquet(d / "out.parquet")
        t0 = time.time()
        ds = _dataset(rows[["id", "input_ids", "response_mask"]]).map_batches(
            EmbedLM, fn_constructor_kwargs={"model": _actor_model(
                cfg, str(adapter / "adapter"), cfg.select.embed_pool)},
            **pool_kwargs(cfg.select.embed_pool))
        out = _stream(ds, len(rows), "stage 1 embed")
        run_log.metrics({"rows": len(rows), "rows_per_s": len(rows) / (time.time() - t0)})
        out.to_parquet(d / "out.parquet")
        cache.commit(d)
        return out


def domain_grads(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                 rows: pd.DataFrame, objective: str) -> np.ndarray:
    """Projected per-sample gradients of D → [Nd, p] (rows that failed are dropped)."""
    from raydapt.stages.grad_score import GradProject

    s = cfg.select
    parts = {"adapter": adapter.name, "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "objective": objective, "p": s.proj_dim, "seed": s.proj_seed,
             "grad_method": s.grad_method}
    d, done = cache.get("grads-domain", parts)
    with tracker.child(f"stage2-{objective}-domain") as run_log:
        if not done:
            t0 = time.time()
            ds = _dataset(rows[["id", "input_ids", "response_mask"]], 8).map_batches(
                GradProject, fn_constructor_kwargs=dict(
                    model=_actor_model(cfg, str(adapter / "adapter"), s.grad_pool),
                    objective=objective, proj_dim=s.proj_dim, proj_seed=s.proj_seed,
                    chunk_rows=s.proj_chunk_rows, vmap_chunk=s.vmap_chunk,
                    grad_method=s.grad_method, micro_batch=s.grad_micro_batch,
                    stage=f"grads-domain-{objective}"),
                **pool_kwargs(s.grad_pool))
            out = _stream(ds, len(rows), f"stage 2 domain gradients ({objective})")
            run_log.metrics({"rows": len(rows), "rows_per_s": len(rows) / (time.time() - t0)})
            out.to_parquet(d / "out.parquet")
            cache.commit(d)
        out, _ = _split_errors(pd.read_parquet(d / "out.parquet"), "grads-domain")
    if len(out) == 0:
        raise DataError("no domain gradient could be computed (see rejects)")
    return np.stack(out["g"].to_numpy()).astype(np.float32)


def stage2_scores(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                  rows: pd.DataFrame, kind: str, against: np.ndarray) -> pd.DataFrame:
    """Score the candidates ``rows`` against the domain, sharded: shard i of ``shard_rows``
    candidates is written to ``part-0000i.parquet`` atomically when all its rows are back; a
    rerun (same inputs) computes only the missing shards. Returns id, score (+ _error)."""
    from raydapt.stages.grad_score import GradProject

    s = cfg.select
    objective = "logit_sum" if kind == "ntk" else "loss"
    parts = {"adapter": adapter.name, "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "kind": kind, "score": s.score, "p": s.proj_dim, "seed": s.proj_seed,
             "against": config_hash({"a": np.round(against.astype(np.float64), 6).tolist()}),
             "shard_rows": s.shard_rows, "grad_method": s.grad_method}
    d, done = cache.get(f"scores-{kind}", parts, keep_partial=True)
    shards = ShardedOutput(d, len(rows), s.shard_rows)
    with tracker.child(f"stage2-{kind}") as run_log:
        todo = shards.missing() if not done else []
        run_log.metrics({"shards": shards.n_shards, "shards_cached": shards.n_shards - len(todo)})
        if todo:
            _say(f"stage 2 {kind}: {len(todo)}/{shards.n_shards} shards to score "
                 f"({shards.n_shards - len(todo)} finished before)")
            frames = []
            for i in todo:
                f = rows.iloc[shards.rows(i)][["id", "input_ids", "response_mask"]].copy()
                f["_shard"] = i
                frames.append(f)
            shard_of = pd.concat(frames).set_index("id")["_shard"]
            need = shard_of.value_counts().to_dict()
            got: dict[int, list[pd.DataFrame]] = {i: [] for i in todo}

            def on_batch(batch: pd.DataFrame) -> None:
                for i, part in batch.groupby(batch["id"].map(shard_of)):
                    got[int(i)].append(part)
                    if sum(len(p) for p in got[int(i)]) == need[int(i)]:
                        order = rows.iloc[shards.rows(int(i))]["id"]
                        sh = pd.concat(got[int(i)]).set_index("id").loc[order].reset_index()
                        shards.write(int(i), sh)
                        got[int(i)] = []

            import ray

            t0 = time.time()
            step = max(1, 2 * s.grad_pool.batch_size)  # small blocks: results stream back
            blocks = [f.drop(columns="_shard").iloc[j: j + step] for f in frames
                      for j in range(0, len(f), step)]
            ds = ray.data.from_pandas(blocks).map_batches(
                GradProject, fn_constructor_kwargs=dict(
                    model=_actor_model(cfg, str(adapter / "adapter"), s.grad_pool),
                    objective=objective, proj_dim=s.proj_dim, proj_seed=s.proj_seed,
                    chunk_rows=s.proj_chunk_rows, vmap_chunk=s.vmap_chunk,
                    grad_method=s.grad_method, micro_batch=s.grad_micro_batch,
                    adam_state=str(adapter / "adam_exp_avg_sq.pt") if kind == "less" else None,
                    score_against=against, score_kind="less" if kind == "less" else s.score,
                    stage=f"scores-{kind}"),
                **pool_kwargs(s.grad_pool))
            n = int(sum(need.values()))
            _stream(ds, n, f"stage 2 {kind} scores", on_batch=on_batch)
            run_log.metrics({"rows": n, "rows_per_s": n / (time.time() - t0)})
            cache.commit(d)
        elif done:
            _say(f"stage 2 {kind}: cached ({d})")
        else:
            cache.commit(d)
        return shards.read_all()


def stage1_candidates(emb: pd.DataFrame, dom: pd.DataFrame, pool: pd.DataFrame,
                      inputs: SelectionInputs, *, k: int, m: int, seed: int
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 1 from the embeddings (``id``, ``emb``): kNN votes of D for the pool, written into
    ``inputs.votes`` / ``inputs.vote_sim`` (aligned with ``pool``; 0 for rows without an
    embedding), and the top ``m`` pool rows by votes (the embedding selector's order).

    Returns:
        (votes frame id / votes / vote_sim of the embedded pool rows, candidate pool rows).
    """
    e = emb.set_index("id")
    pool_ok = pool[pool["id"].isin(e.index)].reset_index(drop=True)
    dom_ok = dom[dom["id"].isin(e.index)]
    votes, vote_sim = knn_votes(np.stack(e.loc[dom_ok["id"], "emb"].to_numpy()),
                                np.stack(e.loc[pool_ok["id"], "emb"].to_numpy()), k=k)
    vs = pd.DataFrame({"id": pool_ok["id"], "votes": votes, "vote_sim": vote_sim})
    full = pd.DataFrame({"id": pool["id"]}).merge(vs, on="id", how="left").fillna(0)
    inputs.votes = full["votes"].to_numpy().astype(np.int64)
    inputs.vote_sim = full["vote_sim"].to_numpy()
    top_m = SELECTORS["embedding"](seed=seed).select(inputs, m)
    return vs, pool.set_index("id").loc[top_m["id"]].reset_index()


def candidate_scores(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                     dom: pd.DataFrame, cand: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Stage 2 for one selector (``ntk``: ⟨ḡ_D, g(c)⟩ of the summed-logit gradients; ``less``:
    max cosine of Adam-preconditioned loss gradients): domain gradients, then the candidates'
    scores (id, score, _error), both cached."""
    g_dom = domain_grads(cfg, cache, tracker, adapter=adapter, rows=dom,
                         objective="logit_sum" if kind == "ntk" else "loss")
    against = g_dom.mean(0) if kind == "ntk" else g_dom
    return stage2_scores(cfg, cache, tracker, adapter=adapter, rows=cand, kind=kind,
                         against=against)


def evaluate_mc(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, label: str,
                adapter: Path | None, prompts: pd.DataFrame
                ) -> tuple[dict[str, float], dict[str, dict[str, float]], pd.DataFrame]:
    """Accuracy per task (and their mean) of one model variant, its calibrated accuracy and
    gold-option log-prob (:func:`calibrated_mc_metrics`), and the per-item predictions."""
    from raydapt.stages.grad_score import MCScore

    parts = {"adapter": adapter.name if adapter else None, "model": cfg.model,
             "ids": _ids_hash(prompts["id"]), "format": cfg.format.model_dump(mode="json"),
             "max_length": cfg.eval.max_length}
    d, done = cache.get("eval", parts)
    with tracker.child(f"eval-{label}", tags={"raydapt.variant": label}) as run_log:
        if not done:
            t0 = time.time()
            letters = LETTERS[: int(prompts["n_options"].max())]
            ds = _dataset(prompts[["id", "prompt", "n_options"]]).map_batches(
                MCScore, fn_constructor_kwargs=dict(
                    model=_actor_model(cfg, str(adapter / "adapter") if adapter else None,
                                       cfg.eval.pool),
                    letters=letters, max_length=cfg.eval.max_length, stage="eval"),
                **pool_kwargs(cfg.eval.pool))
            out = _stream(ds, len(prompts), f"eval {label}")
            run_log.metrics({"rows_per_s": len(prompts) / (time.time() - t0)})
            out.to_parquet(d / "out.parquet")
            cache.commit(d)
        out, _ = _split_errors(pd.read_parquet(d / "out.parquet"), "eval")
        m = prompts.merge(out[["id", "pred", "letter_logp"]], on="id", how="left")
        m["letter_logp"] = m["letter_logp"].map(lambda x: None if x is None or (
            isinstance(x, float) and np.isnan(x)) else list(map(float, x)))
        m["correct"] = (m["pred"] == m["gold"]).astype(float)  # a failed item counts as wrong
        acc = {t: float(g["correct"].mean()) for t, g in m.groupby("task", sort=False)}
        acc["mean"] = float(np.mean(list(acc.values())))
        extra = calibrated_mc_metrics(m)
        run_log.metrics({f"acc.{k}": v for k, v in acc.items()})
        run_log.metrics({f"{kind}.{k}": v for kind, vals in extra.items()
                         for k, v in vals.items()})
        return acc, extra, m


def nll_rows(test: pd.DataFrame, tok, cfg: NTKSelectJob) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test items → id, task, input_ids, response_mask of prompt + gold response (the item's
    rationale where it has one, then ``The answer is X.``, as in training), at most
    ``eval.max_length`` tokens (prompt truncated from the left); plus rejects."""
    fmt = QAFormat(prompt=cfg.format.prompt, response=cfg.format.response,
                   answer_prefix=cfg.format.answer_prefix,
                   context_max_chars=cfg.format.context_max_chars,
                   rationale_max_chars=cfg.format.rationale_max_chars)
    out, bad = [], []
    for r in test.to_dict("records"):
        try:
            e = encode_pair(tok, *render(r, fmt), max_length=cfg.eval.max_length,
                            chat=cfg.format.chat)
        except (ValueError, KeyError) as exc:
            bad.append({"file": "encode-nll", "id": r["id"], "reason": str(exc), "raw": ""})
            continue
        out.append({"id": r["id"], "task": r["task"], "input_ids": e["input_ids"],
                    "response_mask": e["response_mask"]})
    return (pd.DataFrame(out, columns=["id", "task", "input_ids", "response_mask"]),
            pd.DataFrame(bad, columns=["file", "id", "reason", "raw"]))


def nll_summary(m: pd.DataFrame) -> dict[str, float]:
    """Mean per-token NLL per task (Σ nll_sum / Σ n_tokens over the task's items) and the mean
    over tasks (``mean``); items whose scoring failed are left out (counted in ``failed``)."""
    ok = m[m["n_tokens"].notna() & (m["n_tokens"] > 0)]
    res = {t: float(g["nll_sum"].sum() / g["n_tokens"].sum()) for t, g in ok.groupby(
        "task", sort=False)}
    res["mean"] = float(np.mean(list(res.values()))) if res else float("nan")
    res["failed"] = float(len(m) - len(ok))
    return res


def evaluate_nll(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, label: str,
                 adapter: Path | None, rows: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """Held-out gold-response NLL of one model variant (:func:`nll_rows` rows): the per-task
    mean per-token NLL (:func:`nll_summary`) and the per-item sums."""
    from raydapt.stages.grad_score import ResponseNLL

    parts = {"adapter": adapter.name if adapter else None, "model": cfg.model,
             "ids": _ids_hash(rows["id"]), "format": cfg.format.model_dump(mode="json"),
             "max_length": cfg.eval.max_length, "metric": "response_nll"}
    d, done = cache.get("eval-nll", parts)
    with tracker.child(f"eval-nll-{label}", tags={"raydapt.variant": label}) as run_log:
        if not done:
            t0 = time.time()
            ds = _dataset(rows[["id", "input_ids", "response_mask"]]).map_batches(
                ResponseNLL, fn_constructor_kwargs=dict(
                    model=_actor_model(cfg, str(adapter / "adapter") if adapter else None,
                                       cfg.eval.pool)),
                **pool_kwargs(cfg.eval.pool))
            out = _stream(ds, len(rows), f"eval nll {label}")
            run_log.metrics({"rows_per_s": len(rows) / (time.time() - t0)})
            out.to_parquet(d / "out.parquet")
            cache.commit(d)
        out, _ = _split_errors(pd.read_parquet(d / "out.parquet"), "eval-nll")
        m = rows[["id", "task"]].merge(out[["id", "nll_sum", "n_tokens"]], on="id", how="left")
        res = nll_summary(m)
        run_log.metrics({f"nll.{k}": v for k, v in res.items()})
        return res, m


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


def run(cfg: NTKSelectJob) -> dict[str, Any]:
    """Run the NTK-Selector job; returns the results dict also written to results.json."""
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.output_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(cfg.run.cache_dir)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.progress)
    tracker = Tracker(enabled=cfg.tracking.enabled, uri=cfg.tracking.uri,
                      experiment=cfg.tracking.experiment,
                      artifact_location=cfg.tracking.artifact_location)
    s = cfg.select
    t_job = time.time()
    timings: dict[str, float] = {}
    with tracker.job(cfg.run.name, tags={"raydapt.method": "ntk_select",
                                         "raydapt.config_hash": config_hash(cfg)}) as parent:
        parent.params(cfg.model_dump(mode="json"))
        parent.text(to_yaml(cfg), "config.yaml")
        _say(f"resolved config:\n{to_yaml(cfg)}")

        # 1. read ------------------------------------------------------------------------------
        t0 = time.time()
        with tracker.child("read") as run_log:
            data = read_data(cfg)
            parent.params({"data_fingerprint": data["fingerprints"]})
            tok = _tokenizer(cfg.model)
            dom, rej_d = encode_rows(data["domain"], tok, cfg)
            pool, rej_p = encode_rows(data["pool"], tok, cfg)
            prompts = pd.concat([mc_prompts(t, tok, cfg) for t in data["tests"].values()],
                                ignore_index=True)
            rejects = [data["rejects"], rej_d, rej_p]
            nll_items = None
            if cfg.eval.nll:
                parts_nll = [nll_rows(t, tok, cfg) for t in data["tests"].values()]
                nll_items = pd.concat([p for p, _ in parts_nll], ignore_index=True)
                rejects += [r for _, r in parts_nll]
            counts = {"domain_rows": len(dom), "pool_rows": len(pool),
                      **{f"test_rows.{k}": len(v) for k, v in data["tests"].items()},
                      "rejects": sum(len(r) for r in rejects)}
            run_log.metrics(counts)
            _say(f"read: {counts}")
        n = min(len(pool), s.n or max(1, round(s.n_factor * len(dom))))
        m_cand = min(len(pool), max(n, math.ceil(s.m_factor * n)))
        parent.params({"selection": {"N": n, "M": m_cand, "D": len(dom)}})
        timings["read"] = time.time() - t0

        # 2. warm-up ---------------------------------------------------------------------------
        t0 = time.time()
        warm = _fit(cfg, cache, tracker, stage="lora", label="warmup", rows=dom,
                    train=cfg.warmup, storage=out / "train")
        timings["warmup"] = time.time() - t0

        # 3. stage 1: embeddings + votes -------------------------------------------------------
        inputs = SelectionInputs(pool_ids=pool["id"].to_numpy())
        need_stage1 = bool({"ntk", "less", "embedding"} & set(s.selectors))
        cand = pool
        if need_stage1:
            t0 = time.time()
            emb = stage1_embed(cfg, cache, tracker, adapter=warm,
                               rows=pd.concat([dom, pool], ignore_index=True))
            emb, rej = _split_errors(emb, "embed")
            rejects.append(rej)
            vs, cand = stage1_candidates(emb, dom, pool, inputs, k=s.k, m=m_cand,
                                         seed=cfg.run.seed)
            vs.to_parquet(out / "stage1_votes.parquet")
            _say(f"stage 1: {int((vs['votes'] > 0).sum())} pool samples got votes; "
                 f"kept M={len(cand)}")
            timings["stage1"] = time.time() - t0

        # 4-7. per variant, in order: (stage-2 scores →) selection → fine-tune → evaluation, so
        # every finished variant is complete in results.json (written after each one) --------
        results: dict[str, dict[str, float]] = {}
        results_extra: dict[str, dict[str, dict[str, float]]] = {"calibrated": {},
                                                                  "gold_logprob": {}}
        response_nll: dict[str, dict[str, float]] = {}
        majority = majority_letter_accuracy(data["domain"], data["tests"])  # no model: once
        preds: list[pd.DataFrame] = []
        selections: dict[str, pd.DataFrame] = {}
        by_id = pool.set_index("id")

        def scores_for(kind: str) -> None:
            t0 = time.time()
            sc = candidate_scores(cfg, cache, tracker, adapter=warm, dom=dom, cand=cand,
                                  kind=kind)
            sc, rej = _split_errors(sc, f"scores-{kind}")
            rejects.append(rej)
            sc.to_parquet(out / f"scores_{kind}.parquet")
            inputs.scores[kind] = sc.set_index("id")["score"]
            timings[f"stage2_{kind}"] = time.time() - t0

        def select(name: str) -> pd.DataFrame:
            with tracker.child(f"select-{name}") as run_log:
                sel = SELECTORS[name](seed=cfg.run.seed).select(inputs, n)
                sel.to_parquet(out / f"selected_{name}.parquet")
                run_log.artifact(out / f"selected_{name}.parquet", "selected")
                by_src = data["pool"].set_index("id").loc[sel["id"], "source"].value_counts()
                _say(f"select {name}: {len(sel)} samples; sources {by_src.head(8).to_dict()}")
                run_log.metrics({"selected": len(sel)})
            return sel

        def evaluate(label: str, adapter: Path | None) -> None:
            t0 = time.time()
            acc, extra, m = evaluate_mc(cfg, cache, tracker, label=label, adapter=adapter,
                                        prompts=prompts)
            results[label] = acc
            for kind, d in extra.items():
                results_extra[kind][label] = d
            preds.append(m.assign(variant=label)[["variant", "task", "id", "gold", "pred",
                                                  "letter_logp"]])
            if nll_items is not None:
                response_nll[label], _ = evaluate_nll(cfg, cache, tracker, label=label,
                                                      adapter=adapter, rows=nll_items)
                parent.metrics({f"nll.{label}.{k}": v for k, v in response_nll[label].items()})
            timings[f"eval_{label}"] = time.time() - t0
            parent.metrics({f"acc.{label}.{k}": v for k, v in acc.items()})
            parent.metrics({f"{kind}.{label}.{k}": v for kind, d in extra.items()
                            for k, v in d.items()})
            _say(f"eval {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
                 + "; calibrated " + ", ".join(f"{k} {v:.3f}"
                                               for k, v in extra["calibrated"].items()))
            write_summary(complete=False)

        def write_summary(*, complete: bool) -> dict[str, Any]:
            summary = {
                "job": cfg.run.name, "model": cfg.model, "complete": complete,
                "accuracy": results,
                "accuracy_calibrated": results_extra["calibrated"],
                "gold_option_logprob": results_extra["gold_logprob"],
                "majority_letter_from_D": majority,
                **({"response_nll": response_nll} if nll_items is not None else {}),
                "sizes": {"D": len(dom), "pool": len(pool), "M": len(cand), "N": n,
                          "test": {k: len(v) for k, v in data["tests"].items()}},
                "selected_sources": {
                    name: data["pool"].set_index("id").loc[sel["id"], "source"].value_counts()
                    .to_dict() for name, sel in selections.items()},
                "counts": counts, "seconds": time.time() - t_job, "stage_seconds": timings,
            }
            (out / "results.json").write_text(json.dumps(summary, indent=2))
            return summary

        if "base" in s.baselines:
            evaluate("base", None)
        if "domain_only" in s.baselines:
            t0 = time.time()
            ad = _fit(cfg, cache, tracker, stage="lora", label="finetune-domain_only", rows=dom,
                      train=cfg.finetune, storage=out / "train")
            timings["finetune_domain_only"] = time.time() - t0
            evaluate("domain_only", ad)
        for name in s.selectors:
            if name in ("ntk", "less") and name not in inputs.scores:
                scores_for(name)
            selections[name] = sel = select(name)
            t0 = time.time()
            rows = pd.concat([dom, by_id.loc[sel["id"]].reset_index()], ignore_index=True)
            ad = _fit(cfg, cache, tracker, stage="lora", label=f"finetune-{name}", rows=rows,
                      train=cfg.finetune, storage=out / "train")
            timings[f"finetune_{name}"] = time.time() - t0
            evaluate(name, ad)

        # report --------------------------------------------------------------------------------
        rej_df = pd.concat([r for r in rejects if len(r)], ignore_index=True) if any(
            len(r) for r in rejects) else pd.DataFrame(columns=["file", "id", "reason", "raw"])
        rej_df.to_parquet(out / "rejects.parquet")
        pd.concat(preds, ignore_index=True).to_parquet(out / "predictions.parquet")
        summary = write_summary(complete=True)
        summary["rejects"] = len(rej_df)
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        parent.metrics({"seconds": summary["seconds"], "rejects": len(rej_df)})
        for f in ("results.json", "rejects.parquet", "predictions.parquet"):
            parent.artifact(out / f)
        tasks = list(data["tests"]) + ["mean"]
        _say("accuracy\n" + "\n".join(
            f"  {lab:<12} " + "  ".join(f"{t} {acc.get(t, float('nan')):.3f}" for t in tasks)
            for lab, acc in results.items()))
        _say(f"done in {summary['seconds']:.0f}s; outputs in {out}")
        return summary


def _tokenizer(model_ref: str):
    from transformers import AutoTokenizer

    from raydapt.assets import resolve_model

    rm = resolve_model(model_ref)
    tok = AutoTokenizer.from_pretrained(rm.path, revision=rm.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
