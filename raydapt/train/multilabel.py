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
from raydapt.train import per_worker_batch, say
from raydapt.train.launch import launch
from raydapt.train.loop import Fit, Loop, LoopRun, TorchOptimiser, run
from raydapt.train.models import EncoderClassifier
from raydapt.train.samplers import ClassCycleSampler
from raydapt.train.settings import AADLoss, FitTrain, PULoss

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


class MultilabelFit(Fit):
    """One classifier fit on one worker: the model (and AAD's teacher and discriminator), the
    batches of its objective and its loss; :func:`raydapt.train.loop.run` does the rest."""

    report_history = True  # the driver (fit) reads the whole history from the last report

    def __init__(self, c: MultilabelLoopConfig, *, rank: int, world: int, device) -> None:
        t = c.train
        self.c, self.rank, self.world, self.device = c, rank, world, device
        if c.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {c.objective!r}")
        self.model = model = build_model(c.model, seed=c.seed).to(device)
        self.tok = tokenizer(c.model)
        self.train_texts = np.asarray(c.train_texts, dtype=object)
        self.train_y = np.asarray(c.train_y, dtype=np.float32)  # [N, L] observed / full labels
        self.per_worker = per_worker_batch(t.batch_size, world)
        # DALLMi's step count (FitTrain.steps_for: the global batch counts the epoch, see there)
        self.steps = t.steps_for(len(self.train_texts), workers=world, name=c.name)
        self.teacher = self.disc = self.opt_d = None
        if c.objective == "aad":
            self.teacher = copy.deepcopy(model).eval()  # frozen source encoder + head
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            for p in model.classifier.parameters():  # the source classifier stays fixed
                p.requires_grad_(False)
            torch.manual_seed(c.seed + 1)
            self.disc = Discriminator(model.hidden_size, c.aad.disc_hidden).to(device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=c.aad.disc_lr)
            self.src_texts = np.asarray(c.source_texts, dtype=object)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sampler = None
        if c.objective == "dallmi":
            # num_batches is over all ranks: each rank yields steps.per_epoch of them
            self.sampler = ClassCycleSampler(
                self.train_y, self.per_worker, random_share=c.pu.random_share,
                num_batches=self.steps.per_epoch * world, seed=c.seed, rank=rank,
                world_size=world)
        self.gen = torch.Generator().manual_seed(int(c.seed) * 1000 + rank)
        self.eval_texts = np.asarray(c.eval_texts, dtype=object)
        self.eval_y = np.asarray(c.eval_y)
        self.log = (RunLogger(c.mlflow_uri, c.mlflow_run_id) if rank == 0
                    else RunLogger(None, None))

    def sync_grads(self) -> None:
        """Gradients averaged over the workers by hand, not by DDP: the MixUp pass of the
        DALLMi loss calls the model's embed / encode / pool / head steps directly, which DDP's
        forward hook would not see (see the module docstring)."""
        _sync_grads(self.params, self.world)

    def start_epoch(self, epoch: int) -> None:
        self.extra: dict[str, list[float]] = {}

    def batches(self, epoch: int):
        per = self.steps.per_epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
        else:
            batches = _shuffled_batches(len(self.train_texts), self.per_worker, per,
                                        seed=self.c.seed, epoch=epoch, rank=self.rank)
        self.src_batches = None
        if self.c.objective == "aad":
            self.src_batches = _shuffled_batches(len(self.src_texts), self.per_worker, per,
                                                 seed=self.c.seed + 11, epoch=epoch,
                                                 rank=self.rank)
        return enumerate(batches)

    def loss(self, batch) -> torch.Tensor:
        b, rows = batch
        c, ML, extra = self.c, self.c.train.max_length, self.extra
        rows = np.asarray(rows)
        ids, mask = _encode(self.tok, self.train_texts[rows], ML, self.device)
        y = torch.as_tensor(self.train_y[rows], device=self.device)
        if c.objective == "bce":
            logits, _ = self.model(ids, mask)
            return F.binary_cross_entropy_with_logits(logits, y)
        if c.objective == "dallmi":
            out = _dallmi(self.model, ids, mask, y, c.pu, self.gen)
            extra.setdefault("variational", []).append(out.variational.item())
            extra.setdefault("regularizer", []).append(out.regularizer.item())
            return out.loss
        sids, smask = _encode(self.tok, self.src_texts[self.src_batches[b]], ML, self.device)
        loss, parts = _aad_step(self.model, self.teacher, self.disc, self.opt_d, ids, mask,
                                sids, smask, c.aad, self.world)
        for k, v in parts.items():
            extra.setdefault(k, []).append(v)
        return loss

    def end_epoch(self, epoch: int, metrics: dict[str, Any], run: LoopRun) -> None:
        c = self.c
        metrics.update({k: float(np.mean(v)) for k, v in self.extra.items()})
        if self.rank == 0 and len(self.eval_texts):
            probs = predict_probs(self.model, self.tok, self.eval_texts,
                                  max_length=c.train.max_length, device=self.device)
            metrics.update(multilabel_metrics(self.eval_y, probs, c.threshold))
            say(f"[{c.name}] epoch {epoch + 1}: eval mAP {metrics['map']:.4f} "
                f"binarised {metrics['map_bin']:.4f} micro-F1 {metrics['micro_f1']:.4f} "
                f"macro-F1 {metrics['macro_f1']:.4f}")
        self.log.metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
        if c.on_epoch:  # in-process hook (Tune trials report per epoch)
            c.on_epoch(dict(metrics))

    def finish(self, run: LoopRun) -> dict[str, Any] | None:
        if self.c.train.in_process:
            return {"history": run.history, "state": self.model.state_dict()}
        return None


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
    fit = MultilabelFit(c, rank=rank, world=world, device=device)
    steps = fit.steps
    opt = TorchOptimiser(fit.params, lr=t.lr, weight_decay=t.weight_decay, total=steps.total,
                         warmup_ratio=t.warmup_ratio, sync=fit.sync_grads)
    fit.model.train()
    return run(fit, Loop(
        name=c.name, steps=steps, optimiser=opt, log=fit.log, rank=rank, world=world,
        log_every=t.log_every or max(1, math.ceil(steps.per_epoch / 4)),
        rows_per_step=fit.per_worker, scratch=None if in_process else c.scratch,
        ray=not in_process))


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
