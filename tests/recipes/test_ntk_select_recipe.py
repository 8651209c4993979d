"""NTK-Selector on tiny data.

- ``test_stage2_scores_sharded_resume`` (CI): the streamed stage-2 pass (candidates file →
  score shards) on a tiny model with a random LoRA adapter: scores equal an in-process reference
  (per-sample gradients → projection → ⟨ḡ_D, g⟩), and a rerun after deleting one shard
  recomputes only that shard.
- ``test_ntk_select_end_to_end_and_shard_resume`` (CI; 128-147 s on an idle 2-core machine, 294 s
  with the cores shared by other jobs at load average ~40): the whole recipe with real Ray Data
  actor pools, Ray Train + DeepSpeed (ZeRO-2 over gloo), FAISS, MLflow; then a rerun that
  recomputes one deleted shard.

The model is a tiny random Llama (2 layers, width 32) with SmolLM2's tokenizer and chat
template, saved to a directory (a local model reference), so the fixed costs dominate: two
TorchTrainer fits (warm-up, fine-tune on D ∪ S; domain-only reuses the warm-up, same config and
rows) and a handful of actor-pool passes (the base-model evaluation is the same code path with
no adapter, left out here to save a pass).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from ntk_tiny import encoded, random_adapter, reference_scores, tiny_model  # tests/recipes/

from raydapt.config import validate_job


def _write(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _data(root: Path) -> None:
    (root / "pool").mkdir(parents=True)
    (root / "med").mkdir()
    pool = [{"id": f"p{i}", "source": "toy/math" if i % 2 else "toy/sense",
             "question": f"What is {i} plus {i + 1}?" if i % 2 else f"Is a cat bigger than a "
             f"{'mouse' if i % 4 else 'horse'}? number {i}",
             "rationale": f"{i} + {i + 1} = {2 * i + 1}." if i % 2 else "Cats are mid-sized.",
             "answer": str(2 * i + 1) if i % 2 else ("yes" if i % 4 else "no")}
            for i in range(24)]
    pool += ['{"id": "bad-json", ', {"id": "p-empty", "question": "", "answer": "1"}]
    _write(root / "pool" / "toy.jsonl", pool)
    opts = {"A": "yes", "B": "no", "C": "maybe"}
    med = [{"id": f"m{i}", "split": "train" if i < 8 else "test",
            "question": f"Does drug {i} lower blood pressure in adults?",
            "context": f"A trial of drug {i} in {10 * i + 20} adults.", "options": opts,
            "answer": "ABC"[i % 3], "rationale": f"Drug {i} had an effect." if i % 2 else None}
           for i in range(14)]
    med += [{"id": "m-bad", "split": "test", "question": "Q?", "options": opts, "answer": "E"}]
    _write(root / "med" / "toyqa.jsonl", med)


@pytest.mark.timeout(300)
def test_stage2_scores_sharded_resume(ray_local, tmp_path):
    import numpy as np

    from raydapt.core.cache import StageCache
    from raydapt.core.tracking import Tracker
    from raydapt.recipes.ntk_select import (
        STAGE_VERSIONS,
        candidate_source,
        candidates_file,
        read_scores,
        stage2_scores,
    )

    model = tiny_model(tmp_path / "tiny")
    adapter = tmp_path / "warm"
    net = random_adapter(model, adapter)
    rows = encoded(model, 7)
    # batches of 3 computed in length-sorted micro-batches of 2 (the rows come back in order)
    pool_sec = {"concurrency": 1, "num_cpus": 0.5, "batch_size": 3, "threads": 1}
    cfg = validate_job({"method": "ntk_select", "model": str(model),
                        "run": {"cache_dir": str(tmp_path / "cache")},
                        "select": {"proj_dim": 32, "proj_chunk_rows": 256, "shard_rows": 3,
                                   "grad_micro_batch": 2, "grad_pool": pool_sec}})
    against = np.random.default_rng(0).normal(size=32).astype(np.float32)
    cache = StageCache(cfg.run.cache_dir, versions=STAGE_VERSIONS)
    tracker = Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x",
                      artifact_location="")
    path = candidates_file(cfg, cache, tracker, ids=list(rows["id"]), parts={"test": 1},
                           rows=lambda: rows)

    def scores():
        return read_scores(stage2_scores(cfg, cache, tracker, adapter=adapter, kind="ntk",
                                         source=candidate_source(path, 3), against=against))

    got = scores()

    # reference, in process: the same projected gradients and inner products
    ref = reference_scores(net, rows, 32, against)
    assert list(got["id"]) == list(rows["id"]) and (got["_error"] == "").all()
    np.testing.assert_allclose(got["score"].to_numpy(), ref, rtol=1e-3, atol=1e-4)

    # 7 rows in shards of 3 → 3 files; lose the middle one: only it is recomputed
    d = next((tmp_path / "cache" / "scores-ntk").iterdir())
    parts = sorted(d.glob("part-*.parquet"))
    assert len(parts) == 3 and (d / "_SUCCESS").exists()
    mtimes = [p.stat().st_mtime_ns for p in parts]
    parts[1].unlink()
    (d / "_SUCCESS").unlink()
    (d / ".part-00001.parquet.tmp").write_text("half-written")  # a killed writer's leftover
    again = scores()
    assert parts[0].stat().st_mtime_ns == mtimes[0] and parts[2].stat().st_mtime_ns == mtimes[2]
    assert parts[1].exists() and not (d / ".part-00001.parquet.tmp").exists()
    pd.testing.assert_frame_equal(again, got, rtol=1e-5)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_ntk_select_end_to_end_and_shard_resume(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from raydapt.recipes import ntk_select

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _data(tmp_path / "data")
    model = tiny_model(tmp_path / "tiny")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    pool_sec = {"concurrency": 1, "num_cpus": 0.5, "batch_size": 4, "threads": 1}
    train = {"num_workers": 2, "cpus_per_worker": 0.5, "threads": 1, "epochs": 1,
             "batch_size": 8, "lr": 1e-3, "zero_stage": 2}
    cfg = validate_job({
        "method": "ntk_select",
        "run": {"name": "tiny", "output_dir": str(tmp_path / "runs"),
                "cache_dir": str(tmp_path / "cache")},
        "tracking": {"uri": uri, "artifact_location": str(tmp_path / "art"),
                     "experiment": "ntk-test"},
        "data": {"root": str(tmp_path / "data"), "pool": ["pool/toy.jsonl"],
                 "tasks": [{"path": "med/toyqa.jsonl", "name": "toyqa", "domain_rows": 8,
                            "eval_rows": None}]},
        "model": str(model),
        "format": {"max_length": 64},
        "lora": {"r": 2, "alpha": 4},
        "warmup": train, "finetune": train,
        "select": {"selectors": ["ntk"], "baselines": ["domain_only"], "n": 4, "m_factor": 2,
                   "k": 4, "proj_dim": 64, "proj_chunk_rows": 256, "shard_rows": 3, "embed_pool": pool_sec,
                   "grad_pool": pool_sec},
        "eval": {"max_length": 96, "pool": pool_sec, "nll": True},
    })
    res = ntk_select.run(cfg)
    out = tmp_path / "runs" / "tiny"

    # sizes: D = 8 train items, 24 good pool rows (2 rejects), M = 8 candidates, N = 4
    assert res["sizes"] == {"D": 8, "pool": 24, "M": 8, "N": 4, "test": {"toyqa": 6}}
    assert set(res["accuracy"]) == {"domain_only", "ntk"} and res["complete"] is True
    for acc in res["accuracy"].values():
        assert 0.0 <= acc["toyqa"] <= 1.0 and acc["mean"] == acc["toyqa"]
    # D's answers: m0..m7 → A, B, C, A, B, C, A, B → A; the 6 test items m8..m13 → C A B C A B
    assert res["majority_letter_from_D"] == {"toyqa": 2 / 6, "mean": 2 / 6}
    # held-out gold-response NLL per variant (eval.nll): finite, positive, no failed item
    assert set(res["response_nll"]) == {"domain_only", "ntk"}
    for nll in res["response_nll"].values():
        assert 0 < nll["toyqa"] < 20 and nll["mean"] == nll["toyqa"] and nll["failed"] == 0
    rej = pd.read_parquet(out / "rejects.parquet")
    reasons = " | ".join(rej["reason"])
    assert "invalid JSON" in reasons and "empty question" in reasons
    assert "is not one of the options" in reasons  # m-bad: answer E with options A-C

    # selection: N ids from the stage-1 candidates, ranked by the stored NTK scores
    votes = pd.read_parquet(out / "stage1_votes.parquet")
    assert len(votes) == 24 and votes["votes"].sum() == 8 * 4  # every domain row votes k=4
    scores = pd.read_parquet(out / "scores_ntk.parquet")
    assert len(scores) == 8 and scores["score"].notna().all()
    sel = pd.read_parquet(out / "selected_ntk.parquet")
    assert list(sel["id"]) == list(scores.sort_values("score", ascending=False,
                                                      kind="stable")["id"][:4])
    # scored shards: 8 candidates in shards of 3 -> 3 part files, plus the success marker
    shard_dir = next((tmp_path / "cache" / "scores-ntk").iterdir())
    parts = sorted(shard_dir.glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert (shard_dir / "_SUCCESS").exists()

    # MLflow: parent + a child per stage, per-step loss, selected ids as an artifact
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ntk-test")
    runs = client.search_runs([exp.experiment_id])
    names = {r.data.tags.get("mlflow.runName"): r for r in runs}
    for want in ("tiny", "read", "warmup", "stage1-embed", "stage2-logit_sum-domain",
                 "stage2-ntk", "select-ntk", "finetune-ntk", "finetune-domain_only",
                 "eval-domain_only", "eval-ntk"):
        assert want in names, (want, sorted(names))
    assert client.get_metric_history(names["warmup"].info.run_id, "train_loss")
    arts = [a.path for a in client.list_artifacts(names["select-ntk"].info.run_id, "selected")]
    assert arts == ["selected/selected_ntk.parquet"]
    assert "acc.ntk.toyqa" in names["tiny"].data.metrics

    # rerun after losing one shard: only that shard is recomputed, the rest is reused
    keep = {p.name: p.stat().st_mtime_ns for p in parts}
    before = pd.read_parquet(parts[1])
    parts[1].unlink()
    (shard_dir / "_SUCCESS").unlink()
    res2 = ntk_select.run(cfg)
    assert parts[1].exists() and (shard_dir / "_SUCCESS").exists()
    assert parts[0].stat().st_mtime_ns == keep[parts[0].name]
    assert parts[2].stat().st_mtime_ns == keep[parts[2].name]
    pd.testing.assert_frame_equal(pd.read_parquet(parts[1]), before, rtol=1e-5)
    assert res2["accuracy"] == res["accuracy"]
    assert res2["response_nll"] == res["response_nll"]
    runs2 = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = "
                               "'stage2-ntk'", order_by=["start_time DESC"])
    assert runs2[0].data.metrics["shards_cached"] == 2


@pytest.mark.timeout(300)
def test_streamed_pool_ids_order_and_duplicates_across_files(ray_local, tmp_path):
    """The pool as a directory of files, read in units of a few rows: the driver's index of it
    (ids only) equals the in-memory reading's — same rows, same (subsample-hash) order — and an
    id that occurs again (in another file, or in another read unit of the same file) is a
    reject record naming it, its first row in file order kept."""
    import numpy as np

    from raydapt.core.cache import StageCache
    from raydapt.core.tracking import Tracker
    from raydapt.recipes.ntk_select import (
        STAGE_VERSIONS,
        index_pool,
        pool_order,
        read_pool_frame,
        scan_pool_ids,
    )

    pad = "x" * 300  # long lines: a read unit of 4 rows is over the 1 KiB minimum
    row = lambda i, tag="": {"id": f"p{i}", "question": f"Q{i}{tag} {pad}",  # noqa: E731
                             "answer": str(i)}
    (tmp_path / "pool").mkdir()
    _write(tmp_path / "pool" / "a.jsonl", [row(i) for i in range(12)] + ['{"id": "bad", '])
    _write(tmp_path / "pool" / "b.jsonl", [row(i) for i in range(12, 20)] + [row(3, "again")]
           + [row(i) for i in range(20, 28)] + [row(13, "again")])  # p13 again, 9 rows later
    cfg = validate_job({"method": "ntk_select", "run": {"cache_dir": str(tmp_path / "cache")},
                        "data": {"root": str(tmp_path), "pool": ["pool"], "pool_unit_rows": 4}})
    tracker = Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x",
                      artifact_location="")
    out = scan_pool_ids(cfg, StageCache(cfg.run.cache_dir, versions=STAGE_VERSIONS), tracker)
    assert out.n_shards >= 6  # several units per file
    idx = index_pool(out)
    assert list(idx.ids) == [f"p{i}" for i in range(28)]  # first rows, file order
    assert idx.dups == {"p3", "p13"}
    rej = idx.rejects
    dup = rej[rej["reason"].str.startswith("duplicate id in the pool")]
    assert sorted(dup["id"]) == ["p13", "p3"] and len(rej) == 3  # + the bad JSON line
    assert rej["reason"].str.contains("invalid JSON").sum() == 1
    # the in-memory reading (what the recipe did before streaming): same ids, same order
    frame, frame_rej = read_pool_frame(cfg)
    assert list(pool_order(idx.ids, cfg.run.seed)) == list(frame["id"])
    assert len(frame_rej) == len(rej)
    assert not np.array_equal(pool_order(idx.ids, cfg.run.seed), idx.ids)  # the order is the hash's


@pytest.mark.timeout(1800)
def test_recipe_pool_path_does_not_collect_the_pool(ray_local, tmp_path):
    """The recipe's pool path on 16K QA rows (~40 MB): stage 1 streamed (read → tokenise, no
    model), the pool indexed from the shards (ids only), the seeded order, and the tokens of a
    few selected rows read back. The driver's peak traced allocation stays far under the
    pool's size; reading the shards' token columns into the driver (what a frame-based stage
    would hold) is over the same bound, so the check can fail."""
    import tracemalloc

    from raydapt.core.cache import StageCache
    from raydapt.core.tracking import Tracker
    from raydapt.recipes.ntk_select import (
        STAGE_VERSIONS,
        index_pool,
        pool_order,
        pool_source,
        rows_by_id,
        stage1_pool,
    )

    n, pad = 16_000, "y" * 2_400
    (tmp_path / "pool").mkdir()
    for name, rng in (("warm", range(300)), ("big", range(n))):
        with open(tmp_path / "pool" / f"{name}.jsonl", "w") as f:
            for i in rng:
                f.write(json.dumps({"id": f"{name}{i}", "source": "toy",
                                    "question": f"What is {i} plus one? {pad}",
                                    "rationale": f"{i} + 1 = {i + 1}.",
                                    "answer": str(i + 1)}) + "\n")
    tracker = Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x",
                      artifact_location="")
    cache = StageCache(tmp_path / "cache", versions=STAGE_VERSIONS)

    def job(pool: str):
        return validate_job({"method": "ntk_select", "model": "pkg:smollm2-135m-instruct",
                             "run": {"cache_dir": str(tmp_path / "cache")},
                             "format": {"max_length": 64, "chat": False},
                             "data": {"root": str(tmp_path), "pool": [pool],
                                      "pool_unit_rows": 2_000}})

    def recipe_path(cfg):
        out = stage1_pool(cfg, cache, tracker, adapter=None, source=pool_source(cfg))
        idx = index_pool(out)
        order = pool_order(idx.ids, cfg.run.seed)
        return out, idx, order, rows_by_id(out, order[:50], ["input_ids", "response_mask"],
                                           dups=idx.dups)

    recipe_path(job("pool/warm.jsonl"))  # one-off imports of a first pass are not the pool
    cfg = job("pool/big.jsonl")
    tracemalloc.start()
    try:
        out, idx, order, sel = recipe_path(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pool_bytes = (tmp_path / "pool" / "big.jsonl").stat().st_size
    print(f"pool {pool_bytes / 1e6:.1f} MB, driver peak {peak / 1e6:.2f} MB")
    assert pool_bytes > 38_000_000
    assert peak < pool_bytes / 5, (peak, pool_bytes)
    assert len(idx.ids) == n and len(idx.rejects) == 0 and len(set(order)) == n
    assert len(sel) == 50 and all(len(a) == len(m) <= 64 for a, m in
                                  zip(sel["input_ids"], sel["response_mask"]))
    # the bound can be exceeded: the token lists of every row, as the driver-frame pool held
    tracemalloc.start()
    try:
        toks = [t.to_pylist() for t in out.iter_tables(["id", "input_ids", "response_mask"])]
        _, peak_collect = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(t) for t in toks) == n
    print(f"collecting the token columns: peak {peak_collect / 1e6:.2f} MB")
    assert peak_collect > pool_bytes / 5, (peak_collect, pool_bytes)
