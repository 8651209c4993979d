"""Per-sample-gradient scoring throughput: batched implementations vs a batch-size-1 backward loop.

Every path computes g(x) = Π ∇_θ F(x) (Jacobian-free NTK objective, LoRA parameters, Rademacher
projection) for the same samples on the same model: ``hooks`` (the default: one batched
forward/backward, per-sample LoRA gradients from saved activations and output gradients, no
[B, T, V] logits), ``vmap`` (``torch.func``) and ``loop``, the baseline: LESS's structure, one
backward per sample. Reports samples/s (gradients + projection), each batched path's ratio over
the loop (also the median over paired batches, robust to load drift), and the maximum difference
between the paths' projected gradients; writes ``benchmarks/results/ntk-scoring-<device>.json``.

    python benchmarks/ntk_scoring.py --samples 64 --batch-size 32 --micro-batch 8 --seq-len 128
    python benchmarks/ntk_scoring.py --device cuda --samples 512 --batch-size 128 --micro-batch 32
    python benchmarks/ntk_scoring.py --model tiny --samples 16       # seconds, no weights needed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raydapt.select.ntk import RademacherProjector, flat_dim, per_sample_grads, trainable_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import matmul_peak  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="pkg:smollm2-135m-instruct",
                   help="model reference (pkg:/hf:/path) or 'tiny' (random 2-layer Llama)")
    p.add_argument("--samples", type=int, default=32, help="samples scored by each path")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per projection call (every path)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="samples per batched gradient call (hooks, vmap); the loop does 1")
    p.add_argument("--seq-len", type=int, default=128, help="maximum (padded) sequence length")
    p.add_argument("--min-len", type=int, default=None,
                   help="random data: shortest sample (default seq_len // 2); lengths uniform")
    p.add_argument("--prompt-frac", type=float, default=0.5,
                   help="random data: fraction of each sample that is prompt (no response mask)")
    p.add_argument("--padding", choices=["right", "left"], default="right")
    p.add_argument("--data", default=None,
                   help="JSONL with question/rationale/answer (e.g. "
                        "/work/shared/data/cot_pool/gsm8k_train.jsonl); default random tokens")
    p.add_argument("--proj-dim", type=int, default=8192, help="p, the projected dimension")
    p.add_argument("--proj-seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=1024, help="projector chunk (memory knob)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--objective", choices=["logit_sum", "loss"], default="logit_sum")
    p.add_argument("--vmap-chunk", type=int, default=None,
                   help="vmap chunk_size (samples vectorised at once; default the whole batch)")
    p.add_argument("--attn-implementation", default=None,
                   help="transformers attention backend (default: the model's default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--methods", default="hooks,vmap,loop",
                   help="comma-separated; 'loop' (the baseline) is always run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--warmup", type=int, default=2, help="samples run once per path, untimed")
    p.add_argument("--seed", type=int, default=0, help="data and LoRA init seed")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing the paths: run the first method on one micro-batch "
                   "under torch.profiler and report where the time goes (matmuls, attention, "
                   "elementwise, ...) and the matmuls' own GFLOP/s; writes "
                   "ntk-scoring-profile-<device>[-<dtype>].json")
    p.add_argument("--out", default=None,
                   help="output JSON (default benchmarks/results/ntk-scoring-<device>.json)")
    return p.parse_args(argv)


# torch.profiler op names → the category the --profile report sums them into
_OP_GROUPS = (
    ("autograd_engine", ("autograd::",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                "aten::linear", "aten::einsum", "mkldnn", "aten::_mkl")),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax")),
    ("copy_layout", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat",
                     "aten::index", "aten::scatter", "aten::gather", "aten::to", "aten::_to_copy",
                     "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::stack",
                     "aten::where", "aten::masked_fill", "aten::embedding", "aten::sum")),
)


def _op_group(name: str) -> str:
    for group, keys in _OP_GROUPS:
        if any(k in name for k in keys):
            return group
    return "elementwise_other"


def profile_pass(run) -> dict[str, Any]:
    """``run()`` (one scoring pass, already warmed up) under torch.profiler: self CPU time per
    op category (leaf ops, so nothing is counted twice), the top ops, and the FLOP/s the
    profiler's own FLOP count gives for the matmul ops (mm / addmm / bmm)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        run()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    groups: dict[str, float] = {}
    mm_flops = mm_self = 0.0
    for e in events:
        g = _op_group(e.key)
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / 1e6
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") and e.flops:
            mm_flops += e.flops
            mm_self += e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "wall_s_profiled": wall,
        "self_cpu_s_total": total_self,
        "share_by_group": {g: v / total_self for g, v in sorted(groups.items())},
        "matmul_ops_gflops_per_s": mm_flops / mm_self / 1e9 if mm_self else None,
        "matmul_ops_flops": mm_flops,
        "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                     "share": e.self_cpu_time_total / 1e6 / total_self,
                     **({"gflops_per_s": e.flops / (e.self_cpu_time_total / 1e6) / 1e9}
                        if e.flops and e.self_cpu_time_total else {})} for e in top],
    }


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any, dict]:
    """The causal LM with LoRA (random A and B, standing in for a warmed-up adapter: B ≠ 0 so
    both matrices have gradients), its tokenizer (None for tiny) and a description."""
    import peft
    import transformers

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    tokenizer = None
    if args.model == "tiny":
        cfg = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2,
        )
        if args.attn_implementation:
            cfg._attn_implementation = args.attn_implementation
        base = transformers.LlamaForCausalLM(cfg).to(dtype)
        desc = {"ref": "tiny", "config": "llama vocab=64 hidden=32 layers=2 heads=2"}
    else:
        from raydapt.core.assets import resolve_model

        rm = resolve_model(args.model)
        kw: dict[str, Any] = {"dtype": dtype}
        if args.attn_implementation:
            kw["attn_implementation"] = args.attn_implementation
        base = transformers.AutoModelForCausalLM.from_pretrained(rm.path, **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(rm.path)
        desc = {"ref": args.model, "fingerprint": rm.fingerprint,
                "architecture": type(base).__name__,
                "base_params": sum(p.numel() for p in base.parameters())}
    lora = peft.LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha,
        target_modules=args.lora_targets.split(","), init_lora_weights=False,
    )
    model = peft.get_peft_model(base, lora).to(device).eval()
    desc["attn_implementation"] = model.config._attn_implementation
    desc["vocab_size"] = int(model.config.vocab_size)
    return model, tokenizer, desc


def random_data(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) pairs with lengths uniform in [min_len, seq_len]."""
    g = torch.Generator().manual_seed(args.seed)
    lo = args.min_len if args.min_len is not None else args.seq_len // 2
    out = []
    for _ in range(args.samples + args.warmup):
        n = int(torch.randint(lo, args.seq_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append((ids, max(1, min(n - 1, int(n * args.prompt_frac)))))
    return out


def text_data(args: argparse.Namespace, tokenizer: Any) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) from a question/rationale/answer JSONL, truncated to seq_len."""
    out = []
    with open(args.data) as f:
        for line in f:
            if len(out) >= args.samples + args.warmup:
                break
            r = json.loads(line)
            prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
            resp = tokenizer(f" {r['rationale']}\n#### {r['answer']}")["input_ids"]
            ids = (prompt + resp)[: args.seq_len]
            out.append((ids, min(len(prompt), len(ids) - 1)))
    if len(out) < args.samples + args.warmup:
        raise SystemExit(f"{args.data} has fewer than {args.samples + args.warmup} rows")
    return out


def collate(
    rows: list[tuple[list[int], int]], *, side: str, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest → input_ids, attention_mask, response_mask, each [B, T]."""
    t = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), t), pad_id, dtype=torch.long)
    am = torch.zeros(len(rows), t, dtype=torch.long)
    rm = torch.zeros(len(rows), t, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        n = len(ids)
        s = slice(t - n, t) if side == "left" else slice(0, n)
        ids_t[i, s] = torch.tensor(ids)
        am[i, s] = 1
        resp = torch.zeros(n, dtype=torch.long)
        resp[n_prompt:] = 1
        rm[i, s] = resp
    return ids_t.to(device), am.to(device), rm.to(device)


def scoring_flops(model: nn.Module, shapes: list[list[tuple[int, int]]], n_lora: int,
                  proj_dim: int) -> dict[str, float]:
    """FLOPs of the scoring pass as the ``hooks`` path executes it (padded micro-batches):

        grads      = Σ_micro-batches  B·T·(4·P_lin + 6·P_lora) + 12·L·B·T²·H
        projection = Σ_batches        2·B·P_lora·p

    P_lin = the decoder's linear weights (per token: 2·P_lin forward, 2·P_lin for the input
    gradients of the backward, which must reach layer 0's LoRA; no weight gradients of the
    frozen base), P_lora = the LoRA parameters (forward, input and per-sample weight gradients:
    6 per token), attention 4·T²·H per layer forward (QKᵀ and AV over all T², as executed),
    twice that backward; the output layer is not run (hooks: Σ_vocab logits = h·Σ_k W_k, 2·H per
    token, left out), nor are norms, activations or softmaxes (not matmuls)."""
    cfg = model.config
    h, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    p_lin = sum(mod.weight.numel() for name, mod in base.get_decoder().named_modules()
                if isinstance(mod, nn.Linear) and "lora_" not in name)
    grads = sum(b * t * (4 * p_lin + 6 * n_lora) + 12 * layers * b * t * t * h
                for batch in shapes for b, t in batch)
    proj = sum(2 * sum(b for b, _ in batch) * n_lora * proj_dim for batch in shapes)
    return {"grads": float(grads), "projection": float(proj), "P_lin": int(p_lin),
            "P_lora": int(n_lora), "tokens_padded": int(sum(b * t for batch in shapes
                                                           for b, t in batch))}


def projection_breakdown(proj: RademacherProjector, batch: int) -> dict[str, float]:
    """Seconds of one ``project`` call of [batch, P] split into its parts, chunk by chunk as
    ``iter_chunks`` does them: drawing the random words (mt19937), expanding them to ±1/√p floats
    (a [chunk_rows, p] fp32 buffer written per chunk) and the accumulating matmul; plus the
    matmul alone on one cached chunk (what a projection without the expansion would cost)."""
    g = torch.randn(batch, proj.in_dim)
    out = torch.zeros(batch, proj.out_dim)
    table = proj._table(torch.device("cpu"), torch.float32)
    words = torch.empty(proj.chunk_rows, proj.words_per_row, dtype=torch.int64)
    buf = torch.empty(proj.chunk_rows, proj.padded_out_dim)
    t = {"draw_s": 0.0, "expand_s": 0.0, "matmul_s": 0.0}
    for start in range(0, proj.in_dim, proj.chunk_rows):
        stop = min(start + proj.chunk_rows, proj.in_dim)
        rows = stop - start
        t0 = time.perf_counter()
        proj._fill_words(words, start, stop)
        t1 = time.perf_counter()
        idx = words[:rows].view(torch.uint8).reshape(-1).to(torch.int32)
        torch.index_select(table, 0, idx, out=buf[:rows].view(-1, 8))
        t2 = time.perf_counter()
        out.addmm_(g[:, start:stop], buf[:rows, : proj.out_dim])
        t["draw_s"] += t1 - t0
        t["expand_s"] += t2 - t1
        t["matmul_s"] += time.perf_counter() - t2
    t["total_s"] = sum(t.values())
    t["matmul_gflops_per_s"] = 2.0 * batch * proj.in_dim * proj.out_dim / t["matmul_s"] / 1e9
    t["batch"] = batch
    return t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer, model_desc = load_model(args, device)
    params = trainable_params(model)
    n_params = flat_dim(params)
    proj = RademacherProjector(
        n_params, args.proj_dim, seed=args.proj_seed, chunk_rows=args.chunk_rows
    )
    if args.data:
        if tokenizer is None:
            raise SystemExit("--data needs a real model (its tokenizer)")
        rows = text_data(args, tokenizer)
    else:
        rows = random_data(args, model_desc["vocab_size"])
    pad_id = (tokenizer.pad_token_id if tokenizer is not None else None)
    pad_id = pad_id if pad_id is not None else 0
    warm, rows = rows[: args.warmup], rows[args.warmup :]
    if args.profile:
        return _profile_main(args, model, params, rows, pad_id, device, model_desc,
                             sys.argv[1:] if argv is None else argv)
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    def run(method: str, batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, float, float]:
        step = args.micro_batch if method != "loop" else len(batch)  # the loop goes 1 by 1 itself
        sync(device)
        t0 = time.perf_counter()
        parts = []
        for i in range(0, len(batch), step):
            ids, am, rm = collate(batch[i : i + step], side=args.padding, pad_id=pad_id,
                                  device=device)
            parts.append(per_sample_grads(
                model, ids, am, rm, params=params, objective=args.objective, method=method,
                chunk_size=args.vmap_chunk if method == "vmap" else None,
            ))
        g = torch.cat(parts)
        sync(device)
        t1 = time.perf_counter()
        pg = proj.project(g)
        sync(device)
        return pg.cpu(), t1 - t0, time.perf_counter() - t1

    shapes = [[(len(c), max(len(ids) for ids, _ in c)) for c in
               (b[i : i + args.micro_batch] for i in range(0, len(b), args.micro_batch))]
              for b in batches]  # (rows, padded length) of every micro-batch, per batch
    methods = tuple(dict.fromkeys([*args.methods.split(","), "loop"]))
    batched = [m for m in methods if m != "loop"]
    load_before = os.getloadavg()
    # the matmul peak in this dtype (and fp32, the projection's), before and after the timed
    # passes: on a shared machine the fraction below is only meaningful when both agree
    peak_before = {dt: matmul_peak(dt) for dt in dict.fromkeys([args.dtype, "float32"])}
    for m in methods:  # untimed warm-up (allocator, kernels, lazy init)
        if warm:
            run(m, warm)
    timing = {m: {"grad_s": 0.0, "proj_s": 0.0} for m in methods}
    per_batch: list[dict[str, Any]] = []
    peak_mem: dict[str, int] = {}
    projected: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for i, batch in enumerate(batches):
        order = methods if i % 2 == 0 else methods[::-1]  # alternate: fair under drifting load
        per_batch.append({"samples": len(batch)})
        for m in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            pg, tg, tp = run(m, batch)
            if device.type == "cuda":
                peak_mem[m] = max(peak_mem.get(m, 0), torch.cuda.max_memory_allocated(device))
            timing[m]["grad_s"] += tg
            timing[m]["proj_s"] += tp
            per_batch[-1][m] = {"grad_s": tg, "proj_s": tp}
            projected[m].append(pg)
            print(f"batch {i + 1}/{len(batches)} {m:>5}: grads {tg:7.2f}s  projection {tp:6.2f}s",
                  flush=True)
    load_after = os.getloadavg()

    gl = torch.cat(projected["loop"])
    scale = float(gl.abs().max())
    max_abs = {m: float((torch.cat(projected[m]) - gl).abs().max()) for m in batched}
    n = len(rows)
    result_methods = {}
    for m in methods:
        total = timing[m]["grad_s"] + timing[m]["proj_s"]
        result_methods[m] = {
            "samples_per_s": n / total,
            "grad_only_samples_per_s": n / timing[m]["grad_s"],
            "grad_s": timing[m]["grad_s"],
            "projection_s": timing[m]["proj_s"],
            **({"cuda_peak_bytes": peak_mem[m]} if m in peak_mem else {}),
        }
    ratios = {}
    for m in batched:
        # Same batch, back to back: the paired ratio is robust to load drifting between batches.
        paired = [(b["loop"]["grad_s"] + b["loop"]["proj_s"]) / (b[m]["grad_s"] + b[m]["proj_s"])
                  for b in per_batch]
        paired_grad = [b["loop"]["grad_s"] / b[m]["grad_s"] for b in per_batch]
        ratios[m] = {
            "ratio_over_loop": result_methods[m]["samples_per_s"]
            / result_methods["loop"]["samples_per_s"],
            "ratio_grad_only": result_methods[m]["grad_only_samples_per_s"]
            / result_methods["loop"]["grad_only_samples_per_s"],
            "ratio_median_paired_batches": statistics.median(paired),
            "ratio_grad_only_median_paired_batches": statistics.median(paired_grad),
            "projected_max_abs_diff_vs_loop": max_abs[m],
        }
    head = batched[0]
    flops = scoring_flops(model, shapes, n_params, args.proj_dim)
    peak_after = {dt: matmul_peak(dt) for dt in dict.fromkeys([args.dtype, "float32"])}
    peak = {dt: {**max(peak_before[dt], peak_after[dt], key=lambda r: r["gflops_best"]),
                 "gflops_best_before_after": [peak_before[dt]["gflops_best"],
                                              peak_after[dt]["gflops_best"]]}
            for dt in peak_before}
    breakdown = projection_breakdown(proj, args.batch_size) if device.type == "cpu" else None
    eff = {}
    for m in methods:
        gs, ps = timing[m]["grad_s"], timing[m]["proj_s"]
        eff[m] = {
            "gflops_per_s": (flops["grads"] + flops["projection"]) / (gs + ps) / 1e9,
            "grads_gflops_per_s": flops["grads"] / gs / 1e9,
            "projection_gflops_per_s": flops["projection"] / ps / 1e9,
        }
        eff[m]["fraction_of_peak"] = eff[m]["gflops_per_s"] / peak[args.dtype]["gflops_best"]
        eff[m]["grads_fraction_of_peak"] = (eff[m]["grads_gflops_per_s"]
                                            / peak[args.dtype]["gflops_best"])
        eff[m]["projection_fraction_of_fp32_peak"] = (eff[m]["projection_gflops_per_s"]
                                                      / peak["float32"]["gflops_best"])
    import peft
    import transformers

    machine: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "loadavg_1m_before_after": [load_before[0], load_after[0]],
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    result = {
        "benchmark": "ntk-scoring: per-sample gradient of F + Rademacher projection",
        "machine": machine,
        "model": model_desc,
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "lora_params_P": n_params,
        "projection": proj.describe(),
        "samples_timed": n,
        "batches": len(batches),
        "methods": result_methods,
        "headline_method": head,
        "ratio_batched_over_loop": ratios[head]["ratio_over_loop"],
        "ratio_grad_only": ratios[head]["ratio_grad_only"],
        "ratios": ratios,
        "per_batch": per_batch,
        "projected_max_abs": scale,
        "projected_rel_diff": max(max_abs.values()) / scale if scale else 0.0,
        "flops": flops,
        "matmul_peak": peak,
        "achieved": eff,
        "projection_breakdown": breakdown,
    }
    out = Path(args.out) if args.out else RESULTS / f"ntk-scoring-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for m in methods:
        r = result_methods[m]
        extra = "" if m == "loop" else (
            f"  {ratios[m]['ratio_over_loop']:.2f}x the loop (grads only "
            f"{ratios[m]['ratio_grad_only']:.2f}x; paired-batch median "
            f"{ratios[m]['ratio_median_paired_batches']:.2f}x); max |Δ| vs loop "
            f"{max_abs[m]:.3g}")
        print(f"{m:>5}: {r['samples_per_s']:.3f} samples/s (grads only "
              f"{r['grad_only_samples_per_s']:.3f}){extra}")
    for m in methods:
        e = eff[m]
        print(f"{m:>5}: {e['gflops_per_s']:.1f} GFLOP/s = {e['fraction_of_peak']:.0%} of the "
              f"{args.dtype} matmul peak {peak[args.dtype]['gflops_best']:.1f} (grads "
              f"{e['grads_fraction_of_peak']:.0%}, projection "
              f"{e['projection_fraction_of_fp32_peak']:.0%} of fp32 peak)")
    if breakdown:
        b = breakdown
        print(f"projection of {b['batch']} samples: draw {b['draw_s']:.2f}s, expand "
              f"{b['expand_s']:.2f}s, matmul {b['matmul_s']:.2f}s "
              f"({b['matmul_gflops_per_s']:.1f} GFLOP/s)")
    print(f"max |g| {scale:.3g}; wrote {out}")
    return result


def model_shape_matmuls(model: nn.Module, rows: int, dtype: str, repeats: int = 5) -> list[dict]:
    """GFLOP/s of torch.mm at the decoder's own linear shapes for ``rows`` = B·T tokens: the
    forward [rows, in] @ [in, out] and the input gradient [rows, out] @ [out, in] of every
    distinct (in, out), best of ``repeats``. Against the square-matrix peak this is the ceiling
    the model's matmuls can reach at this micro-batch."""
    dt = getattr(torch, dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes = sorted({(m.in_features, m.out_features) for name, m in
                     base.get_decoder().named_modules()
                     if isinstance(m, nn.Linear) and "lora_" not in name})
    out = []
    for i, o in shapes:
        for kind, (k, n) in (("forward", (i, o)), ("input_grad", (o, i))):
            a, b = torch.randn(rows, k).to(dt), torch.randn(k, n).to(dt)
            torch.mm(a, b)
            best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
            out.append({"shape": [rows, k, n], "kind": kind,
                        "gflops_per_s": 2.0 * rows * k * n / best / 1e9})
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _profile_main(args: argparse.Namespace, model: nn.Module, params: dict, rows: list,
                  pad_id: int, device: torch.device, model_desc: dict,
                  argv: list[str]) -> dict:
    method = args.methods.split(",")[0]
    ids, am, rm = collate(rows[: args.micro_batch], side=args.padding, pad_id=pad_id,
                          device=device)
    b, t = ids.shape

    def run() -> None:
        per_sample_grads(model, ids, am, rm, params=params, objective=args.objective,
                         method=method)

    run()  # warm-up
    prof = {"method": method, "micro_batch": [b, t], **profile_pass(run)}
    # the same micro-batch without the profiler (its per-op recording slows small ops most)
    prof["wall_s_unprofiled"] = min(_timed(run) for _ in range(2))
    prof["model_shape_matmuls"] = model_shape_matmuls(model, b * t, args.dtype)
    flops = scoring_flops(model, [[(b, t)]], flat_dim(params), args.proj_dim)
    peak = matmul_peak(args.dtype)
    prof["model_flops_grads"] = flops["grads"]
    prof["model_gflops_per_s"] = flops["grads"] / prof["wall_s_unprofiled"] / 1e9
    prof["model_fraction_of_peak"] = prof["model_gflops_per_s"] / peak["gflops_best"]
    # the time the matmuls would take at the model-shape rate, as a share of the unprofiled
    # pass: what is left is elementwise work, attention, copies and Python / autograd overhead
    shape_rate = statistics.median(r["gflops_per_s"] for r in prof["model_shape_matmuls"])
    prof["model_shape_matmul_gflops_median"] = shape_rate
    prof["matmul_share_at_shape_rate"] = flops["grads"] / (shape_rate * 1e9) / prof[
        "wall_s_unprofiled"]
    prof["matmul_peak_gflops"] = peak["gflops_best"]
    prof["matmul_ops_fraction_of_peak"] = (prof["matmul_ops_gflops_per_s"] or 0.0) / peak[
        "gflops_best"]
    result = {"benchmark": "ntk-scoring profile: where one micro-batch's time goes",
              "command": "python benchmarks/ntk_scoring.py " + " ".join(argv),
              "model": model_desc, "params": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "loadavg_1m": os.getloadavg()[0]},
              "profile": prof}
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = Path(args.out) if args.out else RESULTS / f"ntk-scoring-profile-{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    shares = ", ".join(f"{g} {v:.0%}" for g, v in prof["share_by_group"].items())
    print(f"micro-batch {b}x{t}: {prof['wall_s_unprofiled']:.2f}s ({prof['wall_s_profiled']:.2f}s"
          f" profiled); self time: {shares}")
    print(f"torch.mm at the model's shapes ({b * t} rows): median "
          f"{shape_rate:.1f} GFLOP/s = {shape_rate / peak['gflops_best']:.0%} of the peak; the "
          f"pass's matmul FLOPs at that rate would take {prof['matmul_share_at_shape_rate']:.0%}"
          f" of its time")
    print(f"matmul ops {prof['matmul_ops_gflops_per_s'] or 0:.1f} GFLOP/s = "
          f"{prof['matmul_ops_fraction_of_peak']:.0%} of the {args.dtype} peak "
          f"{peak['gflops_best']:.1f}; the whole pass {prof['model_gflops_per_s']:.1f} GFLOP/s = "
          f"{prof['model_fraction_of_peak']:.0%}")
    for op in prof["top_ops"][:8]:
        print(f"  {op['op']:<40} {op['share']:6.1%}  {op['calls']:5d} calls")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
