"""Training loop for DALLMi's multi-label classifier: BCE, DALLMi PU adaptation and AAD.

Per-worker function first (:func:`multilabel_loop`), driver wiring below (:func:`fit`). The same
function runs inside Ray Train workers (``TorchTrainer``, gloo on CPU / NCCL on GPUs) or, with
``in_process: True``, directly in the calling process (one worker: grids, Tune trials) — one code
path either way.

Objectives (``MultilabelLoopConfig.objective``):

- ``bce``: sigmoid BCE on ``train_y`` [N, L] (source fine-tune with full labels; target
  fine-tune with partial labels, hidden = 0; or the target oracle). Shuffled batches.
- ``dallmi``: :func:`raydapt.losses.pu.dallmi_loss` on the observed labels, batches from
  :class:`ClassCycleSampler` (≥1 observed positive per label per batch + random rows);
  ``mode`` ``norm`` (paper) or ``log`` (VPU ablation).
- ``aad``: adversarial adaptation with distillation (Ryu & Lee 2020, reference code
  bzantium/bert-AAD ``train.adapt``): a frozen copy of the source model (encoder + head) is the
  teacher; the target encoder starts from it and is trained (head frozen, shared) with
  ``gen_weight · GAN loss + kd_weight · T²·KD``; a discriminator D tells target-encoder features
  of *source* rows (label 1) from those of *target* rows (label 0) and the target encoder learns
  to make target rows look like source rows; KD keeps the target encoder's outputs on source rows
  close to the teacher's. Multi-label KD = per-label binary KL of sigmoid(z/T). The reference's
  extra ``exp(-1/‖Δmean‖)`` term (absent from the paper) is left out. Uses no target label.

Gradients are averaged over workers with one all-reduce of the flattened gradients per step
(not DDP's forward hook: the MixUp pass calls the model's embed / encode / pool / head steps
directly, which DDP would not see). Every worker starts from the same weights (same seed and
checkpoint), so the replicas stay identical. Evaluation runs on rank 0 over the whole eval split
(small here); other ranks wait at ``ray.train.report``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydapt.core.assets import load_tokenizer
from raydapt.core.tracking import RunLogger
from raydapt.evaluate import binarised_map, f1_scores, mean_average_precision
from raydapt.losses.pu import dallmi_loss
from raydapt.train import say
from raydapt.train.launch import OptimFields, launch
from raydapt.train.models import EncoderClassifier
from raydapt.train.samplers import ClassCycleSampler

OBJECTIVES = ("bce", "dallmi", "aad")


@dataclass(frozen=True)
class EncoderSpec:
    """The classifier: an encoder reference + a linear sigmoid head of ``num_labels`` outputs,
    optionally started from a saved state and with only the top ``train_layers`` trainable."""

    encoder: str
    num_labels: int
    pooling: str = "mean"
    dropout: float = 0.1
    trust_remote_code: bool = False
    train_layers: int | None = None
    init_state: str | None = None


@dataclass(frozen=True)
class FitTrain(OptimFields):
    """How one fit trains: a DALLMi train section's scaling and optimisation fields.
    ``in_process`` runs the loop in this process (one worker, no Ray Train)."""

    in_process: bool = False
    log_every: int = 0


@dataclass(frozen=True)
class PULoss:
    """The DALLMi objective's knobs (see :func:`raydapt.losses.pu.dallmi_loss`) and the
    class-cycle sampler's random share."""

    alpha: float = 0.3
    beta: float = 0.3
    lam: float = 1.0
    mixup_level: str = "embedding"
    mixup_grad: bool = True
    positive_reduction: str = "norm"
    detach_target: bool = False
    mode: str = "norm"
    random_share: float = 0.25


@dataclass(frozen=True)
class AADLoss:
    """AAD's knobs: GAN and distillation weights, KD temperature, discriminator."""

    gen_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 20.0
    disc_lr: float = 1e-5
    disc_hidden: int = 3072


@dataclass(frozen=True)
class MultilabelLoopConfig:
    """Everything :func:`multilabel_loop` reads (handed to Ray Train workers as a dict).

    ``train_y`` [N, L] observed (or full) labels; ``eval_y`` [M, L]; ``source_texts`` the
    source rows AAD distils on; ``on_epoch`` an in-process hook called with each epoch's
    metrics (Tune trials)."""

    name: str
    objective: str
    seed: int
    model: EncoderSpec
    train: FitTrain
    train_texts: list[str]
    train_y: np.ndarray
    eval_texts: list[str]
    eval_y: np.ndarray
    threshold: float = 0.5
    pu: PULoss = field(default_factory=PULoss)
    aad: AADLoss = field(default_factory=AADLoss)
    source_texts: list[str] = field(default_factory=list)
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    threads: int | None = None
    scratch: str | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def build_model(spec: EncoderSpec, *, seed: int):
    """EncoderClassifier with ``num_labels`` sigmoid outputs (head initialised from ``seed``);
    loads ``init_state`` if given."""
    torch.manual_seed(seed)  # same head init on every worker
    model = EncoderClassifier(spec.encoder, spec.num_labels, pooling=spec.pooling,
                              dropout=spec.dropout, trust_remote_code=spec.trust_remote_code)
    if spec.init_state:
        model.load_state_dict(torch.load(spec.init_state, map_location="cpu",
                                         weights_only=True))
    if spec.train_layers is not None:
        freeze_below(model, int(spec.train_layers))
    return model


def freeze_below(model, train_layers: int) -> None:
    """Freeze the embeddings and all but the top ``train_layers`` encoder layers (BERT-style
    ``encoder.encoder.layer``); the head always trains."""
    layers = getattr(getattr(model.encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError("model.train_layers needs a BERT-style encoder (encoder.layer list)")
    keep = {id(p) for layer in list(layers)[max(0, len(layers) - train_layers):] if train_layers
            for p in layer.parameters()}
    for p in model.encoder.parameters():
        p.requires_grad_(id(p) in keep)


def tokenizer(spec: EncoderSpec):
    return load_tokenizer(spec.encoder)


def _encode(tok, texts, max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(list(texts), truncation=True, max_length=max_length, padding=True,
              return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def predict_probs(model, tok, texts, *, max_length: int, batch_size: int = 64,
                  device="cpu") -> np.ndarray:
    """Sigmoid probabilities [N, L] for ``texts`` (eval mode; train mode restored)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = _encode(tok, texts[i : i + batch_size], max_length, device)
        logits, _ = model(ids, mask)
        out.append(torch.sigmoid(logits).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, model.classifier.out_features))


def multilabel_metrics(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5
                       ) -> dict[str, float]:
    """mAP on scores, binarised mAP (reference code's variant), micro / macro F1.
    y, probs: [N, L]."""
    f1 = f1_scores(y, probs >= threshold)
    return {"map": mean_average_precision(y, probs), "map_bin": binarised_map(y, probs, threshold),
            **f1}


def _shuffled_batches(n: int, per_worker: int, steps: int, *, seed: int, epoch: int,
                      rank: int) -> list[np.ndarray]:
    """``steps`` batches of ``per_worker`` row indices from concatenated seeded permutations
    (stream per (seed, epoch, rank))."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, 7]))
    need = steps * per_worker
    idx = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / max(1, n)))])
    return [idx[i * per_worker : (i + 1) * per_worker] for i in range(steps)]


def _sync_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over workers: one all-reduce of all gradients, flattened."""
    if world <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(p).clone()
        off += n


class Discriminator(nn.Module):
    """AAD's domain discriminator on pooled features: [B, D] -> logit [B] (1 = source)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).squeeze(-1)


def binary_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float
              ) -> torch.Tensor:
    """T²·mean over rows of Σ_labels KL(Bern(σ(t/T)) ‖ Bern(σ(s/T))). [B, L], [B, L] -> scalar."""
    p = torch.sigmoid(teacher_logits / T)
    ls, lns = F.logsigmoid(student_logits / T), F.logsigmoid(-student_logits / T)
    lt, lnt = F.logsigmoid(teacher_logits / T), F.logsigmoid(-teacher_logits / T)
    kl = p * (lt - ls) + (1 - p) * (lnt - lns)
    return kl.sum(-1).mean() * T * T


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def multilabel_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker training function; ``config`` holds the fields of a
    :class:`MultilabelLoopConfig`. In-process it returns ``{"history", "state"}``; inside Ray
    Train it reports ``{epoch metrics..., "history"}`` per epoch (with a checkpoint)."""
    c = MultilabelLoopConfig(**config)
    t = c.train
    in_process = t.in_process
    if in_process:
        rank, world, device = 0, 1, torch.device("cuda" if t.use_gpu else "cpu")
    else:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
    if c.threads:
        torch.set_num_threads(int(c.threads))
    objective = c.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    model = build_model(c.model, seed=c.seed).to(device)
    tok = tokenizer(c.model)
    ML = t.max_length
    train_texts = np.asarray(c.train_texts, dtype=object)
    train_y = np.asarray(c.train_y, dtype=np.float32)  # [N, L] observed (or full) labels
    n = len(train_texts)
    per_worker = max(1, t.batch_size // world)
    global_steps = max(1, math.ceil(n / t.batch_size))  # batches per epoch, all workers
    steps_per_epoch = math.ceil(global_steps / world)  # per worker
    total = steps_per_epoch * t.epochs

    teacher = disc = opt_d = None
    if objective == "aad":
        teacher = copy.deepcopy(model).eval()  # frozen source encoder + head
        for p in teacher.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():  # the source classifier stays fixed
            p.requires_grad_(False)
        torch.manual_seed(c.seed + 1)
        disc = Discriminator(model.hidden_size, c.aad.disc_hidden).to(device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=c.aad.disc_lr)
        src_texts = np.asarray(c.source_texts, dtype=object)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warm = int(t.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    sampler = None
    if objective == "dallmi":
        sampler = ClassCycleSampler(train_y, per_worker, random_share=c.pu.random_share,
                                    num_batches=global_steps, seed=c.seed,
                                    rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(int(c.seed) * 1000 + rank)

    start_epoch = 0
    if not in_process:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:  # resume after a worker failure
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start_epoch = int(state["epoch"]) + 1
    log = RunLogger(c.mlflow_uri, c.mlflow_run_id) if rank == 0 else RunLogger(None, None)
    eval_texts = np.asarray(c.eval_texts, dtype=object)
    eval_y = np.asarray(c.eval_y)
    log_every = t.log_every or max(1, math.ceil(steps_per_epoch / 4))
    history: list[dict[str, float]] = []
    step = start_epoch * steps_per_epoch
    t0 = time.time()
    model.train()
    for epoch in range(start_epoch, t.epochs):
        losses: list[float] = []
        extra: dict[str, list[float]] = {}
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches = list(sampler)
        else:
            batches = _shuffled_batches(n, per_worker, steps_per_epoch, seed=c.seed,
                                        epoch=epoch, rank=rank)
        if objective == "aad":
            src_batches = _shuffled_batches(len(src_texts), per_worker, steps_per_epoch,
                                            seed=c.seed + 11, epoch=epoch, rank=rank)
        for b, rows in enumerate(batches):
            rows = np.asarray(rows)
            ids, mask = _encode(tok, train_texts[rows], ML, device)
            y = torch.as_tensor(train_y[rows], device=device)
            if objective == "bce":
                logits, _ = model(ids, mask)
                loss = F.binary_cross_entropy_with_logits(logits, y)
            elif objective == "dallmi":
                out = _dallmi(model, ids, mask, y, c.pu, gen)
                loss = out.loss
                extra.setdefault("variational", []).append(out.variational.item())
                extra.setdefault("regularizer", []).append(out.regularizer.item())
            else:
                sids, smask = _encode(tok, src_texts[src_batches[b]], ML, device)
                loss, parts = _aad_step(model, teacher, disc, opt_d, ids, mask, sids, smask,
                                        c.aad, world)
                for k, v in parts.items():
                    extra.setdefault(k, []).append(v)
            opt.zero_grad()
            loss.backward()
            _sync_grads(params, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if rank == 0 and (step % log_every == 0 or step == total):
                rate = (step - start_epoch * steps_per_epoch) / max(1e-9, time.time() - t0)
                eta = (total - step) / max(rate, 1e-9)
                recent = float(np.mean(losses[-log_every:]))
                say(f"[{c.name}] epoch {epoch + 1}/{t.epochs} step {step}/{total} "
                    f"loss {recent:.4f} {rate:.2f} steps/s ({rate * t.batch_size:.1f} "
                    f"rows/s) ETA {eta:.0f}s")
                log.metrics({"train_loss": recent}, step)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses or [0]))}
        metrics.update({k: float(np.mean(v)) for k, v in extra.items()})
        if rank == 0 and len(eval_texts):
            probs = predict_probs(model, tok, eval_texts, max_length=ML, device=device)
            metrics.update(multilabel_metrics(eval_y, probs, c.threshold))
            say(f"[{c.name}] epoch {epoch + 1}: eval mAP {metrics['map']:.4f} "
                f"binarised {metrics['map_bin']:.4f} micro-F1 {metrics['micro_f1']:.4f} "
                f"macro-F1 {metrics['macro_f1']:.4f}")
        log.metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
        history.append(dict(metrics))
        if c.on_epoch:  # in-process hook (Tune trials report per epoch)
            c.on_epoch(dict(metrics))
        if not in_process:
            import ray.train

            checkpoint = None
            if rank == 0:
                d = Path(c.scratch) / f"ckpt-{epoch}"
                d.mkdir(parents=True, exist_ok=True)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "epoch": epoch}, d / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(str(d))
            # the scratch copy goes once Ray Train has persisted it into the run's storage
            ray.train.report({**metrics, "history": history}, checkpoint=checkpoint,
                             delete_local_checkpoint_after_upload=checkpoint is not None)
    if in_process:
        return {"history": history, "state": model.state_dict()}
    return None


def _dallmi(model, ids, mask, y, pu: PULoss, gen):
    return dallmi_loss(
        model, ids, mask, y, generator=gen, lam=pu.lam, alpha=pu.alpha, beta=pu.beta,
        level=pu.mixup_level, positive_reduction=pu.positive_reduction,
        mode=pu.mode, mixup_grad=pu.mixup_grad, detach_target=pu.detach_target)


def _aad_step(model, teacher, disc, opt_d, ids, mask, sids, smask, a: AADLoss, world):
    """One AAD step: discriminator update (done here), then the target encoder's loss."""
    with torch.no_grad():
        t_logits, _ = teacher(sids, smask)  # frozen source model on source rows
    s_logits, feat_src_tgt = model(sids, smask)  # target encoder on source rows
    _, feat_tgt = model(ids, mask)  # target encoder on target rows
    feats = torch.cat([feat_src_tgt, feat_tgt]).detach()
    lab = torch.cat([torch.ones(len(feat_src_tgt)), torch.zeros(len(feat_tgt))]).to(feats.device)
    d_loss = F.binary_cross_entropy_with_logits(disc(feats), lab)
    opt_d.zero_grad()
    d_loss.backward()
    _sync_grads(list(disc.parameters()), world)
    opt_d.step()
    fool = torch.ones(len(feat_tgt), device=feats.device)  # target rows labelled "source"
    gen_loss = F.binary_cross_entropy_with_logits(disc(feat_tgt), fool)
    kd = binary_kd(s_logits, t_logits, a.temperature)
    loss = a.gen_weight * gen_loss + a.kd_weight * kd
    return loss, {"disc_loss": d_loss.item(), "gen_loss": gen_loss.item(), "kd_loss": kd.item()}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def fit(loop: MultilabelLoopConfig, *, storage: str) -> dict[str, Any]:
    """Run :func:`multilabel_loop` in-process (``loop.train.in_process``) or on Ray Train
    (:func:`raydapt.train.launch.launch`; run state and checkpoints under ``storage``).

    Returns:
        ``{"history": [per-epoch metrics], "state": model state_dict}``.
    """
    t = loop.train
    loop = replace(loop, threads=loop.threads or max(1, int(t.cpus_per_worker)))
    if t.in_process:
        return multilabel_loop(_as_dict(loop))
    loop = replace(loop, scratch=str(Path(storage).resolve() / loop.name / "scratch"),
                   on_epoch=None)
    result = launch(multilabel_loop, _as_dict(loop), name=loop.name, storage=storage,
                    workers=t.workers)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    return {"history": list(result.metrics.get("history", [])), "state": state["model"]}


def _as_dict(loop: MultilabelLoopConfig) -> dict[str, Any]:
    return {f.name: getattr(loop, f.name) for f in fields(loop)}
