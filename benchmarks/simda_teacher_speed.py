"""SimDA teacher pass speed on CPU: tokens/s of the job's read-out prompt (fp32 and bf16) next to
the machine's measured matmul peak for the same dtype, and whether bf16 keeps the label argmax.

    python benchmarks/simda_teacher_speed.py [--rows 96] [--threads 2] [--dtypes float32 bfloat16]

Runs the engine in-process (no Ray) on the first ``rows`` kitchen reviews with the SimDA CPU
job's teacher settings, batches of 16 ordered by length as the recipe does. Reports wall time
and process CPU time (on a shared machine CPU time / threads estimates the idle wall time).
Writes benchmarks/results/simda-teacher-speed.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, matmul_peak  # noqa: E402

from raydapt.config import load_job  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/simda/amazon-books-to-kitchen.cpu.yaml")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", default="benchmarks/results/simda-teacher-speed.json")
    args = ap.parse_args(argv)
    import torch

    from raydapt.stages.teacher import TeacherScore

    torch.set_num_threads(args.threads)
    cfg = load_job(args.job)
    t = cfg.teacher
    df = pd.read_json(Path(cfg.data.root) / cfg.data.target.path, lines=True)
    df = df.rename(columns={cfg.data.target.text_field: "text",
                            cfg.data.target.id_field: "id"})[["id", "text"]]
    df["id"] = df["id"].astype(str)
    df = df.sample(n=args.rows, random_state=0)
    df = df.iloc[np.argsort(df["text"].str.len().to_numpy(), kind="stable")]
    res: dict = {"benchmark": "simda-teacher-speed", "job": args.job, "rows": args.rows,
                 "threads": args.threads, "batch": args.batch, "machine": describe(),
                 "dtypes": {}}
    logps = {}
    for dtype in args.dtypes:
        ts = TeacherScore(
            engine={"backend": "hf", "model": t.model, "max_length": t.max_length,
                    "dtype": dtype, "chat": t.chat, "answer_prefix": t.answer_prefix,
                    "device": "cpu", "num_threads": args.threads},
            label_words=[t.verbalizer[lab] for lab in cfg.data.labels], template=t.template,
            text_max_tokens=t.text_max_tokens, text_truncation=t.text_truncation)
        n_params = sum(p.numel() for n, p in ts.engine.model.named_parameters()
                       if "embed" not in n)
        ts.process(df.head(args.batch))  # warm-up
        w0, c0, tokens, out = time.perf_counter(), _cpu(), 0, []
        for i in range(0, len(df), args.batch):
            o = ts.process(df.iloc[i: i + args.batch])
            tokens += int(o["prompt_tokens"].sum())
            out.append(o)
        wall, cpu = time.perf_counter() - w0, _cpu() - c0
        logps[dtype] = np.stack(pd.concat(out)["llm_logp"].to_numpy())
        peak = matmul_peak(dtype, threads=args.threads)
        flop = 2 * n_params * tokens  # non-embedding weights; attention over <=512 tokens extra
        res["dtypes"][dtype] = {
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": tokens,
            "tokens_per_s_wall": round(tokens / wall, 1),
            "tokens_per_s_cpu_est": round(tokens / (cpu / args.threads), 1),
            "rows_per_s_cpu_est": round(len(df) / (cpu / args.threads), 2),
            "matmul_peak": peak,
            "achieved_gflops_cpu_est": round(flop / (cpu / args.threads) / 1e9, 1),
        }
        print(dtype, res["dtypes"][dtype], flush=True)
        del ts
    if "float32" in logps:
        ref = logps["float32"]
        for dtype, lp in logps.items():
            if dtype == "float32":
                continue
            m_ref, m = ref[:, 1] - ref[:, 0], lp[:, 1] - lp[:, 0]
            res["dtypes"][dtype]["argmax_agreement_vs_fp32"] = float(
                (ref.argmax(1) == lp.argmax(1)).mean())
            # the read-out the job uses: median-thresholded margins
            res["dtypes"][dtype]["median_argmax_agreement_vs_fp32"] = float(
                ((m_ref > np.median(m_ref)) == (m > np.median(m))).mean())
            res["dtypes"][dtype]["margin_max_abs_diff"] = float(np.abs(m_ref - m).max())
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["dtypes"], indent=1))
    return res


if __name__ == "__main__":
    run()
