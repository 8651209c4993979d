"""SimDA recipe: kNN-augmented LLM annotation of the target domain, then distillation.

Steps, in order (:meth:`SimDARecipe.run`; each cached stage a child MLflow run):

1. read      source (labeled) and target (unlabeled for training, labeled test split) -> rejects
   (template  score ``teacher.templates`` on labelled source rows; only when given)
2. teacher   one LLM pass over source, target-train and target-test prompts T(x):
             last-token hidden state (key / h_T) + verbalizer log-probs (p_LLM)
3. store     FAISS index over the source keys, values = source labels
   (select    k / tau / lam chosen on source or dev labels; then the config that runs is
              recorded: MLflow params and config.yaml)
4. knn       k nearest source keys for every target row -> p_kNN, neighbour ids
   (stream   with ``data.stream_target_train``, the teacher (2) and kNN (4) of the target-train
             rows run here instead, as one chain of actor pools from the target files to
             parquet shards; the driver holds the ids, the test split and p_LLM only)
5. prompted  LLM passes with demonstrations: ICL-random / ICL-nearest baselines on the test
             split, and the kNN-augmented prompt teacher (if ``annotate.teacher_prompt``)
6. annotate  p_T = lam * p_kNN + (1 - lam) * p_LLM, pseudo-label, confidence -> annotations.parquet
7. students  Ray Train fits: distilled (kl_sim, kl, ce) and baselines (source_only, oracle)
8. report    accuracy table (teacher read-outs + students), confusion matrices, results.json
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.config import config_hash
from raydapt.core.assets import load_tokenizer, resolve_model
from raydapt.data.readers import (
    META_COLUMNS,
    DataError,
    Fields,
    RowSource,
    TextRows,
    check_disjoint_ids,
    drop_duplicate_ids,
    fingerprint,
    open_source,
    read_rows,
    split_and_subsample,
    unit_hash,
)
from raydapt.engines.base import check_single_tokens
from raydapt.evaluate import accuracy, confusion_matrix, plot_confusions
from raydapt.job import Recipe, speaker
from raydapt.recipes.simda_config import SimDAJob
from raydapt.stages.annotate import calibrator, mix
from raydapt.stages.common import ERROR_COLUMN, concat_rejects, pool_kwargs, split_errors
from raydapt.stages.sharded import (
    Step,
    ids_only,
    output_rejects,
    sharded_pass,
    stream_pass,
    write_rows,
)
from raydapt.stages.teacher import KnnSearch, TeacherScore, build_index, save_store
from raydapt.train import per_worker_batch, plan_steps
from raydapt.train.settings import StudentTrain, from_section
from raydapt.train.student import fit_student

# The cached stages this recipe owns and their code versions (bump one when its code changes
# what it writes; read / store / knn are not cached today: their versions only name them).
STAGE_VERSIONS: dict[str, int] = {
    "read": 1, "teacher": 3, "store": 1, "knn": 1, "prompted": 3,
    "template": 1,  # teacher.templates scored on labelled source rows (one entry per template)
    "teacher-dev": 1,  # the teacher pass over data.dev rows (annotate.select_on_dev)
    "student-rows": 1,  # a student's rows, which its Ray Train workers read (write_rows)
    "target-ids": 1,  # data.stream_target_train: the target's ids and reader rejects (read → id)
    "target-train": 1,  # data.stream_target_train: teacher → kNN over the target-train files
}

STUDENT_SHARD_ROWS = 4096  # rows per shard of a student's training rows

_say = speaker("simda")


def check_verbalizer(cfg: SimDAJob) -> list[int]:
    """Fail fast, in the driver, if a label word is not one token for the teacher's tokenizer."""
    tok = load_tokenizer(cfg.teacher.model, revision=cfg.teacher.revision,
                         trust_remote_code=cfg.teacher.trust_remote_code,
                         token=cfg.teacher.hf_token)
    words = {cfg.teacher.verbalizer[lab]: tok(cfg.teacher.verbalizer[lab],
                                              add_special_tokens=False)["input_ids"]
             for lab in cfg.data.labels}
    return check_single_tokens(words, cfg.teacher.model)


def teacher_kwargs(cfg: SimDAJob, *, keep_hidden: bool, stage: str,
                   demo_texts: dict[str, str] | None = None,
                   demo_labels: dict[str, str] | None = None,
                   micro_batch: int | None = None) -> dict[str, Any]:
    """The :class:`TeacherScore` actor's constructor kwargs for one pass of the job's teacher."""
    t = cfg.teacher
    return dict(engine=t.engine_args(need_hidden=keep_hidden), micro_batch=micro_batch,
                label_words=[t.verbalizer[lab] for lab in cfg.data.labels],
                template=t.template, text_max_tokens=t.text_max_tokens,
                text_truncation=t.text_truncation, demo_template=t.demo_template,
                demo_max_tokens=t.demo_max_tokens, demo_texts=demo_texts,
                demo_labels=demo_labels, keep_hidden=keep_hidden, stage=stage,
                telemetry={"method": "simda", "run": cfg.run.name})


def knn_kwargs(cfg: SimDAJob, store: Path) -> dict[str, Any]:
    """The :class:`KnnSearch` actor's constructor kwargs: the job's store, k, tau, norm."""
    a = cfg.annotate
    return dict(store=str(store.resolve()), k=a.k, num_classes=len(cfg.data.labels), tau=a.tau,
                distance_norm=a.distance_norm,
                telemetry={"method": "simda", "run": cfg.run.name})


KNN_POOL = {"num_cpus": 0.25, "batch_size": 256}  # one actor (the store is small)
SORT_BATCHES = 16  # streamed teacher: engine batches per map batch, sorted by length


def run_teacher(rows: pd.DataFrame, cfg: SimDAJob, *, keep_hidden: bool, stage: str,
                 demo_texts: dict[str, str] | None = None,
                 demo_labels: dict[str, str] | None = None):
    """One Ray Data actor-pool pass of the teacher over ``rows`` (id, text[, demo_ids]).
    Returns the (lazy) output dataset: id, llm_logp [C], hidden [H] (if ``keep_hidden``), _error."""
    import ray

    # one block per output shard: a shard is complete as soon as its block comes back
    step = cfg.teacher.pool.shard_rows
    ds = ray.data.from_pandas([rows.iloc[i : i + step] for i in range(0, max(len(rows), 1), step)])
    return ds.map_batches(
        TeacherScore,
        fn_constructor_kwargs=teacher_kwargs(cfg, keep_hidden=keep_hidden, stage=stage,
                                             demo_texts=demo_texts, demo_labels=demo_labels),
        **pool_kwargs(cfg.teacher.pool),
    )


@dataclass(frozen=True)
class TrainSplit:
    """The target-train side of :func:`~raydapt.data.readers.split_and_subsample` as a rule on
    each row's id, for a streamed read (``data.stream_target_train``): outside the seeded test
    fraction and, with ``data.max_target_train_rows``, a subsample hash at most ``max_u`` (the
    hash of the cap-th lowest train row). Its repr keys the streamed pass."""

    seed: int
    test_fraction: float
    max_u: float | None = None

    def __call__(self, rows: pd.DataFrame) -> np.ndarray:
        keep = unit_hash(rows["id"], seed=self.seed, salt="split") >= self.test_fraction
        if self.max_u is not None:
            keep &= unit_hash(rows["id"], seed=self.seed, salt="subsample") <= self.max_u
        return keep


def target_source(cfg: SimDAJob, *, keep_ids: frozenset[str] | None = None,
                  row_filter: TrainSplit | None = None) -> RowSource:
    """The target file(s) planned into read units of ``data.target_unit_rows`` rows, text rows
    normalised in the read tasks (labels optional)."""
    d = cfg.data
    norm = TextRows(fields=_fields(d.target), labels=tuple(d.labels), require_label=False)
    return open_source(Path(d.root) / d.target.path, fmt=d.target.format, normaliser=norm,
                       unit_rows=d.target_unit_rows, keep_ids=keep_ids, row_filter=row_filter)


def collect_rows(source: RowSource) -> pd.DataFrame:
    """The good rows of a (small, filtered) streamed read, in file order."""
    df = source.dataset(size_hint=True).to_pandas()
    df = df[(df["_pos"] >= 0) & (df["_reject"] == "")].sort_values(["_unit", "_pos"])
    return df.drop(columns=list(META_COLUMNS)).reset_index(drop=True)


def _frame_hash(df: pd.DataFrame) -> str:
    """Content hash of a DataFrame whose cells may be arrays (p_t, h_t)."""
    import hashlib

    h = hashlib.sha256()
    for col in sorted(df.columns):
        v = df[col].to_numpy()
        h.update(col.encode())
        if v.dtype == object and len(v) and isinstance(v[0], (np.ndarray, list)):
            h.update(np.ascontiguousarray(np.stack(v).astype(np.float64)).tobytes())
        else:
            h.update(pd.util.hash_pandas_object(df[col], index=False).to_numpy().tobytes())
    return h.hexdigest()


def _teacher_key(t) -> dict[str, Any]:
    """What a teacher pass's cache key holds of the teacher: its settings (no pool or secret)
    and the fingerprint of its weights."""
    return {"teacher": t.model_dump(mode="json", exclude={"pool", "hf_token"}),
            "weights": resolve_model(t.model).fingerprint}


LOSS_KEYS = ("beta", "temperature", "sim_tau", "sim_loss", "sim_center")


def student_train_kw(dcfg) -> dict[str, Any]:
    """A student's optimisation and scaling fields of the distill section: the
    :class:`~raydapt.train.settings.StudentTrain` fields (:func:`from_section`) but the loss
    knobs and ``min_confidence`` (its run-name hash and MLflow params)."""
    train = from_section(StudentTrain, dcfg, min_confidence=0.0)
    return {f.name: getattr(train, f.name) for f in dc_fields(train)
            if f.name not in (*LOSS_KEYS, "min_confidence")}


def matched_steps(rows: int, batch_size: int, workers: int, epochs: int) -> int:
    """Optimiser steps of ``epochs`` passes over ``rows``, as the students count them (the one
    rule, :func:`raydapt.train.plan_steps`: per worker batch_size // workers, equal slices, last
    partial batch dropped): the budget every step-matched student gets."""
    return plan_steps(rows, workers=workers, per_worker_batch=per_worker_batch(
        batch_size, workers), epochs=epochs, name="distill").total


def student_steps(dcfg, distill_rows: int) -> dict[str, int | None]:
    """Each student's step budget (``steps`` of its fit): every student but the
    ``source_only_all`` reference trains the same number of optimiser steps, ``distill.steps``
    or :func:`matched_steps` of ``distill.epochs`` over the ``distill_rows`` pseudo-labelled
    rows, whatever its own row count (step-matched baselines); ``source_only_all`` (None) runs
    ``distill.epochs`` over its rows. Counted only when a matched student runs: a too-small
    distillation set is then an error."""
    steps = None
    if set(dcfg.variants) - {"source_only_all"}:
        steps = dcfg.steps or matched_steps(distill_rows, dcfg.batch_size, dcfg.num_workers,
                                            dcfg.epochs)
    return {v: None if v == "source_only_all" else steps for v in dcfg.variants}


def results_table(results: dict[str, float], students: dict[str, dict[str, Any]]) -> str:
    """method -> target-test accuracy, teacher read-outs first; students with rows and steps."""
    lines = []
    width = max(len(k) for k in results)
    for k in sorted(results, key=lambda k: (not k.startswith("teacher:"), k)):
        st = students.get(k.split(":", 1)[1], {}) if k.startswith("student:") else {}
        extra = f"  ({st['rows']} rows, {st['steps']} steps)" if st.get("steps") else ""
        lines.append(f"  {k:<{width}}  {results[k]:.4f}{extra}")
    return "\n".join(lines)


def _by_length(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by text length (stable), so a teacher batch pads little."""
    return rows.iloc[np.argsort(rows["text"].str.len().to_numpy(), kind="stable")].reset_index(
        drop=True)


def _p_llm(df: pd.DataFrame) -> np.ndarray:
    z = np.stack(df["llm_logp"].to_numpy()).astype(np.float64)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _fields(d) -> Fields:
    """The id / text / label columns a domain's config names."""
    return Fields(d.id_field, d.text_field, d.label_field)


def read_dev(cfg: SimDAJob, *, source: pd.DataFrame, target: pd.DataFrame,
             rejects: list[pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """The labelled dev rows of ``data.dev`` (every row needs a label; a seeded subsample of
    ``data.max_dev_rows``), disjoint in id from source and target; returns (rows,
    fingerprint) and appends the dev file's rejects to ``rejects``."""
    d = cfg.data.dev
    path = Path(cfg.data.root) / d.path
    ds, rej = read_rows(path, fmt=d.format, fields=_fields(d), labels=cfg.data.labels)
    dev, dup = drop_duplicate_ids(ds.to_pandas(), file=str(path))
    check_disjoint_ids(dev, source, what="data.dev and the source")
    check_disjoint_ids(dev, target, what="data.dev and the target")
    dev, _ = split_and_subsample(dev, seed=cfg.run.seed, max_rows=cfg.data.max_dev_rows)
    if len(dev) == 0:
        raise DataError(f"data.dev ({path}) has no usable labelled rows")
    rejects.extend([rej.to_pandas(), dup])
    return dev.reset_index(drop=True), fingerprint(path)



@dataclass(frozen=True)
class Rows:
    """What ``read`` gives: the seeded splits, fingerprints, counts."""

    source: pd.DataFrame  # labelled source rows (a seeded subsample)
    source_all: pd.DataFrame  # every usable source row (the source_only_all reference)
    tgt_train: pd.DataFrame  # unlabelled for the teacher (gold kept only for evaluation)
    tgt_test: pd.DataFrame
    fps: dict[str, str]
    counts: dict[str, int]
    dev: pd.DataFrame | None = None  # data.dev rows (annotate.select_on_dev)
    dev_fp: str | None = None
    # data.stream_target_train: tgt_train is empty; its rows are the rule's, streamed from the
    # files (ids that occur twice: only the first row counts)
    train_split: TrainSplit | None = None
    train_dups: frozenset[str] = frozenset()


class SimDARecipe(Recipe):
    """One SimDA job: :meth:`run` lists the steps; each step sets its own attributes below."""

    STAGE_VERSIONS = STAGE_VERSIONS
    cfg: SimDAJob

    rows: Rows  # read
    rejects: list[pd.DataFrame]  # read, then every step appends its rejects
    parts: dict[str, Any]  # teacher: the teacher pass's cache key (the prompted pass extends it)
    by_id: pd.DataFrame  # teacher: id -> llm_logp, hidden
    source: pd.DataFrame  # teacher: the rows the teacher scored, per split
    tgt_train: pd.DataFrame
    tgt_test: pd.DataFrame
    store: Path  # store
    keys: np.ndarray
    knn: pd.DataFrame  # knn: id -> nbr_ids, nbr_dist, p_knn
    test_b: pd.DataFrame  # prompted: the test rows of the ICL baselines
    prompted: pd.DataFrame  # prompted: id -> llm_logp
    train_out: Any  # stream_target_train: the target-train shards (ShardedOutput)
    cal: Any  # annotate: the label-free calibration fitted on target-train rows
    p_t: np.ndarray  # annotate (frames)
    distill: tuple[Any, int, str]  # annotate (stream): distilled rows (ShardedOutput, rows, key)
    oracle_rows: int  # annotate (stream): labelled target-train rows
    pseudo_acc: float
    teacher_preds: dict[str, tuple[np.ndarray, np.ndarray]]  # teacher_readouts
    results: dict[str, float]  # students (teacher read-outs added by the report)
    students: dict[str, dict[str, Any]]
    cms: dict[str, np.ndarray]
    student_seed: int

    def run(self) -> dict[str, Any]:
        """The steps, in order; returns the results dict also written to results.json."""
        cfg = self.cfg
        self.read()
        check_verbalizer(cfg)
        if cfg.teacher.templates:
            self.select_template()
        self.teacher_pass()
        self.data_store()
        if isinstance(cfg.annotate.calibrate_prior, str):
            self.estimate_prior()
        if cfg.annotate.select_on_source:
            self.select_on_source()
        elif cfg.annotate.select_on_dev:
            self.select_on_dev()
        elif cfg.annotate.select_on_target:
            self.select_on_target()
        self.record_config()  # the config that runs from here on: MLflow params, config.yaml
        self.knn_pass()
        if cfg.data.stream_target_train:
            self.stream_target_train()
        self.prompted_passes()
        self.annotate()
        self.teacher_readouts()
        self.train_students()
        return self.report()

    # -- 1. read ----------------------------------------------------------------------------

    def read(self) -> None:
        """1. read: source and target rows, splits, rejects, fingerprints."""
        cfg, ctx, labels = self.cfg, self.ctx, self.cfg.data.labels
        root = Path(cfg.data.root)
        src_path, tgt_path = root / cfg.data.source.path, root / cfg.data.target.path
        fps = {"source": fingerprint(src_path),  # streamed: the files' and reader's hash
               "target": target_source(cfg).fingerprint() if cfg.data.stream_target_train
               else fingerprint(tgt_path)}
        ctx.parent.params({"data_fingerprint": fps})
        ctx.parent.datasets(fps, sources={"source": str(src_path), "target": str(tgt_path)})
        with ctx.tracker.child("read") as run_log:
            src_ds, src_rej = read_rows(src_path, fmt=cfg.data.source.format,
                                        fields=_fields(cfg.data.source), labels=labels)
            src_df, src_dup = drop_duplicate_ids(src_ds.to_pandas(), file=str(src_path))
            source, _ = split_and_subsample(src_df, seed=cfg.run.seed,
                                            max_rows=cfg.data.max_source_rows)
            split, dups = None, frozenset()
            if cfg.data.stream_target_train:  # ids in the driver, rows in files
                tgt_df, tgt_test, tgt_rej, tgt_dup, split, dups, n_train = self.scan_target(
                    tgt_path)
                tgt_train = tgt_test.iloc[:0]
            else:
                tgt_ds, tgt_rej = read_rows(tgt_path, fmt=cfg.data.target.format,
                                            fields=_fields(cfg.data.target), labels=labels,
                                            require_label=False)
                tgt_df, tgt_dup = drop_duplicate_ids(tgt_ds.to_pandas(), file=str(tgt_path))
                tgt_rej = tgt_rej.to_pandas()
                tgt_train, tgt_test = split_and_subsample(
                    tgt_df, seed=cfg.run.seed,
                    test_fraction=cfg.data.target_test_fraction,
                    max_rows=cfg.data.max_target_train_rows,
                    max_test_rows=cfg.data.max_target_test_rows)
            check_disjoint_ids(src_df, tgt_df, what="source and target")
            unlabeled_test = tgt_test[tgt_test["y"] < 0]
            tgt_test = tgt_test[tgt_test["y"] >= 0].reset_index(drop=True)
            rejects = [src_rej.to_pandas(), tgt_rej, src_dup, tgt_dup, pd.DataFrame({
                "file": str(tgt_path), "id": unlabeled_test["id"],
                "reason": "target test row without a label", "raw": ""})]
            if split is None:
                n_train = len(tgt_train)
            counts = {"source_rows": len(source), "target_train_rows": n_train,
                      "target_test_rows": len(tgt_test),
                      "source_rejects": src_rej.count() + len(src_dup),
                      "target_rejects": len(tgt_rej) + len(tgt_dup) + len(unlabeled_test)}
            run_log.params({"source": str(src_path), "target": str(tgt_path),
                            "seed": cfg.run.seed})
            run_log.metrics(counts)
            _say(f"read: {counts}")
            if len(source) < cfg.annotate.k:
                raise DataError(f"{len(source)} usable source rows < annotate.k={cfg.annotate.k}")
            if n_train == 0 or len(tgt_test) == 0:
                raise DataError("the target train or test split is empty: check data.target, its "
                                "labels and data.target_test_fraction")
        dev = dev_fp = None
        if cfg.annotate.select_on_dev:  # a labelled third domain (config checks data.dev is set)
            dev, dev_fp = read_dev(cfg, source=src_df, target=tgt_df, rejects=rejects)
            ctx.parent.params({"data_fingerprint": {"dev": dev_fp}})
            _say(f"read: {len(dev)} dev rows ({cfg.data.dev.path}) for annotate.select_on_dev")
        self.rows = Rows(source=source, source_all=src_df, tgt_train=tgt_train, tgt_test=tgt_test,
                         fps=fps, counts=counts, dev=dev, dev_fp=dev_fp, train_split=split,
                         train_dups=dups)
        self.rejects = rejects

    def scan_target(self, path: Path):
        """``read`` with ``data.stream_target_train``: the target's ids streamed from its files
        (read → id; cached, reader rejects kept), the seeded split drawn from them as
        :func:`split_and_subsample` draws it, the test rows read back by id (few), and the
        train side as a :class:`TrainSplit` rule for the streamed pass. Returns (ids frame,
        test rows, reader rejects, duplicate-id rejects, rule, duplicated ids, train rows)."""
        cfg, ctx, d = self.cfg, self.ctx, self.cfg.data
        out = stream_pass(ctx.cache, ctx.tracker, "target-ids", {}, target_source(cfg),
                          [Step(ids_only)], _say, run_name="read-target", label="target ids")
        rej = output_rejects(out, "read-target")
        parts = [t.to_pandas() for t in out.iter_tables(["id", "_reject"])]
        ids = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["id", "_reject"])
        ids = ids[ids["_reject"].fillna("") == ""].drop(columns="_reject").reset_index(drop=True)
        dup = ids["id"].duplicated(keep="first").to_numpy()
        dup_rej = pd.DataFrame({"file": str(path), "id": ids["id"][dup],
                                "reason": "duplicate id (the first row with this id is kept)",
                                "raw": ""}).reset_index(drop=True)
        dups = frozenset(ids["id"][dup])
        ids = ids[~dup].reset_index(drop=True)
        u_split = unit_hash(ids["id"], seed=cfg.run.seed, salt="split")
        u_take = unit_hash(ids["id"], seed=cfg.run.seed, salt="subsample")
        is_test = u_split < d.target_test_fraction
        order = np.argsort(u_take[is_test], kind="stable")[: d.max_target_test_rows]
        test_ids = ids["id"].to_numpy()[is_test][order]
        u_train = np.sort(u_take[~is_test])
        n_train = min(len(u_train), d.max_target_train_rows or len(u_train))
        max_u = float(u_train[n_train - 1]) if (
            d.max_target_train_rows and n_train < len(u_train)) else None
        test = collect_rows(target_source(cfg, keep_ids=frozenset(test_ids)))
        test = test.drop_duplicates("id").set_index("id").loc[test_ids].reset_index()
        _say(f"target: {len(ids)} rows ({len(ids) - int(is_test.sum())} train side, "
             f"{int(is_test.sum())} test side); {n_train} train rows streamed, "
             f"{len(test)} test rows read")
        return (ids, test, rej, dup_rej,
                TrainSplit(cfg.run.seed, d.target_test_fraction, max_u), dups, n_train)

    def _teacher_rows(self, stage: str, parts: dict[str, Any], rows: pd.DataFrame, cfg=None, *,
                      keep_hidden: bool, run_name: str | None = None, **demos) -> pd.DataFrame:
        """One sharded, cached teacher pass over ``rows`` (id, text[, demo_ids]) with ``cfg``'s
        teacher (default the job's); returns the good rows, rejects kept."""
        cfg = cfg or self.cfg
        self.ctx.tracker.stage_params(run_name or stage, {  # the teacher run's params
            "rows": len(rows), "keep_hidden": keep_hidden, "demonstrations": bool(demos),
            **cfg.teacher.model_dump(mode="json", exclude={"hf_token", "verbalizer"})})
        got = sharded_pass(
            self.ctx.cache, self.ctx.tracker, stage, parts, _by_length(rows),
            cfg.teacher.pool.shard_rows,
            lambda shards: run_teacher(pd.concat(shards), cfg, keep_hidden=keep_hidden,
                                       stage=run_name or stage, **demos), _say,
            run_name=run_name, retries=cfg.teacher.pool.pass_retries)
        got, rej = split_errors(got, run_name or stage)
        self.rejects.append(rej)
        return got

    # -- template (optional) ----------------------------------------------------------------

    def select_template(self) -> None:
        """Score each of ``teacher.templates`` zero-shot on a seeded subset of labelled SOURCE
        rows (p_LLM calibrated on those rows as the target's will be) and choose the best as
        ``teacher.template``. Target labels are never used."""
        cfg, ctx = self.cfg, self.ctx
        t, a = cfg.teacher, cfg.annotate
        rows = self.rows.source.head(t.template_select_rows)  # source is a seeded shuffle
        accs = []
        for i, tpl in enumerate(t.templates):
            c = cfg.model_copy(update={"teacher": t.model_copy(update={"template": tpl})})
            parts = {**_teacher_key(c.teacher), "data": self.rows.fps,
                     "ids": config_hash(rows["id"].tolist())}
            n_rej = len(self.rejects)
            got = self._teacher_rows("template", parts, rows[["id", "text"]], c,
                                     keep_hidden=False, run_name=f"template-{i}")
            del self.rejects[n_rej:]  # a candidate template's failures are not the job's rejects
            y = rows.set_index("id").loc[got["id"], "y"].to_numpy()
            p = _p_llm(got)
            accs.append(accuracy(y, calibrator(a.calibrate_llm, p, a.calibrate_prior)(p)
                                 .argmax(1)))
        best = int(np.argmax(accs))
        with ctx.tracker.child("select-template") as run_log:
            run_log.params({"chosen": best, "template": t.templates[best], "rows": len(rows),
                            **{f"template_{i}": tpl for i, tpl in enumerate(t.templates)}})
            run_log.metrics({f"source_acc.template_{i}": v for i, v in enumerate(accs)})
        (ctx.out / "select-template.json").write_text(json.dumps(
            {"chosen": t.templates[best], "source_accuracy": dict(zip(t.templates, accs))},
            indent=2))
        _say(f"template chosen on {len(rows)} source rows: #{best} {t.templates[best]!r} "
             f"(source accuracies {[round(x, 4) for x in accs]})")
        self.choose("teacher", template=t.templates[best])

    # -- 2. teacher, 3. store ---------------------------------------------------------------

    def teacher_pass(self) -> None:
        """2. teacher pass: keys + p_LLM for source / target-train / target-test."""
        r = self.rows
        parts = {**_teacher_key(self.cfg.teacher),
                 "data": r.fps, "ids": config_hash({"s": r.source["id"].tolist(),
                                                    "tr": r.tgt_train["id"].tolist(),
                                                    "te": r.tgt_test["id"].tolist()})}
        allrows = pd.concat([r.source[["id", "text"]], r.tgt_train[["id", "text"]],
                             r.tgt_test[["id", "text"]]], ignore_index=True)
        by_id = self._teacher_rows("teacher", parts, allrows, keep_hidden=True).set_index("id")

        def scored(df: pd.DataFrame) -> pd.DataFrame:
            return df[df["id"].isin(by_id.index)].reset_index(drop=True)

        self.parts, self.by_id = parts, by_id
        self.source, self.tgt_train, self.tgt_test = (scored(r.source), scored(r.tgt_train),
                                                      scored(r.tgt_test))

    def data_store(self) -> None:
        """3. data store: the source keys in a FAISS index, with their labels."""
        store = self.ctx.out / "store"
        keys = np.stack(self.by_id.loc[self.source["id"], "hidden"].to_numpy()).astype(np.float32)
        save_store(store, build_index(keys, kind=self.cfg.annotate.index),
                   self.source["id"].tolist(), self.source["y"].to_numpy())
        _say(f"store: {len(self.source)} keys of width {keys.shape[1]} ({self.cfg.annotate.index})")
        self.store, self.keys = store, keys

    # -- select (optional): k / tau / lam on labelled rows ----------------------------------

    def _choose_k_tau_lam(self, on: str, nbr_dist: np.ndarray, nbr_labels: np.ndarray,
                          p_llm: np.ndarray, y: np.ndarray, *, params: dict[str, Any],
                          in_json: dict[str, Any] | None = None
                          ) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Score the k / tau / lam grid on labelled rows (their neighbours in the source
        store, their p_LLM calibrated on themselves as the target's is on the target rows,
        their gold labels ``y``); log the curve to the MLflow child run ``select-on-<on>`` and
        to ``select-on-<on>.json`` (``in_json`` first); choose the best. Returns the best and
        the curve."""
        from raydapt.stages.annotate import select_on_source as choose

        a, ctx = self.cfg.annotate, self.ctx
        p = self._calibrate_labelled(p_llm, y)
        best, curve = choose(nbr_dist, nbr_labels, p, y, ks=a.k_grid, taus=a.tau_grid,
                             lams=a.lam_grid, distance_norm=a.distance_norm)
        out = ctx.out / f"select-on-{on}.json"
        with ctx.tracker.child(f"select-on-{on}") as run_log:
            run_log.params({"chosen": best, **params})
            run_log.curves(curve, x="lam", y="accuracy", series=("k", "tau"), best=best,
                           name=f"select-on-{on}-curves", title=f"{on} accuracy over lam per "
                           f"(k, tau); chosen k={best['k']} tau={best['tau']} lam={best['lam']}")
            run_log.metrics({f"best_{on}_accuracy": best["accuracy"]})
            out.write_text(json.dumps({**(in_json or {}), "best": best, "curve": curve}))
            run_log.artifact(out)
        self.choose("annotate", **{k: best[k] for k in ("k", "tau", "lam")})
        return best, curve

    def _calibrate_labelled(self, p_llm: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Labelled rows' p_LLM calibrated on themselves as the target's is on the target rows;
        with a non-uniform calibrate_prior (the target's), to their own label prior instead."""
        a = self.cfg.annotate
        if a.calibrate_llm == "prior" and a.calibrate_prior is not None:
            own = np.bincount(y, minlength=p_llm.shape[1]) / len(y)
            return calibrator("prior", p_llm, list(own))(p_llm)
        return calibrator(a.calibrate_llm, p_llm, a.calibrate_prior)(p_llm)

    def select_on_source(self) -> None:
        """k, tau, lam chosen on the labelled source rows: leave-one-out neighbours in the
        source store, the source rows' p_LLM calibrated on the source rows (as the target's is
        on the target rows)."""
        from raydapt.stages.teacher import loo_neighbours

        a, source = self.cfg.annotate, self.source
        d, idx = loo_neighbours(self.keys, max(a.k_grid), kind=a.index)
        y = source["y"].to_numpy()
        best, curve = self._choose_k_tau_lam("source", d, y[idx],
                                             _p_llm(self.by_id.loc[source["id"]]), y,
                                             params={"rows": len(source)})
        _say(f"select on source ({len(source)} labelled rows, leave-one-out): k={best['k']} "
             f"tau={best['tau']} lam={best['lam']} (source accuracy {best['accuracy']:.4f}; "
             f"lam=0: {max(r['accuracy'] for r in curve if r['lam'] == 0):.4f}, lam=1 best: "
             f"{max(r['accuracy'] for r in curve if r['lam'] == 1):.4f})")

    def select_on_dev(self) -> None:
        """k, tau, lam chosen on ``data.dev``, a labelled third domain taken as a target of the
        source store: a teacher pass over the dev rows, their neighbours in the store, their
        p_LLM calibrated on the dev rows (as the target's is on the target rows). Target labels
        are never used (docs/simda.md: why a source choice over-weights kNN across a shift)."""
        from raydapt.stages.teacher import store_neighbours

        cfg, r = self.cfg, self.rows
        a, dev = cfg.annotate, r.dev
        parts = {**_teacher_key(cfg.teacher), "data": {"dev": r.dev_fp},
                 "ids": config_hash(dev["id"].tolist())}
        got = self._teacher_rows("teacher-dev", parts, dev[["id", "text"]], keep_hidden=True,
                                 run_name="teacher-dev").set_index("id")
        dev = dev[dev["id"].isin(got.index)]
        if len(dev) == 0:
            raise DataError(f"the teacher rejected every data.dev row ({cfg.data.dev.path}): "
                            "check its texts")
        keys = np.stack(got.loc[dev["id"], "hidden"].to_numpy()).astype(np.float32)
        d, idx = store_neighbours(self.keys, keys, max(a.k_grid), kind=a.index)
        info = {"dev": cfg.data.dev.path, "rows": len(dev)}
        best, curve = self._choose_k_tau_lam("dev", d, self.source["y"].to_numpy()[idx],
                                             _p_llm(got.loc[dev["id"]]), dev["y"].to_numpy(),
                                             params=info, in_json=info)
        lam0 = max(r["accuracy"] for r in curve if r["lam"] == 0)
        _say(f"select on dev ({len(dev)} labelled {cfg.data.dev.path} rows as targets of the "
             f"source store): k={best['k']} tau={best['tau']} lam={best['lam']} (dev accuracy "
             f"{best['accuracy']:.4f}; lam=0: {lam0:.4f})")

    def select_on_target(self) -> None:
        """k, tau, lam chosen for the target without its labels (``annotate.target_rule``):
        the unlabelled target-train rows' neighbours in the source store and their p_LLM
        calibrated on themselves, the labelled source rows (leave-one-out neighbours, p_LLM
        calibrated on themselves) and the teacher keys. No teacher pass; the test split is
        never read."""
        from raydapt.stages.annotate import select_on_target as choose
        from raydapt.stages.teacher import loo_neighbours, store_neighbours

        a, ctx, source, tr = self.cfg.annotate, self.ctx, self.source, self.tgt_train
        kmax = max(a.k_grid)
        d_s, i_s = loo_neighbours(self.keys, kmax, kind=a.index)
        tgt_keys = np.stack(self.by_id.loc[tr["id"], "hidden"].to_numpy()).astype(np.float32)
        d_t, i_t = store_neighbours(self.keys, tgt_keys, kmax, kind=a.index)
        y = source["y"].to_numpy()
        p_s = _p_llm(self.by_id.loc[source["id"]])
        p_t = _p_llm(self.by_id.loc[tr["id"]])
        p_s = self._calibrate_labelled(p_s, y)
        p_t = calibrator(a.calibrate_llm, p_t, a.calibrate_prior)(p_t)
        best, curve = choose(d_s, y[i_s], p_s, y, d_t, y[i_t], p_t, src_keys=self.keys,
                             tgt_keys=tgt_keys, rule=a.target_rule, ks=a.k_grid,
                             taus=a.tau_grid, lams=a.lam_grid, distance_norm=a.distance_norm,
                             seed=self.cfg.run.seed)
        info = {"rule": a.target_rule, "source_rows": len(source), "target_rows": len(tr)}
        out = ctx.out / "select-on-target.json"
        with ctx.tracker.child("select-on-target") as run_log:
            run_log.params({"chosen": best, **info})
            run_log.metrics({"best_score": best["score"]})
            out.write_text(json.dumps({**info, "best": best, "curve": curve}))
            run_log.artifact(out)
        self.choose("annotate", **{k: best[k] for k in ("k", "tau", "lam")})
        extra = (f"; kNN target accuracy estimated {best['knn_acc_target_est']:.3f}, source "
                 f"{best['knn_acc_source']:.3f}" if "knn_acc_target_est" in best else "")
        _say(f"select on target ({a.target_rule}: {len(tr)} unlabelled target rows, "
             f"{len(source)} labelled source rows): k={best['k']} tau={best['tau']} "
             f"lam={best['lam']} (score {best['score']:.4f}{extra})")

    def estimate_prior(self) -> None:
        """The target's class prior estimated without labels (``annotate.calibrate_prior``:
        em or bbse) from the target-train rows' p_LLM and the labelled source rows'; the
        estimate becomes the calibrate_prior that runs (and is recorded)."""
        from raydapt.stages.annotate import estimate_prior

        a, source = self.cfg.annotate, self.source
        method = a.calibrate_prior
        pi = estimate_prior(_p_llm(self.by_id.loc[source["id"]]), source["y"].to_numpy(),
                            _p_llm(self.by_id.loc[self.tgt_train["id"]]), method=method)
        prior = [round(float(x), 4) for x in pi]
        with self.ctx.tracker.child("estimate-prior") as run_log:
            run_log.params({"method": method, "prior": prior})
        self.choose("annotate", calibrate_prior=prior)
        _say(f"target class prior estimated ({method}, {len(self.tgt_train)} unlabelled target "
             f"rows): {dict(zip(self.cfg.data.labels, prior))}")

    def _prior_said(self) -> str:
        """The prior the calibration forces on the target rows, for the console."""
        a, labels = self.cfg.annotate, self.cfg.data.labels
        if a.calibrate_llm in ("none", "domain_mean"):
            return f"calibration {a.calibrate_llm} (no class prior forced)"
        pr = (np.full(len(labels), 1 / len(labels)) if a.calibrate_prior is None
              or a.calibrate_llm == "median" else np.asarray(a.calibrate_prior, float))
        pr = pr / pr.sum()
        src = "uniform" if a.calibrate_prior is None or a.calibrate_llm == "median" else (
            f"estimated: {self.ctx.requested.get('annotate.calibrate_prior')}"
            if "annotate.calibrate_prior" in self.ctx.requested else "configured")
        return (f"calibration {a.calibrate_llm}, class prior "
                + "/".join(f"{lab} {x:.2f}" for lab, x in zip(labels, pr)) + f" ({src})")

    # -- 4. knn, 5. prompted passes ----------------------------------------------------------

    def knn_pass(self) -> None:
        """4. kNN for the target rows (with ``data.stream_target_train``: the test rows)."""
        import ray

        tgt_ids = pd.concat([self.tgt_train["id"], self.tgt_test["id"]], ignore_index=True)
        q = pd.DataFrame({"id": tgt_ids, "hidden": list(self.by_id.loc[tgt_ids, "hidden"])})
        knn = ray.data.from_pandas(q).map_batches(
            KnnSearch, fn_constructor_kwargs=knn_kwargs(self.cfg, self.store),
            compute=ray.data.ActorPoolStrategy(size=1), **KNN_POOL,
            batch_format="pandas").to_pandas()
        knn, rej = split_errors(knn, "knn")
        self.rejects.append(rej)
        self.knn = knn.set_index("id")

    def stream_target_train(self) -> None:
        """4b. (``data.stream_target_train``) the target-train rows from the target files to
        the stage cache: teacher → kNN as one chain of actor pools, one parquet shard per read
        unit (resumable: a killed run computes only the missing shards). A shard holds per row
        id, text, y, llm_logp, hidden, nbr_ids, nbr_dist, p_knn, or the ``_error`` of the step
        that could not process it (a reject)."""
        import ray

        cfg, ctx, r = self.cfg, self.ctx, self.rows
        a, t = cfg.annotate, cfg.teacher
        # batches of SORT_BATCHES engine batches, scored shortest first: rows come in file
        # order, and the frame path's teacher sees them sorted by length (less padding)
        steps = [Step(TeacherScore, teacher_kwargs(cfg, keep_hidden=True, stage="teacher-train",
                                                   micro_batch=t.pool.batch_size),
                      columns=["text"], carry=("text", "y"),
                      pool={**pool_kwargs(t.pool),
                            "batch_size": SORT_BATCHES * t.pool.batch_size}),
                 Step(KnnSearch, knn_kwargs(cfg, self.store),
                      pool={"compute": ray.data.ActorPoolStrategy(size=1), **KNN_POOL},
                      columns=["hidden"], carry=("text", "y", "llm_logp", "hidden"))]
        # the store is the source keys: the teacher pass's key (teacher + source ids) names it
        parts = {**self.parts, "knn": {k: getattr(a, k) for k in ("k", "tau", "distance_norm",
                                                                   "index")}}
        self.train_out = stream_pass(
            ctx.cache, ctx.tracker, "target-train", parts,
            target_source(cfg, row_filter=r.train_split), steps, _say,
            run_name="teacher-knn-train", label="target-train teacher → kNN",
            retries=t.pool.pass_retries)
        self.rejects.append(output_rejects(self.train_out, "teacher-knn-train"))

    def _train_rows(self, columns: list[str]):
        """The streamed target-train output shard by shard: its good rows (no ``_error``), an
        id that occurs twice only at its first row."""
        seen: set[str] = set()
        dups = self.rows.train_dups
        for tbl in self.train_out.iter_tables(["id", *columns, ERROR_COLUMN]):
            df = tbl.to_pandas()
            ok = df[ERROR_COLUMN].fillna("").to_numpy() == "" if ERROR_COLUMN in df else \
                np.ones(len(df), dtype=bool)
            if dups:
                for j in np.flatnonzero(ok & df["id"].isin(dups).to_numpy()):
                    ok[j] = df["id"].iat[j] not in seen
                    seen.add(df["id"].iat[j])
            if ok.any():
                yield df[ok].reset_index(drop=True)

    def prompted_passes(self) -> None:
        """5. prompted passes (demonstrations): ICL baselines and the kNN-prompt teacher."""
        cfg, labels, knn = self.cfg, self.cfg.data.labels, self.knn
        source, tgt_train, tgt_test = self.source, self.tgt_train, self.tgt_test
        src_text = dict(zip(source["id"], source["text"]))
        src_word = {i: cfg.teacher.verbalizer[labels[y]].strip()
                    for i, y in zip(source["id"], source["y"])}
        pk = cfg.annotate.prompt_k
        base = cfg.annotate.baselines
        test_b = tgt_test.head(cfg.annotate.baseline_max_rows or len(tgt_test))
        jobs = []
        if "icl_random" in base:
            u = unit_hash([f"{i}:{j}" for i in test_b["id"] for j in range(len(source))],
                          seed=cfg.run.seed, salt="icl_random").reshape(len(test_b), -1)
            demo = [list(source["id"].to_numpy()[np.argsort(r)[:pk]]) for r in u]
            jobs.append(pd.DataFrame({"id": "icl_random:" + test_b["id"], "text": test_b["text"],
                                      "demo_ids": demo}))
        if {"icl_nearest", "knn_prompt"} & set(base):
            jobs.append(pd.DataFrame({
                "id": "icl_nearest:" + test_b["id"], "text": test_b["text"],
                "demo_ids": [list(knn.loc[i, "nbr_ids"][:pk]) for i in test_b["id"]]}))
        if cfg.annotate.teacher_prompt == "knn_prompt":
            jobs.append(pd.DataFrame({
                "id": "knn_prompt:" + tgt_train["id"], "text": tgt_train["text"],
                "demo_ids": [list(knn.loc[i, "nbr_ids"][:pk]) for i in tgt_train["id"]]}))
        prompted = pd.DataFrame(columns=["id", "llm_logp"])
        if jobs:
            rows = _by_length(pd.concat(jobs, ignore_index=True))
            # the key is what the prompts are made of: the teacher (parts), each row and its
            # demonstrations; not lam / k / tau or their grids, which change no prompt (a run
            # that chooses them on source or dev rows reuses the passes)
            parts = {**self.parts, "jobs": config_hash({
                "ids": rows["id"].tolist(), "demos": [list(x) for x in rows["demo_ids"]]})}
            prompted = self._teacher_rows("prompted", parts, rows, keep_hidden=False,
                                          demo_texts=src_text, demo_labels=src_word)
        self.test_b, self.prompted = test_b, prompted.set_index("id")

    # -- 6. annotate, teacher read-outs ------------------------------------------------------

    def annotate(self) -> None:
        """6. annotation: p_T for the target-train rows."""
        if self.cfg.data.stream_target_train:
            return self._annotate_stream()
        a, by_id, knn, tgt_train = self.cfg.annotate, self.by_id, self.knn, self.tgt_train
        p_llm_tr = _p_llm(by_id.loc[tgt_train["id"]])
        # label-free calibration fitted on the unlabelled target-train rows, applied to the
        # test rows too (teacher_readouts)
        self.cal = calibrator(a.calibrate_llm, p_llm_tr, a.calibrate_prior)
        if a.teacher_prompt == "knn_prompt":
            p_llm_tr = _p_llm(self.prompted.loc["knn_prompt:" + tgt_train["id"]])
            p_llm_tr = calibrator(a.calibrate_llm, p_llm_tr, a.calibrate_prior)(p_llm_tr)
        else:
            p_llm_tr = self.cal(p_llm_tr)
        p_knn_tr = np.stack(knn.loc[tgt_train["id"], "p_knn"].to_numpy())
        p_t = mix(p_knn_tr, p_llm_tr, a.lam)
        ann = pd.DataFrame({
            "id": tgt_train["id"], "p_t": list(p_t), "pseudo_label": p_t.argmax(1),
            "confidence": p_t.max(1), "p_llm": list(p_llm_tr), "p_knn": list(p_knn_tr),
            "h_t": list(by_id.loc[tgt_train["id"], "hidden"]),
            "nbr_ids": list(knn.loc[tgt_train["id"], "nbr_ids"]),
        })
        ann.to_parquet(self.ctx.out / "annotations.parquet")
        pseudo_acc = accuracy(tgt_train["y"].to_numpy(), p_t.argmax(1)) if (
            tgt_train["y"] >= 0).all() else float("nan")
        _say(f"annotate: {len(ann)} rows, {self._prior_said()}, lam={a.lam}, mean confidence "
             f"{p_t.max(1).mean():.3f}, pseudo-label accuracy (gold hidden from the teacher) "
             f"{pseudo_acc:.3f}")
        self.p_t, self.pseudo_acc = p_t, pseudo_acc

    def _annotate_stream(self) -> None:
        """6. with ``data.stream_target_train``: the calibration fitted on every target-train
        row's p_LLM (C floats a row, read column by column), then p_T shard by shard into
        ``annotations.parquet`` and the distilled students' rows (text, p_T, h_T: a stage
        output their Ray Train workers read). Nothing else of the rows stays in the driver."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        a, ctx = self.cfg.annotate, self.ctx
        p_llm = [_p_llm(df) for df in self._train_rows(["llm_logp"])]
        if not p_llm:
            raise DataError("the teacher or the kNN step rejected every target-train row: see "
                            "rejects.parquet")
        p_all = np.concatenate(p_llm)
        self.cal = calibrator(a.calibrate_llm, p_all, a.calibrate_prior)
        n = len(p_all)
        del p_llm, p_all
        seen = {"right": 0, "labelled": 0, "confidence": 0.0}
        cols = ["text", "y", "llm_logp", "hidden", "nbr_ids", "p_knn"]

        def shards():
            writer = None
            try:
                for df in self._train_rows(cols):
                    p_l = self.cal(_p_llm(df))
                    p_k = np.stack(df["p_knn"].to_numpy())
                    p_t = mix(p_k, p_l, a.lam)
                    tbl = pa.Table.from_pandas(pd.DataFrame({
                        "id": df["id"], "p_t": list(p_t), "pseudo_label": p_t.argmax(1),
                        "confidence": p_t.max(1), "p_llm": list(p_l), "p_knn": list(p_k),
                        "h_t": list(df["hidden"]), "nbr_ids": list(df["nbr_ids"])}),
                        preserve_index=False)
                    writer = writer or pq.ParquetWriter(ctx.out / "annotations.parquet",
                                                        tbl.schema)
                    writer.write_table(tbl)
                    y = df["y"].to_numpy()
                    seen["labelled"] += int((y >= 0).sum())
                    seen["right"] += int((p_t.argmax(1) == y).sum())
                    seen["confidence"] += float(p_t.max(1).sum())
                    yield pd.DataFrame({"text": df["text"], "p_t": list(p_t),
                                        "h_t": list(df["hidden"])})
            finally:
                if writer is not None:
                    writer.close()

        ran = []

        def chunks():
            ran.append(True)
            yield from shards()

        key = config_hash({"rows": self.train_out.d.name, "lam": a.lam,
                           "calibrate": [a.calibrate_llm, a.calibrate_prior]})
        out = write_rows(ctx.cache, "student-rows", {"data": key}, chunks, n,
                         math.ceil(n / STUDENT_SHARD_ROWS), _say, label="distilled rows")
        if not ran:  # the rows were cached: annotations.parquet and the counts still come
            for _ in shards():
                pass
        self.distill, self.oracle_rows = (out, n, key), seen["labelled"]
        self.pseudo_acc = seen["right"] / n if seen["labelled"] == n else float("nan")
        _say(f"annotate: {n} rows (streamed), {self._prior_said()}, lam={a.lam}, mean "
             f"confidence {seen['confidence'] / n:.3f}, pseudo-label accuracy (gold hidden "
             f"from the teacher) {self.pseudo_acc:.3f}")

    def teacher_readouts(self) -> None:
        """Teacher read-outs evaluated directly on the test split."""
        a, base, test_b = self.cfg.annotate, self.cfg.annotate.baselines, self.test_b
        by_id, knn, prompted, tgt_test = self.by_id, self.knn, self.prompted, self.tgt_test
        y_te = tgt_test["y"].to_numpy()
        p_zs_raw = _p_llm(by_id.loc[tgt_test["id"]])
        p_zs = self.cal(p_zs_raw)

        def cal_self(p: np.ndarray) -> np.ndarray:  # prompted baselines: fitted on their rows
            return calibrator(a.calibrate_llm, p, a.calibrate_prior)(p)

        p_knn_te = np.stack(knn.loc[tgt_test["id"], "p_knn"].to_numpy())
        preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "zero_shot" in base:
            preds["zero_shot_raw"] = (y_te, p_zs_raw.argmax(1))
            preds["zero_shot"] = (y_te, p_zs.argmax(1))
        if "knn" in base:
            preds["knn"] = (y_te, p_knn_te.argmax(1))
        yb = test_b["y"].to_numpy()
        if "icl_random" in base:
            preds["icl_random"] = (
                yb, cal_self(_p_llm(prompted.loc["icl_random:" + test_b["id"]])).argmax(1))
        if {"icl_nearest", "knn_prompt"} & set(base):
            p_near = cal_self(_p_llm(prompted.loc["icl_nearest:" + test_b["id"]]))
            if "icl_nearest" in base:
                preds["icl_nearest"] = (yb, p_near.argmax(1))
            if "knn_prompt" in base:
                pk_b = np.stack(knn.loc[test_b["id"], "p_knn"].to_numpy())
                preds["knn_prompt"] = (yb, mix(pk_b, p_near, a.lam).argmax(1))
        preds["teacher"] = (y_te, mix(p_knn_te, p_zs, a.lam).argmax(1))
        self.teacher_preds = preds

    # -- 7. students -------------------------------------------------------------------------

    def train_students(self) -> None:
        """7. students on Ray Train."""
        cfg, ctx = self.cfg, self.ctx
        a, C, by_id = cfg.annotate, len(cfg.data.labels), self.by_id
        source, tgt_train, tgt_test = self.source, self.tgt_train, self.tgt_test
        dcfg = cfg.distill
        train_kw = student_train_kw(dcfg)
        sseed = cfg.run.seed if dcfg.seed is None else dcfg.seed
        extra = {**dcfg.model_dump(include=set(LOSS_KEYS)), "min_confidence": a.min_confidence}
        streamed = cfg.data.stream_target_train
        distill_df = None if streamed else pd.DataFrame({
            "text": tgt_train["text"], "p_t": list(self.p_t),
            "h_t": list(by_id.loc[tgt_train["id"], "hidden"])})
        budget = student_steps(dcfg, self.distill[1] if streamed else len(distill_df))
        results: dict[str, Any] = {}
        students: dict[str, dict[str, Any]] = {}
        cms: dict[str, np.ndarray] = {}
        for variant in dcfg.variants:
            objective = variant if variant in ("kl_sim", "kl", "ce") else "supervised"
            if streamed and variant in ("kl_sim", "kl", "ce", "oracle"):
                rows_out, n_rows, data_hash = self._streamed_student_rows(variant)
            else:
                if variant in ("kl_sim", "kl", "ce"):
                    frame = distill_df
                elif variant == "source_only":
                    frame = source[["text", "y"]]
                elif variant == "source_only_all":  # reference: every source row, `epochs`
                    frame = self.rows.source_all[["text", "y"]]
                else:  # oracle: gold target labels (upper bound)
                    frame = tgt_train[tgt_train["y"] >= 0][["text", "y"]]
                data_hash, n_rows = _frame_hash(frame), len(frame)
                # the student's rows as a stage output; its Ray Train workers read those files
                rows_out = write_rows(ctx.cache, "student-rows", {"data": data_hash},
                                      lambda f=frame: [f], len(frame),
                                      math.ceil(len(frame) / STUDENT_SHARD_ROWS), _say,
                                      label=f"student {variant} rows")
            ds = rows_out.dataset()
            kw = {**train_kw, "steps": budget[variant]}
            train = from_section(StudentTrain, dcfg, steps=kw["steps"],
                                 min_confidence=a.min_confidence)
            ran = train.steps_for(n_rows, name=f"student {variant}")  # what the loop runs
            _say(f"student {variant}: {objective} on {n_rows} rows, {ran.total} steps = "
                 f"{ran.epochs} epoch(s) of {ran.per_epoch}"
                 + (f" (distill.steps={dcfg.steps} wins over distill.epochs={dcfg.epochs})"
                    if dcfg.steps and kw["steps"] is not None and ran.epochs != dcfg.epochs
                    else "") + f", {dcfg.num_workers} workers")
            with ctx.tracker.child(f"student-{variant}",
                                   tags={"raydapt.variant": variant}) as run_log:
                # what ran: the epochs and steps of this student (distill.epochs as requested
                # beside them when distill.steps overrode it)
                run_log.params({"variant": variant, "objective": objective, **kw, **extra,
                                "epochs": ran.epochs, "steps": ran.total,
                                **({"epochs.requested": dcfg.epochs}
                                   if ran.epochs != dcfg.epochs else {})})
                # same name = same training: Ray Train then resumes it from its last checkpoint
                # (text_truncation at its default "head" is left out: students finished before
                # the option existed keep their names)
                key = config_hash({"v": variant, "train": {k: v for k, v in kw.items() if not (
                                       k == "text_truncation" and v == "head")}, "extra": extra,
                                   "student": dcfg.student, "seed": sseed,
                                   "data": data_hash,
                                   "eval": _frame_hash(tgt_test[["text", "y"]])})
                m = fit_student(
                    name=f"{cfg.run.name}-{variant}-{key[:10]}", objective=objective,
                    train_ds=ds, eval_df=tgt_test, num_classes=C, student=dcfg.student,
                    train=train, seed=sseed,
                    storage=str(ctx.out / "train"),
                    mlflow_uri=ctx.tracker.uri if cfg.tracking.enabled else None,
                    mlflow_run_id=run_log.run_id,
                    telemetry={"stage": f"student-{variant}", "method": "simda",
                               "run": cfg.run.name})
            students[variant] = {"accuracy": m["accuracy"], "final_epoch_loss": m["loss"],
                                 "epochs": m["epoch"], "rows": int(m.get("rows", n_rows)),
                                 "steps": m.get("steps"),
                                 "resumed_finished_run": bool(m.get("resumed", False))}
            if variant in ("kl_sim", "kl", "ce") and not np.isnan(self.pseudo_acc):
                # how far the student stays under the teacher it learns from
                students[variant]["gap_to_pseudo_labels"] = m["accuracy"] - self.pseudo_acc
            cms[f"student:{variant}"] = np.asarray(m["confusion"])
            results[f"student:{variant}"] = m["accuracy"]
            _say(f"student {variant}: target-test accuracy {m['accuracy']:.4f}")
        self.results, self.students, self.cms, self.student_seed = results, students, cms, sseed

    def _streamed_student_rows(self, variant: str) -> tuple[Any, int, str]:
        """A student's rows with ``data.stream_target_train``: the distilled rows ``annotate``
        wrote, or (oracle) the labelled target-train rows copied from the streamed shards."""
        if variant != "oracle":
            return self.distill
        n = self.oracle_rows
        if n == 0:
            raise DataError("distill.variants has oracle, but no target-train row has a label")
        key = config_hash({"rows": self.train_out.d.name, "oracle": True})
        out = write_rows(self.ctx.cache, "student-rows", {"data": key},
                         lambda: (df.loc[df["y"] >= 0, ["text", "y"]]
                                  for df in self._train_rows(["text", "y"])),
                         n, math.ceil(n / STUDENT_SHARD_ROWS), _say, label="student oracle rows")
        return out, n, key

    # -- 8. report ---------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """8. report: results.json, rejects, confusion plot, parent-run metrics and artifacts."""
        cfg, ctx = self.cfg, self.ctx
        a, labels, out, dcfg = cfg.annotate, cfg.data.labels, ctx.out, cfg.distill
        C = len(labels)
        results, cms, students = self.results, self.cms, self.students
        for name, (yt, yp) in self.teacher_preds.items():
            results[f"teacher:{name}"] = accuracy(yt, yp)
            cms[f"teacher:{name}"] = confusion_matrix(yt, yp, C)
        for v, s in students.items():  # distilled student vs its teacher p_T on the test split
            if v in ("kl_sim", "kl", "ce"):
                s["gap_to_teacher"] = s["accuracy"] - results["teacher:teacher"]
        rej_df = concat_rejects(self.rejects)
        rej_df.to_parquet(out / "rejects.parquet")
        summary = {
            "job": cfg.run.name, "source": cfg.data.source.path, "target": cfg.data.target.path,
            "accuracy": results, "students": students, "pseudo_label_accuracy": self.pseudo_acc,
            "counts": self.rows.counts,
            "rejects": len(rej_df), "icl_test_rows": len(self.test_b),
            "seconds": ctx.seconds(),
            "teacher": cfg.teacher.model, "student": dcfg.student, "k": a.k, "lam": a.lam,
            "tau": a.tau, "k_tau_lam_chosen_on": ("source" if a.select_on_source else
                                                 f"dev:{cfg.data.dev.path}" if a.select_on_dev
                                                 else f"target:{a.target_rule}"
                                                 if a.select_on_target else "config"),
            "calibrate_llm": a.calibrate_llm, "calibrate_prior": a.calibrate_prior,
            "student_seed": self.student_seed,
        }
        ctx.write_results(summary)
        plot_confusions(cms, labels, out / "confusion.png")
        ctx.parent.metrics({f"acc.{k.replace(':', '.')}": v for k, v in results.items()})
        ctx.parent.results_table(
            results, metric="target-test accuracy", seeds=[cfg.run.seed],
            details={**{f"teacher:{n}": {"rows": len(yt)}
                        for n, (yt, _) in self.teacher_preds.items()},
                     **{f"student:{v}": {"rows": len(self.tgt_test), "epochs": s["epochs"]}
                        for v, s in students.items()}},
            title=f"{cfg.run.name}: target-test accuracy per teacher read-out and student",
            out_dir=out)
        ctx.parent.metrics({"pseudo_label_accuracy": self.pseudo_acc, "rejects": len(rej_df),
                            "seconds": summary["seconds"]})
        for f in ("annotations.parquet", "rejects.parquet", "results.json", "confusion.png"):
            ctx.parent.artifact(out / f)
        _say("target-test accuracy\n" + results_table(results, students))
        _say(f"done in {summary['seconds']:.0f}s; outputs in {out}")
        return summary


def run(cfg: SimDAJob) -> dict[str, Any]:
    """Run the SimDA job (:class:`SimDARecipe`); returns the results dict also written to
    results.json."""
    return SimDARecipe.main(cfg)


def sweep_trial(cfg: SimDAJob, *, report, run_log) -> None:
    """One ``raydapt sweep`` trial: rerun the recipe (the teacher stages come from the cache) with
    its runs nested under the trial's child run; report the accuracies once."""
    os.environ["RAYDAPT_PARENT_RUN_ID"] = run_log.run_id or ""
    try:  # the recipe's own runs nest under this trial's child run
        summary = run(cfg)
    finally:
        os.environ.pop("RAYDAPT_PARENT_RUN_ID", None)
    report({k.replace(":", "."): v for k, v in summary["accuracy"].items()})
