"""The cluster rehearsal, recorded: a tiny SimDA job on a local multi-node autoscaling Ray
cluster (`raydapt cluster up --local`: CPU-0 head, Ray's real autoscaler, the fake multi-node
provider, node types of cluster/node_types.yaml), with node losses, against a single-node run
of the same job on the same machine.

    python benchmarks/cluster_rehearsal.py [--kills teacher,train] \
        [--out benchmarks/results/cluster-rehearsal-cpu.json] \
        [--plot docs/img/cluster-rehearsal-timeline.png]
    python benchmarks/cluster_rehearsal.py --job ntk   # -> cluster-rehearsal-ntk-cpu.json

``--job ntk``: a tiny NTK-Selector job instead (a 2-layer Llama built from config with the
SmolLM2 tokenizer; 40 FLAN / GSM8K pool rows; 8 MedQA rows as D, 6 test items): stage-1
embedding, stage-2 NTK scoring and evaluation on annotation nodes (``{annotate_gpu: 1}``, pools
``concurrency [1, 2]``), the LoRA warm-up and fine-tune (DeepSpeed ZeRO-2, 2 Ray Train workers)
on training nodes (``{train_gpu: 1}``). Recorded: the timeline, where each stage ran, time to
the first node of each type, scale-down, and the selection against a single-node run of the same
job (selected ids, NTK scores, accuracy). No node is killed in this one.

Records: the node-count timeline per node type (polled every 0.5 s from the GCS), where each
stage ran (actors and tasks -> node type, from Ray's state API), time from submission to the
first annotation node, for each kill what was lost (finished teacher shards rewritten:
must be 0; in-flight teacher tasks failed on the killed node and retried; for a training-node
kill, whether Ray Train resumed from a checkpoint), the job's wall time on the cluster and the
wall time of `raydapt run` of the same job on one local Ray node (run after the cluster is
down, so the two do not share the cores).

What this is not: no GPU (annotate_gpu / train_gpu are custom resources on CPU raylets), one
physical machine (every "node" shares its 2 cores, RAM and disk), no cross-host network
(object transfers go over loopback). docs/cluster.md says so next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

# the local cluster uses Ray's token auth, which Ray reads once per process (machine.py
# imports ray): set it before anything imports ray
os.environ["RAY_AUTH_MODE"] = "token"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARD_ROWS = 4
N_SOURCE, N_TARGET, N_TRAIN, N_TEST = 24, 64, 24, 8


def _common(d: Path, name: str, tag: str) -> dict:
    """The run / tracking / ray sections of a rehearsal job (outputs suffixed by ``tag``)."""
    return {"run": {"name": name, "output_dir": f"{d}/runs-{tag}", "cache_dir": f"{d}/cache-{tag}"},
            "tracking": {"uri": f"sqlite:///{d}/mlruns-{tag}.db",
                         "artifact_location": f"{d}/art-{tag}", "experiment": "rehearsal"},
            "ray": {"num_cpus": 2, "progress": False}}


def write_job(d: Path, *, cluster: bool, tag: str) -> Path:
    """The rehearsal job (the one tests/cluster/test_rehearsal.py runs): books -> kitchen,
    teacher pool [1, 3] actors, a 2-worker student."""
    data = Path(os.environ.get("RAYDAPT_DATA", REPO.parent / "shared/data")) / "amazon"
    books = (data / "books.jsonl").read_text().splitlines()[:N_SOURCE]
    kitchen = (data / "kitchen.jsonl").read_text().splitlines()[:N_TARGET]
    (d / "src.jsonl").write_text("\n".join(books) + "\n")
    (d / "tgt.jsonl").write_text("\n".join(kitchen) + "\n")
    pool = {"concurrency": [1, 3], "num_cpus": 1, "threads": 1, "batch_size": 2,
            "shard_rows": SHARD_ROWS, "max_restarts": 3, "max_task_retries": 3}
    distill = {"variants": ["kl"], "epochs": 2, "batch_size": 8, "max_length": 24,
               "num_workers": 2, "cpus_per_worker": 1, "max_failures": 2}
    if cluster:
        pool["resources"] = {"annotate_gpu": 1}
        distill["resources"] = {"train_gpu": 1}
    job = {"method": "simda", **_common(d, "rehearsal", tag),
           "data": {"root": str(d), "source": {"path": "src.jsonl"},
                    "target": {"path": "tgt.jsonl"}, "max_target_train_rows": N_TRAIN,
                    "max_target_test_rows": N_TEST},
           "teacher": {"text_max_tokens": 24, "pool": pool},
           "annotate": {"k": 8, "baselines": ["zero_shot", "knn"]},
           "distill": distill}
    p = d / f"job-{tag}.yaml"
    p.write_text(yaml.safe_dump(job, sort_keys=False))
    return p


def _shards(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in cache.glob("teacher/*/part-*.parquet")}


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


def _scale_down_record(watch, t_submit: float) -> dict:
    """Once the job has ended: wait until every worker node is gone, and return the node
    timeline, the time to the first node of each type and the scale-down time (seconds since
    the cluster came up)."""
    t_done = time.time() - watch.t0
    watch.wait_for(lambda c: c["annotate_gpu"] == c["train_gpu"] == c["cpu"] == 0, 300,
                   "scale-down")
    t_down = time.time() - watch.t0
    first = {t: watch.first_time(t) for t in ("annotate_gpu", "train_gpu")}
    return {
        "timeline": [{"t": t, **c} for t, c in watch.timeline],
        "submitted_at_s": round(t_submit, 1),
        "time_to_first_annotation_node_s": None if first["annotate_gpu"] is None
        else round(first["annotate_gpu"] - t_submit, 1),
        "time_to_first_training_node_s": None if first["train_gpu"] is None
        else round(first["train_gpu"] - t_submit, 1),
        "job_done_at_s": round(t_done, 1), "scaled_down_at_s": round(t_down, 1),
        "nodes_seen": dict(sorted(Counter(watch.types.values()).items())),
    }


def rehearse(d: Path, kills: list[str]) -> dict:
    import ray
    from ray.job_submission import JobSubmissionClient

    from raydapt.ops import local_cluster as lc
    from raydapt.ops import rehearsal as rh
    from raydapt.ops.submit import submit

    state = d / "state.json"
    job = write_job(d, cluster=True, tag="cluster")
    cache = d / "cache-cluster"
    n_shards = -(-(N_SOURCE + N_TRAIN + N_TEST) // SHARD_ROWS)
    rec: dict = {"kills": []}
    t_up = time.time()
    st = lc.up(state=state, quiet=True)
    rec["cluster_up_seconds"] = round(time.time() - t_up, 1)
    try:
        ray.init(address=st["address"], logging_level="WARNING", log_to_driver=False)
        with rh.NodeWatch(st) as watch:
            t_submit = time.time() - watch.t0
            assert submit(job, [], address=st["dashboard"], pip=False) == 0
            cl = JobSubmissionClient(st["dashboard"])
            teacher = "MapWorker(" + rh.TEACHER_ACTOR + ")"

            def status() -> str:
                return str(cl.get_job_status("rehearsal")).rsplit(".", 1)[-1]

            if "teacher" in kills:  # a node running a teacher actor, after the first shard
                while not _shards(cache) and status() in ("PENDING", "RUNNING"):
                    time.sleep(0.3)
                done = _shards(cache)
                alive = rh.nodes_of(st, teacher, "ALIVE")
                if alive and len(done) < n_shards:
                    victim = alive[0]
                    before = {n for n, t in watch.types.items() if t == "annotate_gpu"}
                    rh.kill_raylet(st, victim)
                    rec["kills"].append({"what": "annotation node running a teacher actor",
                                         "node": victim, "at_s": round(time.time() - watch.t0, 1),
                                         "shards_done_before": len(done),
                                         "shards_total": n_shards, "_done": done,
                                         "_before": before})
            if "train" in kills:  # a node running a Ray Train worker, after a checkpoint
                while status() in ("PENDING", "RUNNING"):
                    if rh.checkpointed(d / "runs-cluster" / "rehearsal"):
                        break
                    time.sleep(0.3)
                alive = rh.nodes_of(st, rh.TRAIN_WORKER, "ALIVE")
                if alive and status() == "RUNNING":
                    rh.kill_raylet(st, alive[0])
                    rec["kills"].append({"what": "training node running a Ray Train worker",
                                         "node": alive[0],
                                         "at_s": round(time.time() - watch.t0, 1)})
            while status() in ("PENDING", "RUNNING"):
                time.sleep(1)
            info = cl.get_job_info("rehearsal")
            rec["job_status"] = status()
            rec["job_wall_seconds"] = round((info.end_time - info.start_time) / 1000, 1)
            logs = cl.get_job_logs("rehearsal")
            nodes = _scale_down_record(watch, t_submit)
            where = rh.placement(st, watch)
            tasks = rh.task_placement(st, watch)
            for k in rec["kills"]:
                if "_done" in k:
                    after = _shards(cache)
                    k["finished_shards_rewritten"] = sum(after.get(p) != m
                                                         for p, m in k.pop("_done").items())
                    k["shards_written_after"] = len(after) - k["shards_done_before"]
                    lost = rh.failed_tasks_on(st, k["node"], rh.TEACHER_ACTOR)
                    k["teacher_tasks_in_flight_retried"] = len(lost)
                    k["rows_in_flight_retried"] = len(lost) * 2  # batch_size 2 rows per task
                    before = k.pop("_before")
                    k["replacement_annotation_nodes"] = [
                        n for n, t in watch.types.items() if t == "annotate_gpu"
                        and n not in before and watch.first_seen[n] > k["at_s"]]
                else:
                    k["ray_train_resumed_from_checkpoint"] = \
                        "resumed from the checkpoint of epoch" in logs
            rec.update({
                **nodes,
                "actors_on": {c: dict(n) for c, n in where.items()},
                "tasks_on": {c: dict(n) for c, n in tasks.items()},
            })
        rec["results"] = json.loads((d / "runs-cluster/rehearsal/results.json").read_text())
    finally:
        ray.shutdown()
        lc.down(state=state, quiet=True)
    return rec


def write_ntk_job(d: Path, *, cluster: bool, tag: str) -> Path:
    """The tiny NTK-Selector job of ``--job ntk`` (see the module docstring)."""
    data = Path(os.environ.get("RAYDAPT_DATA", REPO.parent / "shared/data"))
    if not (d / "pool.jsonl").exists():
        pool = (data / "cot_pool/flan_cot.jsonl").read_text().splitlines()[:30] + \
            (data / "cot_pool/gsm8k_train.jsonl").read_text().splitlines()[:10]
        (d / "pool.jsonl").write_text("\n".join(pool) + "\n")
        med = (data / "medical/medqa.jsonl").read_text().splitlines()[:40]
        (d / "med.jsonl").write_text("\n".join(med) + "\n")
        _tiny_llama(d / "tiny-llama")
    pool_sec = {"concurrency": [1, 2], "num_cpus": 1, "threads": 1, "batch_size": 4}
    train = {"num_workers": 2, "cpus_per_worker": 1, "threads": 1, "epochs": 1,
             "batch_size": 4, "lr": 1e-3, "zero_stage": 2}
    if cluster:
        pool_sec["resources"] = {"annotate_gpu": 1}
        train["resources"] = {"train_gpu": 1}
    job = {"method": "ntk_select", **_common(d, "rehearsal-ntk", tag),
           "data": {"root": str(d), "pool": ["pool.jsonl"],
                    "tasks": [{"path": "med.jsonl", "name": "medqa", "domain_rows": 8,
                               "eval_rows": 6}]},
           "model": str(d / "tiny-llama"), "format": {"max_length": 64},
           "lora": {"r": 2, "alpha": 4}, "warmup": train, "finetune": train,
           "select": {"selectors": ["ntk"], "baselines": [], "n": 4, "m_factor": 2, "k": 4,
                      "proj_dim": 64, "proj_chunk_rows": 256, "shard_rows": 3,
                      "embed_pool": pool_sec, "grad_pool": pool_sec},
           "eval": {"max_length": 96, "pool": pool_sec}}
    p = d / f"job-ntk-{tag}.yaml"
    p.write_text(yaml.safe_dump(job, sort_keys=False))
    return p


def _tiny_llama(out: Path) -> None:
    from raydapt.train.models import random_llama

    random_llama(out)  # 2 layers, width 32, SmolLM2's tokenizer


def rehearse_ntk(d: Path) -> dict:
    import ray
    from ray.job_submission import JobSubmissionClient

    from raydapt.ops import local_cluster as lc
    from raydapt.ops import rehearsal as rh
    from raydapt.ops.submit import submit

    state = d / "state.json"
    job = write_ntk_job(d, cluster=True, tag="cluster")
    rec: dict = {}
    t_up = time.time()
    st = lc.up(state=state, quiet=True)
    rec["cluster_up_seconds"] = round(time.time() - t_up, 1)
    try:
        ray.init(address=st["address"], logging_level="WARNING", log_to_driver=False)
        with rh.NodeWatch(st) as watch:
            start = watch.counts()
            t_submit = time.time() - watch.t0
            assert submit(job, [], address=st["dashboard"], pip=False) == 0
            cl = JobSubmissionClient(st["dashboard"])

            def status() -> str:
                return str(cl.get_job_status("rehearsal-ntk")).rsplit(".", 1)[-1]

            while status() in ("PENDING", "RUNNING"):
                time.sleep(1)
            info = cl.get_job_info("rehearsal-ntk")
            rec["job_status"] = status()
            if rec["job_status"] != "SUCCEEDED":
                raise SystemExit(cl.get_job_logs("rehearsal-ntk")[-6000:])
            rec["job_wall_seconds"] = round((info.end_time - info.start_time) / 1000, 1)
            nodes = _scale_down_record(watch, t_submit)
            where = rh.placement(st, watch)
            rec.update({
                "worker_nodes_at_submit": start,
                **nodes,
                "actors_on": {c: dict(n) for c, n in where.items()},
                "head_actors": rh.head_actors(st, watch),
                "train_worker_nodes": len({a["node_id"] for a in rh.actors(st)
                                           if a["class_name"] == rh.TRAIN_WORKER}),
            })
        rec["results"] = json.loads(
            (d / "runs-cluster/rehearsal-ntk/results.json").read_text())
    finally:
        ray.shutdown()
        lc.down(state=state, quiet=True)
    return rec


def compare_ntk(d: Path) -> dict:
    import numpy as np
    import pandas as pd

    out = {}
    for name in ("scores_ntk", "selected_ntk"):
        a = pd.read_parquet(d / f"runs-single/rehearsal-ntk/{name}.parquet")
        b = pd.read_parquet(d / f"runs-cluster/rehearsal-ntk/{name}.parquet")
        if name == "selected_ntk":
            out["selected_ids_equal"] = a["id"].tolist() == b["id"].tolist()
            out["selected"] = len(a)
        else:
            m = a.merge(b, on="id", suffixes=("_single", "_cluster"))
            out["scored_rows"] = len(m)
            out["score_max_abs_diff"] = float(np.abs(m["score_single"] -
                                                     m["score_cluster"]).max())
            out["score_max_abs"] = float(np.abs(m["score_single"]).max())
    return out


def single_node(d: Path, write=write_job, name: str = "rehearsal") -> dict:
    """`raydapt run` of the same job on one local Ray node (no custom resources)."""
    job = write(d, cluster=False, tag="single")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "raydapt.cli", "run", str(job)],
                       capture_output=True, text=True, env=_env(), timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit((r.stdout + r.stderr)[-4000:])
    return {"wall_seconds": round(wall, 1),
            "results": json.loads((d / f"runs-single/{name}/results.json").read_text())}


def compare(d: Path) -> dict:
    import numpy as np
    import pandas as pd

    a = pd.read_parquet(d / "runs-single/rehearsal/annotations.parquet")
    b = pd.read_parquet(d / "runs-cluster/rehearsal/annotations.parquet")
    assert a["id"].tolist() == b["id"].tolist()
    pa, pb = np.stack(a["p_t"]), np.stack(b["p_t"])
    return {"rows": len(a), "pseudo_labels_equal": bool((a["pseudo_label"] ==
                                                         b["pseudo_label"]).all()),
            "p_t_max_abs_diff": float(np.abs(pa - pb).max())}


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = rec["cluster"]["timeline"]
    end = rec["cluster"]["scaled_down_at_s"] + 5
    top = max(max(p[t] for t in ("cpu", "annotate_gpu", "train_gpu")) for p in tl)
    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=110)
    for typ, colour in (("cpu", "tab:gray"), ("annotate_gpu", "tab:orange"),
                        ("train_gpu", "tab:blue")):
        xs = [p["t"] for p in tl] + [end]
        ys = [p[typ] for p in tl] + [tl[-1][typ]]
        ax.step(xs, ys, where="post", label=typ, color=colour, lw=2)
    for k in rec["cluster"]["kills"]:
        ax.axvline(k["at_s"], color="red", ls="--", lw=1)
        ax.text(k["at_s"], top + 0.5, " kill", color="red", fontsize=8)
    ax.axvline(rec["cluster"]["submitted_at_s"], color="k", ls=":", lw=1)
    ax.axvline(rec["cluster"]["job_done_at_s"], color="k", ls=":", lw=1)
    ax.text(rec["cluster"]["submitted_at_s"], top + 0.5, " submit", fontsize=8)
    ax.text(rec["cluster"]["job_done_at_s"], top + 0.5, " done", fontsize=8)
    ax.set_xlabel("seconds since the cluster came up")
    ax.set_ylabel("alive nodes")
    ax.set_ylim(-0.2, top + 0.9)
    ax.set_yticks(range(top + 1))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("local autoscaling cluster: worker nodes per type (SimDA rehearsal)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", default="teacher,train",
                    help="comma list: teacher (an annotation node mid-pass), train (a training "
                    "node mid-fit); empty for none")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/cluster-rehearsal-cpu.json"))
    ap.add_argument("--plot", default=str(REPO / "docs/img/cluster-rehearsal-timeline.png"))
    ap.add_argument("--job", choices=["simda", "ntk"], default="simda")
    args = ap.parse_args()
    if args.job == "ntk":
        main_ntk(Path(str(args.out).replace("cluster-rehearsal-cpu.json",
                                            "cluster-rehearsal-ntk-cpu.json")))
        return
    kills = [k for k in args.kills.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="rdc-bench-") as tmp:
        d = Path(tmp)
        t0 = time.time()
        rec = {"command": "python benchmarks/cluster_rehearsal.py"
               + (f" --kills {args.kills}" if args.kills != "teacher,train" else ""),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": describe(), "load_average_at_start": os.getloadavg(),
               "job": {"source_rows": N_SOURCE, "target_rows": N_TARGET,
                       "teacher_rows": N_SOURCE + N_TRAIN + N_TEST, "shard_rows": SHARD_ROWS,
                       "teacher_pool": "concurrency [1, 3], {annotate_gpu: 1}, 1 CPU each",
                       "student": "kl, 2 Ray Train workers, {train_gpu: 1} each, 2 epochs"},
               "node_types": "cluster/node_types.yaml (local half)"}
        rec["cluster"] = rehearse(d, kills)
        rec["single_node"] = single_node(d)
        rec["same_numbers"] = compare(d)
        rec["load_average_at_end"] = os.getloadavg()
        rec["bench_seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1, default=str) + "\n")
    plot(rec, Path(args.plot))
    summary = {k: rec["cluster"][k] for k in ("time_to_first_annotation_node_s",
                                              "job_wall_seconds", "kills")}
    print(json.dumps({**summary, "single_node_wall_s": rec["single_node"]["wall_seconds"],
                      "same_numbers": rec["same_numbers"]}, indent=1, default=str))


def main_ntk(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="rdc-bench-ntk-") as tmp:
        d = Path(tmp)
        t0 = time.time()
        rec = {"command": "python benchmarks/cluster_rehearsal.py --job ntk",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": describe(), "load_average_at_start": os.getloadavg(),
               "job": {"pool_rows": 40, "domain_rows": 8, "test_items": 6, "M": 8, "N": 4,
                       "model": "2-layer width-32 Llama, random init, SmolLM2 tokenizer",
                       "pools": "embed / grad / eval: concurrency [1, 2], {annotate_gpu: 1}",
                       "train": "warm-up and fine-tune: LoRA r 2, DeepSpeed ZeRO-2, "
                                "2 Ray Train workers, {train_gpu: 1} each"},
               "node_types": "cluster/node_types.yaml (local half)"}
        rec["cluster"] = rehearse_ntk(d)
        rec["single_node"] = single_node(d, write_ntk_job, "rehearsal-ntk")
        rec["same_numbers"] = compare_ntk(d)
        rec["load_average_at_end"] = os.getloadavg()
        rec["bench_seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(json.dumps({"actors_on": rec["cluster"]["actors_on"],
                      "job_wall_seconds": rec["cluster"]["job_wall_seconds"],
                      "single_node_wall_s": rec["single_node"]["wall_seconds"],
                      "same_numbers": rec["same_numbers"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
