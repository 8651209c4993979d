"""NTK-Selector recipe: mine a general chain-of-thought pool for a low-resource domain.

Stages, in order (each cached by content, each a child MLflow run):

1. read       domain tasks → D (train side) and test items (disjoint), small driver frames
2. warmup     LoRA on D (Ray Train + DeepSpeed) → adapter + Adam second moments (cached, reused)
3. embed      stage 1, streamed from the pool files to parquet shards (``stream_pass``): read
              (parallel byte ranges / row groups, per-row rejects) → tokenise (``EncodeQA``) →
              mean-pooled final hidden states with the warmed-up model (``EmbedLM``), chained
              actor pools, one shard per read unit. kNN votes of D for the pool read shard by
              shard (``select.index``: flat | ivf | hnsw); the top M by votes
              (``StreamingTopN``) are written once as the stage-2 candidates file
4. grads      stage 2: projected per-sample gradients g = Π ∇_θ F (θ = LoRA, same projection
              seed for D and C): ḡ_D, then the score of every candidate, streamed from the
              candidates file to score shards (a rerun computes only the missing shards);
              LESS: Adam-preconditioned loss gradients, max cosine to the domain loss gradients
5. select     each selector (ntk, embedding, random, less) → S, |S| = N  (selected_<name>.parquet;
              ntk / less by ``StreamingTopN`` over the score shards)
6. finetune   LoRA on D ∪ S for every selection, and on D alone (domain-only baseline)
7. eval       multiple-choice accuracy per task by the log-prob of each option letter, for the
              base model, domain-only and every selection → results.json

The driver never holds the pool: per pool row it keeps the id and its vote count / score
(the seeded subsample, the embedding and random selectors and the top-N need them); token ids
are read back from the stage-1 shards only for the M candidates and the N selected rows. The
same id in two pool files (or twice in one) is a reject record ``duplicate id in the pool``;
the first row in file order is kept (found from the ids, which the driver holds anyway).

The steps are the methods of :class:`NTKSelectRecipe`, listed in its ``run()``. Variants run one after another (base, domain-only, then per selector: its stage-2 scores if
any, selection, fine-tune, evaluation); results.json is rewritten after each evaluation
(``complete: false`` until the end), so an interrupted run reports what it finished and a rerun
resumes from the cached stages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.config import config_hash
from raydapt.core.assets import load_tokenizer
from raydapt.core.cache import ShardedOutput, StageCache
from raydapt.core.tracking import RunLogger, Tracker
from raydapt.data.qa import QAFormat, QARows, TokenRows, encode_table, mc_prompt_table, read_qa
from raydapt.data.readers import (
    REJECT_COLUMNS,
    DataError,
    RowSource,
    fingerprint,
    open_source,
    split_and_subsample,
)
from raydapt.evaluate import calibrated_mc_metrics, majority_letter_accuracy
from raydapt.job import Recipe, cached_stage, speaker
from raydapt.recipes.ntk_select_config import NTKSelectJob
from raydapt.select.selectors import SELECTORS, SelectionInputs
from raydapt.select.topk import StreamingTopN
from raydapt.select.votes import knn_votes_streaming
from raydapt.stages.common import ERROR_COLUMN, concat_rejects, pool_kwargs, split_errors
from raydapt.stages.grad_score import ENCODE_ERROR, EmbedLM, EncodeQA, GradProject, MCScore
from raydapt.stages.sharded import Step, ids_only, stream_pass, stream_rows, write_rows
from raydapt.train.lora import LoRATrain, fit_lora
from raydapt.train.settings import from_section

LETTERS = [chr(ord("A") + i) for i in range(10)]

# The cached stages this recipe owns and their code versions (bump one when its code changes
# what it writes).
STAGE_VERSIONS: dict[str, int] = {
    "lora": 1, "grads-domain": 1, "eval": 1, "eval-nll": 1,
    # 2: streamed from the pool files (one shard per read unit, tokens + source carried along)
    "embed": 2, "scores-ntk": 2, "scores-less": 2,
    "pool-ids": 1, "embed-domain": 1, "candidates": 1,
    "lora-rows": 1,  # a LoRA fit's rows, which its Ray Train workers read (write_rows)
}

#: the selected rows' tokens are gathered from the stage-1 shards this many ids at a time (one
#: pass over the shards each), so a large selection is never held whole in the driver
SELECTED_CHUNK_ROWS = 50_000


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
    """Domain set D and the per-task test items (D ∩ test = ∅), rejects, fingerprints (of the
    pool files too). The pool is streamed by :func:`pool_source`, never read here."""
    root = Path(cfg.data.root)
    rejects: list[pd.DataFrame] = []
    src = pool_source(cfg)
    fps = {_rel(f, root): fingerprint(f) for f in src.files if "://" not in f}
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
    rej = concat_rejects(rejects)
    return {"domain": d, "tests": tests, "rejects": rej, "fingerprints": fps}


def read_pool_frame(cfg: NTKSelectJob) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole pool as a driver frame (rows, rejects): duplicates across files dropped, the
    seeded subsample, in subsample-hash order. For small in-memory pools only (the planted-pool
    benchmarks, tests); the recipe streams the pool (:meth:`NTKSelectRecipe.stage1`)."""
    rejects, pools = [], []
    for f in pool_source(cfg).files:
        rows, rej = read_qa(f)
        pools.append(rows)
        rejects.append(rej)
    pool = pd.concat(pools, ignore_index=True)
    dup = pool["id"].duplicated()
    if dup.any():
        rejects.append(pd.DataFrame({"file": "pool", "id": pool.loc[dup, "id"],
                                     "reason": "duplicate id across pool files", "raw": ""}))
        pool = pool[~dup]
    pool, _ = split_and_subsample(pool, seed=cfg.run.seed, max_rows=cfg.data.max_pool_rows)
    return pool.reset_index(drop=True), concat_rejects(rejects)


def _rel(f: str, root: Path) -> str:
    try:
        return str(Path(f).relative_to(root))
    except ValueError:
        return f


def pool_source(cfg: NTKSelectJob, keep_ids: frozenset[str] | None = None) -> RowSource:
    """The pool's files (``data.pool``: files, directories, globs) planned into read units of
    ``data.pool_unit_rows`` rows, QA rows normalised in the read tasks (:class:`QARows`);
    ``keep_ids``: only these rows (the seeded subsample)."""
    root = Path(cfg.data.root)
    return open_source([root / p for p in cfg.data.pool], normaliser=QARows(),
                       unit_rows=cfg.data.pool_unit_rows, keep_ids=keep_ids)


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
                    label: str, ids: Sequence[str],
                    chunks: Callable[[], Iterable[pd.DataFrame]], train,
                    storage: Path) -> Path:
    """A cached LoRA fit (Ray Train + DeepSpeed) → output directory. Its rows (pre-tokenised:
    ``id``, ``input_ids``, ``response_mask``; ``ids`` in order, yielded by ``chunks()``) are
    first written as a stage output (``lora-rows``, :func:`write_rows`: ~32 rows a shard, at
    most 64 shards, one held at a time), and Ray Train's workers read them from those files."""
    tsec = train.model_dump(mode="json")
    parts = {"model": cfg.model, "lora": cfg.lora.model_dump(mode="json"), "train": tsec,
             "format": cfg.format.model_dump(mode="json"), "seed": cfg.run.seed,
             "ids": _ids_hash(ids)}
    n = len(ids)

    def compute(d: Path, run_log: RunLogger) -> None:
        _say(f"{label}: LoRA on {n} rows, {train.epochs} epoch(s), {train.num_workers} "
             f"workers, ZeRO-{train.zero_stage}, {train.dtype}")
        rows = write_rows(cache, "lora-rows", {k: parts[k] for k in ("model", "format", "ids")},
                          chunks, n, min(64, math.ceil(n / 32)), _say, label=f"{label} rows")
        # the Ray Train run is named by content (the cache key), so a changed config or data
        # never meets an earlier run's snapshot in the same storage folder
        m = fit_lora(name=f"{cfg.run.name}-{label}-{d.name[:8]}",
                     train_ds=rows.dataset(["input_ids", "response_mask"]), n_rows=n,
                     model=cfg.model, lora=cfg.lora.model_dump(mode="json"),
                     train=from_section(LoRATrain, train),
                     seed=cfg.run.seed, storage=str(storage), out_dir=d,
                     mlflow_uri=tracker.uri if cfg.tracking.enabled else None,
                     mlflow_run_id=run_log.run_id)
        run_log.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})

    return cached_stage(cache, tracker, stage, parts, compute=compute,
                        load=lambda d, _: d, run_name=label, tags={"raydapt.stage": stage},
                        params={"rows": n, **tsec,
                                "lora": cfg.lora.model_dump(mode="json")},
                        say=_say, label=label)


def embed_rows(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
               rows: pd.DataFrame, label: str = "D") -> pd.DataFrame:
    """Mean-pooled final hidden states of a small driver frame of encoded rows (D; a small
    in-memory pool in the benchmarks) with the warmed-up model: id, emb (+ _error)."""
    parts = {"adapter": str(adapter.name), "model": cfg.model, "ids": _ids_hash(rows["id"]),
             "format": cfg.format.model_dump(mode="json")}

    def compute(d: Path, run_log: RunLogger) -> None:
        t0 = time.time()
        ds = _dataset(rows[["id", "input_ids", "response_mask"]]).map_batches(
            EmbedLM, fn_constructor_kwargs={"model": _actor_model(
                cfg, str(adapter / "adapter"), cfg.select.embed_pool),
                "telemetry": _telemetry(cfg)},
            **pool_kwargs(cfg.select.embed_pool))
        out = _stream(ds, len(rows), f"stage 1 embed ({label})")
        run_log.metrics({"rows": len(rows), "rows_per_s": len(rows) / (time.time() - t0)})
        out.to_parquet(d / "out.parquet")

    return cached_stage(cache, tracker, "embed-domain", parts, compute=compute,
                        load=lambda d, _: pd.read_parquet(d / "out.parquet"),
                        run_name="stage1-embed-domain", say=_say,
                        label=f"stage 1 embed ({label})")


# ---------------------------------------------------------------------------------------------
# the streamed pool: ids, stage 1, candidates
# ---------------------------------------------------------------------------------------------


def _one_actor():
    import ray

    return ray.data.ActorPoolStrategy(size=1)


def scan_pool_ids(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker) -> ShardedOutput:
    """The pool's ids and reader rejects as shards (read → id): the seeded subsample
    (``data.max_pool_rows``) is drawn from them before any model work."""
    return stream_pass(cache, tracker, "pool-ids", {}, pool_source(cfg), [Step(ids_only)],
                       _say, run_name="read-pool", label="pool ids")


def stage1_pool(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *,
                adapter: Path | None, source: RowSource) -> ShardedOutput:
    """Stage 1 from the pool files to shards: tokenise (:class:`EncodeQA`) and, with an
    ``adapter``, embed (:class:`EmbedLM`, the warmed-up model) — chained actor pools, one
    parquet shard per read unit, resumable. A shard holds per row id, emb, input_ids,
    response_mask, source (or ``_reject`` / ``_error``)."""
    s, f = cfg.select, cfg.format
    keep = ("input_ids", "response_mask", "source")
    steps = [Step(EncodeQA, {"model": cfg.model, "max_length": f.max_length,
                             "fmt": qa_format(cfg), "chat": f.chat, "keep": ("source",)},
                  pool={"compute": _one_actor(), "num_cpus": min(0.25, s.embed_pool.num_cpus),
                        "batch_size": max(64, s.embed_pool.batch_size),
                        "max_restarts": s.embed_pool.max_restarts,
                        "max_task_retries": s.embed_pool.max_task_retries})]
    if adapter is not None:
        steps.append(Step(EmbedLM, {"model": _actor_model(cfg, str(adapter / "adapter"),
                                                           s.embed_pool),
                                     "telemetry": _telemetry(cfg), "keep": keep},
                          pool=pool_kwargs(s.embed_pool), columns=list(keep)))
    parts = {"adapter": adapter.name if adapter is not None else None, "model": cfg.model,
             "format": f.model_dump(mode="json")}
    return stream_pass(cache, tracker, "embed", parts, source, steps, _say,
                       run_name="stage1-embed", label="stage 1 embed",
                       retries=s.embed_pool.pass_retries)


@dataclasses.dataclass
class PoolIndex:
    """What the driver keeps of a streamed pool: the ids (unique, first row in stream order),
    whether each has an embedding, the ids that occur more than once, and the reject records
    (reader rejects, duplicates, rows that could not be encoded)."""

    ids: np.ndarray
    embedded: np.ndarray
    dups: frozenset[str]
    rejects: pd.DataFrame


def index_pool(out: ShardedOutput, *, report_dups: bool = True) -> PoolIndex:
    """Read a streamed pool output's ids and status column by column, shard by shard. A row
    with the id of an earlier row is a ``duplicate id in the pool`` reject (the driver holds
    the ids: ~100 MB at a million rows). Rows that failed to encode are rejects (file
    ``encode``) and not in the pool; rows that failed later (embed) stay in the pool without
    an embedding, as before streaming."""
    ids: list[np.ndarray] = []
    state: list[np.ndarray] = []  # 0 ok, 1 encode failed, 2 failed later
    recs: list[dict[str, Any]] = []
    for tbl in out.iter_tables(["id", "_reject", ERROR_COLUMN]):
        df = tbl.to_pandas()
        rej = df["_reject"].fillna("").to_numpy() if "_reject" in df else np.full(len(df), "")
        recs += [json.loads(r) for r in rej if r]
        df = df[rej == ""]
        err = df[ERROR_COLUMN].fillna("").astype(str).to_numpy() if ERROR_COLUMN in df else \
            np.full(len(df), "")
        st = np.where(err == "", 0, np.where(np.char.startswith(err.astype(str), ENCODE_ERROR),
                                             1, 2))
        ids.append(df["id"].to_numpy(dtype=object))
        state.append(st)
        for i, e, k in zip(df["id"][st > 0], err[st > 0], st[st > 0]):
            recs.append({"file": "encode", "id": i, "reason": e[len(ENCODE_ERROR):], "raw": ""}
                        if k == 1 else {"file": "embed", "id": i, "reason": e, "raw": ""})
    all_ids = pd.Series(np.concatenate(ids) if ids else np.array([], dtype=object), dtype=object)
    all_st = np.concatenate(state) if state else np.array([], dtype=np.int64)
    dup = all_ids.duplicated(keep="first").to_numpy()
    dups = frozenset(all_ids[dup])
    if report_dups and dup.any():
        recs += [{"file": "pool", "id": i, "reason": "duplicate id in the pool (its first row "
                  "in file order is kept)", "raw": ""} for i in all_ids[dup]]
    first, st = all_ids[~dup].to_numpy(), all_st[~dup]
    bad = set(first[st > 0])  # only first rows count: a later duplicate is never processed
    recs = [r for r in recs if r["file"] not in ("encode", "embed") or r["id"] in bad]
    return PoolIndex(ids=first[st != 1], embedded=st[st != 1] == 0, dups=dups,
                     rejects=pd.DataFrame(recs, columns=REJECT_COLUMNS))


def pool_rows(out: ShardedOutput, columns: list[str], *, dups: frozenset[str],
              keep: Callable[[pd.DataFrame], np.ndarray] | None = None, tokens: bool = False
              ) -> Iterator[pd.DataFrame]:
    """A streamed pool output shard by shard: the good rows (no ``_reject`` / ``_error``; with
    ``tokens`` also the rows that were encoded but failed a later step: they are pool rows
    without an embedding), a duplicated id only at its first row, optionally only the rows
    ``keep`` marks."""
    seen: set[str] = set()
    for tbl in out.iter_tables(["id", *columns, "_reject", ERROR_COLUMN]):
        df = tbl.to_pandas()
        ok = np.ones(len(df), dtype=bool)
        if "_reject" in df:
            ok &= df["_reject"].fillna("").to_numpy() == ""
        if ERROR_COLUMN in df:
            err = df[ERROR_COLUMN].fillna("").astype(str)
            ok &= ~err.str.startswith(ENCODE_ERROR).to_numpy() if tokens else \
                err.to_numpy() == ""
        if dups:
            for j in np.flatnonzero(ok & df["id"].isin(dups).to_numpy()):
                rid = df["id"].iat[j]
                ok[j] = rid not in seen
                seen.add(rid)
        if keep is not None:
            ok &= keep(df)
        if ok.any():
            yield df[ok]


def rows_by_id(out: ShardedOutput, ids: Iterable[str], columns: list[str], *,
               dups: frozenset[str]) -> pd.DataFrame:
    """The rows of a few ids (the candidates, the selected rows) from a streamed pool output,
    in the order of ``ids``; token ids as lists."""
    want = list(ids)
    wanted = set(want)
    parts = list(pool_rows(out, columns, dups=dups, tokens=True,
                           keep=lambda df: df["id"].isin(wanted).to_numpy()))
    got = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", *columns])
    missing = wanted - set(got["id"])
    if missing:
        raise RuntimeError(f"{len(missing)} ids missing from {out.d} (e.g. {sorted(missing)[:3]})")
    got = got.set_index("id").loc[want, columns].reset_index()
    for c in ("input_ids", "response_mask"):
        if c in got:
            got[c] = [list(map(int, v)) for v in got[c]]
    return got


def pool_order(ids: np.ndarray, seed: int) -> np.ndarray:
    """The pool's order: by the seeded subsample hash of the id (``split_and_subsample``, as
    the driver-frame pool was ordered), so results do not depend on file order."""
    return split_and_subsample(pd.DataFrame({"id": ids}), seed=seed)[0]["id"].to_numpy(
        dtype=object)


def stage1_votes(cfg: NTKSelectJob, out: ShardedOutput, dom_emb: np.ndarray, *,
                 dups: frozenset[str]) -> pd.DataFrame:
    """kNN votes of D for the pool, the embeddings read shard by shard
    (:func:`~raydapt.select.votes.knn_votes_streaming`, ``select.index``): id, votes,
    vote_sim of the rows with a vote."""
    s = cfg.select
    opts: dict[str, Any] = {}
    if s.index == "ivf":
        opts = {"nlist": s.index_nlist, "nprobe": s.index_nprobe,
                "train_rows": s.index_train_rows}
    return knn_votes_streaming(dom_emb, (df[["id", "emb"]] for df in pool_rows(
        out, ["emb"], dups=dups)), k=s.k, index=s.index, **opts)


def top_m(ids: np.ndarray, votes: np.ndarray, vote_sim: np.ndarray, m: int,
          block: int = 65_536) -> pd.DataFrame:
    """The top ``m`` pool rows by votes, then summed similarity, then pool order (the
    embedding selector's order) by :class:`StreamingTopN`."""
    top = StreamingTopN(m)
    for i in range(0, len(ids), block):
        top.update(ids[i: i + block], votes[i: i + block], tiebreak=vote_sim[i: i + block])
    return top.result()


def candidates_file(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *,
                    rows: Callable[[], pd.DataFrame], ids: list[str], parts: dict[str, Any]
                    ) -> Path:
    """The stage-2 candidates written once (id, input_ids, response_mask, in ``ids`` order),
    one parquet row group per ``select.shard_rows`` rows = one stage-2 shard. ``rows()``
    fetches them (from the stage-1 shards)."""
    parts = {**parts, "ids": _ids_hash(ids), "shard_rows": cfg.select.shard_rows}

    def compute(d: Path, run_log: RunLogger) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        df = rows()[["id", "input_ids", "response_mask"]]
        tbl = pa.Table.from_pandas(df, preserve_index=False)
        pq.write_table(tbl, d / "candidates.parquet", row_group_size=cfg.select.shard_rows)
        run_log.metrics({"candidates": len(df)})

    return cached_stage(cache, tracker, "candidates", parts, compute=compute,
                        load=lambda d, _: d / "candidates.parquet",
                        run_name="stage1-candidates", say=_say, label="stage-2 candidates")


def stage1_candidates(emb: pd.DataFrame, dom: pd.DataFrame, pool: pd.DataFrame,
                      inputs: SelectionInputs, *, k: int, m: int, seed: int
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 1 of a small in-memory pool (the planted-pool benchmarks) from its embeddings
    (``id``, ``emb``): kNN votes of D (FAISS flat), written into ``inputs.votes`` /
    ``inputs.vote_sim`` (aligned with ``pool``; 0 for rows without an embedding), and the top
    ``m`` pool rows by votes (the embedding selector's order).

    Returns:
        (votes frame id / votes / vote_sim of the embedded pool rows, candidate pool rows).
    """
    from raydapt.select.selectors import knn_votes

    e = emb.set_index("id")
    pool_ok = pool[pool["id"].isin(e.index)].reset_index(drop=True)
    dom_ok = dom[dom["id"].isin(e.index)]
    votes, vote_sim = knn_votes(np.stack(e.loc[dom_ok["id"], "emb"].to_numpy()),
                                np.stack(e.loc[pool_ok["id"], "emb"].to_numpy()), k=k)
    vs = pd.DataFrame({"id": pool_ok["id"], "votes": votes, "vote_sim": vote_sim})
    full = pd.DataFrame({"id": pool["id"]}).merge(vs, on="id", how="left").fillna(0)
    inputs.votes = full["votes"].to_numpy().astype(np.int64)
    inputs.vote_sim = full["vote_sim"].to_numpy()
    top = SELECTORS["embedding"](seed=seed).select(inputs, m)
    return vs, pool.set_index("id").loc[top["id"]].reset_index()


def candidate_source(path: Path, shard_rows: int) -> RowSource:
    """The candidates file as a stream of read units of ``shard_rows`` rows (its row groups)."""
    return open_source(path, normaliser=TokenRows(), unit_rows=shard_rows)


def domain_grads(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                 rows: pd.DataFrame, objective: str) -> np.ndarray:
    """Projected per-sample gradients of D → [Nd, p] (rows that failed are dropped)."""
    out = domain_grads_frame(cfg, cache, tracker, adapter=adapter, rows=rows, objective=objective)
    return np.stack(out["g"].to_numpy()).astype(np.float32)


def domain_grads_frame(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                       rows: pd.DataFrame, objective: str) -> pd.DataFrame:
    """:func:`domain_grads` with the ids: a frame of ``id``, ``g`` (the good rows, D's order)."""
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
    return out


def stage2_scores(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                  source: RowSource, kind: str, against: np.ndarray) -> ShardedOutput:
    """Score the candidates (``source``: the candidates file, one read unit per
    ``select.shard_rows`` rows) against the domain, streamed: each shard is written
    atomically when its rows are back; a rerun computes only the missing shards. Shards hold
    id, score (+ _error, _reject)."""
    s = cfg.select
    objective = "logit_sum" if kind == "ntk" else "loss"
    parts = {"adapter": adapter.name, "model": cfg.model,
             "kind": kind, "score": s.score, "p": s.proj_dim, "seed": s.proj_seed,
             "against": config_hash({"a": np.round(against.astype(np.float64), 6).tolist()}),
             "grad_method": s.grad_method}
    step = Step(GradProject, dict(
        model=_actor_model(cfg, str(adapter / "adapter"), s.grad_pool),
        objective=objective, proj_dim=s.proj_dim, proj_seed=s.proj_seed,
        chunk_rows=s.proj_chunk_rows, vmap_chunk=s.vmap_chunk,
        grad_method=s.grad_method, micro_batch=s.grad_micro_batch,
        adam_state=str(adapter / "adam_exp_avg_sq.pt") if kind == "less" else None,
        score_against=against, score_kind="less" if kind == "less" else s.score,
        stage=f"scores-{kind}", telemetry=_telemetry(cfg)),
        pool=pool_kwargs(s.grad_pool), columns=["input_ids", "response_mask"])
    return stream_pass(cache, tracker, f"scores-{kind}", parts, source, [step], _say,
                       run_name=f"stage2-{kind}", label=f"stage 2 {kind} scores",
                       retries=s.grad_pool.pass_retries)


def frame_candidate_scores(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *,
                           adapter: Path, dom: pd.DataFrame, cand: pd.DataFrame, kind: str
                           ) -> pd.DataFrame:
    """Stage 2 of candidates given as a small driver frame (id, input_ids, response_mask; the
    planted-pool benchmarks): written once as the candidates file, scored streamed as in the
    recipe. Returns id, score, _error in candidate order."""
    path = candidates_file(cfg, cache, tracker, ids=list(cand["id"]), parts={"frame": True},
                           rows=lambda: cand)
    return read_scores(candidate_scores(cfg, cache, tracker, adapter=adapter, dom=dom,
                                        source=candidate_source(path, cfg.select.shard_rows),
                                        kind=kind))


def read_scores(out: ShardedOutput) -> pd.DataFrame:
    """id, score, _error of a score output (the M candidates: ids and scores only)."""
    parts = [t.to_pandas() for t in out.iter_tables(["id", "score", ERROR_COLUMN, "_reject"])]
    df = pd.concat(parts, ignore_index=True)
    if "_reject" in df:
        df = df[df["_reject"].fillna("") == ""].drop(columns="_reject")
    if "score" not in df:
        df["score"] = np.nan
    df[ERROR_COLUMN] = df[ERROR_COLUMN].fillna("") if ERROR_COLUMN in df else ""
    return df[["id", "score", ERROR_COLUMN]].reset_index(drop=True)


def candidate_scores(cfg: NTKSelectJob, cache: StageCache, tracker: Tracker, *, adapter: Path,
                     dom: pd.DataFrame, source: RowSource, kind: str) -> ShardedOutput:
    """Stage 2 for one selector (``ntk``: ⟨ḡ_D, g(c)⟩ of the summed-logit gradients; ``less``:
    max cosine of Adam-preconditioned loss gradients): domain gradients, then the candidates'
    score shards, both cached."""
    g_dom = domain_grads(cfg, cache, tracker, adapter=adapter, rows=dom,
                         objective="logit_sum" if kind == "ntk" else "loss")
    against = g_dom.mean(0) if kind == "ntk" else g_dom
    return stage2_scores(cfg, cache, tracker, adapter=adapter, source=source, kind=kind,
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

    data: dict[str, Any]  # read: domain, tests, rejects, fingerprints (raw rows)
    dom: pd.DataFrame  # read: D, tokenised
    prompts: pd.DataFrame  # read: MC test prompts
    nll_items: pd.DataFrame | None  # read: held-out response-NLL rows (eval.nll)
    rejects: list[pd.DataFrame]  # read, then every step appends its rejects
    counts: dict[str, int]  # read (D, tests), stage1 (pool)
    majority: dict[str, float]
    warm: Path  # warmup: the warm-up adapter
    pool_out: ShardedOutput  # stage1: the streamed pool (tokens, embeddings) as shards
    pool_ids: np.ndarray  # stage1: the pool's ids, in pool order (ids only on the driver)
    dups: frozenset[str]  # stage1: pool ids that occur more than once
    n: int  # stage1: N selected
    m_cand: int  # stage1: M stage-1 candidates
    inputs: SelectionInputs  # stage1 (ids, votes), stage 2 (scores)
    n_cand: int  # stage1: candidates kept (M, or the pool without stage 1)
    cand_source: RowSource | None  # stage1: the candidates file, streamed by stage 2
    score_outs: dict[str, ShardedOutput]  # stage 2: the score shards per selector

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
        self.sources: dict[str, dict[str, int]] = {}

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
        """1. read: D, the test prompts (the pool is streamed by :meth:`stage1`)."""
        cfg = self.cfg
        t0 = time.time()
        with self.tracker.child("read") as run_log:
            data = read_data(cfg)
            self.ctx.parent.params({"data_fingerprint": data["fingerprints"]})
            self.ctx.parent.datasets(data["fingerprints"])
            tok = tokenizer(cfg.model)
            dom, rej_d = encode_rows(data["domain"], tok, cfg)
            prompts = pd.concat([mc_prompts(t, tok, cfg) for t in data["tests"].values()],
                                ignore_index=True)
            rejects = [data["rejects"], rej_d]
            nll_items = None
            if cfg.eval.nll:
                parts_nll = [nll_rows(t, tok, cfg) for t in data["tests"].values()]
                nll_items = pd.concat([p for p, _ in parts_nll], ignore_index=True)
                rejects += [r for _, r in parts_nll]
            counts = {"domain_rows": len(dom),
                      **{f"test_rows.{k}": len(v) for k, v in data["tests"].items()}}
            run_log.metrics(counts)
            _say(f"read: {counts}")
        self.timings["read"] = time.time() - t0
        self.data, self.dom, self.prompts = data, dom, prompts
        self.rejects, self.counts = rejects, counts
        self.nll_items = nll_items
        self.majority = majority_letter_accuracy(data["domain"], data["tests"])  # no model: once

    def warmup(self) -> None:
        """2. warm-up LoRA on D."""
        t0 = time.time()
        self.warm = fit_lora_cached(self.cfg, self.cache, self.tracker, stage="lora",
                                    label="warmup", ids=self.dom["id"].tolist(),
                                    chunks=lambda: [self.dom], train=self.cfg.warmup,
                                    storage=self.out / "train")
        self.timings["warmup"] = time.time() - t0

    def stage1(self) -> None:
        """3. the pool, streamed: (ids → seeded subsample →) tokens + embeddings as shards;
        votes; the top-M candidates written once for stage 2."""
        cfg, s, out = self.cfg, self.s, self.out
        need_stage1 = bool({"ntk", "less", "embedding"} & set(s.selectors))
        t0 = time.time()
        keep, report_dups = None, True
        if cfg.data.max_pool_rows is not None:  # the subsample needs every id first
            ids_out = scan_pool_ids(cfg, self.cache, self.tracker)
            scan = index_pool(ids_out)
            self.rejects.append(scan.rejects)
            kept, _ = split_and_subsample(pd.DataFrame({"id": scan.ids}), seed=cfg.run.seed,
                                          max_rows=cfg.data.max_pool_rows)
            keep, report_dups = frozenset(kept["id"]), False
        self.pool_out = pool_out = stage1_pool(
            cfg, self.cache, self.tracker, adapter=self.warm if need_stage1 else None,
            source=pool_source(cfg, keep))
        idx = index_pool(pool_out, report_dups=report_dups)
        if keep is not None:  # the scan reported the reader's rejects and the duplicates
            idx.rejects = idx.rejects[idx.rejects["file"] == "encode"]
        self.rejects.append(idx.rejects)
        self.dups = idx.dups
        if len(idx.ids) == 0:
            raise DataError("the pool has no usable row (see rejects)")
        overlap = set(idx.ids[pd.Series(idx.ids).isin(set(self.dom["id"])).to_numpy()])
        if overlap:
            raise DataError(f"{len(overlap)} ids occur in both the pool and D (e.g. "
                            f"{sorted(overlap)[:3]}); stages join on id")
        self.pool_ids = pool_ids = pool_order(idx.ids, cfg.run.seed)
        self.counts = {"domain_rows": self.counts["domain_rows"], "pool_rows": len(pool_ids),
                       **{k: v for k, v in self.counts.items() if k != "domain_rows"},
                       "rejects": sum(len(r) for r in self.rejects)}
        self.n, self.m_cand = s.sizes(len(self.dom), len(pool_ids))
        self.ctx.parent.params({"selection": {"N": self.n, "M": self.m_cand,
                                              "D": len(self.dom)}})
        self.ctx.parent.metrics({"pool_rows": len(pool_ids)})
        _say(f"pool: {len(pool_ids)} rows ({pool_out.n_shards} "
             f"shards); N={self.n}, M={self.m_cand}")
        inputs = SelectionInputs(pool_ids=pool_ids)
        self.n_cand, self.cand_source = len(pool_ids), None
        self.score_outs = {}
        if need_stage1:
            emb, rej = split_errors(embed_rows(cfg, self.cache, self.tracker,
                                               adapter=self.warm, rows=self.dom), "embed")
            self.rejects.append(rej)
            dom_ok = self.dom[self.dom["id"].isin(emb["id"])]
            dom_emb = np.stack(emb.set_index("id").loc[dom_ok["id"], "emb"].to_numpy())
            voted = stage1_votes(cfg, pool_out, dom_emb, dups=self.dups)
            full = pd.DataFrame({"id": pool_ids}).merge(voted, on="id", how="left").fillna(0)
            inputs.votes = full["votes"].to_numpy().astype(np.int64)
            inputs.vote_sim = full["vote_sim"].to_numpy()
            emb_ok = set(idx.ids[idx.embedded]) if not idx.embedded.all() else None
            vs = full if emb_ok is None else full[full["id"].isin(emb_ok)]
            vs.assign(votes=vs["votes"].astype(np.int64)).reset_index(drop=True).to_parquet(
                out / "stage1_votes.parquet")
            cand = top_m(pool_ids, inputs.votes, inputs.vote_sim, self.m_cand)
            self.n_cand = len(cand)
            _say(f"stage 1: {int((inputs.votes > 0).sum())} pool samples got votes; "
                 f"kept M={len(cand)}")
            if {"ntk", "less"} & set(s.selectors):
                path = candidates_file(
                    cfg, self.cache, self.tracker, ids=list(cand["id"]),
                    parts={"embed": pool_out.d.name},
                    rows=lambda: rows_by_id(pool_out, cand["id"],
                                            ["input_ids", "response_mask"], dups=self.dups))
                self.cand_source = candidate_source(path, s.shard_rows)
            self.timings["stage1"] = time.time() - t0
        self.inputs = inputs

    def scores_for(self, kind: str) -> None:
        """4. stage 2: projected-gradient scores of the candidates (ntk or less), streamed."""
        cfg, out = self.cfg, self.out
        t0 = time.time()
        assert self.cand_source is not None
        so = candidate_scores(cfg, self.cache, self.tracker, adapter=self.warm, dom=self.dom,
                              source=self.cand_source, kind=kind)
        sc, rej = split_errors(read_scores(so), f"scores-{kind}")
        self.rejects.append(rej)
        sc.to_parquet(out / f"scores_{kind}.parquet")
        self.score_outs[kind] = so
        self.timings[f"stage2_{kind}"] = time.time() - t0

    def select(self, name: str) -> pd.DataFrame:
        """5. selection: N samples by one selector (ntk / less: the streaming top-N of the
        score shards; embedding / random: from the pool's ids and votes)."""
        out = self.out
        with self.tracker.child(f"select-{name}") as run_log:
            if name in self.score_outs:
                top = StreamingTopN(self.n)
                for tbl in self.score_outs[name].iter_tables(
                        ["id", "score", ERROR_COLUMN, "_reject"]):
                    top.update_table(tbl)
                sel = top.result()
            else:
                sel = SELECTORS[name](seed=self.cfg.run.seed).select(self.inputs, self.n)
            sel.to_parquet(out / f"selected_{name}.parquet")
            run_log.artifact(out / f"selected_{name}.parquet", "selected")
            run_log.metrics({"selected": len(sel)})
        return sel

    def domain_only(self) -> None:
        """Baseline: LoRA on D alone, evaluated."""
        t0 = time.time()
        ad = fit_lora_cached(self.cfg, self.cache, self.tracker, stage="lora",
                             label="finetune-domain_only", ids=self.dom["id"].tolist(),
                             chunks=lambda: [self.dom], train=self.cfg.finetune,
                             storage=self.out / "train")
        self.timings["finetune_domain_only"] = time.time() - t0
        self.evaluate("domain_only", ad)

    def selection(self, name: str) -> None:
        """4-7 for one selector: (stage-2 scores →) selection → fine-tune on D ∪ S → evaluation.
        S's token ids are read back from the stage-1 shards (N rows)."""
        if name in ("ntk", "less") and name not in self.score_outs:
            self.scores_for(name)
        sel = self.select(name)
        t0 = time.time()
        s_ids = sel["id"].tolist()
        self.selections[name] = sel
        self.sources[name] = rows_by_id(self.pool_out, s_ids, ["source"], dups=self.dups)[
            "source"].value_counts().to_dict()
        _say(f"select {name}: {len(sel)} samples; sources "
             f"{dict(list(self.sources[name].items())[:8])}")

        def chunks() -> Iterator[pd.DataFrame]:  # D, then S's tokens a chunk of ids at a time
            yield self.dom[["id", "input_ids", "response_mask"]]
            for i in range(0, len(s_ids), SELECTED_CHUNK_ROWS):
                yield rows_by_id(self.pool_out, s_ids[i:i + SELECTED_CHUNK_ROWS],
                                 ["input_ids", "response_mask"], dups=self.dups)

        ad = fit_lora_cached(self.cfg, self.cache, self.tracker, stage="lora",
                             label=f"finetune-{name}", ids=self.dom["id"].tolist() + s_ids,
                             chunks=chunks, train=self.cfg.finetune, storage=self.out / "train")
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
            "sizes": {"D": len(self.dom), "pool": len(self.pool_ids), "M": self.n_cand,
                      "N": self.n, "test": {k: len(v) for k, v in data["tests"].items()}},
            "selected_sources": {name: self.sources[name] for name in self.selections},
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
