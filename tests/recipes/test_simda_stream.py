"""``data.stream_target_train``: the SimDA job's target-train rows streamed from the target
file to parquet shards (teacher → kNN as one chain of actor pools) give the annotations, teacher
read-outs, counts and rejects of the frame path on the same rows."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from raydapt.cli import main

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(900), pytest.mark.e2e]


def _target(d, data_dir, n: int = 90) -> str:
    """n kitchen rows with a row that has no text and a repeated id among them (deep inside:
    after the first read units), written to one jsonl file."""
    rows = [json.loads(x) for x in (data_dir / "amazon/kitchen.jsonl").read_text().splitlines()[:n]]
    rows.insert(70, {"id": "kitchen-bad", "text": "", "label": "positive"})
    rows.insert(75, {**rows[10], "text": rows[10]["text"] + " (again)"})  # id kitchen-10 twice
    (d / "tgt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "tgt.jsonl"


def test_streamed_target_train_gives_the_frame_paths_annotations(tmp_path, capsys,
                                                                 tiny_simda_job, data_dir):
    target = _target(tmp_path, data_dir)
    runs = {}
    for tag, stream in (("frame", False), ("stream", True)):
        job = tiny_simda_job(
            tmp_path, source_rows=40, tag=tag, tracking={"experiment": "t"},
            data={"target": {"path": target}, "max_target_test_rows": 20,
                  "stream_target_train": stream, "target_unit_rows": 16},
            teacher={"text_max_tokens": 32,
                     "pool": {"concurrency": 1, "num_cpus": 1, "batch_size": 16}},
            annotate={"k": 8, "baselines": ["zero_shot", "knn"]},
            distill={"variants": []})
        assert main(["run", str(job)]) == 0
        runs[tag] = tmp_path / f"runs-{tag}/tiny"
    console = capsys.readouterr().out
    shards = re.search(r"target-train teacher → kNN: (\d+) shards of ~16 rows from 1 file", console)
    assert shards and int(shards[1]) >= 4, console  # several read units of one file

    res = {t: json.loads((d / "results.json").read_text()) for t, d in runs.items()}
    assert res["stream"]["counts"] == res["frame"]["counts"]
    assert res["frame"]["counts"]["target_train_rows"] > 30
    # the test split is read back by id in the streamed run: the same rows, the same read-outs
    assert res["stream"]["accuracy"] == res["frame"]["accuracy"]
    assert res["stream"]["pseudo_label_accuracy"] == pytest.approx(
        res["frame"]["pseudo_label_accuracy"])

    ann = {t: pd.read_parquet(d / "annotations.parquet").set_index("id") for t, d in
           runs.items()}
    assert set(ann["stream"].index) == set(ann["frame"].index)
    assert ann["stream"].index.is_unique  # kitchen-10's second row is dropped
    a, b = ann["frame"], ann["stream"].loc[ann["frame"].index]
    # the teacher batches other rows beside each row than the frame path does: float
    # noise only
    for col, atol in (("p_t", 1e-4), ("p_llm", 1e-4), ("p_knn", 1e-4), ("h_t", 1e-3)):
        np.testing.assert_allclose(np.stack(b[col]), np.stack(a[col]), atol=atol, err_msg=col)
    assert (b["pseudo_label"] == a["pseudo_label"]).all()
    assert [list(x) for x in b["nbr_ids"]] == [list(x) for x in a["nbr_ids"]]

    rej = {t: pd.read_parquet(d / "rejects.parquet") for t, d in runs.items()}
    for t in rej:
        assert {"kitchen-bad", "kitchen-10"} <= set(rej[t]["id"]), (t, rej[t])
    assert sorted(zip(rej["stream"]["id"], rej["stream"]["reason"])) == sorted(
        zip(rej["frame"]["id"], rej["frame"]["reason"]))
