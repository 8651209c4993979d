"""Causal-LM LoRA fine-tuning with DeepSpeed on Ray Train (NTK-Selector's warm-up and fine-tune).

Per-worker function first (:func:`lora_sft_loop`), driver wiring below (:func:`fit_lora`).

The train dataset holds pre-tokenised rows: ``input_ids`` [L] and ``response_mask`` [L] (see
:func:`raydapt.data.qa.encode_pair`); the loss is the mean next-token cross-entropy over the
response tokens of each sample (:func:`raydapt.select.ntk.response_loss_objective`), averaged
over the batch. DeepSpeed owns the optimizer (AdamW), the LR schedule (linear warm-up, linear
decay) and ZeRO; on CPU it runs over gloo (``DS_ACCELERATOR=cpu``, ``torch_adam: true`` — the
CPU-Adam JIT build takes minutes), on GPUs over NCCL (ZeRO-3 + bf16 in the GPU job).

The output directory (copied from the Ray Train checkpoint of rank 0) holds ``adapter/`` (peft
``save_pretrained``), ``adam_exp_avg_sq.pt`` (the optimizer's second moments over the LoRA
parameters, flattened in ``named_parameters`` order — LESS's preconditioner) and
``train.json`` (steps, losses, seconds).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydapt.core.assets import load_tokenizer, resolve_model
from raydapt.core.tracking import RunLogger
from raydapt.data.qa import pad_batch
from raydapt.select.ntk import response_loss_objective
from raydapt.train import per_worker_batch
from raydapt.train.launch import launch
from raydapt.train.loop import DeepSpeedOptimiser, Fit, Loop, LoopRun, run, warmup_steps
from raydapt.train.settings import LoRATrain

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoRALoopConfig:
    """Everything :func:`lora_sft_loop` reads (handed to each Ray Train worker as a dict).
    ``lora`` is the adapter {r, alpha, dropout, target_modules} (see :func:`add_lora`)."""

    name: str
    seed: int
    model: str
    lora: dict[str, Any]
    train: LoRATrain
    train_rows: int
    log_every: int
    threads: int
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None


def load_causal_lm(model_ref: str, *, dtype: str = "float32", device: str = "cpu",
                   adapter: str | None = None, lora: dict[str, Any] | None = None,
                   trainable: bool = False, seed: int = 0):
    """Base causal LM (+ a saved LoRA adapter, or a fresh one from ``lora``) and its tokenizer.

    Args:
        model_ref: ``pkg:`` / ``hf:`` reference or a directory.
        adapter: directory of a peft adapter to load (trainable if ``trainable``).
        lora: fresh LoRA config {r, alpha, dropout, target_modules} when no adapter is given.
        seed: seeds the fresh adapter's initialisation.

    Returns:
        (model, tokenizer); the tokenizer has a pad token.
    """
    from transformers import AutoModelForCausalLM

    rm = resolve_model(model_ref)
    tdtype = torch.bfloat16 if dtype == "auto" and device != "cpu" else _DTYPES.get(
        dtype, torch.float32)
    tok = load_tokenizer(model_ref, pad_to_eos=True)
    model = AutoModelForCausalLM.from_pretrained(rm.path, revision=rm.revision, dtype=tdtype,
                                                 use_safetensors=True if rm.local else None)
    model.config.use_cache = False
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora is not None:
        model = add_lora(model, lora, seed=seed)
    return model.to(device), tok


def add_lora(model, lora: dict[str, Any], *, seed: int = 0):
    """Wrap a causal LM with a fresh LoRA adapter from ``lora`` {r, alpha, dropout,
    target_modules}; the adapter is created on the model's device in its dtype (peft's own)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(
        r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT loss of one padded batch {input_ids, attention_mask, response_mask} ([B, T]
    each, on the model's device): mean over samples of the response-token cross-entropy
    (computed in fp32 whatever the model's dtype)."""

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return response_loss_objective(out.logits, batch["input_ids"], batch["response_mask"]).mean()


def deepspeed_config(*, micro_batch: int, grad_accum: int, world: int, lr: float,
                     weight_decay: float, total_steps: int, warmup_steps: int, zero_stage: int,
                     dtype: str, cpu: bool, offload_optimizer: bool = False,
                     grad_clip: float = 1.0) -> dict[str, Any]:
    """A DeepSpeed config for LoRA SFT (AdamW + WarmupDecayLR + ZeRO ``zero_stage``).

    On CPU: torch's AdamW (``torch_adam``) instead of the JIT-built CPU-Adam; fp16 is refused by
    DeepSpeed on CPU, so ``dtype`` is float32 or bfloat16 there.
    """
    if cpu and dtype == "float16":
        raise ValueError("DeepSpeed refuses fp16 on CPU; use float32 or bfloat16")
    zero: dict[str, Any] = {"stage": int(zero_stage)}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch) * int(grad_accum) * int(world),
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            **({"torch_adam": True} if cpu else {})}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(1, total_steps), "warmup_num_steps": max(1, warmup_steps),
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_type": "linear"}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


def _collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    encs = [{"input_ids": list(a), "response_mask": list(m)}
            for a, m in zip(batch["input_ids"], batch["response_mask"])]
    return pad_batch(encs, pad_id=pad_id, side="right")


class LoRAFit(Fit):
    """One LoRA SFT on one worker: the DeepSpeed engine, this worker's shard of the
    pre-tokenised rows and :func:`sft_loss`. One report at the end (no per-epoch checkpoint):
    the adapter, the Adam second moments and ``train.json``."""

    def __init__(self, c: LoRALoopConfig, engine, named, tok, *, rank: int, world: int,
                 micro: int, device, log) -> None:
        import ray.train

        self.c, self.engine, self.named, self.tok = c, engine, named, tok
        self.model = engine.module
        self.rank, self.world, self.micro, self.device, self.log = rank, world, micro, device, log
        self.shard = ray.train.get_dataset_shard("train")

    def start_epoch(self, epoch: int) -> None:
        self.engine.train()

    def batches(self, epoch: int):
        # the skeleton stops at steps.per_epoch: equal step counts on every rank (ZeRO
        # collectives)
        return self.shard.iter_batches(batch_size=self.micro, batch_format="numpy",
                                       drop_last=True, local_shuffle_buffer_size=256,
                                       local_shuffle_seed=self.c.seed + epoch)

    def loss(self, batch) -> torch.Tensor:
        b = {k: v.to(self.device) for k, v in _collate(batch, self.tok.pad_token_id).items()}
        return sft_loss(self.engine, b)

    def finish(self, run: LoopRun) -> None:
        import deepspeed
        import ray.train
        from deepspeed.utils import safe_get_full_optimizer_state

        t, named, step, losses = self.c.train, self.named, run.step, run.losses
        # second moments of Adam over the LoRA params (a collective under ZeRO: every rank
        # calls it)
        vs = []
        for _, p in named:
            v = safe_get_full_optimizer_state(p, "exp_avg_sq")
            vs.append(torch.zeros(p.numel()) if v is None else
                      v.detach().float().reshape(-1).cpu())
        adam_v = torch.cat(vs)
        net = self.engine.module
        if t.zero_stage == 3:
            params = [p for _, p in named]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {n: p.detach().cpu().clone() for n, p in named}
        else:
            state = None
        seconds = time.time() - run.t0
        metrics = {"steps": step,
                   "loss": float(np.mean(losses[-max(1, run.steps.per_epoch):] or [0])),
                   "first_loss": losses[0] if losses else float("nan"),
                   "seconds": seconds,
                   "rows_per_s": step * self.micro * self.world / max(1e-9, seconds)}
        self.log.metrics({"final_loss": metrics["loss"]}, step)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                if state is not None:  # ZeRO-3: write the gathered LoRA weights
                    net.save_pretrained(os.path.join(d, "adapter"), state_dict=state)
                else:
                    net.save_pretrained(os.path.join(d, "adapter"))
                torch.save({"names": [n for n, _ in named], "exp_avg_sq": adam_v},
                           os.path.join(d, "adam_exp_avg_sq.pt"))
                Path(d, "train.json").write_text(json.dumps({**metrics, "losses": losses}))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)


def skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce
    (``deepspeed_shm_comm``: g++ over two C++ files, 50 s to 2.5 min on a fresh 2-core machine,
    cached per venv) when it starts, yet uses it only for ``inference_all_reduce``
    (tensor-parallel inference). Training's gradients are reduced by torch.distributed (gloo),
    so the build is skipped by marking the op incompatible: ``deepspeed.ops`` keeps one
    ``__compatible_ops__`` dict per process, and edits to it persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def lora_sft_loop(config: dict[str, Any]) -> None:
    """Per-worker LoRA SFT with DeepSpeed (runs inside each Ray Train worker); ``config`` holds
    the fields of a :class:`LoRALoopConfig`."""
    c = LoRALoopConfig(**config)
    t = c.train
    if not t.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        skip_shm_comm_build()
    import deepspeed
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if c.threads:
        torch.set_num_threads(int(c.threads))
    device = f"cuda:{ray.train.torch.get_device().index or 0}" if t.use_gpu else "cpu"
    # bf16 jobs load bf16 weights (an 8B model in fp32 per worker would not fit); DeepSpeed
    # keeps fp32 master copies of the (LoRA) parameters it optimises
    model, tok = load_causal_lm(c.model, dtype="bfloat16" if t.dtype == "bfloat16"
                                else "float32", device=device, lora=c.lora, seed=c.seed)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    micro = per_worker_batch(t.batch_size, world, t.grad_accum)
    steps = t.steps_for(c.train_rows, workers=world, name=c.name)
    total_opt = t.optimiser_steps(steps)
    ds_cfg = deepspeed_config(
        micro_batch=micro, grad_accum=t.grad_accum, world=world, lr=t.lr,
        weight_decay=t.weight_decay, total_steps=total_opt,
        warmup_steps=warmup_steps(total_opt, t.warmup_ratio), zero_stage=t.zero_stage,
        dtype=t.dtype, cpu=not t.use_gpu, offload_optimizer=t.offload_optimizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for _, p in named], config=ds_cfg,
        dist_init_required=False)
    log = RunLogger(c.mlflow_uri, c.mlflow_run_id) if rank == 0 else \
        RunLogger(None, None)
    fit = LoRAFit(c, engine, named, tok, rank=rank, world=world, micro=micro, device=device,
                  log=log)
    # not resumable: a LoRA fit reports once, at its end (a retried one starts again)
    run(fit, Loop(name=c.name, steps=steps, optimiser=DeepSpeedOptimiser(engine), log=log,
                  log_every=c.log_every, rows_per_step=micro, rank=rank, world=world,
                  report_every_epoch=False, resume=False))


def fit_lora(*, name: str, train_ds, n_rows: int, model: str, lora: dict[str, Any],
             train: LoRATrain, seed: int, storage: str, out_dir: str | Path,
             mlflow_uri: str | None = None, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Fit a LoRA adapter with Ray Train + DeepSpeed (:func:`raydapt.train.launch.launch`);
    copy the final checkpoint (adapter, Adam second moments, train.json) into ``out_dir``;
    return the metrics."""
    train.steps_for(n_rows, name=name)  # no optimiser step would run: an error, here
    loop = LoRALoopConfig(
        name=name, seed=seed, model=model, lora=dict(lora), train=train, train_rows=n_rows,
        mlflow_uri=mlflow_uri, mlflow_run_id=mlflow_run_id,
        log_every=max(1, math.ceil(n_rows / max(1, train.batch_size) / 8)),
        threads=train.threads or max(1, int(train.cpus_per_worker)))
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    result = launch(lora_sft_loop, {f.name: getattr(loop, f.name) for f in fields(loop)},
                    name=name, storage=storage, workers=train.workers,
                    datasets={"train": train_ds},
                    # rows read from files (write_rows' shards) reach the workers in file
                    # order, as the blocks of a driver frame did
                    dataset_config=DataConfig(
                        execution_options=ExecutionOptions(preserve_order=True)))
    out = Path(out_dir)
    with result.checkpoint.as_directory() as d:
        for item in Path(d).iterdir():
            dest = out / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(item, dest)
    return dict(result.metrics)
