"""The whole DALLMi job on ~60 PubMed rows with a tiny 2-layer BERT (MiniLM's tokenizer): real Ray
Train (2 gloo workers, gradients averaged by all-reduce) for the source fine-tune, every
adaptation method in-process through the same loop, real MLflow; then a 2-trial Ray Tune sweep
with ASHA and one MLflow child run per trial."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raydapt.cli import main

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random-init 2-layer BERT saved as a local checkpoint, with MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    from raydapt.core.assets import resolve_model
    from raydapt.train.models import tiny_bert

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model("pkg:all-minilm-l6-v2").path)
    tiny_bert(vocab_size=tok.vocab_size, hidden=32, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _job(tmp_path, data_dir, tiny_encoder, *, methods: str, source_train: str) -> str:
    rows = [json.loads(x) for x in (data_dir / "pubmed_mesh/pubmed.jsonl").read_text()
            .splitlines()]
    male = [r for r in rows if r["domain"] == "male"][:30]
    female = [r for r in rows if r["domain"] == "female"][:30]
    bad = [{"id": "bad-1", "text": "", "labels": ["A"], "domain": "female"},
           {"id": "bad-2", "text": "some text", "labels": ["K"], "domain": "female"},
           {"id": female[0]["id"], "text": "dup", "labels": [], "domain": "female"}]
    (tmp_path / "pm.jsonl").write_text(
        "\n".join(json.dumps(r) for r in male + female + bad) + "\n")
    db = tmp_path / "mlruns.db"
    job = tmp_path / "job.yaml"
    job.write_text(f"""
method: dallmi
run: {{name: tiny, output_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}
tracking: {{uri: "sqlite:///{db}", artifact_location: {tmp_path}/art, experiment: t}}
data: {{root: {tmp_path}, path: pm.jsonl, source_domains: [male], target_domains: [female]}}
hide: {{keep_ratio: 0.3}}
model: {{encoder: {tiny_encoder}}}
source: {{epochs: 1, batch_size: 8, max_length: 16, {source_train}}}
adapt: {{epochs: 1, batch_size: 20, max_length: 16, num_workers: 1, in_process: true,
        random_share: 0.25, lr: 1.0e-3}}
methods: {methods}
""")
    return str(job)


@pytest.mark.e2e
def test_dallmi_end_to_end(tmp_path, data_dir, tiny_encoder, capsys):
    from mlflow.tracking import MlflowClient

    job = _job(tmp_path, data_dir, tiny_encoder,
               methods="[no_adapt, bce_partial, bce_oracle, aad, dallmi, dallmi_log]",
               source_train="num_workers: 2, cpus_per_worker: 0.9")
    assert main(["run", job]) == 0
    out = tmp_path / "runs/tiny"
    res = json.loads((out / "results.json").read_text())
    methods = {"no_adapt", "bce_partial", "bce_oracle", "aad", "dallmi", "dallmi_log"}
    assert set(res["methods"]) == methods
    for m, r in res["methods"].items():
        for k in ("map", "map_bin", "micro_f1", "macro_f1"):
            assert 0.0 <= r[k] <= 1.0, (m, k, r[k])
        assert len(r["history"]) == (0 if m == "no_adapt" else 1)
    c = res["counts"]
    assert c["rejects"] == 3 and c["labels"] == 14
    assert c["source_rows"] + c["source_test_rows"] == 30
    assert c["target_train_rows"] + c["target_test_rows"] == 30  # the duplicate id is a reject
    # label hiding: 30 % of each label's positives kept, at least one where there were any
    pos, obs = np.array(res["target_train_positives"]), np.array(res["target_train_observed"])
    assert (obs <= pos).all() and ((pos > 0) <= (obs > 0)).all() and obs.sum() < pos.sum()
    assert res["methods"]["no_adapt"]["map"] == pytest.approx(res["source"]["target_test"]["map"])
    assert "gradients" not in res  # sanity: plain JSON
    # disk: the source fit (2 workers, Ray Train) keeps only Ray Train's retained checkpoint,
    # no scratch copy of any epoch's state
    assert not list((out / "train").rglob("scratch/**/state.pt"))
    assert len(list((out / "train").rglob("checkpoint_*/state.pt"))) == 1

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    p = parent[0]
    assert p.data.params["hide.keep_ratio"] == "0.3" and "data_fingerprint.data" in p.data.params
    assert p.data.metrics["map.dallmi"] == pytest.approx(res["methods"]["dallmi"]["map"])
    children = {r.data.tags["mlflow.runName"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
    assert {"read", "source", *methods} <= set(children)
    for m in methods - {"no_adapt"}:
        hist = client.get_metric_history(children[m].info.run_id, "map")
        assert len(hist) == 1 and hist[0].value == pytest.approx(res["methods"][m]["map"])
    # the source fit ran on Ray Train: rank 0 logged its per-epoch metrics to the child run
    assert client.get_metric_history(children["source"].info.run_id, "map")
    arts = {a.path for a in client.list_artifacts(p.info.run_id)}
    assert {"config.yaml", "results.json", "rejects.parquet", "hidden_labels.parquet"} <= arts

    # a second job with the same source reuses the cached source model (other ratio / method)
    capsys.readouterr()
    assert main(["run", job, "hide.keep_ratio=0.1", "methods=[dallmi]"]) == 0
    assert "source: cached (" in capsys.readouterr().out


@pytest.mark.slow  # Tune start-up + 2 trials: ~2 min on the shared 2-core machine
def test_dallmi_sweep_two_trials(tmp_path, data_dir, tiny_encoder):
    from mlflow.tracking import MlflowClient

    job = _job(tmp_path, data_dir, tiny_encoder, methods="[dallmi]",
               source_train="num_workers: 1, in_process: true")
    sweep = tmp_path / "s.sweep.yaml"
    sweep.write_text(f"""
job: {job}
name: tiny
metric: map
num_samples: 2
scheduler: {{type: asha, max_t: 2, grace_period: 1}}
search_space:
  adapt.alpha: {{uniform: [0.1, 1.0]}}
  adapt.lam: {{loguniform: [0.1, 10.0]}}
""")
    assert main(["sweep", str(sweep), "adapt.epochs=2"]) == 0
    best = json.loads((tmp_path / "runs/sweep-tiny/best.json").read_text())
    assert len(best["trials"]) == 2 and set(best["best"]) == {"adapt.alpha", "adapt.lam"}
    assert best["best_metric"] == max(t["metric"] for t in best["trials"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    parent = [r for r in runs if r.data.tags.get("mlflow.runName") == "sweep-tiny"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    pid = parent[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid
              and "raydapt.trial" in r.data.tags]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert {"adapt.alpha", "adapt.lam"} <= set(trials[0].data.params)
    assert "trial_map" in trials[0].data.metrics
    assert float(parent[0].data.params["best.adapt.alpha"]) == pytest.approx(
        best["best"]["adapt.alpha"])
