"""The node-type checks of `raydapt submit` / `raydapt plan` (cluster/node_types.yaml).
`raydapt cluster up --local / status / down`, as a user runs them, start and stop the
rehearsal's cluster (tests/cluster/test_rehearsal.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydapt.config import load_job
from raydapt.ops import node_types as ntm
from raydapt.ops.plan import make_plan, place_on_node_types
from raydapt.ops.submit import check_node_types

REPO = Path(__file__).resolve().parents[2]


def test_job_requests_and_placement_of_the_gpu_job():
    cfg = load_job(REPO / "jobs/simda/amazon-mistral7b.gpu.yaml")
    req = ntm.job_requests(cfg)
    assert req["teacher.pool"] == {"CPU": cfg.teacher.pool.num_cpus, "GPU": 1.0,
                                   "annotate_gpu": 1.0}
    assert req["distill"]["train_gpu"] == 1.0 and req["distill"]["GPU"] == 1.0
    where = ntm.placement(cfg, ntm.cloud())
    assert where["teacher.pool"] == ["annotate_gpu"] and where["distill"] == ["train_gpu"]
    # the same job asks for GPUs, which the local rehearsal cluster does not have
    with pytest.raises(ntm.NodeTypesError, match=r"teacher.pool asks for GPU=1, which no local"):
        ntm.placement(cfg, ntm.local())
    # the CPU job with the steering resources fits the local cluster
    cpu = load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml",
                   ["teacher.pool.resources={annotate_gpu: 1}",
                    "distill.resources={train_gpu: 1}"])
    where = check_node_types(cpu, None, "local")
    assert where["teacher.pool"] == ["annotate_gpu"] and where["distill"] == ["train_gpu"]


def test_submit_names_the_missing_resource_and_the_node_types(capsys):
    from raydapt.cli import main

    cfg = "jobs/simda/amazon-books-to-kitchen.cpu.yaml"
    # no cluster listens on port 9: the node-type check fails first, without contacting one
    rc = main(["submit", str(REPO / cfg), "distill.resources={trian_gpu: 1}",
               "--address", "http://127.0.0.1:9", "--node-types", "cloud"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not submitted: distill asks for trian_gpu=1, which no cloud node type offers" in err
    assert "train_gpu: CPU=96, GPU=8, train_gpu=8" in err


def test_plan_says_where_each_stage_lands(capsys):
    cfg = load_job(REPO / "jobs/simda/amazon-mistral7b.gpu.yaml")
    plan = place_on_node_types(make_plan(cfg), cfg, "cloud")
    on = {s.name: s.resources["on"] for s in plan.stages}
    assert on["teacher"] == "annotate_gpu" and on["student-kl_sim"] == "train_gpu"
    assert on["read"] == "head (driver)"
    assert "head" not in on["knn"].split("|") and "cpu" in on["knn"].split("|")
    plan = place_on_node_types(make_plan(cfg), cfg, "local")  # GPU stages: no local node type
    assert plan.stages[1].resources["on"] == "NONE"
    assert any("asks for GPU=1, which no local node type offers" in n for n in plan.notes)
