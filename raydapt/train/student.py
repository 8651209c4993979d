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
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydapt.core.assets import load_tokenizer
from raydapt.core.telemetry import StageTelemetry
from raydapt.core.tracking import RunLogger
from raydapt.evaluate import confusion_matrix
from raydapt.losses.distill import kl_distillation, pseudo_label_ce, similarity_alignment
from raydapt.train import say, steps_per_epoch
from raydapt.train.models import EncoderClassifier

OBJECTIVES = ("kl_sim", "kl", "ce", "supervised")


def _loss(objective: str, cfg: dict[str, Any], logits, pooled, batch) -> torch.Tensor:
    if objective == "supervised":
        return torch.nn.functional.cross_entropy(logits, torch.as_tensor(batch["y"]).long())
    p_t = torch.as_tensor(np.stack(batch["p_t"])).float()
    w = None
    if cfg.get("min_confidence", 0.0) > 0:
        w = (p_t.max(-1).values >= cfg["min_confidence"]).float()
    if objective == "ce":
        return pseudo_label_ce(logits, p_t, weights=w)
    loss = kl_distillation(logits, p_t, temperature=cfg["temperature"], weights=w)
    if objective == "kl_sim" and cfg["beta"] > 0:
        h_t = torch.as_tensor(np.stack(batch["h_t"])).float()
        loss = loss + cfg["beta"] * similarity_alignment(
            h_t, pooled, tau=cfg["sim_tau"], kind=cfg["sim_loss"], center=cfg["sim_center"])
    return loss


def _evaluate(model, tok, rows: dict[str, np.ndarray], cfg, rank: int, world: int, C: int):
    """Confusion matrix [C, C] over this worker's slice of the eval rows (summed later)."""
    texts, ys = rows["text"][rank::world], rows["y"][rank::world]
    cm = np.zeros((C, C), dtype=np.int64)
    net = model.module if hasattr(model, "module") else model
    net.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(list(texts[i : i + 64]), truncation=True, max_length=cfg["max_length"],
                      padding=True, return_tensors="pt")
            logits, _ = net(enc["input_ids"], enc["attention_mask"])
            cm += confusion_matrix(ys[i : i + 64], logits.argmax(-1).numpy(), C)
    net.train()
    return cm


def student_loop(cfg: dict[str, Any]) -> None:
    """Per-worker training function (runs inside each Ray Train worker)."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])  # same init on every worker (DDP also broadcasts)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    C = cfg["num_classes"]
    model = EncoderClassifier(cfg["student"], C, pooling="mean")
    tok = load_tokenizer(cfg["student"])  # at the reference's revision (hf: models)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n_rows = cfg["train_rows"]
    per_worker = max(1, cfg["batch_size"] // world)
    per_epoch = steps_per_epoch(n_rows, workers=world, per_worker_batch=per_worker,
                                name=cfg["name"])
    # a fixed step budget (cfg["steps"]) makes baselines and distilled students comparable
    # whatever their row counts: the data is cycled for ceil(steps / per_epoch) epochs
    total = int(cfg.get("steps") or per_epoch * cfg["epochs"])
    n_epochs = math.ceil(total / per_epoch)
    warm = int(cfg["warmup_ratio"] * total)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    start_epoch, last_metrics = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume: model, optimizer, scheduler, epoch
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        (model.module if hasattr(model, "module") else model).load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = int(state["epoch"]) + 1
        last_metrics = state.get("metrics")
        if rank == 0:
            say(f"[{cfg['name']}] resumed from the checkpoint of epoch {start_epoch}/"
                f"{n_epochs}")
    log = RunLogger(cfg.get("mlflow_uri"), cfg.get("mlflow_run_id")) if rank == 0 else RunLogger(None, None)
    eval_rows = cfg["eval_rows"]
    cols = ["text", "y"] if cfg["objective"] == "supervised" else ["text", "p_t", "h_t"]
    # Every worker reads the whole (student-sized) training set once, in source order; each
    # epoch's order and this worker's slice come from (seed, epoch), as with a
    # DistributedSampler. So the batches of epoch e never depend on what ran before it, and a
    # run resumed at epoch e trains exactly as an uninterrupted one (Ray Data's per-epoch
    # streaming order is not reproducible across runs).
    parts: dict[str, list] = {c: [] for c in cols}
    for b in ray.train.get_dataset_shard("train").iter_batches(batch_size=None,
                                                                batch_format="numpy"):
        for c in cols:
            parts[c].append(b[c])
    data = {c: np.concatenate(v) for c, v in parts.items()}
    n_data = len(data["text"])
    step = start_epoch * per_epoch
    t0 = time.time()
    tm = StageTelemetry(**{"stage": "student", **cfg.get("telemetry", {})})  # Ray metrics
    if start_epoch >= n_epochs:  # restored a finished run: report its final metrics again
        ray.train.report({**(last_metrics or {}), "resumed": True})
        return
    for epoch in range(start_epoch, n_epochs):
        # RNG from (seed, epoch, rank): a run resumed at epoch e draws what an uninterrupted one does
        torch.manual_seed(cfg["seed"] * 100_003 + epoch * 101 + rank)
        # train mode every epoch: from_pretrained returns the encoder in eval mode (dropout off),
        # so without this a fresh run's first epoch and a resumed run's first epoch differ
        model.train()
        losses = []
        order = np.random.default_rng(cfg["seed"] + epoch).permutation(n_data)
        mine = order[rank::world][: n_data // world]  # equal slices: DDP steps in lockstep
        for s in range(len(mine) // per_worker):  # drop_last
            if step >= total:
                break
            t_batch = time.perf_counter()
            ix = mine[s * per_worker : (s + 1) * per_worker]
            batch = {c: data[c][ix] for c in cols}
            enc = tok(list(batch["text"]), truncation=True, max_length=cfg["max_length"],
                      padding=True, return_tensors="pt")
            logits, pooled = model(enc["input_ids"], enc["attention_mask"])
            loss = _loss(cfg["objective"], cfg, logits, pooled, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            tm.record_batch(rows=len(batch["text"]), seconds=time.perf_counter() - t_batch)
            if rank == 0 and (step % cfg["log_every"] == 0 or step == total):
                rate = (step - start_epoch * per_epoch) / max(1e-9, time.time() - t0)
                eta = (total - step) / max(rate, 1e-9)
                say(f"[{cfg['name']}] epoch {epoch + 1}/{n_epochs} step {step}/{total} "
                    f"loss {np.mean(losses[-cfg['log_every']:]):.4f} {rate:.2f} steps/s "
                    f"ETA {eta:.0f}s")
                log.metrics({"train_loss": float(np.mean(losses[-cfg['log_every']:]))}, step)
        cm = torch.as_tensor(_evaluate(model, tok, eval_rows, cfg, rank, world, C))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(cm)
        cm = cm.numpy()
        acc = float(np.trace(cm) / max(1, cm.sum()))
        metrics = {"epoch": epoch + 1, "accuracy": acc, "loss": float(np.mean(losses or [0])),
                   "confusion": cm.tolist(), "steps": step, "rows": n_rows}
        log.metrics({"accuracy": acc, "epoch_loss": metrics["loss"], "steps": step}, epoch + 1)
        checkpoint = None
        if rank == 0 and cfg.get("checkpoint", True):
            d = Path(cfg["scratch"]) / f"ckpt-{epoch}"
            d.mkdir(parents=True, exist_ok=True)
            net = model.module if hasattr(model, "module") else model
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "epoch": epoch, "metrics": metrics},
                       d / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(str(d))
        ray.train.report(metrics, checkpoint=checkpoint)


def fit_student(
    *, name: str, objective: str, train_ds, eval_df, num_classes: int, student: str,
    train: dict[str, Any], seed: int, storage: str, extra: dict[str, Any] | None = None,
    mlflow_uri: str | None = None, mlflow_run_id: str | None = None,
    telemetry: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fit one student with :class:`ray.train.torch.TorchTrainer`; returns the final metrics.

    ``train`` holds the DistillSection fields (num_workers, epochs, steps, lr, ...): ``steps``
    (if set) is the number of optimiser steps whatever the row count; ``extra`` the loss
    knobs (beta, temperature, sim_tau, sim_loss, min_confidence).

    Resume: the Ray Train run is named ``name`` under ``storage``, and Ray Train restores the
    latest checkpoint of a run with the same name and storage path — so a job killed
    mid-training continues from its last finished epoch when rerun. Callers must therefore put a
    hash of everything that determines the training (config, data) into ``name``.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    # a finished fit of the same name (= same training) is not started again
    final = Path(storage) / name / "final_metrics.json"
    if final.exists():
        return {**json.loads(final.read_text()), "resumed": True}
    n_rows = train_ds.count()
    workers = int(train["num_workers"])
    # fail before Ray Train starts if no optimiser step would run (was: 0 steps, loss 0.0)
    steps_per_epoch(n_rows, workers=workers, name=name,
                    per_worker_batch=max(1, int(train["batch_size"]) // workers))
    cfg = {
        **train, **(extra or {}), "name": name, "objective": objective, "seed": seed,
        "student": student, "num_classes": num_classes, "train_rows": n_rows,
        "eval_rows": {"text": eval_df["text"].to_numpy(), "y": eval_df["y"].to_numpy()},
        "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
        "scratch": str(Path(storage) / name / "scratch"),
        "log_every": max(1, math.ceil(n_rows / max(1, train["batch_size"]) / 4)),
        "threads": max(1, int(train.get("cpus_per_worker", 1))),
        # Ray metric tags (stage, method, run) of this fit; see raydapt.core.telemetry
        "telemetry": dict(telemetry or {"stage": f"student-{objective}", "run": name}),
    }
    trainer = TorchTrainer(
        student_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=bool(train.get("use_gpu")),
            # custom resources (train.resources, e.g. {train_gpu: 1}) steer workers (cluster/)
            resources_per_worker={"CPU": float(train.get("cpus_per_worker", 1)),
                                  **dict(train.get("resources") or {})}),
        run_config=RunConfig(
            name=name, storage_path=str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=int(train.get("max_failures", 1))),
            checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train": train_ds},
        # each worker gets the whole training set in source order and slices it itself
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in metrics.items() if k != "resumed"}, default=float))
    os.replace(tmp, final)  # atomic: written only once the fit has finished
    return metrics
