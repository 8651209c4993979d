"""Ray Train loop for SimDA students: distilled (KL + sim, KL, CE) or supervised baselines.

Per-worker function first (:func:`student_loop`), driver wiring below (:func:`fit_student`).

Datasets handed to the trainer:

- ``train``: ``text`` and, by objective, ``p_t`` [C] + ``h_t`` [H_T] (distillation) or ``y``
  (supervised). Every worker reads all of it once; epoch e's permutation comes from seed + e and
  worker r trains on rows r, r+W, ... of it (equal slices), like a DistributedSampler.
- ``eval``: ``text``, ``y`` — the target test split. Not split by Ray: worker r evaluates rows
  r, r+W, r+2W, ... and the counts are summed with an all-reduce, so every row counts once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydapt.core.assets import load_tokenizer
from raydapt.core.storage import Store, remote_of
from raydapt.core.telemetry import StageTelemetry
from raydapt.core.tracking import RunLogger
from raydapt.data.text import truncate_text
from raydapt.evaluate import confusion_matrix
from raydapt.losses.distill import kl_distillation, pseudo_label_ce, similarity_alignment
from raydapt.train import per_worker_batch
from raydapt.train.launch import launch
from raydapt.train.loop import Fit, Loop, LoopRun, TorchOptimiser, run
from raydapt.train.models import EncoderClassifier
from raydapt.train.settings import StudentTrain

OBJECTIVES = ("kl_sim", "kl", "ce", "supervised")


@dataclass(frozen=True)
class StudentLoopConfig:
    """Everything :func:`student_loop` reads (handed to each Ray Train worker as a dict)."""

    name: str
    objective: str
    seed: int
    student: str
    num_classes: int
    train_rows: int
    eval_rows: dict[str, np.ndarray]
    train: StudentTrain
    scratch: str
    log_every: int
    threads: int
    telemetry: dict[str, str]
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    checkpoint: bool = True


def _loss(objective: str, t: StudentTrain, logits, pooled, batch) -> torch.Tensor:
    if objective == "supervised":
        return torch.nn.functional.cross_entropy(logits, torch.as_tensor(batch["y"]).long())
    p_t = torch.as_tensor(np.stack(batch["p_t"])).float()
    w = None
    if t.min_confidence > 0:
        w = (p_t.max(-1).values >= t.min_confidence).float()
    if objective == "ce":
        return pseudo_label_ce(logits, p_t, weights=w)
    loss = kl_distillation(logits, p_t, temperature=t.temperature, weights=w)
    if objective == "kl_sim" and t.beta > 0:
        h_t = torch.as_tensor(np.stack(batch["h_t"])).float()
        loss = loss + t.beta * similarity_alignment(
            h_t, pooled, tau=t.sim_tau, kind=t.sim_loss, center=t.sim_center)
    return loss


def student_texts(tok, texts, max_length: int, side: str) -> list[str]:
    """The texts a student sees: as they are for ``head`` (the tokenizer's own right
    truncation to ``max_length``), else cut to the window first (``tail`` / ``head_tail``), with
    room for the special tokens and the " ... " joint."""
    if side == "head":
        return list(texts)
    return [truncate_text(tok, x, max_length - 5, side) for x in texts]


def _evaluate(model, tok, rows: dict[str, np.ndarray], max_length: int, rank: int, world: int,
              C: int):
    """Confusion matrix [C, C] over this worker's slice of the eval rows (summed later)."""
    texts, ys = rows["text"][rank::world], rows["y"][rank::world]
    cm = np.zeros((C, C), dtype=np.int64)
    net = model.module if hasattr(model, "module") else model
    net.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(list(texts[i : i + 64]), truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt")
            logits, _ = net(enc["input_ids"], enc["attention_mask"])
            cm += confusion_matrix(ys[i : i + 64], logits.argmax(-1).numpy(), C)
    net.train()
    return cm


class StudentFit(Fit):
    """One student on one worker: the encoder (DDP), the training rows and the loss of
    :func:`_loss`; :func:`raydapt.train.loop.run` does the rest."""

    def __init__(self, c: StudentLoopConfig, model, tok, data: dict[str, np.ndarray],
                 eval_rows: dict[str, np.ndarray], cols: list[str], rank: int, world: int,
                 per_worker: int, log) -> None:
        self.c, self.ddp, self.tok, self.data, self.eval_rows = c, model, tok, data, eval_rows
        self.model = model.module if hasattr(model, "module") else model
        self.cols, self.rank, self.world, self.per_worker, self.log = (cols, rank, world,
                                                                        per_worker, log)

    def start_epoch(self, epoch: int) -> None:
        # RNG from (seed, epoch, rank): a run resumed at epoch e draws what an uninterrupted
        # one does
        torch.manual_seed(self.c.seed * 100_003 + epoch * 101 + self.rank)
        # train mode every epoch: from_pretrained returns the encoder in eval mode (dropout off),
        # so without this a fresh run's first epoch and a resumed run's first epoch differ
        self.ddp.train()

    def batches(self, epoch: int):
        n_data = len(self.data["text"])
        order = np.random.default_rng(self.c.seed + epoch).permutation(n_data)
        mine = order[self.rank::self.world][: n_data // self.world]  # equal slices: lockstep
        for s in range(len(mine) // self.per_worker):  # drop_last
            ix = mine[s * self.per_worker : (s + 1) * self.per_worker]
            yield {col: self.data[col][ix] for col in self.cols}

    def loss(self, batch) -> torch.Tensor:
        t = self.c.train
        enc = self.tok(list(batch["text"]), truncation=True, max_length=t.max_length,
                       padding=True, return_tensors="pt")
        logits, pooled = self.ddp(enc["input_ids"], enc["attention_mask"])
        return _loss(self.c.objective, t, logits, pooled, batch)

    def end_epoch(self, epoch: int, metrics: dict[str, Any], run: LoopRun) -> None:
        import torch.distributed as dist

        c, t = self.c, self.c.train
        metrics.update(steps=run.step, rows=c.train_rows)
        if t.eval_every_epoch or epoch == run.steps.epochs - 1:  # the last one: always
            cm = torch.as_tensor(_evaluate(self.ddp, self.tok, self.eval_rows, t.max_length,
                                           self.rank, self.world, c.num_classes))
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(cm)
            cm = cm.numpy()
            metrics.update(accuracy=float(np.trace(cm) / max(1, cm.sum())),
                           confusion=cm.tolist())
            # a curve over epochs when evaluated every epoch, else one summary value
            self.log.metrics({"accuracy": metrics["accuracy"]},
                             epoch + 1 if t.eval_every_epoch else 0)
        self.log.metrics({"epoch_loss": metrics["loss"]}, epoch + 1)  # steps: a param


def student_loop(config: dict[str, Any]) -> None:
    """Per-worker training function (runs inside each Ray Train worker); ``config`` holds the
    fields of a :class:`StudentLoopConfig`."""
    import ray.train

    c = StudentLoopConfig(**config)
    t = c.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(c.seed)  # same init on every worker (DDP also broadcasts)
    if c.threads:
        torch.set_num_threads(c.threads)
    model = EncoderClassifier(c.student, c.num_classes, pooling="mean")
    tok = load_tokenizer(c.student)  # at the reference's revision (hf: models)
    model = ray.train.torch.prepare_model(model)
    per_worker = per_worker_batch(t.batch_size, world)
    # a fixed step budget (train.steps) makes baselines and distilled students comparable
    # whatever their row counts: the data is cycled for ceil(steps / per_epoch) epochs
    steps = t.steps_for(c.train_rows, workers=world, name=c.name)
    opt = TorchOptimiser(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                         total=steps.total, warmup_ratio=t.warmup_ratio)
    log = RunLogger(c.mlflow_uri, c.mlflow_run_id) if rank == 0 else RunLogger(None, None)
    cols = ["text", "y"] if c.objective == "supervised" else ["text", "p_t", "h_t"]
    # Every worker reads the whole (student-sized) training set once, in source order; each
    # epoch's order and this worker's slice come from (seed, epoch), as with a
    # DistributedSampler. So the batches of epoch e never depend on what ran before it, and a
    # run resumed at epoch e trains exactly as an uninterrupted one (Ray Data's per-epoch
    # streaming order is not reproducible across runs).
    parts: dict[str, list] = {col: [] for col in cols}
    for b in ray.train.get_dataset_shard("train").iter_batches(batch_size=None,
                                                                batch_format="numpy"):
        for col in cols:
            parts[col].append(b[col])
    data = {col: np.concatenate(v) for col, v in parts.items()}
    eval_rows = c.eval_rows
    if t.text_truncation != "head":  # cut every text to the window once, not every epoch
        data["text"] = np.asarray(student_texts(tok, data["text"], t.max_length,
                                                t.text_truncation), dtype=object)
        eval_rows = {**eval_rows, "text": np.asarray(student_texts(
            tok, eval_rows["text"], t.max_length, t.text_truncation), dtype=object)}
    fit = StudentFit(c, model, tok, data, eval_rows, cols, rank, world, per_worker, log)
    run(fit, Loop(name=c.name, steps=steps, optimiser=opt, log=log, log_every=c.log_every,
                  rows_per_step=per_worker, rank=rank, world=world,
                  scratch=c.scratch if c.checkpoint else None,
                  telemetry=StageTelemetry(**{"stage": "student", **c.telemetry})))


def fit_student(
    *, name: str, objective: str, train_ds, eval_df, num_classes: int, student: str,
    train: StudentTrain, seed: int, storage: str, mlflow_uri: str | None = None,
    mlflow_run_id: str | None = None, telemetry: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fit one student with Ray Train (:func:`raydapt.train.launch.launch`); returns the final
    metrics.

    Resume: the Ray Train run is named ``name`` under ``storage``, and Ray Train restores the
    latest checkpoint of a run with the same name and storage path — so a job killed
    mid-training continues from its last finished epoch when rerun. Callers must therefore put a
    hash of everything that determines the training (config, data) into ``name``.
    """
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    # a finished fit of the same name (= same training) is not started again
    done = _final_metrics(storage, name)
    if done is not None:
        return {**done, "resumed": True}
    n_rows = train_ds.count()
    # fail before Ray Train starts if no optimiser step would run (was: 0 steps, loss 0.0)
    train.steps_for(n_rows, name=name)
    loop = StudentLoopConfig(
        name=name, objective=objective, seed=seed, student=student, num_classes=num_classes,
        train_rows=n_rows, train=train,
        eval_rows={"text": eval_df["text"].to_numpy(), "y": eval_df["y"].to_numpy()},
        mlflow_uri=mlflow_uri, mlflow_run_id=mlflow_run_id,
        scratch=str(Path(storage) / name / "scratch"),
        log_every=max(1, math.ceil(n_rows / max(1, train.batch_size) / 4)),
        threads=max(1, int(train.cpus_per_worker)),
        # Ray metric tags (stage, method, run) of this fit; see raydapt.core.telemetry
        telemetry=dict(telemetry or {"stage": f"student-{objective}", "run": name}))
    result = launch(
        student_loop, {f.name: getattr(loop, f.name) for f in fields(loop)}, name=name,
        storage=storage, workers=train.workers, datasets={"train": train_ds},
        # each worker gets the whole training set in source order and slices it itself
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)))
    metrics = dict(result.metrics)
    _write_final_metrics(storage, name, {k: v for k, v in metrics.items() if k != "resumed"})
    return metrics


FINAL = "final_metrics.json"


def _final_store(storage: str) -> Store:
    """Where a fit's final metrics live: the object store itself when ``storage`` stands for
    one (a URI, or a job's local mirror of one), so a rerun on another machine, with an empty
    mirror, skips the finished fit too instead of starting Ray Train only to restore its last
    checkpoint; else the local directory."""
    return Store(remote_of(storage) or storage)


def _final_metrics(storage: str, name: str) -> dict[str, Any] | None:
    """The final metrics of a finished fit ``name`` under ``storage``, or None."""
    st = _final_store(storage)
    return st.read_json(f"{name}/{FINAL}") if st.exists(f"{name}/{FINAL}") else None


def _write_final_metrics(storage: str, name: str, metrics: dict[str, Any]) -> None:
    """Written only once the fit has finished, atomically (Store.write_bytes: a local file
    renamed into place, or one upload)."""
    _final_store(storage).write_bytes(f"{name}/{FINAL}",
                                      json.dumps(metrics, default=float).encode())
