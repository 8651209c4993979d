"""GPU check: raydapt's hot paths on random-initialised models of the real architectures, each as
achieved TFLOP/s and as a fraction of the bf16 matrix-multiply peak measured in the same run.

Needs only torch, transformers, peft and tokenizers (no Ray, DeepSpeed, vLLM, FAISS, MLflow,
pydantic; no downloads: models are built from config objects, the tokenizer is a word-level one
built in memory). Run from the repository root with ``PYTHONPATH=.``::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu-check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --quick            # tiny shapes, CPU, < 1 min

Sections (each wrapped: an error is recorded and the run goes on; the JSON is rewritten after
every section; ``--budget-s`` skips sections that would start too late):

- ``peak``: bf16 [n, n] @ [n, n] matmul TFLOP/s (the denominator of every ``frac_of_peak``).
- ``correctness_grads``: hooks / vmap / loop per-sample LoRA gradients agree (fp32 and bf16,
  small Llama, padded batch).
- ``correctness_engine``: the hf engine's label log-probs and hidden states on the device vs CPU.
- ``teacher``: ``HFEngine.score`` (tokenise + forward with ``logits_to_keep=1``) rows/s,
  tokens/s, TFLOP/s on the Llama-3-8B-shaped model.
- ``ntk``: NTK stage-2 scoring (``per_sample_grads`` hooks / vmap / loop + Rademacher
  projection), samples/s at the full sequence length, TFLOP/s, hooks ÷ loop.
- ``lora_step``: LoRA SFT step (``add_lora`` + ``sft_loss`` + AdamW, no DeepSpeed), tokens/s.
- ``dallmi``: DALLMi batched MixUp step (``dallmi_loss``) vs the per-label loop on BERT-base.

Each FLOP count is the model's matrix-multiply work, written out as ``flops_formula``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

LLAMA3_8B = dict(hidden=4096, inter=14336, heads=32, kv=8, vocab=128256)
BERT_BASE = dict(hidden=768, layers=12, heads=12, inter=3072, vocab=30522)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny: every code path on CPU in well under a minute (CI)
    "quick": dict(
        llama=dict(hidden=64, inter=128, heads=4, kv=2, vocab=512, layers=2), seq=32,
        ntk_batch=8, ntk_batches=2, vmap_samples=4, vmap_chunk=4, loop_samples=4,
        proj_dim=256, proj_chunk=256, lora_batch=4, lora_steps=2, teacher_batch=8,
        teacher_batches=2, bert=dict(hidden=64, layers=2, heads=2, inter=128, vocab=512),
        dallmi_batch=8, dallmi_len=32, dallmi_labels=4, dallmi_steps=1, peak_n=256,
        peak_iters=3,
        small=dict(hidden=64, inter=128, heads=4, kv=2, vocab=256, layers=2), small_seq=24,
        small_batch=4, warmup=1,
    ),
    # CPU-feasible, same code paths with larger shapes (catches shape bugs of the full config)
    "medium": dict(
        llama=dict(hidden=512, inter=1792, heads=8, kv=2, vocab=32000, layers=2), seq=128,
        ntk_batch=8, ntk_batches=2, vmap_samples=4, vmap_chunk=4, loop_samples=4,
        proj_dim=2048, proj_chunk=2048, lora_batch=4, lora_steps=2, teacher_batch=8,
        teacher_batches=2, bert=dict(hidden=256, layers=4, heads=4, inter=1024, vocab=30522),
        dallmi_batch=64, dallmi_len=64, dallmi_labels=14, dallmi_steps=2, peak_n=1024,
        peak_iters=3,
        small=dict(hidden=128, inter=256, heads=4, kv=2, vocab=1000, layers=2), small_seq=48,
        small_batch=6, warmup=1,
    ),
    # the GPU run: Llama-3-8B width with 4 of 32 layers, BERT-base; ~2-3 min on an H200
    "full": dict(
        llama=dict(**LLAMA3_8B, layers=4), seq=512,
        ntk_batch=64, ntk_batches=3, vmap_samples=16, vmap_chunk=8, loop_samples=32,
        proj_dim=8192, proj_chunk=8192, lora_batch=8, lora_steps=10, teacher_batch=64,
        teacher_batches=6, bert=BERT_BASE, dallmi_batch=64, dallmi_len=128, dallmi_labels=14,
        dallmi_steps=8,
        peak_n=8192, peak_iters=20,
        small=dict(hidden=256, inter=512, heads=4, kv=2, vocab=1000, layers=2), small_seq=64,
        small_batch=8, warmup=2,
    ),
}

# per-sample-gradient agreement: max |a - b| / max |b| over the [B, P] gradients vs the loop
TOL_GRAD = {"float32": 1e-4, "bfloat16": 5e-2}
# engine on device vs CPU fp32: max |Δ label log-prob| in nats
TOL_ENGINE = {"float32": 1e-3, "bfloat16": 0.1}
LABEL_WORDS = [" negative", " positive", " neutral"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn) -> tuple[Any, float]:
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def peak_mem(dev: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def reset_mem(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def word_tokenizer(n_words: int):
    """A word-level fast tokenizer built in memory: ``w0 … w{n-1}`` + the label words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(n_words)] + [w.strip() for w in LABEL_WORDS]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[PAD]")


def build(factory, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    """Construct a module directly on ``dev`` in ``dtype`` (no fp32 CPU copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            m = factory()
    finally:
        torch.set_default_dtype(old)
    # parameters were created in ``dtype``; buffers built explicitly in fp32 (RoPE's inv_freq)
    # stay fp32, as with from_pretrained(dtype=...)
    for p in m.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return m.to(device=dev)


def llama(spec: dict[str, int], dev: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"], max_position_embeddings=4096, tie_word_embeddings=False,
    )
    cfg.use_cache = False
    torch.manual_seed(seed)
    return build(lambda: LlamaForCausalLM(cfg), dev, dtype).eval()


def lora_cfg() -> dict[str, Any]:
    # the NTK-Selector GPU job's adapter (jobs/ntk_select/medical-llama3-8b.gpu.yaml)
    return {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def with_lora(model: nn.Module, seed: int = 0) -> nn.Module:
    """``raydapt.train.lora.add_lora`` + a non-zero B (a warmed-up adapter: both A and B get
    gradients), on the base model's device."""
    from raydapt.train.lora import add_lora

    m = add_lora(model, lora_cfg(), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return m


def decoder_params(model: nn.Module) -> tuple[int, int]:
    """(N_dec: parameters of the decoder layers, N_head: the output layer's), without LoRA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_dec = sum(p.numel() for n, p in base.model.layers.named_parameters() if "lora_" not in n)
    return int(n_dec), int(base.lm_head.weight.numel())


def rand_batch(n: int, t: int, vocab: int, dev: torch.device, *, seed: int, pad: bool = False,
               left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, response_mask [n, t]; response = second half of each sample;
    with ``pad`` the lengths are uniform in [t/2, t] (left or right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, t), generator=g)
    am = torch.ones(n, t, dtype=torch.long)
    rm = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(t // 2, t + 1, (1,), generator=g)) if pad else t
        s = slice(t - length, t) if left else slice(0, length)
        am[i] = 0
        am[i, s] = 1
        real = torch.arange(t)[s]
        rm[i, real[length // 2:]] = 1
        ids[i, am[i] == 0] = 0
    return ids.to(dev), am.to(dev), rm.to(dev)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = PRESETS[args.preset]
        self.dev = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.result: dict[str, Any] = {"benchmark": "gpu-check", "preset": args.preset,
                                       "sizes": self.p, "sections": {}}
        self.peak_tflops: float | None = None
        self._big: nn.Module | None = None
        self._lora_model: nn.Module | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def write(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.out)

    def frac(self, tflops: float) -> float | None:
        return tflops / self.peak_tflops if self.peak_tflops else None

    def section(self, name: str, fn, min_s: float) -> None:
        if self.args.sections and name not in self.args.sections and name != "meta":
            return
        if self.left() < min_s:
            self.result["sections"][name] = {"status": "skipped: budget",
                                             "left_s": round(self.left(), 1)}
            self.log(f"{name}: skipped (budget: {self.left():.0f}s left, needs ~{min_s:.0f}s)")
            self.write()
            return
        self.log(f"{name}: start")
        t = time.perf_counter()
        try:
            rec = {"status": "ok", **fn()}
        except Exception as e:  # noqa: BLE001 - record and go on: one section must not kill the run
            rec = {"status": "error", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
            traceback.print_exc()
        rec["wall_s"] = round(time.perf_counter() - t, 2)
        if self.dev.type == "cuda":
            rec.setdefault("cuda_peak_bytes", peak_mem(self.dev))
        self.result["sections"][name] = rec
        self.write()
        brief = {k: v for k, v in rec.items() if k in ("status", "error", "summary")}
        self.log(f"{name}: {json.dumps(brief, default=str)[:400]} ({rec['wall_s']}s)")
        free(self.dev)

    # -- metadata ------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        import transformers

        try:
            import peft

            peft_v = peft.__version__
        except Exception as e:  # noqa: BLE001
            peft_v = f"unavailable: {e}"
        from machine import describe

        m: dict[str, Any] = {
            "device": str(self.dev), "dtype": self.args.dtype, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft_v,
            "python": platform.python_version(), "machine": describe(),
            "budget_s": self.args.budget_s, "torch_threads": torch.get_num_threads(),
        }
        if self.dev.type == "cuda":
            prop = torch.cuda.get_device_properties(self.dev)
            m.update(gpu=prop.name, sm_count=prop.multi_processor_count,
                     gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                     capability=f"{prop.major}.{prop.minor}",
                     cudnn=torch.backends.cudnn.version())
        return m

    # -- sections ------------------------------------------------------------------------------
    def peak(self) -> dict[str, Any]:
        n, iters = self.p["peak_n"], self.p["peak_iters"]
        g = torch.Generator(device=self.dev).manual_seed(0)
        a = torch.randn(n, n, device=self.dev, dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device=self.dev, dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            c = a @ b
        _, s = timed(self.dev, lambda: [torch.matmul(a, b, out=c) for _ in range(iters)])
        tflops = 2 * n**3 * iters / s / 1e12
        self.peak_tflops = tflops
        return {"summary": f"{tflops:.1f} TFLOP/s", "bf16_matmul_tflops": tflops, "n": n,
                "iters": iters, "seconds": s, "method": f"mean of {iters} [n,n]@[n,n] bf16 "
                "matmuls on random normal data after 3 warm-ups, wall clock with synchronize"}

    def correctness_grads(self) -> dict[str, Any]:
        from raydapt.select.ntk import per_sample_grads

        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        out: dict[str, Any] = {"tolerance": {k: f"max|g - g_loop| / max|g_loop| <= {v}"
                                             for k, v in TOL_GRAD.items()}}
        ok = True
        try:
            for dt in ("float32", "bfloat16"):
                model = with_lora(llama(self.p["small"], self.dev, getattr(torch, dt)), seed=3)
                ids, am, rm = rand_batch(self.p["small_batch"], self.p["small_seq"],
                                         self.p["small"]["vocab"], self.dev, seed=7, pad=True,
                                         left=True)
                g, rec = {}, {}
                for m in ("loop", "hooks", "vmap"):
                    try:
                        g[m] = per_sample_grads(model, ids, am, rm, method=m)
                    except Exception as e:  # noqa: BLE001 - keep the other methods' verdicts
                        rec[m] = {"error": f"{type(e).__name__}: {e}", "passed": False}
                        ok = False
                for m in ("hooks", "vmap"):
                    if m not in g or "loop" not in g:
                        continue
                    e = rel_err(g[m], g["loop"])
                    rec[m] = {"rel_err_vs_loop": e, "min_cosine_vs_loop": min_cos(g[m], g["loop"]),
                              "passed": bool(e <= TOL_GRAD[dt])}
                    ok &= rec[m]["passed"]
                rec["finite"] = bool(all(torch.isfinite(v).all() for v in g.values()))
                if "hooks" not in g:
                    out[dt] = rec
                    ok = False
                    continue
                rec["grad_device"] = str(g["hooks"].device)
                rec["grad_dtype"] = str(g["hooks"].dtype)
                ok &= rec["finite"] and g["hooks"].device.type == self.dev.type
                ok &= all(m in g for m in ("hooks", "vmap", "loop"))
                out[dt] = rec
                del model
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        out["passed"] = bool(ok)
        out["summary"] = ("passed" if ok else "FAILED") + " " + ", ".join(
            f"{dt} {m} {out[dt][m].get('rel_err_vs_loop', float('nan')):.2e}"
            for dt in ("float32", "bfloat16") for m in ("hooks", "vmap") if m in out[dt])
        return out

    def correctness_engine(self) -> dict[str, Any]:
        from raydapt.engines.hf import HFEngine

        spec = self.p["small"]
        tok = word_tokenizer(spec["vocab"] - 10)
        cpu_model = llama(spec, torch.device("cpu"), torch.float32, seed=5)
        g = torch.Generator().manual_seed(11)
        prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, spec["vocab"] - 10, (n,),
                                                                    generator=g))
                   for n in (5, 17, self.p["small_seq"], 9)]
        ref = HFEngine.from_model(cpu_model, tok, LABEL_WORDS, max_length=self.p["small_seq"])
        r = ref.score(prompts)
        out: dict[str, Any] = {"tolerance": {k: f"max |Δ label log-prob| <= {v} nats vs CPU fp32"
                                             for k, v in TOL_ENGINE.items()}}
        ok = True
        for dt in ("float32", "bfloat16"):
            m = copy.deepcopy(cpu_model).to(device=self.dev, dtype=getattr(torch, dt))
            eng = HFEngine.from_model(m, word_tokenizer(spec["vocab"] - 10), LABEL_WORDS,
                                      max_length=self.p["small_seq"])
            o = eng.score(prompts)
            d = float(abs(o.label_logprobs - r.label_logprobs).max())
            dh = float(abs(o.hidden - r.hidden).max() / max(1e-30, abs(r.hidden).max()))
            rec = {"max_abs_logprob_diff": d, "hidden_rel_diff": dh,
                   "engine_device": eng.device,
                   "same_prompt_tokens": bool((o.prompt_tokens == r.prompt_tokens).all()),
                   "passed": bool(d <= TOL_ENGINE[dt] and (o.prompt_tokens ==
                                                          r.prompt_tokens).all())}
            ok &= rec["passed"]
            out[dt] = rec
        out["passed"] = bool(ok)
        out["summary"] = ("passed" if ok else "FAILED") + (
            f" fp32 {out['float32']['max_abs_logprob_diff']:.2e}, "
            f"bf16 {out['bfloat16']['max_abs_logprob_diff']:.2e} nats")
        return out

    def big(self) -> nn.Module:
        """The Llama-3-8B-shaped base model (built once, shared: teacher first, then LoRA)."""
        if self._big is None:
            t = time.perf_counter()
            self._big = llama(self.p["llama"], self.dev, self.dtype)
            self.result["big_model"] = {
                "spec": self.p["llama"], "build_s": round(time.perf_counter() - t, 2),
                "params": int(sum(p.numel() for p in self._big.parameters())),
                "attn_implementation": self._big.config._attn_implementation}
        return self._big

    def teacher(self) -> dict[str, Any]:
        from raydapt.engines.hf import HFEngine

        model = self.big()
        spec, t = self.p["llama"], self.p["seq"]
        n_words = min(spec["vocab"] - 10, 30000)
        eng = HFEngine.from_model(model, word_tokenizer(n_words), LABEL_WORDS, max_length=t)
        g = torch.Generator().manual_seed(1)
        bsz = self.p["teacher_batch"]

        def prompts():
            ids = torch.randint(0, n_words, (bsz, t), generator=g)
            return [" ".join(f"w{int(i)}" for i in row) for row in ids]

        for _ in range(self.p["warmup"]):
            eng.score(prompts())
        batches = [prompts() for _ in range(self.p["teacher_batches"])]
        reset_mem(self.dev)
        rows = toks = 0
        total = 0.0
        for b in batches:
            if rows and self.left() < 5:  # at least one timed batch, then stop at the budget
                break
            o, s = timed(self.dev, lambda b=b: eng.score(b))
            total += s
            rows += len(b)
            toks += int(o.prompt_tokens.sum())
        # the forward alone (no tokenisation, no host copies), same shapes
        enc = eng.tokenize(batches[0], return_tensors="pt", padding=True).to(eng.device)
        with torch.inference_mode():
            _, fs = timed(self.dev, lambda: eng.model(**enc, output_hidden_states=True,
                                                      logits_to_keep=1))
        n_dec, _ = decoder_params(model)
        h, layers, v = spec["hidden"], spec["layers"], spec["vocab"]
        per_row = 2 * n_dec * t + 2 * layers * t * t * h + 2 * h * v
        tf = per_row * rows / total / 1e12
        tf_fwd = per_row * bsz / fs / 1e12
        return {
            "summary": f"{rows / total:.1f} rows/s, {toks / total:.0f} tok/s, {tf:.1f} TFLOP/s "
                       f"({self.frac(tf) or 0:.1%} of peak); forward alone {tf_fwd:.1f} TFLOP/s",
            "rows_per_s": rows / total, "tokens_per_s": toks / total, "tflops": tf,
            "frac_of_peak": self.frac(tf), "rows": rows, "batch": bsz, "seq_len": t,
            "seconds": total, "forward_only_s": fs, "forward_only_tflops": tf_fwd,
            "forward_only_frac_of_peak": self.frac(tf_fwd),
            "flops_per_row": per_row,
            "flops_formula": "2*N_dec*T + 2*L*T^2*H (causal attention, QK^T and PV halved) + "
                             "2*H*V (output layer at the last position only)",
            "N_dec": n_dec, "note": "HFEngine.score: tokenise (word-level fast tokenizer) + "
            "forward with output_hidden_states and logits_to_keep=1 + host copies"}

    def ntk(self) -> dict[str, Any]:
        from raydapt.select.ntk import (
            RademacherProjector,
            flat_dim,
            per_sample_grads,
            trainable_params,
        )

        model = with_lora(self.big())
        self._lora_model = model  # the LoRA step reuses it (LoRA is injected in place)
        n_dec, _ = decoder_params(model)
        params = trainable_params(model)
        big_p = flat_dim(params)
        proj = RademacherProjector(big_p, self.p["proj_dim"], seed=0,
                                   chunk_rows=self.p["proj_chunk"])
        spec, t = self.p["llama"], self.p["seq"]
        bsz, nb = self.p["ntk_batch"], self.p["ntk_batches"]
        data = [rand_batch(bsz, t, spec["vocab"], self.dev, seed=100 + i) for i in range(nb + 1)]
        h, layers = spec["hidden"], spec["layers"]
        lora_numel = big_p
        per_sample = (4 * n_dec * t + 6 * layers * t * t * h + 2 * t * lora_numel
                      + 2 * big_p * self.p["proj_dim"])
        res: dict[str, Any] = {
            "P": big_p, "proj_dim": self.p["proj_dim"], "seq_len": t, "N_dec": n_dec,
            "lora": lora_cfg(), "flops_per_sample": per_sample,
            "flops_formula": "4*N_dec*T (forward + activation-gradient backward; the base is "
                             "frozen, no weight gradients) + 6*L*T^2*H (causal attention fwd+bwd) "
                             "+ 2*T*P (per-sample LoRA outer products) + 2*P*p (projection); "
                             "the same useful FLOPs are credited to every method (the loop also "
                             "computes the [T, V] logits)",
            "methods": {}}

        def run(method: str, ids, am, rm, chunk: int | None = None):
            g, gs = timed(self.dev, lambda: per_sample_grads(
                model, ids, am, rm, params=params, method=method,
                chunk_size=chunk if method == "vmap" else None))
            pg, ps = timed(self.dev, lambda: proj.project(g))
            return g, pg, gs, ps

        plan = {"hooks": (bsz, nb, None), "vmap": (self.p["vmap_samples"], 1,
                                                  self.p["vmap_chunk"]),
                "loop": (self.p["loop_samples"], 1, None)}
        grads0: dict[str, torch.Tensor] = {}
        for method, (n, reps, chunk) in plan.items():
            if self.left() < 15:
                res["methods"][method] = {"status": "skipped: budget"}
                continue
            reset_mem(self.dev)
            try:
                w = data[nb]
                k = n if method == "hooks" else min(n, self.p["warmup"] * (chunk or 1))
                for _ in range(self.p["warmup"] if method == "hooks" else 1):
                    run(method, w[0][:k], w[1][:k], w[2][:k], chunk)
                gsum = psum = 0.0
                cnt = 0
                for i in range(reps):
                    ids, am, rm = (x[:n] for x in data[i])
                    g, _, gs, ps = run(method, ids, am, rm, chunk)
                    if i == 0:
                        grads0[method] = g[: self.p["loop_samples"]].float().cpu()
                    gsum, psum, cnt = gsum + gs, psum + ps, cnt + n
                    del g
                    if self.left() < 20:
                        break
                tf = per_sample * cnt / (gsum + psum) / 1e12
                tf_g = (per_sample - 2 * big_p * self.p["proj_dim"]) * cnt / gsum / 1e12
                res["methods"][method] = {
                    "samples": cnt, "micro_batch": n, "vmap_chunk": chunk,
                    "samples_per_s": cnt / (gsum + psum), "grad_only_samples_per_s": cnt / gsum,
                    "grad_s": gsum, "projection_s": psum, "projection_s_per_call": psum / reps,
                    "tflops": tf, "frac_of_peak": self.frac(tf), "grad_only_tflops": tf_g,
                    "grad_only_frac_of_peak": self.frac(tf_g), "cuda_peak_bytes": peak_mem(self.dev)}
            except Exception as e:  # noqa: BLE001 - one method failing (e.g. vmap OOM) is a finding
                res["methods"][method] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            free(self.dev)
        ms = res["methods"]
        for m in ("hooks", "vmap"):
            if "samples_per_s" in ms.get(m, {}) and "samples_per_s" in ms.get("loop", {}):
                res[f"{m}_over_loop"] = ms[m]["samples_per_s"] / ms["loop"]["samples_per_s"]
                res[f"{m}_over_loop_grad_only"] = (ms[m]["grad_only_samples_per_s"]
                                                    / ms["loop"]["grad_only_samples_per_s"])
        if "loop" in grads0:
            agree = {}
            for m in ("hooks", "vmap"):
                if m in grads0:
                    k = min(len(grads0[m]), len(grads0["loop"]))
                    e = rel_err(grads0[m][:k], grads0["loop"][:k])
                    agree[m] = {"rel_err_vs_loop": e, "samples": k,
                                "min_cosine_vs_loop": min_cos(grads0[m][:k], grads0["loop"][:k]),
                                "passed": bool(e <= TOL_GRAD[self.args.dtype])}
            res["agreement_on_this_model"] = agree
        hk = ms.get("hooks", {})
        res["summary"] = (f"hooks {hk.get('samples_per_s', float('nan')):.1f} samples/s "
                          f"({hk.get('tflops', float('nan')):.1f} TFLOP/s, "
                          f"{(hk.get('frac_of_peak') or float('nan')):.1%} of peak), "
                          f"{res.get('hooks_over_loop', float('nan')):.2f}x the loop")
        return res

    def lora_step(self) -> dict[str, Any]:
        from raydapt.train.lora import sft_loss

        model = self._lora_model if self._lora_model is not None else with_lora(self.big())
        spec, t, bsz = self.p["llama"], self.p["seq"], self.p["lora_batch"]
        n_dec, n_head = decoder_params(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        batches = [rand_batch(bsz, t, spec["vocab"], self.dev, seed=200 + i)
                   for i in range(self.p["lora_steps"])]

        def step(b):
            ids, am, rm = b
            loss = sft_loss(model, {"input_ids": ids, "attention_mask": am, "response_mask": rm})
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        for _ in range(self.p["warmup"]):
            step(batches[0])
        reset_mem(self.dev)
        total, n, losses = 0.0, 0, []
        for b in batches:
            if n and self.left() < 5:
                break
            loss, s = timed(self.dev, lambda b=b: step(b))
            total += s
            n += 1
            losses.append(float(loss))
        model.eval()
        h, layers = spec["hidden"], spec["layers"]
        per_step = 4 * (n_dec + n_head) * bsz * t + 6 * layers * t * t * h * bsz
        tf = per_step * n / total / 1e12
        toks = bsz * t * n / total
        return {
            "summary": f"{toks:.0f} tok/s, {tf:.1f} TFLOP/s ({self.frac(tf) or 0:.1%} of peak)",
            "tokens_per_s": toks, "steps_per_s": n / total, "tflops": tf,
            "frac_of_peak": self.frac(tf), "steps": n, "batch": bsz, "seq_len": t,
            "losses": losses, "trainable_params": int(sum(p.numel() for p in params)),
            "param_dtype_lora": str(params[0].dtype), "flops_per_step": per_step,
            "flops_formula": "4*(N_dec+N_head)*B*T (forward + activation-gradient backward; "
                             "frozen base: no weight gradients, LoRA's are negligible) + "
                             "6*L*T^2*H*B (causal attention fwd+bwd); 6*N*tokens would overstate "
                             "a LoRA step by ~1.5x",
            "note": "raydapt.train.lora.add_lora + sft_loss (full [B, T, V] logits, fp32 CE) + "
                    "torch AdamW over the LoRA parameters; no DeepSpeed, no gradient checkpointing"}

    def dallmi(self) -> dict[str, Any]:
        from dallmi_step import per_label_loss
        from transformers import BertConfig, BertModel

        from raydapt.losses.pu import (
            dallmi_loss,
            mixup_pairs,
            mixup_regularizer,
            sample_mu,
            variational_pu_loss,
        )
        from raydapt.train.models import EncoderClassifier

        spec, bsz, t = self.p["bert"], self.p["dallmi_batch"], self.p["dallmi_len"]
        n_lab = self.p["dallmi_labels"]
        cfg = BertConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         intermediate_size=spec["inter"], max_position_embeddings=512)
        torch.manual_seed(0)
        enc = build(lambda: BertModel(cfg, add_pooling_layer=False), self.dev, torch.float32)
        model = EncoderClassifier(None, n_lab, encoder=enc).to(self.dev)
        n_enc = int(sum(p.numel() for p in enc.encoder.parameters()))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(1000, spec["vocab"] // 2), spec["vocab"], (bsz, t), generator=g)
        lengths = torch.randint(t // 2, t + 1, (bsz,), generator=g)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        ids = (ids * mask).to(self.dev)
        mask = mask.to(self.dev)
        obs = (torch.rand(bsz, n_lab, generator=g) < 0.2).long()
        obs[torch.arange(n_lab) % bsz, torch.arange(n_lab)] = 1
        obs = obs.to(self.dev)
        gen = torch.Generator().manual_seed(0)
        # exactness first (fp32, eval mode, same pairs and μ): the batched loss is the loop's maths
        model.eval()
        pairs = mixup_pairs(obs, generator=gen)
        mu = sample_mu(len(pairs[0]), alpha=0.3, beta=0.3, generator=gen)
        with torch.no_grad():
            hdn = model.encode(model.embed(ids), mask)
            pr = torch.sigmoid(model.head(model.pool(hdn, mask)))
            var, _ = variational_pu_loss(pr, obs)
            reg, _ = mixup_regularizer(model, ids, mask, pr, obs, alpha=0.3, beta=0.3,
                                       generator=gen, mu=mu, pairs=pairs)
            batched_val = float(var + reg)
            loop_val = float(per_label_loss(model, ids, mask, obs, pairs, mu, lam=1.0))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        # autocast on CUDA only (CPU bf16 autocast is many times slower than fp32 on CPUs
        # without bf16 units; the CPU run only exercises the code path)
        use_amp = self.dev.type == "cuda" and self.dtype != torch.float32
        amp = dict(device_type=self.dev.type, dtype=self.dtype, enabled=use_amp)

        def step_batched():
            with torch.autocast(**amp):
                out = dallmi_loss(model, ids, mask, obs, generator=gen, lam=1.0)
            out.loss.float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def step_loop():
            p = mixup_pairs(obs, generator=gen)
            m = sample_mu(len(p[0]), alpha=0.3, beta=0.3, generator=gen)
            with torch.autocast(**amp):
                loss = per_label_loss(model, ids, mask, obs, p, m, lam=1.0)
            loss.float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(self.p["warmup"]):
            step_batched()
            step_loop()
        times: dict[str, float] = {"batched": 0.0, "per_label_loop": 0.0}
        n = 0
        for _ in range(self.p["dallmi_steps"]):
            if n and self.left() < 5:
                break
            for name, fn in (("batched", step_batched), ("per_label_loop", step_loop)):
                times[name] += timed(self.dev, fn)[1]
            n += 1
        n_pairs = int(len(pairs[0]))
        h, layers = spec["hidden"], spec["layers"]

        def flops(rows: int) -> int:  # full fine-tune: fwd + bwd (weights and activations)
            return 6 * n_enc * rows * t + 12 * layers * t * t * h * rows

        fb, fl = flops(bsz + n_pairs), flops(bsz + 2 * n_pairs)
        tb = fb * n / times["batched"] / 1e12
        tl = fl * n / times["per_label_loop"] / 1e12
        return {
            "summary": f"batched {times['batched'] / n * 1e3:.1f} ms/step ({tb:.1f} TFLOP/s, "
                       f"{self.frac(tb) or 0:.1%} of peak), per-label loop "
                       f"{times['per_label_loop'] / n * 1e3:.1f} ms/step: "
                       f"{times['per_label_loop'] / times['batched']:.2f}x",
            "seconds_per_step": {k: v / n for k, v in times.items()}, "steps": n,
            "loop_over_batched": times["per_label_loop"] / times["batched"],
            "batched_tflops": tb, "batched_frac_of_peak": self.frac(tb),
            "loop_tflops": tl, "loop_frac_of_peak": self.frac(tl),
            "batch": bsz, "seq_len": t, "labels": n_lab, "labels_with_pairs": n_pairs,
            "forward_passes": {"batched": 2, "per_label_loop": 1 + 2 * n_pairs},
            "N_enc": n_enc, "flops_per_step": {"batched": fb, "per_label_loop": fl},
            "flops_formula": "6*N_enc*R*T + 12*L*T^2*H*R (bidirectional attention fwd+bwd), "
                             "R = rows through the encoder: B + L' (batched), B + 2L' (loop); "
                             "T = padded length",
            "precision": "fp32 weights, AdamW, autocast "
                         + (self.args.dtype if use_amp else "off"),
            "loss_eval_fp32": {"batched": batched_val, "per_label_loop": loop_val,
                               "abs_diff": abs(batched_val - loop_val),
                               "passed": bool(abs(batched_val - loop_val)
                                              <= 1e-4 * max(1.0, abs(loop_val)))}}

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.log(f"gpu_check preset={self.args.preset} device={self.dev} dtype={self.args.dtype} "
                 f"budget={self.args.budget_s}s out={self.out}")
        self.section("meta", self.meta, 0)
        self.section("peak", self.peak, 5)
        self.section("correctness_grads", self.correctness_grads, 10)
        self.section("correctness_engine", self.correctness_engine, 10)
        self.section("teacher", self.teacher, 30)
        self.section("ntk", self.ntk, 40)
        self.section("lora_step", self.lora_step, 20)
        self._big = self._lora_model = None
        free(self.dev)
        self.section("dallmi", self.dallmi, 20)
        secs = self.result["sections"]
        checks = {
            "per_sample_grads": secs.get("correctness_grads", {}).get("passed"),
            "engine_vs_cpu": secs.get("correctness_engine", {}).get("passed"),
            "ntk_big_model": all(v.get("passed") for v in
                                 secs.get("ntk", {}).get("agreement_on_this_model", {}).values())
            if secs.get("ntk", {}).get("agreement_on_this_model") else None,
            "dallmi_batched_equals_loop": secs.get("dallmi", {}).get("loss_eval_fp32",
                                                                      {}).get("passed"),
        }
        self.result["correctness"] = checks
        self.result["all_sections_ok"] = all(s.get("status") == "ok" for s in secs.values())
        self.write()
        self.log(f"done: sections ok={self.result['all_sections_ok']} checks={checks}; "
                 f"wrote {self.out}")
        return self.result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--quick", action="store_true", help="= --preset quick (tiny shapes, CPU)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="total time budget: sections that would start too late are skipped")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--sections", default=None,
                    help="comma-separated subset (peak, correctness_grads, correctness_engine, "
                         "teacher, ntk, lora_step, dallmi); default all")
    ap.add_argument("--out", default=None,
                    help="output JSON (default benchmarks/results/gpu-check-<device>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    args.sections = [x.strip() for x in args.sections.split(",")] if args.sections else None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        tag = "cpu"
        if args.device.startswith("cuda") and torch.cuda.is_available():
            tag = "".join(c if c.isalnum() else "-" for c in
                          torch.cuda.get_device_name(0).lower()).strip("-")
        suffix = "" if args.preset == "full" else f"-{args.preset}"
        args.out = str(HERE / "results" / f"gpu-check-{tag}{suffix}.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Check(args).run()


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res.get("all_sections_ok") else 1)
