"""The SimDA job with ``data.stream_target_train`` on 10K and 100K-row target corpora (issue 25):
`raydapt run` as a user runs it, with the driver's memory read from outside. Writes
benchmarks/results/simda-stream-scale-cpu.json.

    python benchmarks/simda_stream_scale.py --sizes 10000,100000
    python benchmarks/simda_stream_scale.py --sizes 10000,100000 --path frame   # the control

The target is Amazon kitchen / electronics / dvd reviews repeated with new ids, written as 8
jsonl files in a directory (scratch, not git); the source is the main job's 300 books rows. The
job is ``jobs/simda/amazon-books-to-kitchen.cpu.yaml`` with: the target directory streamed
(``data.stream_target_train``, read units of 5,000 rows), 95 % of it on the train side and 200
test rows, the teacher replaced by the tiny random Llama of ``pool_scale.py`` (2 layers, width
128: the platform's cost, not matmuls; its pool 1 actor with 2 threads, batches of 64), texts cut to 64
tokens, and one distilled student (kl_sim, 10 steps, 32 tokens a row) that reads its rows from
the streamed shards. Accuracy of a random-init teacher is chance and is not the point; rows,
time and the driver's memory are.

Recorded per size: wall seconds, the streamed pass's rows/s (its console line), the driver's RSS
peak and its private (anonymous) and shared parts, sampled every 0.5 s from /proc/<pid>/status
(``ntk_recipe_scale.record_run``), and the counts and rejects the recipe reports.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from ntk_recipe_scale import record_run  # noqa: E402
from pool_scale import DATA, N_FILES, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "simda-stream-scale-cpu.json"
BASE_JOB = ROOT / "jobs" / "simda" / "amazon-books-to-kitchen.cpu.yaml"
DOMAINS = ["kitchen", "electronics", "dvd"]


def build_target(scratch: Path, size: int) -> Path:
    """``size`` target reviews with new ids in N_FILES jsonl files (built once)."""
    d = scratch / f"simda-target-{size}"
    if (d / "_BUILT").exists():
        return d / "files"
    base: list[str] = []
    for dom in DOMAINS:
        base += [ln for ln in (DATA / "amazon" / f"{dom}.jsonl").read_text().splitlines()
                 if ln.strip()]
    (d / "files").mkdir(parents=True, exist_ok=True)
    per_file = -(-size // N_FILES)
    outs = [open(d / "files" / f"part-{k:02d}.jsonl", "w") for k in range(N_FILES)]
    try:
        for i in range(size):
            rec = json.loads(base[i % len(base)])
            rec["id"] = f"t{i:07d}-{rec['id']}"
            outs[i // per_file].write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        for f in outs:
            f.close()
    (d / "_BUILT").write_text(json.dumps({"rows": size, "base_rows": len(base)}))
    return d / "files"


def single_file(files: Path) -> Path:
    """The target's files as one jsonl file (the frame path reads one file), built once."""
    one = files.parent / "single.jsonl"
    if not one.exists():
        tmp = one.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for f in sorted(files.glob("part-*.jsonl")):
                out.write(f.read_bytes())
        tmp.rename(one)
    return one


def by_length(files: Path) -> Path:
    """The target's rows sorted by text length (stable), in as many files: the order in which
    the frame path's teacher batches them (``_by_length``), for the streamed pass."""
    d = files.parent / "by-length"
    if not (d / "_BUILT").exists():
        rows = [ln for f in sorted(files.glob("part-*.jsonl"))
                for ln in f.read_text().splitlines() if ln.strip()]
        rows.sort(key=lambda ln: len(json.loads(ln)["text"]))
        d.mkdir(exist_ok=True)
        per = -(-len(rows) // N_FILES)
        for k in range(N_FILES):
            (d / f"part-{k:02d}.jsonl").write_text("".join(
                ln + "\n" for ln in rows[k * per:(k + 1) * per]))
        (d / "_BUILT").write_text("")
    return d


def job_for(scratch: Path, size: int, mdir: str, stream: bool = True,
            sorted_by_length: bool = False) -> Path:
    cfg = yaml.safe_load(BASE_JOB.read_text())
    target = build_target(scratch, size)
    if sorted_by_length:
        target = by_length(target)
    work = scratch / ((f"simda-stream-{size}" if stream else f"simda-frame-{size}")
                      + ("-by-length" if sorted_by_length else ""))
    cfg["run"] = {"name": f"target-{size}", "seed": 0, "output_dir": str(work / "runs"),
                  "cache_dir": str(work / "cache")}
    cfg["tracking"] = {"uri": f"sqlite:///{work}/mlruns.db",
                       "artifact_location": str(work / "art"), "experiment": "simda-stream"}
    cfg["ray"] = {"num_cpus": 2, "progress": False}
    cfg["data"].update({"root": str(DATA / "amazon"),
                        "target": {"path": str(target if stream else single_file(target))},
                        "target_test_fraction": 0.05, "max_target_train_rows": None,
                        "max_target_test_rows": 200, "stream_target_train": stream,
                        "target_unit_rows": 5_000})
    cfg["teacher"].update({"model": mdir, "max_length": 96, "text_max_tokens": 64,
                           "pool": {"concurrency": 1, "num_cpus": 1, "threads": 2,
                                    "batch_size": 64}})
    cfg["distill"].update({"variants": ["kl_sim"], "steps": 10, "max_length": 32})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--scratch", default="/tmp/pool-scale")
    ap.add_argument("--path", choices=("stream", "frame"), default="stream",
                    help="frame: the same job with data.stream_target_train off, its target "
                         "files as one file (the control; entries keyed frame-<size>)")
    ap.add_argument("--order", choices=("file", "length"), default="file",
                    help="length: the target's rows sorted by text length in its files (the "
                         "frame teacher's batch order; entries keyed <size>-by-length)")
    args = ap.parse_args()
    stream = args.path == "stream"
    by_len = args.order == "length"
    scratch = Path(args.scratch)
    mdir, _ = build_model(scratch)
    out = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    out.update({"benchmark": "simda-stream-scale-cpu", "machine": describe(),
                "command": "python benchmarks/simda_stream_scale.py --sizes SIZES [--path "
                           "frame] [--order length]"})
    for size in map(int, args.sizes.split(",")):
        job = job_for(scratch, size, mdir, stream, by_len)
        entry, text = record_run(job, size, "simda_stream_scale")
        entry["path"], entry["order"] = args.path, args.order
        res = json.loads((job.parent / "runs" / f"target-{size}" / "results.json").read_text())
        entry.update({k: res.get(k) for k in ("counts", "rejects", "seconds", "students")})
        m = re.search(r"target-train teacher → kNN: (\d+) rows in ([\d.]+)s \(([\d.]+) rows/s\)",
                      text)
        if m:
            entry["stream_pass"] = {"rows": int(m[1]), "seconds": float(m[2]),
                                    "rows_per_s": float(m[3])}
        m = re.search(r"\] teacher: (\d+)/\1 rows, ([\d.]+) rows/s", text)
        if m and not stream:  # the frame path's teacher pass (source, train and test rows)
            entry["frame_teacher_pass"] = {"rows": int(m[1]), "rows_per_s": float(m[2])}
        entry["console_tail"] = text.splitlines()[-12:]
        out["runs"][("" if stream else "frame-") + str(size) + ("-by-length" if by_len
                                                                 else "")] = entry
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        print(f"[simda_stream_scale] {size}: {entry['wall_s']} s, driver RSS peak "
              f"{entry['driver_rss_mb_peak']} MiB (private {entry['driver_rss_anon_mb_peak']}), "
              f"stream pass {entry.get('stream_pass')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
