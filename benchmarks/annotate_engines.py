"""Annotation throughput: the vLLM engine vs the hf engine, same rows, same model, same run.

Both engines score SimDA's teacher prompts (chat template + answer prefix, label-word log-probs)
for the same Amazon reviews with the same model and dtype, in one process: zero-shot prompts
(the teacher pass; ~100-180 tokens) and prompts with ``--demos`` demonstrations (the ICL /
kNN-augmented prompt passes vLLM serves in SimDA; ~4x longer). The machine is shared, so the two
engines are timed batch by batch, back to back (hf batch i, then vLLM batch i), and the result is
their ratio; each engine gets ``--threads`` CPU threads. Also recorded: engine start-up, the
label-distribution agreement and a check of vLLM's exact second pass (prompt log-probs) against
its first. Run it in the vLLM venv, where both engines are installed::

    bash scripts/setup-vllm.sh
    .venv-vllm/bin/python benchmarks/annotate_engines.py   # -> benchmarks/results/annotate-engines-cpu.json

Costs ~6-10 min on 2 shared cores (two engine starts, 2 x 2 x ``--rows`` prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _prompts(hf, rows: list[dict], demos: int, T) -> list[str]:
    """SimDA's zero-shot prompt (demos=0) or an ICL prompt with the next ``demos`` reviews."""
    from raydapt.stages.annotate import build_prompt

    out = []
    for i, r in enumerate(rows):
        ds = [(hf.truncate(d["text"], T.demo_max_tokens), T.verbalizer[d["label"]].strip())
              for d in (rows[(i + j + 1) % len(rows)] for j in range(demos))]
        out.append(build_prompt(T.template, hf.truncate(r["text"], T.text_max_tokens),
                                demos=ds, demo_template=T.demo_template))
    return out


def _timed_pair(hf, vl, prompts: list[str], bs: int) -> dict:
    """Score ``prompts`` in batches of ``bs`` on both engines, batch by batch, back to back."""
    t = {"hf": 0.0, "vllm": 0.0}
    lp = {"hf": [], "vllm": []}
    tok = {"hf": 0, "vllm": 0}
    for i in range(0, len(prompts), bs):
        b = prompts[i:i + bs]
        for name, eng in (("hf", hf), ("vllm", vl)):
            t0 = time.perf_counter()
            o = eng.score(b)
            t[name] += time.perf_counter() - t0
            lp[name].append(o.label_logprobs)
            tok[name] += int(o.prompt_tokens.sum())
    from raydapt.engines.base import renormalise

    h, v = np.concatenate(lp["hf"]), np.concatenate(lp["vllm"])
    ph, pv = renormalise(h), renormalise(v)
    res = {name: {"seconds": round(t[name], 2), "rows_per_s": round(len(prompts) / t[name], 2),
                  "tokens_per_s": round(tok[name] / t[name], 1)} for name in t}
    res.update(rows=len(prompts), prompt_tokens_mean=round(tok["hf"] / len(prompts), 1),
               same_tokens=tok["hf"] == tok["vllm"],
               vllm_over_hf_rows_per_s=round(t["hf"] / t["vllm"], 2),
               argmax_agreement=float((ph.argmax(1) == pv.argmax(1)).mean()),
               max_abs_dp=float(np.abs(ph - pv).max()),
               max_abs_dlogp=float(np.abs(h - v).max()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pkg:smollm2-135m-instruct")
    ap.add_argument("--data", default=str(Path(os.environ.get(
        "RAYDAPT_DATA", REPO.parent / "shared" / "data")) / "amazon" / "kitchen.jsonl"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per engine call "
                    "(teacher.pool.batch_size: what one actor scores at once)")
    ap.add_argument("--demos", type=int, default=4, help="demonstrations in the long prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vllm", default='{"kv_cache_memory_bytes": 536870912, "max_num_seqs": 16}',
                    help="teacher.vllm engine kwargs (JSON)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                         "annotate-engines-cpu.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers
    import vllm
    from machine import describe

    from raydapt.engines.hf import HFEngine
    from raydapt.engines.vllm import VLLMEngine
    from raydapt.recipes.simda_config import TeacherSection

    T = TeacherSection()
    words = [T.verbalizer["negative"], T.verbalizer["positive"]]
    common = dict(max_length=1024, dtype=a.dtype, chat=T.chat, answer_prefix=T.answer_prefix,
                  num_threads=a.threads)
    lines = Path(a.data).read_text().splitlines()
    rows = [json.loads(x) for x in lines if x.strip()][: a.rows]

    t0 = time.perf_counter()
    vl = VLLMEngine(a.model, words, engine_kwargs=json.loads(a.vllm), **common)
    start_vllm = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = HFEngine(a.model, words, device="cpu", **common)
    torch.set_num_threads(a.threads)
    start_hf = time.perf_counter() - t0
    print(f"engines up: vLLM {start_vllm:.0f}s, hf {start_hf:.0f}s", flush=True)

    warm = _prompts(hf, rows[: a.batch_size], 0, T)
    hf.score(warm)
    vl.score(warm)
    results = {}
    for kind, demos in (("zero_shot", 0), (f"icl_{a.demos}_demos", a.demos)):
        r = _timed_pair(hf, vl, _prompts(hf, rows, demos, T), a.batch_size)
        print(kind, json.dumps(r), flush=True)
        results[kind] = r

    # vLLM's exact second pass (prompt + label word, prompt_logprobs) on 8 prompts vs pass 1
    ids = vl.encode(_prompts(hf, rows[:8], 0, T))
    first = vl.score_ids(ids)
    second = np.stack([vl.prompt_logprobs(ids, [t] * len(ids)) for t in vl.label_token_ids()], 1)
    out = {
        "benchmark": "annotate_engines",
        "command": "python benchmarks/annotate_engines.py " + " ".join(sys.argv[1:]),
        "machine": describe(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": a.model, "dtype": a.dtype, "threads": a.threads, "batch_size": a.batch_size,
        "vllm_engine_kwargs": vl.engine_kwargs | {"model": a.model},
        "vllm_exact_ids_api": vl.exact_ids_api,
        "engine_start_s": {"vllm": round(start_vllm, 1), "hf": round(start_hf, 1)},
        "results": results,
        "vllm_pass2_vs_pass1_max_abs_dlogp": float(np.abs(first - second).max()),
        "note": "shared 2-core machine: absolute rates vary with other load; the two engines "
                "were timed batch by batch back to back, so their ratio is the result.",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
