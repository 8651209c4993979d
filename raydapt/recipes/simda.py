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
from raydapt.runtime import config_note, init_ray, seed_everything
from raydapt.stages.annotate import calibrate_domain_mean, mix
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
            demo_template=cfg.teacher.demo_template, demo_max_tokens=cfg.teacher.demo_max_tokens,
            demo_texts=demo_texts, demo_labels=demo_labels, keep_hidden=keep_hidden, stage=stage,
            telemetry={"method": "simda", "run": cfg.run.name}),
        **pool_kwargs(cfg.teacher.pool),
    )


def _cached_pass(cache: StageCache, tracker: Tracker, stage: str, parts: dict[str, Any],
                 rows: pd.DataFrame, shard_rows: int, make_ds, every_s: float = 60.0
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
        _say(f"resolved config: {config_note(cfg, out)}")

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

        # 2. teacher pass: keys + p_LLM for source / target-train / target-test ---------------
        from raydapt.assets import resolve_model

        parts = {"teacher": cfg.teacher.model_dump(mode="json", exclude={"pool", "hf_token"}),
                 "weights": resolve_model(cfg.teacher.model).fingerprint,
                 "data": fps, "ids": config_hash({"s": source["id"].tolist(),
                                                  "tr": tgt_train["id"].tolist(),
                                                  "te": tgt_test["id"].tolist()})}
        allrows = pd.concat([source[["id", "text"]], tgt_train[["id", "text"]],
                             tgt_test[["id", "text"]]], ignore_index=True)
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
            rows = pd.concat(jobs, ignore_index=True)
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
        p_llm_tr = _p_llm(by_id.loc[tgt_train["id"]])
        llm_mean = p_llm_tr.mean(0)
        if a.teacher_prompt == "knn_prompt":
            p_llm_tr = _p_llm(prompted.loc["knn_prompt:" + tgt_train["id"]])
            llm_mean = p_llm_tr.mean(0)
        if a.calibrate_llm == "domain_mean":
            p_llm_tr = calibrate_domain_mean(p_llm_tr, llm_mean)
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
        cal = (lambda p, m=None: calibrate_domain_mean(p, m)) if a.calibrate_llm == "domain_mean" \
            else (lambda p, m=None: p)
        p_zs = cal(p_zs_raw, _p_llm(by_id.loc[tgt_train["id"]]).mean(0))
        p_knn_te = np.stack(knn.loc[tgt_test["id"], "p_knn"].to_numpy())
        teacher_preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "zero_shot" in base:
            teacher_preds["zero_shot_raw"] = (y_te, p_zs_raw.argmax(1))
            teacher_preds["zero_shot"] = (y_te, p_zs.argmax(1))
        if "knn" in base:
            teacher_preds["knn"] = (y_te, p_knn_te.argmax(1))
        yb = test_b["y"].to_numpy()
        if "icl_random" in base:
            teacher_preds["icl_random"] = (yb, cal(_p_llm(prompted.loc["icl_random:" + test_b["id"]])).argmax(1))
        p_near = None
        if {"icl_nearest", "knn_prompt"} & set(base):
            p_near = cal(_p_llm(prompted.loc["icl_nearest:" + test_b["id"]]))
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
        train_kw = dcfg.model_dump(mode="json", exclude={"student", "variants", *loss_keys})
        extra = {**dcfg.model_dump(include=loss_keys), "min_confidence": a.min_confidence}
        distill_df = pd.DataFrame({"text": tgt_train["text"], "p_t": list(p_t),
                                   "h_t": list(by_id.loc[tgt_train["id"], "hidden"])})
        results: dict[str, Any] = {}
        students: dict[str, dict[str, Any]] = {}
        cms: dict[str, np.ndarray] = {}
        for variant in dcfg.variants:
            if variant in ("kl_sim", "kl", "ce"):
                ds, objective = ray.data.from_pandas(distill_df), variant
            elif variant == "source_only":
                ds, objective = ray.data.from_pandas(source[["text", "y"]]), "supervised"
            else:  # oracle: gold target labels (upper bound)
                ds, objective = ray.data.from_pandas(tgt_train[tgt_train["y"] >= 0][["text", "y"]]), "supervised"
            _say(f"student {variant}: {objective} on {ds.count()} rows, {dcfg.epochs} epochs, "
                 f"{dcfg.num_workers} workers")
            with tracker.child(f"student-{variant}", tags={"raydapt.variant": variant}) as run_log:
                run_log.params({"variant": variant, "objective": objective, **train_kw, **extra})
                # same name = same training: Ray Train then resumes it from its last checkpoint
                key = config_hash({"v": variant, "train": train_kw, "extra": extra,
                                   "student": dcfg.student, "seed": cfg.run.seed,
                                   "data": _frame_hash(ds.to_pandas()),
                                   "eval": _frame_hash(tgt_test[["text", "y"]])})
                m = fit_student(
                    name=f"{cfg.run.name}-{variant}-{key[:10]}", objective=objective, train_ds=ds,
                    eval_df=tgt_test, num_classes=C, student=dcfg.student, train=train_kw,
                    seed=cfg.run.seed, storage=str(out / "train"), extra=extra,
                    mlflow_uri=tracker.uri if cfg.tracking.enabled else None,
                    mlflow_run_id=run_log.run_id,
                    telemetry={"stage": f"student-{variant}", "method": "simda",
                               "run": cfg.run.name})
            students[variant] = {"accuracy": m["accuracy"], "final_epoch_loss": m["loss"],
                                 "epochs": m["epoch"], "steps": m.get("steps"),
                                 "resumed_finished_run": bool(
                                     m.get("resumed", False))}
            cms[f"student:{variant}"] = np.asarray(m["confusion"])
            results[f"student:{variant}"] = m["accuracy"]
            _say(f"student {variant}: target-test accuracy {m['accuracy']:.4f}")

        # 8. report ---------------------------------------------------------------------------
        for name, (yt, yp) in teacher_preds.items():
            results[f"teacher:{name}"] = accuracy(yt, yp)
            cms[f"teacher:{name}"] = confusion_matrix(yt, yp, C)
        rej_df = pd.concat([r for r in rejects if len(r)], ignore_index=True) if any(
            len(r) for r in rejects) else pd.DataFrame(columns=["file", "id", "reason", "raw"])
        rej_df.to_parquet(out / "rejects.parquet")
        summary = {
            "job": cfg.run.name, "source": cfg.data.source.path, "target": cfg.data.target.path,
            "accuracy": results, "students": students, "pseudo_label_accuracy": pseudo_acc,
            "counts": counts,
            "rejects": len(rej_df), "icl_test_rows": len(test_b), "seconds": time.time() - t_job,
            "teacher": cfg.teacher.model, "student": dcfg.student, "k": a.k, "lam": a.lam,
        }
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        _plot_confusions(cms, labels, out / "confusion.png")
        parent.metrics({f"acc.{k.replace(':', '.')}": v for k, v in results.items()})
        parent.metrics({"pseudo_label_accuracy": pseudo_acc, "rejects": len(rej_df),
                        "seconds": summary["seconds"]})
        for f in ("annotations.parquet", "rejects.parquet", "results.json", "confusion.png"):
            parent.artifact(out / f)
        width = max(len(k) for k in results)
        _say("target-test accuracy\n" + "\n".join(
            f"  {k:<{width}}  {v:.4f}" for k, v in results.items()))
        _say(f"done in {summary['seconds']:.0f}s; outputs in {out}")
        return summary
