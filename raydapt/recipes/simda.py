"""SimDA recipe: kNN-augmented LLM annotation of the target domain, then distillation.

Stages, in order (each cached by content, each a child MLflow run):

1. read      source (labeled) and target (unlabeled for training, labeled test split) -> rejects
2. teacher   one LLM pass over source, target-train and target-test prompts T(x):
             last-token hidden state (key / h_T) + verbalizer log-probs (p_LLM)
3. store     FAISS index over the source keys, values = source labels
4. knn       k nearest source keys for every target row -> p_kNN, neighbour ids
5. prompted  LLM passes with demonstrations: ICL-random / ICL-nearest baselines on the test
             split, and the kNN-augmented prompt teacher (if ``annotate.teacher_prompt``)
6. annotate  p_T = lam * p_kNN + (1 - lam) * p_LLM, pseudo-label, confidence -> annotations.parquet
7. students  Ray Train fits: distilled (kl_sim, kl, ce) and baselines (source_only, oracle)
8. report    accuracy table (teacher read-outs + students), confusion matrices, results.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.cache import ShardedOutput, StageCache
from raydapt.config import SimDAJob, config_hash, to_yaml
from raydapt.data.readers import (
    DataError,
    Fields,
    check_disjoint_ids,
    drop_duplicate_ids,
    fingerprint,
    read_rows,
    split_and_subsample,
    unit_hash,
)
from raydapt.evaluate import accuracy, confusion_matrix
from raydapt.runtime import init_ray, seed_everything
from raydapt.stages.annotate import calibrator, mix
from raydapt.stages.common import pool_kwargs
from raydapt.stages.teacher import KnnSearch, TeacherScore, build_index, save_store
from raydapt.tracking import Tracker


def _say(msg: str) -> None:
    print(f"[simda {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _engine_kwargs(cfg: SimDAJob, *, need_hidden: bool = False) -> dict[str, Any]:
    """Engine kwargs for a pass. vLLM gives no hidden states, so a pass that needs keys /
    teacher representations runs the same model on the hf engine (the documented switch)."""
    t = cfg.teacher
    backend = "hf" if (need_hidden and t.backend == "vllm") else t.backend
    kw = {"backend": backend, "model": t.model, "max_length": t.max_length, "dtype": t.dtype,
          "chat": t.chat, "answer_prefix": t.answer_prefix,
          "trust_remote_code": t.trust_remote_code, "revision": t.revision,
          "device": t.device,
          "num_threads": t.pool.threads or max(1, int(round(t.pool.num_cpus)))}
    if backend == "vllm":
        kw["engine_kwargs"] = dict(t.vllm)
    else:
        kw["token"] = t.hf_token
    return kw


def check_verbalizer(cfg: SimDAJob) -> list[int]:
    """Fail fast, in the driver, if a label word is not one token for the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from raydapt.assets import resolve_model
    from raydapt.engines.base import check_single_tokens

    rm = resolve_model(cfg.teacher.model)
    tok = AutoTokenizer.from_pretrained(rm.path, revision=cfg.teacher.revision or rm.revision,
                                        trust_remote_code=cfg.teacher.trust_remote_code,
                                        token=cfg.teacher.hf_token)
    words = {cfg.teacher.verbalizer[lab]: tok(cfg.teacher.verbalizer[lab],
                                              add_special_tokens=False)["input_ids"]
             for lab in cfg.data.labels}
    return check_single_tokens(words, cfg.teacher.model)


def _split_errors(df: pd.DataFrame, stage: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    bad = df[df["_error"] != ""]
    rej = pd.DataFrame({"file": stage, "id": bad["id"], "reason": bad["_error"], "raw": ""})
    return df[df["_error"] == ""].drop(columns="_error").reset_index(drop=True), rej


def _run_teacher(rows: pd.DataFrame, cfg: SimDAJob, *, keep_hidden: bool, stage: str,
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
        fn_constructor_kwargs=dict(
            engine=_engine_kwargs(cfg, need_hidden=keep_hidden),
            label_words=[cfg.teacher.verbalizer[lab] for lab in cfg.data.labels],
            template=cfg.teacher.template, text_max_tokens=cfg.teacher.text_max_tokens,
            text_truncation=cfg.teacher.text_truncation,
            demo_template=cfg.teacher.demo_template, demo_max_tokens=cfg.teacher.demo_max_tokens,
            demo_texts=demo_texts, demo_labels=demo_labels, keep_hidden=keep_hidden, stage=stage,
            telemetry={"method": "simda", "run": cfg.run.name}),
        **pool_kwargs(cfg.teacher.pool),
    )


def _cached_pass(cache: StageCache, tracker: Tracker, stage: str, parts: dict[str, Any],
                 rows: pd.DataFrame, shard_rows: int, make_ds, every_s: float = 10.0
                 ) -> pd.DataFrame:
    """A sharded, resumable pass: reuse a finished output with the same key; otherwise stream
    ``make_ds(pending_rows)`` and write each shard of ``shard_rows`` input rows the moment all its
    rows are back, so a killed run resumes from its finished shards. Prints rows done, rows/s and
    ETA; logs rows and rows/s to the stage's MLflow child run. Output rows follow ``rows``' order
    whichever run computed them."""
    parts = {**parts, "shard_rows": shard_rows}
    d, done = cache.get(stage, parts, keep_partial=True)
    sharded = ShardedOutput(d, len(rows), shard_rows)
    with tracker.child(stage) as run_log:
        if done:
            _say(f"{stage}: cached ({d})")
            return sharded.read_all()
        todo = sharded.missing()
        n_done = sharded.n_shards - len(todo)
        if n_done:
            _say(f"{stage}: resuming, {n_done}/{sharded.n_shards} shards already done")
        pending = rows.iloc[np.concatenate([np.arange(len(rows))[sharded.rows(i)] for i in todo])]
        shard_of = {rid: i for i in todo for rid in rows["id"].iloc[sharded.rows(i)]}
        need = {i: sharded.rows(i).stop - sharded.rows(i).start for i in todo}
        buf: dict[int, list[pd.DataFrame]] = {i: [] for i in todo}
        got = dict.fromkeys(todo, 0)
        _say(f"{stage}: scoring {len(pending)} prompts in {len(todo)} shards of <= {shard_rows}")
        t0, last, n = time.time(), 0.0, 0
        for batch in make_ds(pending).iter_batches(batch_format="pandas", batch_size=None):
            for i, g in batch.groupby(batch["id"].map(shard_of), sort=False):
                i = int(i)
                buf[i].append(g)
                got[i] += len(g)
                if got[i] == need[i]:  # shard complete: write it in input order
                    order = rows["id"].iloc[sharded.rows(i)]
                    sharded.write(i, pd.concat(buf.pop(i)).set_index("id").loc[order]
                                  .reset_index())
            n += len(batch)
            now = time.time()
            if now - last >= every_s or n >= len(pending):
                rate = n / max(now - t0, 1e-9)
                _say(f"{stage}: {n}/{len(pending)} rows, {rate:.2f} rows/s, "
                     f"ETA {max(len(pending) - n, 0) / max(rate, 1e-9):.0f}s")
                last = now
        if buf:
            raise RuntimeError(f"{stage}: rows missing from the output of shards {sorted(buf)}")
        run_log.metrics({"rows": len(pending), "shards_reused": n_done,
                         "rows_per_s": len(pending) / max(time.time() - t0, 1e-9)})
        cache.commit(d)
        return sharded.read_all()


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


def matched_steps(rows: int, batch_size: int, workers: int, epochs: int) -> int:
    """Optimiser steps of ``epochs`` passes over ``rows`` (per worker batch_size // workers,
    equal slices, last partial batch dropped), as :func:`raydapt.train.student.student_loop`
    counts them: the budget every step-matched student gets."""
    per_worker = max(1, batch_size // workers)
    return max(1, (rows // workers) // per_worker) * epochs


def _select_template(cfg: SimDAJob, source: pd.DataFrame, cache: StageCache, tracker: Tracker,
                     fps: dict[str, str], out: Path) -> SimDAJob:
    """Score each of ``teacher.templates`` zero-shot on a seeded subset of labelled SOURCE rows
    (p_LLM calibrated on those rows as the target's will be) and return the config with the
    best as ``teacher.template``. Target labels are never used."""
    from raydapt.assets import resolve_model

    t, a = cfg.teacher, cfg.annotate
    rows = source.head(t.template_select_rows)  # source is already a seeded shuffle
    accs = []
    for i, tpl in enumerate(t.templates):
        c = cfg.model_copy(update={"teacher": t.model_copy(update={"template": tpl})})
        parts = {"teacher": c.teacher.model_dump(mode="json", exclude={"pool", "hf_token"}),
                 "weights": resolve_model(t.model).fingerprint, "data": fps,
                 "ids": config_hash(rows["id"].tolist())}
        got = _cached_pass(cache, tracker, f"template-{i}", parts,
                           _by_length(rows[["id", "text"]]), t.pool.shard_rows,
                           lambda r, c=c, i=i: _run_teacher(r, c, keep_hidden=False,
                                                       stage=f"template-{i}"))
        got, _ = _split_errors(got, f"template-{i}")
        y = rows.set_index("id").loc[got["id"], "y"].to_numpy()
        p = _p_llm(got)
        accs.append(accuracy(y, calibrator(a.calibrate_llm, p, a.calibrate_prior)(p).argmax(1)))
    best = int(np.argmax(accs))
    with tracker.child("select-template") as run_log:
        run_log.params({"chosen": best, "template": t.templates[best], "rows": len(rows),
                        **{f"template_{i}": tpl for i, tpl in enumerate(t.templates)}})
        run_log.metrics({f"source_acc.template_{i}": v for i, v in enumerate(accs)})
    (out / "select-template.json").write_text(json.dumps(
        {"chosen": t.templates[best], "source_accuracy": dict(zip(t.templates, accs))}, indent=2))
    _say(f"template chosen on {len(rows)} source rows: #{best} {t.templates[best]!r} "
         f"(source accuracies {[round(x, 4) for x in accs]})")
    return cfg.model_copy(update={"teacher": t.model_copy(update={"template": t.templates[best]})})


def _select_on_source(cfg: SimDAJob, keys: np.ndarray, source: pd.DataFrame,
                      p_llm_src: np.ndarray, tracker: Tracker, out: Path) -> SimDAJob:
    """k, tau, lam chosen on the labelled source rows: leave-one-out neighbours in the source
    store, the source rows' p_LLM calibrated on the source rows (as the target's is on the
    target rows). Returns the config with them set; logs the curve."""
    from raydapt.stages.annotate import select_on_source
    from raydapt.stages.teacher import loo_neighbours

    a = cfg.annotate
    d, idx = loo_neighbours(keys, max(a.k_grid), kind=a.index)
    y = source["y"].to_numpy()
    p = calibrator(a.calibrate_llm, p_llm_src, a.calibrate_prior)(p_llm_src)
    best, curve = select_on_source(d, y[idx], p, y, ks=a.k_grid, taus=a.tau_grid,
                                   lams=a.lam_grid, distance_norm=a.distance_norm)
    with tracker.child("select-on-source") as run_log:
        run_log.params({"chosen": best, "rows": len(source)})
        for r in curve:  # one series per (k, tau), stepped by lam in percent
            run_log.metrics({f"source_acc.k{r['k']}.tau{r['tau']}": r["accuracy"]},
                            int(round(r["lam"] * 100)))
        run_log.metrics({"best_source_accuracy": best["accuracy"]})
        (out / "select-on-source.json").write_text(json.dumps({"best": best, "curve": curve}))
        run_log.artifact(out / "select-on-source.json")
    _say(f"select on source ({len(source)} labelled rows, leave-one-out): k={best['k']} "
         f"tau={best['tau']} lam={best['lam']} (source accuracy {best['accuracy']:.4f}; "
         f"lam=0: {max(r['accuracy'] for r in curve if r['lam'] == 0):.4f}, lam=1 best: "
         f"{max(r['accuracy'] for r in curve if r['lam'] == 1):.4f})")
    return cfg.model_copy(update={"annotate": a.model_copy(
        update={k: best[k] for k in ("k", "tau", "lam")})})


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


def _plot_confusions(cms: dict[str, np.ndarray], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cms)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    for ax, (name, cm) in zip(axes[0], cms.items()):
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_title(f"{name}\nacc {np.trace(cm) / max(1, cm.sum()):.3f}", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
    axes[0][0].set_ylabel("true", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: SimDAJob) -> dict[str, Any]:
    """Run the SimDA job; returns the results dict also written to results.json."""
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.output_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(cfg.run.cache_dir)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.progress)
    tracker = Tracker(enabled=cfg.tracking.enabled, uri=cfg.tracking.uri,
                      experiment=cfg.tracking.experiment,
                      artifact_location=cfg.tracking.artifact_location)
    labels = cfg.data.labels
    C = len(labels)
    t_job = time.time()
    with tracker.job(cfg.run.name, tags={"raydapt.method": "simda",
                                         "raydapt.config_hash": config_hash(cfg)}) as parent:
        parent.params(cfg.model_dump(mode="json"))
        parent.text(to_yaml(cfg), "config.yaml")
        _say(f"resolved config:\n{to_yaml(cfg)}")

        # 1. read ------------------------------------------------------------------------------
        root = Path(cfg.data.root)
        src_path, tgt_path = root / cfg.data.source.path, root / cfg.data.target.path
        fps = {"source": fingerprint(src_path), "target": fingerprint(tgt_path)}
        parent.params({"data_fingerprint": fps})
        with tracker.child("read") as run_log:
            def fields(d) -> Fields:
                return Fields(d.id_field, d.text_field, d.label_field)

            src_ds, src_rej = read_rows(src_path, fmt=cfg.data.source.format,
                                        fields=fields(cfg.data.source), labels=labels)
            tgt_ds, tgt_rej = read_rows(tgt_path, fmt=cfg.data.target.format,
                                        fields=fields(cfg.data.target), labels=labels,
                                        require_label=False)
            src_df, src_dup = drop_duplicate_ids(src_ds.to_pandas(), file=str(src_path))
            tgt_df, tgt_dup = drop_duplicate_ids(tgt_ds.to_pandas(), file=str(tgt_path))
            check_disjoint_ids(src_df, tgt_df, what="source and target")
            source, _ = split_and_subsample(src_df, seed=cfg.run.seed,
                                            max_rows=cfg.data.max_source_rows)
            tgt_train, tgt_test = split_and_subsample(
                tgt_df, seed=cfg.run.seed,
                test_fraction=cfg.data.target_test_fraction,
                max_rows=cfg.data.max_target_train_rows,
                max_test_rows=cfg.data.max_target_test_rows)
            unlabeled_test = tgt_test[tgt_test["y"] < 0]
            tgt_test = tgt_test[tgt_test["y"] >= 0].reset_index(drop=True)
            rejects = [src_rej.to_pandas(), tgt_rej.to_pandas(), src_dup, tgt_dup, pd.DataFrame({
                "file": str(tgt_path), "id": unlabeled_test["id"],
                "reason": "target test row without a label", "raw": ""})]
            counts = {"source_rows": len(source), "target_train_rows": len(tgt_train),
                      "target_test_rows": len(tgt_test),
                      "source_rejects": src_rej.count() + len(src_dup),
                      "target_rejects": tgt_rej.count() + len(tgt_dup) + len(unlabeled_test)}
            run_log.metrics(counts)
            _say(f"read: {counts}")
            if len(source) < cfg.annotate.k:
                raise DataError(f"{len(source)} usable source rows < annotate.k={cfg.annotate.k}")
            if len(tgt_train) == 0 or len(tgt_test) == 0:
                raise DataError("the target train or test split is empty: check data.target, its "
                                "labels and data.target_test_fraction")

        check_verbalizer(cfg)
        if cfg.teacher.templates:
            cfg = _select_template(cfg, source, cache, tracker, fps, out)

        # 2. teacher pass: keys + p_LLM for source / target-train / target-test ---------------
        from raydapt.assets import resolve_model

        parts = {"teacher": cfg.teacher.model_dump(mode="json", exclude={"pool", "hf_token"}),
                 "weights": resolve_model(cfg.teacher.model).fingerprint,
                 "data": fps, "ids": config_hash({"s": source["id"].tolist(),
                                                  "tr": tgt_train["id"].tolist(),
                                                  "te": tgt_test["id"].tolist()})}
        allrows = _by_length(pd.concat([source[["id", "text"]], tgt_train[["id", "text"]],
                                        tgt_test[["id", "text"]]], ignore_index=True))
        scored = _cached_pass(
            cache, tracker, "teacher", parts, allrows, cfg.teacher.pool.shard_rows,
            lambda r: _run_teacher(r, cfg, keep_hidden=True, stage="teacher"))
        scored, rej = _split_errors(scored, "teacher")
        rejects.append(rej)
        by_id = scored.set_index("id")
        source = source[source["id"].isin(by_id.index)].reset_index(drop=True)
        tgt_train = tgt_train[tgt_train["id"].isin(by_id.index)].reset_index(drop=True)
        tgt_test = tgt_test[tgt_test["id"].isin(by_id.index)].reset_index(drop=True)

        # 3. data store ------------------------------------------------------------------------
        store = out / "store"
        keys = np.stack(by_id.loc[source["id"], "hidden"].to_numpy()).astype(np.float32)
        save_store(store, build_index(keys, kind=cfg.annotate.index), source["id"].tolist(),
                   source["y"].to_numpy())
        _say(f"store: {len(source)} keys of width {keys.shape[1]} ({cfg.annotate.index})")
        if cfg.annotate.select_on_source:
            cfg = _select_on_source(cfg, keys, source, _p_llm(by_id.loc[source["id"]]), tracker,
                                    out)

        # 4. kNN for the target rows ----------------------------------------------------------
        import ray

        tgt_ids = pd.concat([tgt_train["id"], tgt_test["id"]], ignore_index=True)
        q = pd.DataFrame({"id": tgt_ids, "hidden": list(by_id.loc[tgt_ids, "hidden"])})
        knn = ray.data.from_pandas(q).map_batches(
            KnnSearch, fn_constructor_kwargs=dict(
                store=str(store.resolve()), k=cfg.annotate.k, num_classes=C,
                tau=cfg.annotate.tau, distance_norm=cfg.annotate.distance_norm,
                telemetry={"method": "simda", "run": cfg.run.name}),
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25, batch_size=256,
            batch_format="pandas").to_pandas()
        knn, rej = _split_errors(knn, "knn")
        rejects.append(rej)
        knn = knn.set_index("id")

        # 5. prompted passes (demonstrations) -------------------------------------------------
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
            parts = {**parts, "annotate": cfg.annotate.model_dump(mode="json"),
                     "jobs": config_hash({"ids": rows["id"].tolist(),
                                          "demos": [list(x) for x in rows["demo_ids"]]})}
            prompted = _cached_pass(
                cache, tracker, "prompted", parts, rows, cfg.teacher.pool.shard_rows,
                lambda r: _run_teacher(r, cfg, keep_hidden=False, stage="prompted",
                                       demo_texts=src_text, demo_labels=src_word))
            prompted, rej = _split_errors(prompted, "prompted")
            rejects.append(rej)
        prompted = prompted.set_index("id")

        # 6. annotation: p_T for the target-train rows ----------------------------------------
        a = cfg.annotate

        def cal_on(ref: np.ndarray):  # label-free calibration fitted on unlabelled rows
            return calibrator(a.calibrate_llm, ref, a.calibrate_prior)

        p_llm_tr = _p_llm(by_id.loc[tgt_train["id"]])
        cal = cal_on(p_llm_tr)  # fitted on the target-train rows, applied to the test rows too
        if a.teacher_prompt == "knn_prompt":
            p_llm_tr = _p_llm(prompted.loc["knn_prompt:" + tgt_train["id"]])
            p_llm_tr = cal_on(p_llm_tr)(p_llm_tr)
        else:
            p_llm_tr = cal(p_llm_tr)
        p_knn_tr = np.stack(knn.loc[tgt_train["id"], "p_knn"].to_numpy())
        p_t = mix(p_knn_tr, p_llm_tr, a.lam)
        ann = pd.DataFrame({
            "id": tgt_train["id"], "p_t": list(p_t), "pseudo_label": p_t.argmax(1),
            "confidence": p_t.max(1), "p_llm": list(p_llm_tr), "p_knn": list(p_knn_tr),
            "h_t": list(by_id.loc[tgt_train["id"], "hidden"]),
            "nbr_ids": list(knn.loc[tgt_train["id"], "nbr_ids"]),
        })
        ann.to_parquet(out / "annotations.parquet")
        pseudo_acc = accuracy(tgt_train["y"].to_numpy(), p_t.argmax(1)) if (
            tgt_train["y"] >= 0).all() else float("nan")
        _say(f"annotate: {len(ann)} rows, mean confidence {p_t.max(1).mean():.3f}, "
             f"pseudo-label accuracy (gold hidden from the teacher) {pseudo_acc:.3f}")

        # teacher read-outs evaluated directly on the test split
        y_te = tgt_test["y"].to_numpy()
        p_zs_raw = _p_llm(by_id.loc[tgt_test["id"]])
        p_zs = cal(p_zs_raw)

        def cal_self(p: np.ndarray) -> np.ndarray:  # prompted baselines: fitted on their rows
            return cal_on(p)(p)
        p_knn_te = np.stack(knn.loc[tgt_test["id"], "p_knn"].to_numpy())
        teacher_preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "zero_shot" in base:
            teacher_preds["zero_shot_raw"] = (y_te, p_zs_raw.argmax(1))
            teacher_preds["zero_shot"] = (y_te, p_zs.argmax(1))
        if "knn" in base:
            teacher_preds["knn"] = (y_te, p_knn_te.argmax(1))
        yb = test_b["y"].to_numpy()
        if "icl_random" in base:
            teacher_preds["icl_random"] = (
                yb, cal_self(_p_llm(prompted.loc["icl_random:" + test_b["id"]])).argmax(1))
        p_near = None
        if {"icl_nearest", "knn_prompt"} & set(base):
            p_near = cal_self(_p_llm(prompted.loc["icl_nearest:" + test_b["id"]]))
            if "icl_nearest" in base:
                teacher_preds["icl_nearest"] = (yb, p_near.argmax(1))
            if "knn_prompt" in base:
                pk_b = np.stack(knn.loc[test_b["id"], "p_knn"].to_numpy())
                teacher_preds["knn_prompt"] = (yb, mix(pk_b, p_near, a.lam).argmax(1))
        teacher_preds["teacher"] = (y_te, mix(p_knn_te, p_zs, a.lam).argmax(1))

        # 7. students on Ray Train -------------------------------------------------------------
        import ray

        from raydapt.train.student import fit_student

        dcfg = cfg.distill
        loss_keys = {"beta", "temperature", "sim_tau", "sim_loss", "sim_center"}
        train_kw = dcfg.model_dump(mode="json", exclude={"student", "variants", "seed",
                                                         *loss_keys})
        sseed = cfg.run.seed if dcfg.seed is None else dcfg.seed
        extra = {**dcfg.model_dump(include=loss_keys), "min_confidence": a.min_confidence}
        distill_df = pd.DataFrame({"text": tgt_train["text"], "p_t": list(p_t),
                                   "h_t": list(by_id.loc[tgt_train["id"], "hidden"])})
        # every student but the source_only_all reference trains the same number of steps
        steps = dcfg.steps or matched_steps(len(distill_df), dcfg.batch_size, dcfg.num_workers,
                                            dcfg.epochs)
        results: dict[str, Any] = {}
        students: dict[str, dict[str, Any]] = {}
        cms: dict[str, np.ndarray] = {}
        for variant in dcfg.variants:
            if variant in ("kl_sim", "kl", "ce"):
                ds, objective = ray.data.from_pandas(distill_df), variant
            elif variant == "source_only":
                ds, objective = ray.data.from_pandas(source[["text", "y"]]), "supervised"
            elif variant == "source_only_all":  # reference: every source row, `epochs` passes
                ds, objective = ray.data.from_pandas(src_df[["text", "y"]]), "supervised"
            else:  # oracle: gold target labels (upper bound)
                ds, objective = ray.data.from_pandas(tgt_train[tgt_train["y"] >= 0][["text", "y"]]), "supervised"
            kw = {**train_kw, "steps": None if variant == "source_only_all" else steps}
            _say(f"student {variant}: {objective} on {ds.count()} rows, "
                 + (f"{dcfg.epochs} epochs" if kw["steps"] is None else f"{steps} steps")
                 + f", {dcfg.num_workers} workers")
            with tracker.child(f"student-{variant}", tags={"raydapt.variant": variant}) as run_log:
                run_log.params({"variant": variant, "objective": objective, **kw, **extra})
                # same name = same training: Ray Train then resumes it from its last checkpoint
                key = config_hash({"v": variant, "train": kw, "extra": extra,
                                   "student": dcfg.student, "seed": sseed,
                                   "data": _frame_hash(ds.to_pandas()),
                                   "eval": _frame_hash(tgt_test[["text", "y"]])})
                m = fit_student(
                    name=f"{cfg.run.name}-{variant}-{key[:10]}", objective=objective, train_ds=ds,
                    eval_df=tgt_test, num_classes=C, student=dcfg.student, train=kw,
                    seed=sseed, storage=str(out / "train"), extra=extra,
                    mlflow_uri=tracker.uri if cfg.tracking.enabled else None,
                    mlflow_run_id=run_log.run_id,
                    telemetry={"stage": f"student-{variant}", "method": "simda",
                               "run": cfg.run.name})
            students[variant] = {"accuracy": m["accuracy"], "final_epoch_loss": m["loss"],
                                 "epochs": m["epoch"], "rows": int(m.get("rows", ds.count())),
                                 "steps": m.get("steps"),
                                 "resumed_finished_run": bool(m.get("resumed", False))}
            if variant in ("kl_sim", "kl", "ce") and (tgt_train["y"] >= 0).all():
                # how far the student stays under the teacher it learns from
                students[variant]["gap_to_pseudo_labels"] = m["accuracy"] - pseudo_acc
            cms[f"student:{variant}"] = np.asarray(m["confusion"])
            results[f"student:{variant}"] = m["accuracy"]
            _say(f"student {variant}: target-test accuracy {m['accuracy']:.4f}")

        # 8. report ---------------------------------------------------------------------------
        for name, (yt, yp) in teacher_preds.items():
            results[f"teacher:{name}"] = accuracy(yt, yp)
            cms[f"teacher:{name}"] = confusion_matrix(yt, yp, C)
        for v, st in students.items():  # distilled student vs its teacher p_T on the test split
            if v in ("kl_sim", "kl", "ce"):
                st["gap_to_teacher"] = st["accuracy"] - results["teacher:teacher"]
        rej_df = pd.concat([r for r in rejects if len(r)], ignore_index=True) if any(
            len(r) for r in rejects) else pd.DataFrame(columns=["file", "id", "reason", "raw"])
        rej_df.to_parquet(out / "rejects.parquet")
        summary = {
            "job": cfg.run.name, "source": cfg.data.source.path, "target": cfg.data.target.path,
            "accuracy": results, "students": students, "pseudo_label_accuracy": pseudo_acc,
            "counts": counts,
            "rejects": len(rej_df), "icl_test_rows": len(test_b), "seconds": time.time() - t_job,
            "teacher": cfg.teacher.model, "student": dcfg.student, "k": a.k, "lam": a.lam,
            "student_seed": sseed,
        }
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        _plot_confusions(cms, labels, out / "confusion.png")
        parent.metrics({f"acc.{k.replace(':', '.')}": v for k, v in results.items()})
        parent.metrics({"pseudo_label_accuracy": pseudo_acc, "rejects": len(rej_df),
                        "seconds": summary["seconds"]})
        for f in ("annotations.parquet", "rejects.parquet", "results.json", "confusion.png"):
            parent.artifact(out / f)
        _say("target-test accuracy\n" + results_table(results, students))
        _say(f"done in {summary['seconds']:.0f}s; outputs in {out}")
        if cfg.tracking.enabled:
            _say(f"browse the runs: mlflow ui --backend-store-uri {tracker.uri}")
        return summary
