"""Time per DALLMi training step: the batched loss (one main forward + ONE forward over all L mixed
inputs) vs a per-label loop with 1 + 2L forward passes (the reference implementation's
structure: per label, a forward of the unlabeled row for Φ_l(u) and a forward of the mixed
input), same model, batch, pairs and μ. Prints the ratio and writes
benchmarks/results/dallmi-step-cpu.json with the machine described.

    python benchmarks/dallmi_step.py [--steps 6] [--batch 32] [--max-length 64]

The two variants alternate step by step so CPU contention hits both alike. Before timing, both
losses are computed in eval mode (no dropout) on the same pairs and μ: they must agree (the
batched loss is the loop's maths, not an approximation); the difference is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.losses.pu import dallmi_loss, mixup_pairs, sample_mu, variational_pu_loss  # noqa: E402
from raydapt.train.samplers import ClassCycleSampler  # noqa: E402


def per_label_loss(model, ids, mask, observed, pairs, mu, *, lam: float) -> torch.Tensor:
    """Reference structure: main forward, then per label two single-row forwards."""
    hidden = model.encode(model.embed(ids), mask)
    probs = torch.sigmoid(model.head(model.pool(hidden, mask)))
    var, _ = variational_pu_loss(probs, observed)
    reg = probs.new_zeros(())
    label_idx, pos_idx, unl_idx = pairs
    for j in range(len(label_idx)):
        lab, p, u = int(label_idx[j]), int(pos_idx[j]), int(unl_idx[j])
        logit_u, _ = model(ids[u : u + 1], mask[u : u + 1])  # forward 1: Φ_l(u)
        phi_u = torch.sigmoid(logit_u[0, lab])
        emb = model.embed(ids[[p, u]])  # forward 2: the mixed input
        m = mu[j]
        mixed = m * emb[0:1] + (1 - m) * emb[1:2]
        mk = torch.maximum(mask[p], mask[u])[None]
        phi_mix = torch.sigmoid(model.head(model.pool(model.encode(mixed, mk), mk))[0, lab])
        reg = reg + (m + (1 - m) * phi_u - phi_mix) ** 2
    return var + lam * reg


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="pkg:all-minilm-l6-v2")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="../shared/data/pubmed_mesh/pubmed.jsonl")
    ap.add_argument("--out", default="benchmarks/results/dallmi-step-cpu.json")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from raydapt.core.assets import resolve_model
    from raydapt.data.labels import multi_hot
    from raydapt.train.models import EncoderClassifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    rows = [r for r in rows if r["domain"] == "female"][:200]
    vocab = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "L", "M", "N", "Z"]
    y = multi_hot([r["labels"] for r in rows], vocab)
    batch = next(iter(ClassCycleSampler(y, args.batch, random_share=0.25, seed=0)))
    tok = AutoTokenizer.from_pretrained(resolve_model(args.encoder).path)
    enc = tok([rows[i]["text"] for i in batch], truncation=True, max_length=args.max_length,
              padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    obs = torch.as_tensor(y[batch])
    model = EncoderClassifier(args.encoder, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    pairs = mixup_pairs(obs, generator=gen)
    mu = sample_mu(len(pairs[0]), alpha=0.3, beta=0.3, generator=gen)

    model.eval()  # equivalence: same pairs and μ, no dropout
    with torch.no_grad():
        from raydapt.losses.pu import mixup_regularizer

        h = model.encode(model.embed(ids), mask)
        pr = torch.sigmoid(model.head(model.pool(h, mask)))
        var, _ = variational_pu_loss(pr, obs)
        reg, _ = mixup_regularizer(model, ids, mask, pr, obs, alpha=0.3, beta=0.3, generator=gen,
                                   mu=mu, pairs=pairs)
        batched_val = float(var + reg)
        loop_val = float(per_label_loss(model, ids, mask, obs, pairs, mu, lam=1.0))
    model.train()

    def step_batched() -> None:
        out = dallmi_loss(model, ids, mask, obs, generator=gen, lam=1.0, alpha=0.3, beta=0.3)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    def step_loop() -> None:
        p = mixup_pairs(obs, generator=gen)
        m = sample_mu(len(p[0]), alpha=0.3, beta=0.3, generator=gen)
        loss = per_label_loss(model, ids, mask, obs, p, m, lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"batched": [], "per_label_loop": []}
    step_batched()
    step_loop()  # warm-up
    for i in range(args.steps):
        for name, fn in (("batched", step_batched), ("per_label_loop", step_loop)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"step {i + 1}/{args.steps}: batched {times['batched'][-1]:.2f}s, "
              f"per-label loop {times['per_label_loop'][-1]:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_labels = len(pairs[0])
    report = {
        "benchmark": "dallmi-step", "encoder": args.encoder, "batch": args.batch,
        "max_length": args.max_length, "tokens_per_row_padded": int(ids.shape[1]),
        "labels_with_pairs": n_labels,
        "forward_passes": {"batched": 2, "per_label_loop": 1 + 2 * n_labels},
        "seconds_per_step_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_per_step_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "speedup_loop_over_batched": round(med["per_label_loop"] / med["batched"], 2),
        "loss_eval_mode": {"batched": batched_val, "per_label_loop": loop_val,
                           "abs_diff": abs(batched_val - loop_val)},
        "threads": args.threads, "machine": describe(),
        "note": "steps alternate between the variants; the machine was shared with other jobs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"median s/step: batched {med['batched']:.3f}, per-label loop "
          f"{med['per_label_loop']:.3f} -> batched is {report['speedup_loop_over_batched']}x "
          f"faster; eval-mode losses {batched_val:.6f} vs {loop_val:.6f}; wrote {args.out}")
    return report


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
