"""DALLMi recipe: multi-label positive-unlabeled domain adaptation (source male -> target female).

Steps, in order (:meth:`DALLMiRecipe.run`; each an MLflow child run of the job's parent run;
read / hide / source are also the shared set-up of a sweep's trials):

1. read     one multi-label file; source / target rows chosen by ``data.domain_field``;
            rejects (empty text, unknown labels, duplicate ids, ...) -> rejects.parquet
2. split    seeded id-hash 80/20 split per domain (train / test); the target test split keeps
            every label
3. hide     seeded label hiding on the target train split: keep ``hide.keep_ratio`` of each
            label's positives (>=1), the rest become 0 ("unlabeled") -> hidden_labels.parquet
4. source   fine-tune the classifier on the labeled source train split (BCE, full labels) on
            Ray Train; the checkpoint is cached by content (encoder, source rows, train config,
            seed), so every ratio, method and sweep trial with the same source reuses it
5. adapt    one fit per method, each starting from the source checkpoint:
              no_adapt     the source model as is
              bce_partial  BCE on the observed labels (hidden positives count as negatives)
              bce_oracle   BCE on the full target labels (upper bound)
              aad          adversarial adaptation with distillation (no target labels)
              dallmi       variational PU loss (norm) + MixUp, class-cycle sampler
              dallmi_log   the same with the log (VPU) variational loss (ablation)
            per-epoch target-test mAP, binarised mAP, micro / macro F1 to MLflow
6. report   results.json (final-epoch metrics and per-epoch history for every method)

Model selection never looks at the test split: every method reports its last epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.config import ConfigError, _expand_env, config_hash
from raydapt.core.cache import StageCache
from raydapt.core.runtime import seed_everything
from raydapt.core.storage import OutputDir
from raydapt.core.tracking import RunLogger, Tracker
from raydapt.data.labels import hide_labels, multi_hot
from raydapt.data.multilabel import read_multilabel
from raydapt.data.readers import DataError, fingerprint, split_and_subsample
from raydapt.job import Recipe, cached_stage, speaker
from raydapt.recipes.dallmi_config import DALLMiJob, DALLMiTrainSection
from raydapt.train.multilabel import (
    AADLoss,
    EncoderSpec,
    FitTrain,
    MultilabelLoopConfig,
    PULoss,
    build_model,
    fit,
    multilabel_metrics,
    predict_probs,
    tokenizer,
)
from raydapt.train.settings import from_section

ADAPT_OBJECTIVE = {"bce_partial": ("bce", None), "bce_oracle": ("bce", None),
                   "aad": ("aad", None), "dallmi": ("dallmi", "norm"),
                   "dallmi_log": ("dallmi", "log")}


# The cached stages this recipe owns and their code versions (bump one when its code changes
# what it writes).
STAGE_VERSIONS: dict[str, int] = {"dallmi_source": 1}

_say = speaker("dallmi")


@dataclass
class Prepared:
    """The recipe's typed state before adaptation, shared by every fit (built once per job /
    sweep): ``read_and_split`` sets the rows and labels, ``hide`` ``observed``,
    ``source_finetune`` ``source_state`` and ``source_metrics``."""

    vocab: list[str]
    source: pd.DataFrame  # source train rows: id, text, labels
    source_test: pd.DataFrame
    target_train: pd.DataFrame
    target_test: pd.DataFrame
    y_source: np.ndarray  # [Ns, L]
    y_train: np.ndarray  # [Nt, L] full target-train labels (oracle only)
    observed: np.ndarray  # [Nt, L] after hiding
    y_test: np.ndarray  # [Nte, L]
    source_state: str  # path of the cached source model state_dict
    source_metrics: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    rejects: pd.DataFrame | None = None


def _encoder(cfg: DALLMiJob, n_labels: int, init_state: str | None = None) -> EncoderSpec:
    m = cfg.model
    return EncoderSpec(encoder=m.encoder, num_labels=n_labels, pooling=m.pooling,
                       dropout=m.dropout, trust_remote_code=m.trust_remote_code,
                       train_layers=m.train_layers, init_state=init_state)


def _fit_train(section: DALLMiTrainSection) -> FitTrain:
    return from_section(FitTrain, section)


def _loop(cfg: DALLMiJob, section: DALLMiTrainSection, *, name: str, objective: str,
          vocab: list[str], texts, y, eval_texts, eval_y, seed: int,
          init_state: str | None = None, **extra) -> MultilabelLoopConfig:
    return MultilabelLoopConfig(
        name=name, objective=objective, seed=seed,
        model=_encoder(cfg, len(vocab), init_state), train=_fit_train(section),
        threshold=cfg.threshold, train_texts=list(texts),
        train_y=np.asarray(y, dtype=np.float32), eval_texts=list(eval_texts),
        eval_y=np.asarray(eval_y, dtype=np.int64), **extra)


def check_cycle_batch(cfg: DALLMiJob, n_labels: int) -> None:
    """The class-cycle sampler needs one row per label plus the random rows in every
    per-worker batch; fail before any training if it cannot have them."""
    a = cfg.adapt
    per = a.batch_size // a.num_workers
    n_rand = int(np.floor(round(a.random_share * per, 9) + 0.5))
    if per < n_labels + n_rand:
        raise ConfigError(
            f"adapt.batch_size={a.batch_size} over {a.num_workers} worker(s) gives {per} rows "
            f"per worker batch; the class-cycle sampler needs >= {n_labels} labels + {n_rand} "
            f"random rows: raise adapt.batch_size or lower adapt.random_share")


def _needs_ray(cfg: DALLMiJob) -> bool:
    adapt = [m for m in cfg.methods if m != "no_adapt"]
    return (not cfg.source.in_process) or (bool(adapt) and not cfg.adapt.in_process)


def prepare(cfg: DALLMiJob, tracker: Tracker, out: Path) -> Prepared:
    """Stages 1-4, shared by every method and sweep trial: read + split, hide, source
    fine-tune (cached)."""
    prep = read_and_split(cfg, tracker)
    hide(cfg, prep, tracker, out)
    source_finetune(cfg, prep, tracker, out)
    return prep


def read_and_split(cfg: DALLMiJob, tracker: Tracker) -> Prepared:
    """1-2. read the file (rejects kept), pick source / target rows by domain, split each."""
    d = cfg.data
    path = Path(_expand_env(d.root)) / d.path  # defaults are not expanded at load time
    with tracker.child("read") as run_log:
        rows, rejects, vocab = read_multilabel(
            path, fmt=d.format, id_field=d.id_field, text_field=d.text_field,
            labels_field=d.labels_field, label_columns=d.label_columns, labels=d.labels,
            domain_field=d.domain_field, domains=[*d.source_domains, *d.target_domains])
        fps = {"data": fingerprint(path)}
        src_all = rows[rows["domain"].isin(d.source_domains)]
        tgt_all = rows[rows["domain"].isin(d.target_domains)]
        source, source_test = split_and_subsample(src_all, seed=cfg.run.seed,
                                                  test_fraction=d.test_fraction,
                                                  max_rows=d.max_source_rows)
        tgt_train, tgt_test = split_and_subsample(
            tgt_all, seed=cfg.run.seed, test_fraction=d.test_fraction,
            max_rows=d.max_target_train_rows, max_test_rows=d.max_target_test_rows)
        counts = {"source_rows": len(source), "source_test_rows": len(source_test),
                  "target_train_rows": len(tgt_train), "target_test_rows": len(tgt_test),
                  "rejects": len(rejects), "labels": len(vocab)}
        run_log.metrics({k: v for k, v in counts.items()})
        _say(f"read {path}: {counts} (source {d.source_domains} -> target {d.target_domains})")
        if min(len(source), len(tgt_train), len(tgt_test)) == 0:
            raise DataError(f"empty split {counts}: check data.domain_field "
                            f"{d.domain_field!r} and its values {d.source_domains} / "
                            f"{d.target_domains}, and the data.max_* caps")
        if any(m in ("dallmi", "dallmi_log") for m in cfg.methods):
            check_cycle_batch(cfg, len(vocab))
    return Prepared(vocab=vocab, source=source, source_test=source_test, target_train=tgt_train,
                    target_test=tgt_test, y_source=multi_hot(list(source["labels"]), vocab),
                    y_train=multi_hot(list(tgt_train["labels"]), vocab),
                    observed=np.zeros((0, len(vocab))),
                    y_test=multi_hot(list(tgt_test["labels"]), vocab), source_state="",
                    source_metrics={}, counts=counts, fingerprints=fps, rejects=rejects)


def hide(cfg: DALLMiJob, prep: Prepared, tracker: Tracker, out: Path) -> None:
    """3. hide: keep ``hide.keep_ratio`` of the target-train positives (seeded) ->
    ``prep.observed``, hidden_labels.parquet, rejects.parquet."""
    with tracker.child("hide") as run_log:
        y_tr, tgt_train = prep.y_train, prep.target_train
        observed = hide_labels(y_tr, keep_ratio=cfg.hide.keep_ratio, strategy=cfg.hide.strategy,
                               seed=cfg.run.seed, row_keys=list(tgt_train["id"]))
        kept = observed.sum(0)
        run_log.metrics({"observed_positives": float(kept.sum()),
                         "hidden_positives": float(y_tr.sum() - kept.sum())})
        _say(f"hide: keep_ratio {cfg.hide.keep_ratio} ({cfg.hide.strategy}): "
             f"{int(kept.sum())}/{int(y_tr.sum())} target-train positives observed")
        pd.DataFrame({"id": tgt_train["id"], "labels": tgt_train["labels"],
                      "observed": [list(np.asarray(prep.vocab)[r > 0]) for r in observed]}
                     ).to_parquet(out / "hidden_labels.parquet")
        prep.rejects.to_parquet(out / "rejects.parquet")
    prep.observed = observed


def source_finetune(cfg: DALLMiJob, prep: Prepared, tracker: Tracker, out: Path) -> None:
    """4. source: fine-tune on the labeled source rows (BCE), cached by content; its target-test
    metrics are the no-adaptation baseline -> ``prep.source_state``, ``prep.source_metrics``."""
    import torch

    vocab, source, source_test = prep.vocab, prep.source, prep.source_test
    src_cfg = cfg.source.model_dump(mode="json", exclude={"in_process", "max_failures",
                                                          "log_every", "cpus_per_worker"})
    parts = {"model": cfg.model.model_dump(mode="json"), "train": src_cfg,
             "data": prep.fingerprints,
             "ids": config_hash({"ids": source["id"].tolist(), "vocab": vocab}),
             "seed": cfg.run.seed}

    def compute(cdir: Path, run_log: RunLogger) -> None:
        _say(f"source: fine-tune {cfg.model.encoder} on {len(source)} rows, "
             f"{cfg.source.epochs} epochs, {cfg.source.num_workers} worker(s)"
             f"{' in-process' if cfg.source.in_process else ' on Ray Train'}")
        lc = _loop(cfg, cfg.source, name=f"{cfg.run.name}-source", objective="bce",
                   vocab=vocab, texts=source["text"], y=prep.y_source,
                   eval_texts=source_test["text"],
                   eval_y=multi_hot(list(source_test["labels"]), vocab),
                   seed=cfg.run.seed, mlflow_uri=tracker.uri if cfg.tracking.enabled
                   else None, mlflow_run_id=run_log.run_id)
        res = fit(lc, storage=str(out / "train"))
        torch.save(res["state"], cdir / "model.pt")
        (cdir / "history.json").write_text(json.dumps(res["history"]))

    def load(cdir: Path, run_log: RunLogger) -> tuple[Path, dict[str, Any]]:
        hist = json.loads((cdir / "history.json").read_text())
        src_metrics = {"source_test": hist[-1] if hist else {}}
        # the source model on the target test split = the no-adaptation baseline
        # (train_layers only freezes parameters: the forward pass is the same)
        spec = _encoder(cfg, len(vocab), init_state=str(cdir / "model.pt"))
        probs = predict_probs(build_model(spec, seed=cfg.run.seed), tokenizer(spec),
                              list(prep.target_test["text"]), max_length=cfg.adapt.max_length)
        src_metrics["target_test"] = multilabel_metrics(prep.y_test, probs, cfg.threshold)
        run_log.metrics({f"target_{k}": v for k, v in src_metrics["target_test"].items()})
        return cdir, src_metrics

    cdir, src_metrics = cached_stage(
        StageCache(cfg.run.cache_dir, versions=STAGE_VERSIONS), tracker, "dallmi_source", parts,
        compute=compute, load=load, run_name="source", tags={"raydapt.variant": "source"},
        params={"objective": "bce", **cfg.source.model_dump(mode="json")}, say=_say,
        label="source")
    prep.source_state, prep.source_metrics = str(cdir / "model.pt"), src_metrics


def adapt(cfg: DALLMiJob, prep: Prepared, method: str, *, out: Path,
          run_log: RunLogger | None = None, mlflow_uri: str | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Stage 5 for one method: fit from the source checkpoint; returns final metrics + history."""
    if method == "no_adapt":
        m = dict(prep.source_metrics["target_test"])
        if on_epoch:
            on_epoch({"epoch": 0, **m})
        return {**m, "history": []}
    objective, mode = ADAPT_OBJECTIVE[method]
    a = cfg.adapt
    y = prep.y_train if method == "bce_oracle" else prep.observed
    pu = from_section(PULoss, a, mode=mode or "norm")
    if objective == "dallmi":
        check_cycle_batch(cfg, int((y.sum(0) > 0).sum()))
    lc = _loop(cfg, a, name=f"{cfg.run.name}-{method}", objective=objective,
               vocab=prep.vocab, texts=prep.target_train["text"], y=y,
               eval_texts=prep.target_test["text"], eval_y=prep.y_test, seed=cfg.run.seed,
               init_state=prep.source_state, pu=pu, aad=from_section(AADLoss, a.aad),
               source_texts=list(prep.source["text"]),
               mlflow_uri=mlflow_uri if run_log is not None and run_log.enabled else None,
               mlflow_run_id=run_log.run_id if run_log is not None else None,
               on_epoch=on_epoch)
    res = fit(lc, storage=str(out / "train"))
    hist = res["history"]
    return {**{k: v for k, v in hist[-1].items() if k != "epoch"}, "history": hist}


class DALLMiRecipe(Recipe):
    """One DALLMi job: :meth:`run` lists the steps; each step sets its own attributes below."""

    STAGE_VERSIONS = STAGE_VERSIONS
    cfg: DALLMiJob

    prep: Prepared  # read (rows, labels), hide (observed), source (source model + metrics)
    results: dict[str, Any]  # adapt: final metrics + history per method

    @classmethod
    def needs_ray(cls, cfg: DALLMiJob) -> bool:
        return _needs_ray(cfg)

    def run(self) -> dict[str, Any]:
        """The steps, in order; returns the results dict also written to results.json."""
        self.read()
        self.hide()
        self.source_finetune()
        self.adapt_methods()
        return self.report()

    def read(self) -> None:
        """1-2. read + split (rejects kept); the data fingerprints to the parent run."""
        cfg, ctx = self.cfg, self.ctx
        self.prep = read_and_split(cfg, ctx.tracker)
        ctx.parent.params({"data_fingerprint": self.prep.fingerprints})
        ctx.parent.datasets(self.prep.fingerprints, sources={"data": str(cfg.data.path)})

    def hide(self) -> None:
        """3. hide target-train positives."""
        hide(self.cfg, self.prep, self.ctx.tracker, self.ctx.out)

    def source_finetune(self) -> None:
        """4. the source model (cached)."""
        source_finetune(self.cfg, self.prep, self.ctx.tracker, self.ctx.out)

    def adapt_methods(self) -> None:
        """5. adapt: one fit per method from the source checkpoint, each an MLflow child run."""
        cfg, ctx, prep = self.cfg, self.ctx, self.prep
        results: dict[str, Any] = {}
        for method in cfg.methods:
            t0 = time.time()
            _say(f"{method}: adapting from the source checkpoint")
            with ctx.tracker.child(method, tags={"raydapt.variant": method}) as run_log:
                run_log.params({"method": method, "keep_ratio": cfg.hide.keep_ratio,
                                **({} if method == "no_adapt" else
                                   cfg.adapt.model_dump(mode="json"))})
                r = adapt(cfg, prep, method, out=ctx.out, run_log=run_log,
                          mlflow_uri=ctx.tracker.uri if cfg.tracking.enabled else None)
                if method == "no_adapt":
                    run_log.metrics({k: v for k, v in r.items() if k != "history"}, 0)
                r["seconds"] = round(time.time() - t0, 1)
            results[method] = r
            _say(f"{method}: target-test mAP {r['map']:.4f} (binarised {r['map_bin']:.4f}, "
                 f"micro-F1 {r['micro_f1']:.4f}) in {r['seconds']:.0f}s")
        self.results = results

    def report(self) -> dict[str, Any]:
        """6. report: results.json, the parent run's metrics / table / artifacts, the console table."""
        cfg, ctx, prep, results = self.cfg, self.ctx, self.prep, self.results
        parent, out = ctx.parent, ctx.out
        summary = {
            "job": cfg.run.name, "seed": cfg.run.seed, "keep_ratio": cfg.hide.keep_ratio,
            "strategy": cfg.hide.strategy, "encoder": cfg.model.encoder, "labels": prep.vocab,
            "source_domains": cfg.data.source_domains, "target_domains": cfg.data.target_domains,
            "counts": prep.counts,
            "target_train_positives": prep.y_train.sum(0).astype(int).tolist(),
            "target_train_observed": prep.observed.sum(0).astype(int).tolist(),
            "source": prep.source_metrics,
            "methods": results, "seconds": round(ctx.seconds(), 1),
        }
        ctx.write_results(summary)
        for k, r in results.items():
            parent.metrics({f"{m}.{k}": r[m] for m in ("map", "map_bin", "micro_f1", "macro_f1")})
        parent.metrics({"seconds": summary["seconds"]})
        parent.results_table({k: r["map"] for k, r in results.items()}, metric="target-test mAP",
                             seeds=[cfg.run.seed], title=f"{cfg.run.name}: target-test mAP",
                             out_dir=out)
        for f in ("results.json", "rejects.parquet", "hidden_labels.parquet"):
            parent.artifact(out / f)
        width = max(len(k) for k in results)
        _say("target-test mAP / binarised mAP / micro-F1 / macro-F1\n" + "\n".join(
            f"  {k:<{width}}  {r['map']:.4f}  {r['map_bin']:.4f}  {r['micro_f1']:.4f}  "
            f"{r['macro_f1']:.4f}" for k, r in results.items()))
        _say(f"done in {summary['seconds']:.0f}s; outputs in {out}")
        return summary


def run(cfg: DALLMiJob) -> dict[str, Any]:
    """Run the DALLMi job (:class:`DALLMiRecipe`); returns the results dict also written to
    results.json."""
    return DALLMiRecipe.main(cfg)


# ---------------------------------------------------------------------------------------------
# sweep hooks (raydapt.ops.sweep): shared set-up in the driver, one adaptation per trial
# ---------------------------------------------------------------------------------------------


def _sweep_method(cfg: DALLMiJob) -> str:
    adaptive = [m for m in cfg.methods if m != "no_adapt"]
    if len(adaptive) != 1:
        raise ConfigError(f"a DALLMi sweep trains one adaptation method per trial; set methods "
                          f"to one of {sorted(ADAPT_OBJECTIVE)} (got {cfg.methods})")
    return adaptive[0]


def prepare_for_sweep(cfg: DALLMiJob, tracker: Tracker) -> None:
    """Driver side: read / hide / train the source model once, so trials find it cached."""
    _sweep_method(cfg)
    out = OutputDir(cfg.run.output_dir, cfg.run.name).local  # a URI: its local mirror
    prepare(cfg, tracker, out)


def trial(cfg: DALLMiJob, *, report: Callable[[dict[str, Any]], None],
          run_log: RunLogger) -> dict[str, Any]:
    """One sweep trial: adapt with this trial's config from the cached source model; report
    target-test metrics per epoch (live when ``adapt.in_process``, else after the fit)."""
    method = _sweep_method(cfg)
    seed_everything(cfg.run.seed)
    out = OutputDir(cfg.run.output_dir, cfg.run.name).local  # a URI: its local mirror
    quiet = Tracker.from_section(cfg.tracking, enabled=False)
    prep = prepare(cfg, quiet, out)
    live = cfg.adapt.in_process

    def on_epoch(m: dict[str, Any]) -> None:
        report({k: v for k, v in m.items() if isinstance(v, (int, float))})

    r = adapt(cfg, prep, method, out=out, run_log=run_log, mlflow_uri=run_log.uri,
              on_epoch=on_epoch if live else None)
    if not live:
        for m in r["history"]:
            on_epoch(m)
    return r
