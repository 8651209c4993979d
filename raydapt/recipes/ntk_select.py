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

The steps are the methods of :class:`NTKSelectRecipe`, listed in its ``run()``. Variants run one after another (base, domain-only, then per selector: its stage-2 scores if
any, selection, fine-tune, evaluation); results.json is rewritten after each evaluation
(``complete: false`` until the end), so an interrupted run reports what it finished and a rerun
resumes from the cached stages.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.config import config_hash
from raydapt.core.assets import load_tokenizer
from raydapt.core.cache import StageCache
from raydapt.core.tracking import RunLogger, Tracker
from raydapt.data.qa import QAFormat, encode_table, mc_prompt_table, read_qa
from raydapt.data.readers import DataError, fingerprint, split_and_subsample
from raydapt.evaluate import calibrated_mc_metrics, majority_letter_accuracy
from raydapt.job import Recipe, cached_stage, speaker
from raydapt.recipes.ntk_select_config import NTKSelectJob
from raydapt.select.selectors import SELECTORS, SelectionInputs, knn_votes
from raydapt.stages.common import concat_rejects, pool_kwargs, split_errors
from raydapt.stages.grad_score import EmbedLM, GradProject, MCScore
from raydapt.stages.sharded import sharded_pass, stream_rows
from raydapt.train.lora import LoRATrain, fit_lora
from raydapt.train.settings import from_section

LETTERS = [chr(ord("A") + i) for i in range(10)]

# The cached stages this recipe owns and their code versions (bump one when its code changes
# what it writes).
STAGE_VERSIONS: dict[str, int] = {
    "lora": 1, "embed": 1, "grads-domain": 1, "scores-ntk": 1, "scores-less": 1, "eval": 1,
    "eval-nll": 1,
}


_say = speaker("ntk_select")


def _dataset(df: pd.DataFrame, rows_per_block: int = 32):
    """A Ray Dataset from a DataFrame in several blocks (a list of frames: pandas 3 + Ray's
    ``override_num_blocks`` do not mix)."""
    import ray

    n = max(1, min(64, math.ceil(len(df) / rows_per_block)))
    return ray.data.from_pandas([df.iloc[ix] for ix in np.array_split(np.arange(len(df)), n)
                                 if len(ix)])


def _stream(ds, total: int, label: str, on_batch=None) -> pd.DataFrame:
    return stream_rows(ds, total, label, _say, on_batch=on_batch)


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
    rej = concat_rejects(rejects)
    return {"pool": pool.reset_index(drop=True), "domain": d, "tests": tests, "rejects": rej,
            "fingerprints": fps}


def qa_format(cfg: NTKSelectJob) -> QAFormat:
    """The job's ``format`` section as the QA templates of :mod:`raydapt.data.qa`."""
    f = cfg.format
    return QAFormat(prompt=f.prompt, response=f.response, answer_prefix=f.answer_prefix,
                    context_max_chars=f.context_max_chars,
                    rationale_max_chars=f.rationale_max_chars)


def encode_rows(rows: pd.DataFrame, tok, cfg: NTKSelectJob) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (D, pool) → id, input_ids [L], response_mask [L] within
    ``format.max_length`` tokens, plus rejects for rows that do not fit."""
    return encode_table(rows, tok, qa_format(cfg), max_length=cfg.format.max_length,
                        chat=cfg.format.chat)


def mc_prompts(test: pd.DataFrame, tok, cfg: NTKSelectJob) -> pd.DataFrame:
    """Test items → id, task, prompt (chat prefix + answer prefix), n_options, gold."""
    return mc_prompt_table(test, tok, qa_format(cfg), chat=cfg.format.chat)


def nll_rows(test: pd.DataFrame, tok, cfg: NTKSelectJob) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test items → id, task, input_ids, response_mask of prompt + gold response (the item's
    rationale where it has one, then ``The answer is X.``, as in training), at most
    ``eval.max_length`` tokens (prompt truncated from the left); plus rejects."""
    return encode_table(test, tok, qa_format(cfg), max_length=cfg.eval.max_length,
                        chat=cfg.format.chat, keep=("id", "task"), reject_file="encode-nll")


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def _telemetry(cfg: NTKSelectJob) -> dict[str, str]:
    """The method and run tags of every stage's Ray metrics (the dashboards filter on them)."""
    return {"method": "ntk_select", "run": cfg.run.name}


def _actor_model(cfg: NTKSelectJob, adapter: str | None, pool) -> dict[str, Any]:
    return {"model": cfg.model, "adapter": adapter, "dtype": cfg.dtype,
            "threads": pool.threads or max(1, int(round(pool.num_cpus)))}


def fit_lora_cached(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, stage: str,
                    label: str, rows: pd.DataFrame, train, storage: Path) -> Path:
    """A cached LoRA fit (Ray Train + DeepSpeed) on pre-tokenised rows → output directory."""
    tsec = train.model_dump(mode="json")
    parts = {"model": cfg.model, "lora": cfg.lora.model_dump(mode="json"), "train": tsec,
             "format": cfg.format.model_dump(mode="json"), "seed": cfg.run.seed,
             "ids": _ids_hash(rows["id"])}

    def compute(d: Path, run_log: RunLogger) -> None:
        _say(f"{label}: LoRA on {len(rows)} rows, {train.epochs} epoch(s), {train.num_workers} "
             f"workers, ZeRO-{train.zero_stage}, {train.dtype}")
        # the Ray Train run is named by content (the cache key), so a changed config or data
        # never meets an earlier run's snapshot in the same storage folder
        m = fit_lora(name=f"{cfg.run.name}-{label}-{d.name[:8]}", train_ds=_dataset(rows),
                     n_rows=len(rows),
                     model=cfg.model, lora=cfg.lora.model_dump(mode="json"),
                     train=from_section(LoRATrain, train),
                     seed=cfg.run.seed, storage=str(storage), out_dir=d,
                     mlflow_uri=tracker.uri if cfg.tracking.enabled else None,
                     mlflow_run_id=run_log.run_id)
        run_log.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})

    return cached_stage(cache, tracker, stage, parts, compute=compute,
                        load=lambda d, _: d, run_name=label, tags={"raydapt.stage": stage},
                        params={"rows": len(rows), **tsec,
                                "lora": cfg.lora.model_dump(mode="json")},
                        say=_say, label=label)


def stage1_embed(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                 rows: pd.DataFrame) -> pd.DataFrame:
    """Mean-pooled final hidden states of ``rows`` (D and C) with the warmed-up model."""
    parts = {"adapter": str(adapter.name), "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "format": cfg.format.model_dump(mode="json")}

    def compute(d: Path, run_log: RunLogger) -> None:
        t0 = time.time()
        ds = _dataset(rows[["id", "input_ids", "response_mask"]]).map_batches(
            EmbedLM, fn_constructor_kwargs={"model": _actor_model(
                cfg, str(adapter / "adapter"), cfg.select.embed_pool),
                "telemetry": _telemetry(cfg)},
            **pool_kwargs(cfg.select.embed_pool))
        out = _stream(ds, len(rows), "stage 1 embed")
        run_log.metrics({"rows": len(rows), "rows_per_s": len(rows) / (time.time() - t0)})
        out.to_parquet(d / "out.parquet")

    return cached_stage(cache, tracker, "embed", parts, compute=compute,
                        load=lambda d, _: pd.read_parquet(d / "out.parquet"),
                        run_name="stage1-embed", say=_say, label="stage 1 embed")


def domain_grads(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                 rows: pd.DataFrame, objective: str) -> np.ndarray:
    """Projected per-sample gradients of D → [Nd, p] (rows that failed are dropped)."""
    s = cfg.select
    parts = {"adapter": adapter.name, "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "objective": objective, "p": s.proj_dim, "seed": s.proj_seed,
             "grad_method": s.grad_method}

    def compute(d: Path, run_log: RunLogger) -> None:
        t0 = time.time()
        ds = _dataset(rows[["id", "input_ids", "response_mask"]], 8).map_batches(
            GradProject, fn_constructor_kwargs=dict(
                model=_actor_model(cfg, str(adapter / "adapter"), s.grad_pool),
                objective=objective, proj_dim=s.proj_dim, proj_seed=s.proj_seed,
                chunk_rows=s.proj_chunk_rows, vmap_chunk=s.vmap_chunk,
                grad_method=s.grad_method, micro_batch=s.grad_micro_batch,
                stage=f"grads-domain-{objective}", telemetry=_telemetry(cfg)),
            **pool_kwargs(s.grad_pool))
        out = _stream(ds, len(rows), f"stage 2 domain gradients ({objective})")
        run_log.metrics({"rows": len(rows), "rows_per_s": len(rows) / (time.time() - t0)})
        out.to_parquet(d / "out.parquet")

    out, _ = split_errors(cached_stage(
        cache, tracker, "grads-domain", parts, compute=compute,
        load=lambda d, _: pd.read_parquet(d / "out.parquet"),
        run_name=f"stage2-{objective}-domain"), "grads-domain")
    if len(out) == 0:
        raise DataError("no domain gradient could be computed (see rejects)")
    return np.stack(out["g"].to_numpy()).astype(np.float32)


def stage2_scores(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                  rows: pd.DataFrame, kind: str, against: np.ndarray) -> pd.DataFrame:
    """Score the candidates ``rows`` against the domain, sharded: shard i of ``shard_rows``
    candidates is written to ``part-0000i.parquet`` atomically when all its rows are back; a
    rerun (same inputs) computes only the missing shards. Returns id, score (+ _error)."""
    s = cfg.select
    objective = "logit_sum" if kind == "ntk" else "loss"
    parts = {"adapter": adapter.name, "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "kind": kind, "score": s.score, "p": s.proj_dim, "seed": s.proj_seed,
             "against": config_hash({"a": np.round(against.astype(np.float64), 6).tolist()}),
             "shard_rows": s.shard_rows, "grad_method": s.grad_method}

    def make_ds(frames: list[pd.DataFrame]):
        import ray

        step = max(1, 2 * s.grad_pool.batch_size)  # small blocks: results stream back
        blocks = [f.iloc[j: j + step] for f in frames for j in range(0, len(f), step)]
        return ray.data.from_pandas(blocks).map_batches(
            GradProject, fn_constructor_kwargs=dict(
                model=_actor_model(cfg, str(adapter / "adapter"), s.grad_pool),
                objective=objective, proj_dim=s.proj_dim, proj_seed=s.proj_seed,
                chunk_rows=s.proj_chunk_rows, vmap_chunk=s.vmap_chunk,
                grad_method=s.grad_method, micro_batch=s.grad_micro_batch,
                adam_state=str(adapter / "adam_exp_avg_sq.pt") if kind == "less" else None,
                score_against=against, score_kind="less" if kind == "less" else s.score,
                stage=f"scores-{kind}", telemetry=_telemetry(cfg)),
            **pool_kwargs(s.grad_pool))

    return sharded_pass(cache, tracker, f"scores-{kind}", parts,
                        rows[["id", "input_ids", "response_mask"]], s.shard_rows, make_ds, _say,
                        run_name=f"stage2-{kind}", label=f"stage 2 {kind} scores")


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
    parts = {"adapter": adapter.name if adapter else None, "model": cfg.model,
             "ids": _ids_hash(prompts["id"]), "format": cfg.format.model_dump(mode="json"),
             "max_length": cfg.eval.max_length}

    def compute(d: Path, run_log: RunLogger) -> None:
        t0 = time.time()
        letters = LETTERS[: int(prompts["n_options"].max())]
        ds = _dataset(prompts[["id", "prompt", "n_options"]]).map_batches(
            MCScore, fn_constructor_kwargs=dict(
                model=_actor_model(cfg, str(adapter / "adapter") if adapter else None,
                                   cfg.eval.pool),
                letters=letters, max_length=cfg.eval.max_length, stage="eval",
                telemetry=_telemetry(cfg)),
            **pool_kwargs(cfg.eval.pool))
        out = _stream(ds, len(prompts), f"eval {label}")
        run_log.metrics({"rows_per_s": len(prompts) / (time.time() - t0)})
        out.to_parquet(d / "out.parquet")

    def load(d: Path, run_log: RunLogger):
        out, _ = split_errors(pd.read_parquet(d / "out.parquet"), "eval")
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

    return cached_stage(cache, tracker, "eval", parts, compute=compute, load=load,
                        run_name=f"eval-{label}", tags={"raydapt.variant": label})


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

    def compute(d: Path, run_log: RunLogger) -> None:
        t0 = time.time()
        ds = _dataset(rows[["id", "input_ids", "response_mask"]]).map_batches(
            ResponseNLL, fn_constructor_kwargs=dict(
                model=_actor_model(cfg, str(adapter / "adapter") if adapter else None,
                                   cfg.eval.pool), telemetry=_telemetry(cfg)),
            **pool_kwargs(cfg.eval.pool))
        out = _stream(ds, len(rows), f"eval nll {label}")
        run_log.metrics({"rows_per_s": len(rows) / (time.time() - t0)})
        out.to_parquet(d / "out.parquet")

    def load(d: Path, run_log: RunLogger):
        out, _ = split_errors(pd.read_parquet(d / "out.parquet"), "eval-nll")
        m = rows[["id", "task"]].merge(out[["id", "nll_sum", "n_tokens"]], on="id", how="left")
        res = nll_summary(m)
        run_log.metrics({f"nll.{k}": v for k, v in res.items()})
        return res, m

    return cached_stage(cache, tracker, "eval-nll", parts, compute=compute, load=load,
                        run_name=f"eval-nll-{label}", tags={"raydapt.variant": label})


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


class NTKSelectRecipe(Recipe):
    """One NTK-Selector job: :meth:`run` lists the steps; each step sets its own attributes
    below (the per-variant results are collected as the variants finish)."""

    STAGE_VERSIONS = STAGE_VERSIONS
    cfg: NTKSelectJob

    data: dict[str, Any]  # read: pool, domain, tests, rejects, fingerprints (raw rows)
    dom: pd.DataFrame  # read: D, tokenised
    pool: pd.DataFrame  # read: the pool, tokenised
    by_id: pd.DataFrame
    prompts: pd.DataFrame  # read: MC test prompts
    nll_items: pd.DataFrame | None  # read: held-out response-NLL rows (eval.nll)
    rejects: list[pd.DataFrame]  # read, then every step appends its rejects
    counts: dict[str, int]
    n: int  # read: N selected
    m_cand: int  # read: M stage-1 candidates
    majority: dict[str, float]
    warm: Path  # warmup: the warm-up adapter
    inputs: SelectionInputs  # stage1 (votes), stage 2 (scores)
    cand: pd.DataFrame  # stage1: the M candidates

    def __init__(self, cfg: NTKSelectJob, ctx) -> None:
        super().__init__(cfg, ctx)
        self.s = cfg.select
        self.cache, self.tracker, self.out = ctx.cache, ctx.tracker, ctx.out
        self.timings: dict[str, float] = {}
        self.results: dict[str, dict[str, float]] = {}
        self.results_extra: dict[str, dict[str, dict[str, float]]] = {"calibrated": {},
                                                                       "gold_logprob": {}}
        self.response_nll: dict[str, dict[str, float]] = {}
        self.preds: list[pd.DataFrame] = []
        self.selections: dict[str, pd.DataFrame] = {}

    def run(self) -> dict[str, Any]:
        """The steps, in order; per variant: (stage-2 scores →) selection → fine-tune →
        evaluation, so every finished variant is complete in results.json (written after each
        one). Returns the results dict."""
        cfg = self.cfg
        self.read()
        self.warmup()
        self.stage1()
        if "base" in cfg.select.baselines:
            self.evaluate("base", None)
        if "domain_only" in cfg.select.baselines:
            self.domain_only()
        for name in cfg.select.selectors:
            self.selection(name)
        return self.report()

    def read(self) -> None:
        """1. read: D, the pool, the test prompts; N and M."""
        cfg, s = self.cfg, self.s
        t0 = time.time()
        with self.tracker.child("read") as run_log:
            data = read_data(cfg)
            self.ctx.parent.params({"data_fingerprint": data["fingerprints"]})
            self.ctx.parent.datasets(data["fingerprints"])
            tok = tokenizer(cfg.model)
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
        n, m_cand = s.sizes(len(dom), len(pool))
        self.ctx.parent.params({"selection": {"N": n, "M": m_cand, "D": len(dom)}})
        self.timings["read"] = time.time() - t0
        self.data, self.dom, self.pool, self.prompts = data, dom, pool, prompts
        self.rejects, self.counts, self.n, self.m_cand = rejects, counts, n, m_cand
        self.nll_items = nll_items
        self.majority = majority_letter_accuracy(data["domain"], data["tests"])  # no model: once
        self.by_id = pool.set_index("id")

    def warmup(self) -> None:
        """2. warm-up LoRA on D."""
        t0 = time.time()
        self.warm = fit_lora_cached(self.cfg, self.cache, self.tracker, stage="lora", label="warmup",
                         rows=self.dom, train=self.cfg.warmup, storage=self.out / "train")
        self.timings["warmup"] = time.time() - t0

    def stage1(self) -> None:
        """3. stage 1: embeddings + votes; keeps the top-M candidates."""
        cfg, s, pool, dom, out = self.cfg, self.s, self.pool, self.dom, self.out
        inputs = SelectionInputs(pool_ids=pool["id"].to_numpy())
        need_stage1 = bool({"ntk", "less", "embedding"} & set(s.selectors))
        cand = pool
        if need_stage1:
            t0 = time.time()
            emb = stage1_embed(cfg, self.cache, self.tracker, adapter=self.warm,
                               rows=pd.concat([dom, pool], ignore_index=True))
            emb, rej = split_errors(emb, "embed")
            self.rejects.append(rej)
            vs, cand = stage1_candidates(emb, dom, pool, inputs, k=s.k, m=self.m_cand,
                                         seed=cfg.run.seed)
            vs.to_parquet(out / "stage1_votes.parquet")
            _say(f"stage 1: {int((vs['votes'] > 0).sum())} pool samples got votes; "
                 f"kept M={len(cand)}")
            self.timings["stage1"] = time.time() - t0
        self.inputs, self.cand = inputs, cand

    def scores_for(self, kind: str) -> None:
        """4. stage 2: projected-gradient scores of the candidates (ntk or less)."""
        cfg, out = self.cfg, self.out
        t0 = time.time()
        sc = candidate_scores(cfg, self.cache, self.tracker, adapter=self.warm, dom=self.dom,
                              cand=self.cand, kind=kind)
        sc, rej = split_errors(sc, f"scores-{kind}")
        self.rejects.append(rej)
        sc.to_parquet(out / f"scores_{kind}.parquet")
        self.inputs.scores[kind] = sc.set_index("id")["score"]
        self.timings[f"stage2_{kind}"] = time.time() - t0

    def select(self, name: str) -> pd.DataFrame:
        """5. selection: N samples by one selector."""
        out = self.out
        with self.tracker.child(f"select-{name}") as run_log:
            sel = SELECTORS[name](seed=self.cfg.run.seed).select(self.inputs, self.n)
            sel.to_parquet(out / f"selected_{name}.parquet")
            run_log.artifact(out / f"selected_{name}.parquet", "selected")
            by_src = self.data["pool"].set_index("id").loc[sel["id"], "source"].value_counts()
            _say(f"select {name}: {len(sel)} samples; sources {by_src.head(8).to_dict()}")
            run_log.metrics({"selected": len(sel)})
        return sel

    def domain_only(self) -> None:
        """Baseline: LoRA on D alone, evaluated."""
        t0 = time.time()
        ad = fit_lora_cached(self.cfg, self.cache, self.tracker, stage="lora", label="finetune-domain_only",
                  rows=self.dom, train=self.cfg.finetune, storage=self.out / "train")
        self.timings["finetune_domain_only"] = time.time() - t0
        self.evaluate("domain_only", ad)

    def selection(self, name: str) -> None:
        """4-7 for one selector: (stage-2 scores →) selection → fine-tune on D ∪ S → evaluation."""
        if name in ("ntk", "less") and name not in self.inputs.scores:
            self.scores_for(name)
        self.selections[name] = sel = self.select(name)
        t0 = time.time()
        rows = pd.concat([self.dom, self.by_id.loc[sel["id"]].reset_index()], ignore_index=True)
        ad = fit_lora_cached(self.cfg, self.cache, self.tracker, stage="lora", label=f"finetune-{name}",
                  rows=rows, train=self.cfg.finetune, storage=self.out / "train")
        self.timings[f"finetune_{name}"] = time.time() - t0
        self.evaluate(name, ad)

    def evaluate(self, label: str, adapter: Path | None) -> None:
        """7. evaluation: multiple-choice accuracy (+ calibrated views); results.json rewritten."""
        parent = self.ctx.parent
        t0 = time.time()
        acc, extra, m = evaluate_mc(self.cfg, self.cache, self.tracker, label=label,
                                    adapter=adapter, prompts=self.prompts)
        self.results[label] = acc
        for kind, d in extra.items():
            self.results_extra[kind][label] = d
        self.preds.append(m.assign(variant=label)[["variant", "task", "id", "gold", "pred",
                                                   "letter_logp"]])
        if self.nll_items is not None:
            nll, _ = evaluate_nll(self.cfg, self.cache, self.tracker, label=label,
                                  adapter=adapter, rows=self.nll_items)
            self.response_nll[label] = nll
            parent.metrics({f"nll.{label}.{k}": v for k, v in nll.items()})
        self.timings[f"eval_{label}"] = time.time() - t0
        parent.metrics({f"acc.{label}.{k}": v for k, v in acc.items()})
        parent.metrics({f"{kind}.{label}.{k}": v for kind, d in extra.items()
                        for k, v in d.items()})
        _say(f"eval {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
             + "; calibrated " + ", ".join(f"{k} {v:.3f}"
                                           for k, v in extra["calibrated"].items()))
        self.write_summary(complete=False)

    def write_summary(self, *, complete: bool) -> dict[str, Any]:
        data = self.data
        summary = {
            "job": self.cfg.run.name, "model": self.cfg.model, "complete": complete,
            "accuracy": self.results,
            "accuracy_calibrated": self.results_extra["calibrated"],
            "gold_option_logprob": self.results_extra["gold_logprob"],
            "majority_letter_from_D": self.majority,
            **({"response_nll": self.response_nll} if self.nll_items is not None else {}),
            "sizes": {"D": len(self.dom), "pool": len(self.pool), "M": len(self.cand),
                      "N": self.n, "test": {k: len(v) for k, v in data["tests"].items()}},
            "selected_sources": {
                name: data["pool"].set_index("id").loc[sel["id"], "source"].value_counts()
                .to_dict() for name, sel in self.selections.items()},
            "counts": self.counts, "seconds": self.ctx.seconds(), "stage_seconds": self.timings,
        }
        self.ctx.write_results(summary)
        return summary

    def report(self) -> dict[str, Any]:
        """8. report: rejects, predictions, the complete results.json, parent-run artifacts."""
        out, parent = self.out, self.ctx.parent
        rej_df = concat_rejects(self.rejects)
        rej_df.to_parquet(out / "rejects.parquet")
        pd.concat(self.preds, ignore_index=True).to_parquet(out / "predictions.parquet")
        summary = self.write_summary(complete=True)
        summary["rejects"] = len(rej_df)
        self.ctx.write_results(summary)
        parent.metrics({"seconds": summary["seconds"], "rejects": len(rej_df)})
        parent.results_table({f"{v}:{t}": a for v, d in self.results.items() for t, a in d.items()},
                             metric="accuracy", seeds=[self.cfg.run.seed],
                             title=f"{self.cfg.run.name}: accuracy per selection and task",
                             out_dir=out)
        for f in ("results.json", "rejects.parquet", "predictions.parquet"):
            parent.artifact(out / f)
        tasks = list(self.data["tests"]) + ["mean"]
        _say("accuracy\n" + "\n".join(
            f"  {lab:<12} " + "  ".join(f"{t} {acc.get(t, float('nan')):.3f}" for t in tasks)
            for lab, acc in self.results.items()))
        _say(f"done in {summary['seconds']:.0f}s; outputs in {out}")
        return summary


def tokenizer(model_ref: str):
    """The model's tokenizer, padding with EOS (what every NTK-Selector stage encodes with)."""
    return load_tokenizer(model_ref, pad_to_eos=True)


def run(cfg: NTKSelectJob) -> dict[str, Any]:
    """Run the NTK-Selector job (:class:`NTKSelectRecipe`); returns the results dict also
    written to results.json."""
    return NTKSelectRecipe.main(cfg)
