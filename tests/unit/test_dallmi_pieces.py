"""DALLMi pieces without Ray Train: multi-label reader, config errors, AAD's KD loss, layer
freezing, sweep files and search-space parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raydapt.config import ConfigError, load_job
from raydapt.data.multilabel import read_multilabel
from raydapt.data.readers import DataError

REPO = Path(__file__).resolve().parents[2]
CPU_JOB = REPO / "jobs/dallmi/pubmed-male-to-female.cpu.yaml"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_reader_labels_list_domains_and_rejects(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "1", "text": "a", "labels": ["C", "A"], "domain": "male"},
        {"id": "2", "text": "b", "labels": [], "domain": "female"},
        {"id": "3", "text": "c", "labels": ["A"], "domain": "both"},  # not selected
        {"id": "4", "text": " ", "labels": ["A"], "domain": "male"},  # empty text
        {"id": "5", "text": "e", "labels": ["Q"], "domain": "male"},  # unknown label
        {"id": "6", "text": "f", "labels": "A", "domain": "male"},  # 'A' -> ['A'] (csv style)
        {"id": "7", "text": "g", "labels": 3, "domain": "male"},  # not a list
        {"id": "1", "text": "dup", "labels": [], "domain": "male"},  # duplicate id
        {"text": "no id", "labels": [], "domain": "male"},
        "{not json",
    ])
    rows, rej, vocab = read_multilabel(f, labels=["A", "B", "C"], domains=["male", "female"])
    assert vocab == ["A", "B", "C"]
    assert rows["id"].tolist() == ["1", "2", "6"]
    assert rows["labels"].tolist() == [["A", "C"], [], ["A"]]  # vocabulary order
    reasons = dict(zip(rej["id"].fillna("-"), rej["reason"]))
    assert reasons["4"] == "empty text" and "not in the label set" in reasons["5"]
    assert "not a list" in reasons["7"] and "duplicate id" in reasons["1"]
    assert sum("missing id" in r for r in rej["reason"]) == 1
    assert sum("not a JSON object" in r for r in rej["reason"]) == 1


def test_reader_one_hot_columns_csv_and_missing_column(tmp_path):
    f = tmp_path / "d.csv"
    pd.DataFrame({"pmid": [10, 11, 12], "abstract": ["x", "y", "z"], "A": [1, 0, 1],
                  "B": [0, 0, 2], "sex": ["m", "f", "f"]}).to_csv(f, index=False)
    rows, rej, vocab = read_multilabel(f, id_field="pmid", text_field="abstract",
                                       labels_field=None, label_columns=["A", "B"],
                                       labels=None, domain_field="sex")
    assert vocab == ["A", "B"] and rows["labels"].tolist() == [["A"], []]
    assert rej["id"].tolist() == ["12"] and "0/1" in rej["reason"][0]
    with pytest.raises(DataError, match="no column 'domain'.*columns found"):
        read_multilabel(f, id_field="pmid", text_field="abstract", labels_field=None,
                        label_columns=["A"])


def test_dallmi_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="adapt: .*in_process: true needs num_workers: 1"):
        load_job(CPU_JOB, ["adapt.in_process=true", "adapt.num_workers=2"])
    with pytest.raises(ConfigError, match="overlap"):
        load_job(CPU_JOB, ["data.target_domains=[male]"])
    with pytest.raises(ConfigError, match="methods.0"):
        load_job(CPU_JOB, ["methods=[dallmi_vpu]"])
    with pytest.raises(ConfigError, match="adapt.mixup_level"):
        load_job(CPU_JOB, ["adapt.mixup_level=tokens"])
    with pytest.raises(ConfigError, match="hide.keep_ratio"):
        load_job(CPU_JOB, ["hide.keep_ratio=1.5"])


def test_cycle_batch_too_small_is_a_clear_error():
    from raydapt.recipes.dallmi import check_cycle_batch

    cfg = load_job(CPU_JOB, ["adapt.batch_size=16"])  # 16 < 14 labels + round(0.25*16)=4
    with pytest.raises(ConfigError, match="needs >= 14 labels \\+ 4 random rows"):
        check_cycle_batch(cfg, 14)
    check_cycle_batch(load_job(CPU_JOB), 14)  # 32 >= 14 + 8


def test_binary_kd_hand_values():
    from raydapt.train.multilabel import binary_kd

    z = torch.tensor([[0.3, -1.2]])
    assert float(binary_kd(z, z, 2.0)) == pytest.approx(0.0, abs=1e-7)
    # one label, T=1: teacher p=sigmoid(0)=0.5, student q=sigmoid(ln 3)=0.75
    s, t = torch.tensor([[math.log(3.0)]]), torch.tensor([[0.0]])
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(binary_kd(s, t, 1.0)) == pytest.approx(want, rel=1e-6)
    assert float(binary_kd(s * 2, t, 2.0)) == pytest.approx(4 * want, rel=1e-6)  # T² scaling


def test_freeze_below_keeps_top_layers_and_head():
    from raydapt.train.models import EncoderClassifier, tiny_bert
    from raydapt.train.multilabel import freeze_below

    m = EncoderClassifier(None, 3, encoder=tiny_bert(layers=3))
    freeze_below(m, 1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.encoder.layer.2.", "classifier."))
                             for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)


def test_multilabel_metrics_match_evaluate():
    from raydapt.evaluate import mean_average_precision
    from raydapt.train.multilabel import multilabel_metrics

    y = np.array([[1, 0], [0, 1], [1, 1]])
    p = np.array([[0.9, 0.2], [0.4, 0.6], [0.3, 0.7]])
    m = multilabel_metrics(y, p)
    assert m["map"] == pytest.approx(mean_average_precision(y, p))
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))  # tp 3, fp 0, fn 1


# --- sweep files and search spaces (no Tune run) ----------------------------------------------

SWEEPS = sorted((REPO / "jobs").rglob("*.sweep.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_loads_and_starts_with_a_comment(path):
    from raydapt.ops.sweep import load_sweep

    assert path.read_text().startswith("# raydapt sweep ")
    spec, base, cfg = load_sweep(path)
    assert spec.search_space and base["method"] == cfg.method
    assert Path(base["run"]["cache_dir"]).is_absolute()  # trials run in other directories
    assert base["tracking"]["uri"].startswith("sqlite:////")


def test_sweep_overrides_split_between_sweep_and_job():
    from raydapt.ops.sweep import load_sweep

    spec, base, _ = load_sweep(REPO / "jobs/dallmi/pubmed.sweep.yaml",
                               ["num_samples=3", "scheduler.max_t=2", "hide.keep_ratio=0.1"])
    assert spec.num_samples == 3 and spec.scheduler.max_t == 2
    assert base["hide"]["keep_ratio"] == 0.1 and base["methods"] == ["dallmi"]


def test_search_space_parsing_and_errors(tmp_path):
    from ray import tune

    from raydapt.ops.sweep import build_space, load_sweep

    space = build_space({"a": {"uniform": [0.1, 1.0]}, "b": {"loguniform": [0.1, 10]},
                         "c": {"choice": [8, 16]}, "d": {"randint": [1, 4]},
                         "e": {"grid": [1, 2]}, "f": {"quniform": [0, 1, 0.25]}})
    assert isinstance(space["a"], tune.search.sample.Float)
    assert space["c"].categories == [8, 16] and space["e"] == {"grid_search": [1, 2]}
    for bad, msg in [({"x": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
                     ({"x": {"uniform": [1.0]}}, "needs \\[2 numbers\\]"),
                     ({"x": {"uniform": [2, 1]}}, "lo < hi"),
                     ({"x": {"loguniform": [0, 1]}}, "lo > 0"),
                     ({"x": {"uniform": [0, 1], "choice": [1]}}, "exactly one distribution")]:
        with pytest.raises(ConfigError, match=msg):
            build_space(bad)
    s = tmp_path / "s.sweep.yaml"
    s.write_text(f"job: {CPU_JOB}\nmetric: map\nsearch_space: {{adapt.alhpa: {{uniform: [0, 1]}}}}\n")
    with pytest.raises(ConfigError, match="adapt.alhpa: unknown key"):
        load_sweep(s)  # a sampled key that is not a job key fails before any trial
    s.write_text(f"job: {CPU_JOB}\nmetric: map\nsamples: 3\nsearch_space: {{a: {{grid: [1]}}}}\n")
    with pytest.raises(ConfigError, match="(?s)invalid sweep file.*samples: unknown key"):
        load_sweep(s)
