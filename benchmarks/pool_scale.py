"""Pool scale (issue 25): stream 10K / 100K / 1M-row pools from files to files through the
platform and show how cost grows. Writes benchmarks/results/pool-scale-cpu.json (one entry per
size and file layout, merged into the file) with the machine described.

Pools are built from the shared FLAN + GSM8K chain-of-thought rows (cot_pool/) with new ids,
written as 8 jsonl files and once as one large jsonl, under a scratch directory (not in git).
Each size runs in its own process (driver peak RSS is per size):

    python benchmarks/pool_scale.py build --sizes 10000,100000,1000000
    python benchmarks/pool_scale.py run --size 100000 --layout files      # identity, stage 1, stage 2
    python benchmarks/pool_scale.py run --size 100000 --layout files --bare   # + the no-Ray loop
    python benchmarks/pool_scale.py kill --size 1000000 --layout files    # kill half way, rerun
    python benchmarks/pool_scale.py plot                                  # docs/img/pool-scale.png

Passes (each a :func:`raydapt.stages.sharded.stream_pass`, one parquet shard per read unit):

- ``identity``: read -> identity -> write (the pure platform cost per row);
- ``stage1``: read -> QA normalise -> tokenise -> ``EmbedLM`` (actor pools, chained, no
  barrier), then kNN votes of 100 domain rows streamed over the shards (exact, flat memory) and
  the top-M candidates (M = 1 % of the pool);
- ``stage2``: the M candidates re-read from the pool files -> tokenise -> ``GradProject`` scores
  against the mean domain gradient, then a streaming top-N (N = M / 4);
- ``bare`` (``--bare``): the same model work in one process, no Ray: read the single file,
  normalise, tokenise, embed, votes, scores — the reference rows/s.

The model is built from config (random init): a 2-layer, width-128 Llama with the packaged
SmolLM2 tokenizer (vocabulary 49,152) and a random LoRA (r 8, q/v), so the platform's cost is
visible rather than hidden behind matmuls. Recorded per pass: wall seconds, rows/s, driver peak
RSS (sampled each 0.5 s, and the process's ru_maxrss), worker peak RSS (Ray worker processes of
this run, sampled), object-store peak and spill (Ray's memory summary, sampled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, matmul_peak  # noqa: E402

from raydapt.core.cache import StageCache  # noqa: E402
from raydapt.core.tracking import Tracker  # noqa: E402
from raydapt.data.qa import QARows, normalise_qa  # noqa: E402
from raydapt.data.readers import open_source  # noqa: E402
from raydapt.recipes.ntk_select import STAGE_VERSIONS as NTK_STAGE_VERSIONS  # noqa: E402
from raydapt.select.topk import StreamingTopN  # noqa: E402
from raydapt.select.votes import knn_votes_streaming  # noqa: E402
from raydapt.stages.common import ERROR_COLUMN  # noqa: E402
from raydapt.stages.sharded import Step, identity, output_rejects, stream_pass  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pool-scale-cpu.json"
DATA = Path(os.environ.get("RAYDAPT_DATA", "/work/shared/data"))
POOL = ["cot_pool/flan_cot.jsonl", "cot_pool/gsm8k_train.jsonl"]
DOMAIN = "medical/medqa.jsonl"
N_FILES = 8
UNIT_ROWS = 5_000
MAX_LENGTH = 128  # tokens per row (prompt + response); --max-length changes it for a run
PROJ_DIM = 512
N_DOMAIN = 100
MIN_BLOCKS = 0  # --min-blocks: Ray Data's read_op_min_num_blocks for a run (0: Ray's default)
STORE_BUDGET_MB = 0  # --store-budget-mb: ray.data_object_store_mb for a run (0: Ray's default)
# --driver-memory: ray.driver_returns_freed_memory for a run ("return", the default since
# 2026-12-07; entries recorded before it ran with the allocators' defaults, "keep")
DRIVER_MEMORY = "return"
SPIKE_STACKS = os.environ.get("POOL_SCALE_SPIKE_STACKS") == "1"
SERIES_EVERY_S = 10.0  # the driver's memory over a pass, one sample every this many seconds
RAY_TMP = os.environ.get("POOL_SCALE_RAY_TMP", "")  # the --temp-dir of a `ray start` head


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


def pool_dir(scratch: Path, size: int) -> Path:
    return scratch / f"pool-{size}"


def build(scratch: Path, size: int) -> Path:
    d = pool_dir(scratch, size)
    if (d / "_BUILT").exists():
        return d
    base: list[dict[str, Any]] = []
    for rel in POOL:
        with open(DATA / rel) as f:
            base += [json.loads(ln) for ln in f if ln.strip()]
    (d / "files").mkdir(parents=True, exist_ok=True)
    per_file = math.ceil(size / N_FILES)
    outs = [open(d / "files" / f"part-{k:02d}.jsonl", "w") for k in range(N_FILES)]
    single = open(d / "single.jsonl", "w")
    try:
        for i in range(size):
            rec = dict(base[i % len(base)])
            rec["id"] = f"p{i:07d}-{rec['id']}"
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            outs[i // per_file].write(line)
            single.write(line)
    finally:
        for f in [*outs, single]:
            f.close()
    (d / "_BUILT").write_text(json.dumps({"rows": size, "base_rows": len(base)}))
    return d


def build_model(scratch: Path) -> tuple[str, str]:
    """A 2-layer, width-128 Llama (random init) with the SmolLM2 tokenizer, and a random LoRA."""
    mdir, adir = scratch / "model", scratch / "lora"
    if (adir / "adapter" / "adapter_config.json").exists():
        return str(mdir), str(adir / "adapter")
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from raydapt.core.assets import load_tokenizer

    tok = load_tokenizer("pkg:smollm2-135m-instruct", pad_to_eos=True)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=512,
                                   tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    net = transformers.LlamaForCausalLM(cfg)
    net.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    torch.manual_seed(1)
    peft = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    peft.save_pretrained(adir / "adapter")
    return str(mdir), str(adir / "adapter")


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _proc_rss(pid: int | str = "self") -> dict[str, float]:
    """A process's resident set, MiB, and its parts as the kernel counts them
    (/proc/<pid>/status): anonymous (heap, private), shared memory (the object store's pages
    this process has mapped and touched: Ray's plasma store is a shared mmap, so reading blocks
    zero-copy makes them resident here too) and file-backed (libraries, mmap'd files)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            for key, name in (("VmRSS:", "driver_rss_mb"), ("RssAnon:", "driver_rss_anon_mb"),
                              ("RssShmem:", "driver_rss_shmem_mb"),
                              ("RssFile:", "driver_rss_file_mb")):
                if line.startswith(key):
                    out[name] = int(line.split()[1]) / 1024
    return out


class Sampler:
    """Peak driver RSS, worker RSS (this driver's Ray processes) and object-store use/spill."""

    def __init__(self, every_s: float = 0.5,
                 store_every_s: float = float(os.environ.get("POOL_SCALE_STORE_EVERY_S", 3.0))
                 ) -> None:
        import psutil

        self.me = psutil.Process()
        self.every_s, self.store_every_s = every_s, store_every_s
        self.stop_ev = threading.Event()
        self.peak = {"driver_rss_mb": 0.0, "driver_rss_anon_mb": 0.0,
                     "driver_rss_shmem_mb": 0.0, "driver_rss_file_mb": 0.0,
                     "worker_rss_mb": 0.0, "workers_rss_sum_mb": 0.0, "object_store_mb": 0.0}
        self.spilled_mb = 0.0
        self.series: list[list[float]] = []  # [s, anon, shmem, arrow pool, object store] MiB
        self.store_now = 0.0

    def _store(self) -> tuple[float, float]:
        import re

        import ray
        from ray._private.internal_api import memory_summary

        s = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        used = re.search(r"Plasma memory usage (\d+) MiB", s)
        spill = re.search(r"Spilled (\d+) MiB", s)
        return (float(used.group(1)) if used else 0.0, float(spill.group(1)) if spill else 0.0)

    def _loop(self) -> None:
        import psutil
        import pyarrow as pa

        last_store, last_series, t0 = 0.0, 0.0, time.time()
        while not self.stop_ev.is_set():
            try:
                parts = _proc_rss()  # the whole resident set and its parts, one read
                if SPIKE_STACKS and self.series and parts["driver_rss_anon_mb"] > \
                        self.series[-1][1] + 30:  # diagnosis: what the driver does in a spike
                    import traceback

                    sys.stderr.write(f"SPIKE anon {parts['driver_rss_anon_mb']:.0f} MiB\n")
                    for tid, fr in sys._current_frames().items():
                        sys.stderr.write(f"  thread {tid}:\n" + "".join(
                            traceback.format_stack(fr)[-6:]))
                for k, v in parts.items():  # all of it, and which pages: heap or store
                    self.peak[k] = max(self.peak[k], v)
                if time.time() - last_series >= SERIES_EVERY_S:
                    last_series = time.time()
                    self.series.append([round(last_series - t0, 1),
                                        round(parts["driver_rss_anon_mb"], 1),
                                        round(parts["driver_rss_shmem_mb"], 1),
                                        round(pa.total_allocated_bytes() / 2**20, 1),
                                        self.store_now])
                rss = []
                procs = self.me.children(recursive=True)
                for r in psutil.process_iter(["name", "cmdline"]):  # a head started with
                    try:  # `ray start --temp-dir=...` (RAY_ADDRESS): its raylet's workers
                        if r.info["name"] == "raylet" and RAY_TMP and RAY_TMP in " ".join(
                                r.info["cmdline"] or []):
                            procs += r.children(recursive=True)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                for p in procs:
                    try:
                        if p.name().startswith("ray::") or "default_worker" in " ".join(
                                p.cmdline()[:3]):
                            rss.append(p.memory_info().rss / 2**20)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                if rss:
                    self.peak["worker_rss_mb"] = max(self.peak["worker_rss_mb"], max(rss))
                    self.peak["workers_rss_sum_mb"] = max(self.peak["workers_rss_sum_mb"],
                                                          sum(rss))
                if self.store_every_s and time.time() - last_store >= self.store_every_s:
                    used, spill = self._store()
                    self.store_now = used
                    self.peak["object_store_mb"] = max(self.peak["object_store_mb"], used)
                    self.spilled_mb = max(self.spilled_mb, spill)
                    last_store = time.time()
            except Exception:  # noqa: BLE001 - a sampling miss is not a benchmark failure
                pass
            self.stop_ev.wait(self.every_s)

    def __enter__(self) -> Sampler:
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_ev.set()
        self.t.join()
        try:
            used, spill = self._store()
            self.spilled_mb = max(self.spilled_mb, spill)
        except Exception:  # noqa: BLE001
            pass

    def result(self) -> dict[str, float]:
        return {**{k: round(v, 1) for k, v in self.peak.items()},
                "object_store_spilled_mb": round(self.spilled_mb, 1),
                "driver_series": {"columns": ["s", "rss_anon_mb", "rss_shmem_mb",
                                              "arrow_allocated_mb", "object_store_mb"],
                                  "every_s": SERIES_EVERY_S, "rows": self.series}}


def _brief(p: dict[str, Any]) -> dict[str, Any]:
    """A pass's entry for the console: without its memory time series."""
    return {k: v for k, v in p.items() if k != "driver_series"}


def _say(msg: str) -> None:
    print(f"[pool_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tracker() -> Tracker:
    return Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x", artifact_location="")


def _pool_kw(size: int, cpus: float, batch: int) -> dict[str, Any]:
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=size), "num_cpus": cpus,
            "batch_size": batch}


def _model_kw(mdir: str, adapter: str) -> dict[str, Any]:
    return {"model": mdir, "adapter": adapter, "dtype": "float32", "threads": 1}


def domain_side(mdir: str, adapter: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and the mean NTK gradient of the first N_DOMAIN domain rows (in process)."""
    from raydapt.data.qa import read_qa
    from raydapt.stages.grad_score import EmbedLM, GradProject

    rows, _ = read_qa(DATA / DOMAIN)
    rows = rows.head(N_DOMAIN)
    enc = _encode_cls()(mdir, MAX_LENGTH)(rows)
    enc = enc[enc[ERROR_COLUMN] == ""]
    emb = EmbedLM(model=_model_kw(mdir, adapter))(enc)
    g = GradProject(model=_model_kw(mdir, adapter), objective="logit_sum", proj_dim=PROJ_DIM,
                    proj_seed=0, micro_batch=16)(enc)
    return np.stack(emb["emb"].to_numpy()), np.stack(g["g"].to_numpy()).mean(0)


def candidates_from_votes(votes: pd.DataFrame, m: int) -> list[str]:
    """Top m by votes, then summed similarity, then stream order (the embedding selector's)."""
    order = np.lexsort((np.arange(len(votes)), -votes["vote_sim"].to_numpy(),
                        -votes["votes"].to_numpy()))[:m]
    return votes["id"].to_numpy()[order].tolist()


def sizes_for(n: int) -> tuple[int, int, int]:
    """(M candidates, N selected, k neighbours) for a pool of n rows."""
    m = max(50, n // 100)
    return m, max(10, m // 4), math.ceil(3 * m / N_DOMAIN)


# ---------------------------------------------------------------------------------------------
# run one size
# ---------------------------------------------------------------------------------------------


def run_size(scratch: Path, size: int, layout: str, passes: list[str], bare: bool,
             cache_dir: Path | None = None) -> dict[str, Any]:
    import ray

    from raydapt.core.runtime import init_ray

    d = build(scratch, size)
    src_path = d / "files" if layout == "files" else d / "single.jsonl"
    mdir, adapter = build_model(scratch)
    m, n_sel, k = sizes_for(size)
    res: dict[str, Any] = {"size": size, "layout": layout, "unit_rows": UNIT_ROWS,
                           "max_length": MAX_LENGTH,
                           "M": m, "N": n_sel, "k": k, "domain_rows": N_DOMAIN,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                           "passes": {}}
    dom_emb, gbar = domain_side(mdir, adapter) if "stage1" in passes or bare else (None, None)
    cache = StageCache(cache_dir or scratch / f"cache-{size}-{layout}{_len_tag()}",
                       versions=NTK_STAGE_VERSIONS)
    init_ray(num_cpus=2, progress=False, data_object_store_mb=STORE_BUDGET_MB or None,
             driver_returns_freed_memory=DRIVER_MEMORY == "return")
    res["driver_returns_freed_memory"] = DRIVER_MEMORY == "return"
    if STORE_BUDGET_MB:
        res["data_object_store_mb"] = STORE_BUDGET_MB
    if MIN_BLOCKS:  # Ray Data splits a read of fewer units into this many blocks (default 200)
        ray.data.DataContext.get_current().read_op_min_num_blocks = MIN_BLOCKS
        res["read_op_min_num_blocks"] = MIN_BLOCKS
    try:
        res["ray_object_store_mb"] = round(ray.cluster_resources().get(
            "object_store_memory", 0) / 2**20, 1)
        t_open = time.time()
        src = open_source(src_path, normaliser=QARows(), unit_rows=UNIT_ROWS)
        res["plan_seconds"] = round(time.time() - t_open, 2)
        res["files"], res["units"] = len(src.files), len(src.units)
        if "identity" in passes:
            st: dict[str, Any] = {}
            with Sampler() as s:
                t0 = time.time()
                out = stream_pass(cache, _tracker(), "embed", {"pass": "identity"}, src,
                                  [Step(identity, pool={"num_cpus": 0.5})], _say, stats=st)
                wall = time.time() - t0
            rej = output_rejects(out, "identity")
            res["passes"]["identity"] = {"wall_s": round(wall, 2), **_rates(st, wall),
                                         "rejects": len(rej), **s.result()}
            _say(f"identity: {_brief(res['passes']['identity'])}")
        if "stage1" in passes:
            st = {}
            steps = [Step(_encode_cls(), {"model": mdir, "max_length": MAX_LENGTH},
                          pool=_pool_kw(1, 0.5, 256)),
                     Step(_embed_cls(), {"model": _model_kw(mdir, adapter)},
                          pool=_pool_kw(2, 0.5, 64), columns=["input_ids", "response_mask"])]
            with Sampler() as s:
                t0 = time.time()
                out = stream_pass(cache, _tracker(), "embed", {"pass": "stage1", "m": mdir},
                                  src, steps, _say, stats=st)
                t_pass = time.time() - t0
                with Sampler(store_every_s=0) as s_votes:  # the votes alone, inside the pass's
                    votes = knn_votes_streaming(dom_emb, out.iter_tables(
                        ["id", "emb", ERROR_COLUMN, "_reject"]), k=k)
                    cand = candidates_from_votes(votes, m)
                wall = time.time() - t0
            res["passes"]["stage1"] = {"wall_s": round(wall, 2), "pass_s": round(t_pass, 2),
                                       "votes_s": round(wall - t_pass, 2),
                                       **_rates(st, t_pass), "voted_rows": len(votes),
                                       "candidates": len(cand),
                                       "rejects": len(output_rejects(out, "stage1")),
                                       **s.result(),
                                       "votes_driver": {k: v for k, v in s_votes.result().items()
                                                        if k.startswith("driver_rss")}}
            _say(f"stage1: {_brief(res['passes']['stage1'])}")
            if "stage2" in passes:
                st = {}
                csrc = open_source(src_path, normaliser=QARows(), unit_rows=UNIT_ROWS,
                                   keep_ids=frozenset(cand))
                steps = [Step(_encode_cls(), {"model": mdir, "max_length": MAX_LENGTH},
                              pool=_pool_kw(1, 0.5, 256)),
                         Step(_grad_cls(), {"model": _model_kw(mdir, adapter),
                                            "objective": "logit_sum", "proj_dim": PROJ_DIM,
                                            "proj_seed": 0, "score_against": gbar,
                                            "micro_batch": 16},
                              pool=_pool_kw(2, 0.5, 64), columns=["input_ids", "response_mask"])]
                top = StreamingTopN(n_sel)
                with Sampler() as s:
                    t0 = time.time()
                    out2 = stream_pass(cache, _tracker(), "scores-ntk",
                                       {"pass": "stage2", "m": mdir}, csrc, steps, _say,
                                       stats=st)
                    for tbl in out2.iter_tables(["id", "score", ERROR_COLUMN, "_reject"]):
                        top.update_table(tbl)
                    sel = top.result()
                    wall = time.time() - t0
                res["passes"]["stage2"] = {"wall_s": round(wall, 2), **_rates(st, wall),
                                           "selected": len(sel), **s.result()}
                _say(f"stage2: {_brief(res['passes']['stage2'])}")
    finally:
        ray.shutdown()
    if bare:
        res["bare"] = bare_loop(d / "single.jsonl", mdir, adapter, dom_emb, gbar, m, n_sel, k)
        _say(f"bare: {res['bare']}")
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["driver_ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


def _len_tag() -> str:
    """The suffix of a run's entry key and cache directory: none at the default length, block
    split and store budget; ``-returnmem`` for a driver that returns freed memory (the default
    since 2026-12-07), so entries recorded before it keep their keys."""
    return ("" if MAX_LENGTH == 128 else f"-len{MAX_LENGTH}") + (
        f"-minblocks{MIN_BLOCKS}" if MIN_BLOCKS else "") + (
        f"-store{STORE_BUDGET_MB}" if STORE_BUDGET_MB else "") + (
        "-returnmem" if DRIVER_MEMORY == "return" else "")


def _encode_cls():
    from raydapt.stages.grad_score import EncodeQA as cls

    return cls


def _embed_cls():
    from raydapt.stages.grad_score import EmbedLM

    return EmbedLM


def _grad_cls():
    from raydapt.stages.grad_score import GradProject

    return GradProject


def _rates(st: dict[str, Any], wall: float) -> dict[str, Any]:
    rows = int(st.get("rows", 0))
    return {"rows": rows, "rows_per_s": round(rows / max(wall, 1e-9), 1),
            "shards": st.get("shards"), "shards_computed": st.get("shards_computed"),
            "shards_reused": st.get("shards_reused"),
            "driver_peak_held_rows": st.get("peak_held_rows", 0),
            "driver_peak_held_units": st.get("peak_held_units", 0)}


def bare_loop(path: Path, mdir: str, adapter: str, dom_emb: np.ndarray, gbar: np.ndarray,
              m: int, n_sel: int, k: int, batch: int = 64) -> dict[str, Any]:
    """The same work in one process, no Ray: a user's plain loop (2 torch threads)."""
    import torch

    from raydapt.data.readers import parse_jsonl_lines
    from raydapt.select.selectors import knn_votes
    from raydapt.stages.grad_score import EmbedLM, GradProject

    torch.set_num_threads(2)
    enc_fn = _encode_cls()(mdir, MAX_LENGTH)
    emb_fn = EmbedLM(model={**_model_kw(mdir, adapter), "threads": 2})

    def chunks():
        with open(path, "rb") as f:
            buf = []
            for ln in f:
                buf.append(ln.rstrip(b"\n"))
                if len(buf) == 1024:
                    yield buf
                    buf = []
            if buf:
                yield buf

    out: dict[str, Any] = {}
    t0 = time.time()
    ids, embs, n = [], [], 0
    for lines in chunks():
        rows, _ = normalise_qa(parse_jsonl_lines(lines), file=str(path))
        enc = enc_fn(rows)
        enc = enc[enc[ERROR_COLUMN] == ""]
        for i in range(0, len(enc), batch):
            e = emb_fn(enc.iloc[i: i + batch])
            ids += e["id"].tolist()
            embs += list(e["emb"])
        n += len(rows)
    t_embed = time.time() - t0
    votes, vote_sim = knn_votes(dom_emb, np.stack(embs), k=k)
    vf = pd.DataFrame({"id": ids, "votes": votes, "vote_sim": vote_sim})
    cand = set(candidates_from_votes(vf[vf["votes"] > 0], m))
    t1 = time.time()
    out["stage1"] = {"rows": n, "wall_s": round(t1 - t0, 2), "embed_s": round(t_embed, 2),
                     "rows_per_s": round(n / (t1 - t0), 1)}
    del embs
    g_fn = GradProject(model={**_model_kw(mdir, adapter), "threads": 2}, objective="logit_sum",
                       proj_dim=PROJ_DIM, proj_seed=0, score_against=gbar, micro_batch=16)
    t2 = time.time()
    scores, n2 = [], 0
    for lines in chunks():
        rows, _ = normalise_qa(parse_jsonl_lines(lines), file=str(path))
        rows = rows[rows["id"].isin(cand)]
        if not len(rows):
            continue
        enc = enc_fn(rows)
        enc = enc[enc[ERROR_COLUMN] == ""]
        for i in range(0, len(enc), batch):
            scores.append(g_fn(enc.iloc[i: i + batch]))
        n2 += len(rows)
    sc = pd.concat(scores, ignore_index=True)
    top = sc.sort_values("score", ascending=False, kind="stable").head(n_sel)
    out["stage2"] = {"rows": n2, "wall_s": round(time.time() - t2, 2),
                     "rows_per_s": round(n2 / (time.time() - t2), 1), "selected": len(top)}
    return out


# ---------------------------------------------------------------------------------------------
# kill half way, rerun
# ---------------------------------------------------------------------------------------------


def kill_experiment(scratch: Path, size: int, layout: str, passes: str) -> dict[str, Any]:
    """Run the pass in a child process, SIGKILL its process group once half the shards are
    written, rerun, and count the shards the rerun computed. The killed driver's memory is read
    from outside (/proc/<pid>/status), since it never gets to write its own stats."""
    cache = scratch / f"cache-kill-{size}-{layout}{_len_tag()}"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    cmd = [sys.executable, __file__, "run", "--size", str(size), "--layout", layout,
           "--max-length", str(MAX_LENGTH), "--min-blocks", str(MIN_BLOCKS),
           "--store-budget-mb", str(STORE_BUDGET_MB), "--driver-memory", DRIVER_MEMORY,
           "--passes", passes, "--cache", str(cache), "--no-record"]
    d = build(scratch, size)
    src = open_source(d / "files" if layout == "files" else d / "single.jsonl",
                      normaliser=QARows(), unit_rows=UNIT_ROWS)
    total = len(src.units)
    child = subprocess.Popen(cmd, start_new_session=True)
    t0 = time.time()
    done_at_kill = 0
    peak = {"driver_rss_mb": 0.0, "driver_rss_anon_mb": 0.0, "driver_rss_shmem_mb": 0.0}
    series: list[list[float]] = []  # [s, shards on disk, rss, anon, shmem] of the killed driver
    try:
        while child.poll() is None:
            parts = list(cache.glob("*/*/part-*.parquet"))
            try:
                mem = _proc_rss(child.pid)
            except OSError:
                mem = {}
            for k in peak if mem else ():
                peak[k] = max(peak[k], mem[k])
            if mem and (not series or time.time() - t0 - series[-1][0] >= SERIES_EVERY_S):
                series.append([round(time.time() - t0, 1), len(parts),
                               *(round(mem[k], 1) for k in peak)])
            if len(parts) >= total // 2:
                done_at_kill = len(parts)
                os.killpg(child.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    t_kill = time.time() - t0
    log = scratch / f"kill-rerun-{size}.json"
    cmd2 = [*cmd, "--stats-out", str(log)]  # --no-record kept: the full run keeps its entry
    t1 = time.time()
    subprocess.run(cmd2, check=True)
    rerun = json.loads(log.read_text())
    p = rerun["passes"][passes]
    return {"size": size, "layout": layout, "pass": passes, "shards": total,
            "shards_on_disk_at_kill": done_at_kill, "killed_after_s": round(t_kill, 1),
            "killed_driver": {**{k: round(v, 1) for k, v in peak.items()},
                              "series": {"columns": ["s", "shards_on_disk", *peak],
                                         "every_s": SERIES_EVERY_S, "rows": series}},
            "rerun_shards_computed": p["shards_computed"],
            "rerun_shards_reused": p["shards_reused"],
            "recomputed_beyond_unfinished": p["shards_computed"] - (total - done_at_kill),
            "rerun_wall_s": round(time.time() - t1, 1),
            "rerun": {k: v for k, v in rerun.items() if k != "passes"} | {"pass": p}}


# ---------------------------------------------------------------------------------------------


def _merge(entry_key: str, value: Any) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc.setdefault("machine", describe())
    if "fp32_matmul" not in doc:
        doc["fp32_matmul"] = matmul_peak("float32", threads=2)
    doc.setdefault("runs", {})[entry_key] = value
    doc["command"] = "python benchmarks/pool_scale.py run|kill ... (see docs/scale.md)"
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(RESULTS.read_text())
    runs = sorted((r for r in doc["runs"].values() if isinstance(r, dict) and "passes" in r),
                  key=lambda r: r["size"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 5.6))
    def kind(r: dict) -> tuple[str, int, int, bool]:
        return (r["layout"], r.get("max_length", 128), r.get("data_object_store_mb", 0),
                r.get("driver_returns_freed_memory", False))

    for layout, length, budget, returns in sorted({kind(r) for r in runs}):
        for name, mk in (("identity", "o"), ("stage1", "s"), ("stage2", "^")):
            if name == "identity" and length != 128:
                continue  # the identity pass reads no tokens: one series is enough
            pts = [(r["size"], r["passes"][name]) for r in runs
                   if kind(r) == (layout, length, budget, returns) and name in r["passes"]]
            if pts:
                style = ("P" if returns else "*" if budget else mk) + (
                    ":" if length != 128 else "-" if layout == "files" else "--")
                lab = (f"{name} ({'8 files' if layout == 'files' else '1 file'}"
                       + (f", {length} tokens" if name != "identity" else "")
                       + (f", ray.data_object_store_mb {budget}" if budget else "")
                       + (", driver returns freed memory" if returns else "") + ")")
                ax[0].plot([p[0] for p in pts], [p[1]["wall_s"] for p in pts], style,
                           label=lab)
                ax[1].plot([p[0] for p in pts], [p[1]["driver_rss_mb"] for p in pts], style,
                           label=lab)
    mem = doc["runs"].get("stage1-driver-memory-2026-12-07", {}).get("runs", {})
    if mem:  # stage 1's driver memory split: private pages vs the object store's shared ones
        by: dict[int, list[dict]] = {}
        for r in mem.values():
            by.setdefault(r["size"], []).append(r["passes"]["stage1"])
        xs = sorted(by)
        for key, style, lab in (("driver_rss_anon_mb", "D-.", "stage1 private (anon) peak"),
                                ("driver_rss_shmem_mb", "v-.", "stage1 shared (object store)")):
            ax[1].plot(xs, [float(np.mean([p[key] for p in by[x]])) for x in xs], style,
                       label=lab)
        capped = [r for r in runs if r.get("data_object_store_mb") and "stage1" in r["passes"]]
        if capped:  # the same split for the runs with a capped object store
            ax[1].plot([r["size"] for r in capped],
                       [r["passes"]["stage1"]["driver_rss_shmem_mb"] for r in capped], "*",
                       color="tab:olive", label="stage1 shared, ray.data_object_store_mb")
    for a, yl in zip(ax, ("wall seconds of the pass", "driver peak RSS (MiB)")):
        a.set_xscale("log")
        a.set_xlabel("pool rows")
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
    ax[0].set_yscale("log")
    ax[1].set_ylim(bottom=0)
    for a in ax:  # under the plots: the series are many, and the points sit everywhere
        a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=1)
    fig.suptitle("pool scale (CPU, 2 cores): wall time and driver memory vs pool rows "
                 "(the 8-file drivers also load torch for stage 1)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    global MAX_LENGTH, MIN_BLOCKS, STORE_BUDGET_MB, DRIVER_MEMORY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["build", "run", "kill", "plot", "merge"])
    ap.add_argument("--scratch", default="/tmp/pool-scale")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--layout", choices=["files", "single"], default="files")
    ap.add_argument("--passes", default="identity,stage1,stage2")
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--stats-out", default=None)
    ap.add_argument("--key", default=None, help="merge: the entry the --stats-in files go under")
    ap.add_argument("--stats-in", nargs="+", default=[],
                    help="merge: --stats-out files of --no-record runs, as NAME=FILE")
    ap.add_argument("--note", default="", help="merge: how those runs were made")
    ap.add_argument("--max-length", type=int, default=MAX_LENGTH,
                    help="tokens per row: shorter rows make the model work per row smaller, so "
                         "a 1M-row stage 1 fits a session on 2 cores (entries get a -lenN key)")
    ap.add_argument("--min-blocks", type=int, default=0,
                    help="Ray Data's read_op_min_num_blocks for this run (0: Ray's default, "
                         "200): 1 keeps one block per read unit at any pool size")
    ap.add_argument("--store-budget-mb", type=int, default=0,
                    help="ray.data_object_store_mb for this run: the object store a pass may "
                         "fill before Ray Data holds back its reads (0: Ray's default, half the "
                         "store)")
    ap.add_argument("--driver-memory", choices=["return", "keep"], default=DRIVER_MEMORY,
                    help="ray.driver_returns_freed_memory for this run: return (the default; "
                         "entries get a -returnmem key) or keep (the allocators' defaults, as "
                         "every entry recorded before 2026-12-07 20:00 UTC)")
    args = ap.parse_args(argv)
    MAX_LENGTH, MIN_BLOCKS = args.max_length, args.min_blocks
    STORE_BUDGET_MB, DRIVER_MEMORY = args.store_budget_mb, args.driver_memory
    scratch = Path(args.scratch)
    if args.action == "build":
        for n in map(int, args.sizes.split(",")):
            _say(f"built {build(scratch, n)}")
        return 0
    if args.action == "plot":
        plot(ROOT / "docs" / "img" / "pool-scale.png")
        return 0
    if args.action == "merge":  # --no-record runs (e.g. repeats, diagnostics) under one key
        runs = {}
        for item in args.stats_in:
            name, f = item.split("=", 1)
            runs[name] = json.loads(Path(f).read_text())
        _merge(args.key, {"note": args.note, "runs": runs})
        return 0
    if args.action == "kill":
        first = args.passes.split(",")[0]
        r = kill_experiment(scratch, args.size, args.layout, first)
        _say(f"kill: {r}")
        _merge(f"kill-{args.size}-{args.layout}"
               + ("" if first == "identity" else f"-{first}{_len_tag()}"), r)
        return 0
    r = run_size(scratch, args.size, args.layout, args.passes.split(","), args.bare,
                 Path(args.cache) if args.cache else None)
    if args.stats_out:
        Path(args.stats_out).write_text(json.dumps(r, indent=1))
    if not args.no_record:
        _merge(f"{args.size}-{args.layout}{_len_tag()}", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
