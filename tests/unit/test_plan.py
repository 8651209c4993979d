"""`raydapt plan`: rows counted in the files, tokens from the real teacher tokenizer, device
hours from the throughput table by hand, resources from the config, one rendered prompt."""

from __future__ import annotations

import json
import types

import pytest

from raydapt.cli import main
from raydapt.config import validate_job
from raydapt.ops.plan import PlanError, count_rows, load_table, make_plan, model_params


def _job(tmp_path, n_src=30, n_tgt=40, **over):
    for name, n in (("s.jsonl", n_src), ("t.jsonl", n_tgt)):
        rows = [{"id": f"{name}-{i}", "text": f"review number {i} " * 5,
                 "label": ["negative", "positive"][i % 2]} for i in range(n)]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    raw = {"method": "simda", "data": {"root": str(tmp_path), "source": {"path": "s.jsonl"},
                                       "target": {"path": "t.jsonl"},
                                       "max_target_test_rows": 10},
           "teacher": {"pool": {"concurrency": [1, 2], "num_gpus": 1, "num_cpus": 2}},
           "annotate": {"baselines": ["zero_shot", "icl_random"], "baseline_max_rows": 6},
           "distill": {"variants": ["source_only", "kl"], "epochs": 2, "use_gpu": True,
                       "num_workers": 4, "max_length": 64, "batch_size": 8}}
    raw.update(over)
    return validate_job(raw)


def test_plan_rows_tokens_hours_resources(tmp_path):
    cfg = _job(tmp_path)
    table = load_table()
    p = make_plan(cfg, gpu="a100", table=table)
    st = {s.name: s for s in p.stages}
    assert count_rows(tmp_path / "s.jsonl") == 30  # blank lines are not rows
    # source 30; target 40 -> 20 train, min(20, 10) = 10 test; ICL on min(10, 6) = 6 rows
    assert st["read"].rows == 70 and st["teacher"].rows == 30 + 20 + 10
    assert st["knn"].rows == 30 and st["prompted"].rows == 6
    # rows are rows (as in every other stage); step-matched: source-only takes as many steps
    # as the distilled student, counted by the students' own rule: 20 target-train rows on 4
    # workers = 5 each, batches of 8 // 4 = 2 -> 2 steps per epoch, 2 epochs = 4 steps of 8
    # rows; source-only cycles its 30 rows (7 per worker, 3 steps per epoch) for them
    assert st["student-source_only"].rows == 30 and st["student-kl"].rows == 20
    assert "step-matched: 4 steps (2 epochs of 2) x 8 rows = 32 examples" in st["student-kl"].note
    assert "step-matched: 4 steps (2 epochs of 3) x 8 rows = 32 examples" in \
        st["student-source_only"].note
    # hours by hand from the table: 2*N*tokens / rate + model load per replica (max 2)
    n, _ = model_params(cfg.teacher.model, table)
    tok = st["teacher"].llm_tokens
    want = (2 * n * tok / table["devices"]["a100"]["llm_hf"]
            + table["fixed_seconds"]["llm_load_hf"]["gpu"] * 2) / 3600
    assert st["teacher"].device == "gpu" and st["teacher"].hours == pytest.approx(want)
    assert st["prompted"].llm_tokens / 6 > tok / 60  # demonstrations make prompts longer
    ns, _ = model_params(cfg.distill.student, table)
    wall = 6 * ns * 32 * 64 / (table["devices"]["a100"]["train"] * 4) + \
        table["fixed_seconds"]["train_fit"]["gpu"]
    assert st["student-source_only"].hours == pytest.approx(wall * 4 / 3600)
    assert st["teacher"].resources == {"actors": "1-2", "CPU/actor": 2.0, "GPU/actor": 1.0,
                                       "batch_size": 16, "backend": "hf"}
    assert st["student-kl"].resources["workers"] == 4
    assert p.total_hours("gpu") == pytest.approx(sum(s.hours or 0 for s in p.stages
                                                     if s.device == "gpu"))
    # the prompt the teacher sees: the default cloze read-out, no chat template
    assert "<|im_start|>" not in p.prompt
    assert p.prompt.endswith("\nThe sentiment of this review is")
    assert "review number 0" in p.prompt
    params = p.mlflow_params()
    assert params["plan.teacher.rows"] == "60" and params["plan.gpu"] == "a100"


def test_plan_counts_the_dev_pass_of_select_on_dev(tmp_path):
    cfg = _job(tmp_path)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(
        {"id": f"d{i}", "text": "a dev review", "label": "positive"}) + "\n" for i in range(25)))
    assert "teacher-dev" not in {s.name for s in make_plan(cfg, gpu="a100").stages}
    dev = _job(tmp_path, annotate={"select_on_dev": True},
               data={**cfg.data.model_dump(), "dev": {"path": "d.jsonl"}, "max_dev_rows": 20})
    st = {s.name: s for s in make_plan(dev, gpu="a100").stages}
    assert st["teacher-dev"].rows == 20 and st["teacher"].rows == 60  # capped; main pass as is
    assert st["teacher-dev"].llm_tokens > 0


def test_plan_cpu_job_missing_file_and_errors(tmp_path, capsys):
    cfg = _job(tmp_path, teacher={"pool": {"num_cpus": 1}}, distill={"variants": ["kl"]})
    (tmp_path / "t.jsonl").unlink()
    p = make_plan(cfg)
    st = {s.name: s for s in p.stages}
    assert st["teacher"].device == "cpu" and st["teacher"].rows is None
    assert all(s.device == "cpu" for s in p.stages)
    assert "plan.gpu" not in p.mlflow_params()  # no GPU type on a CPU run
    assert "plan.gpu" in make_plan(_job(tmp_path)).mlflow_params()
    assert any("is not on this machine" in n for n in p.notes)
    with pytest.raises(PlanError, match="unknown GPU type 'v100'"):
        make_plan(cfg, gpu="v100")
    with pytest.raises(PlanError, match="no plan for method 'nope' yet"):
        make_plan(types.SimpleNamespace(method="nope"))
    assert model_params("hf:some/Model-13B-chat", load_table())[0] == 13e9
    assert model_params("hf:org/thing", load_table())[1] == "unknown size, assumed 7e9"


def test_plan_cli(tmp_path, capsys):
    _job(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(f"method: simda\ndata: {{root: '{tmp_path}', source: {{path: s.jsonl}}, "
                   "target: {path: t.jsonl}}\n")
    assert main(["plan", str(job), "distill.variants=[kl]", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in out["stages"]][-1] == "student-kl" and out["cpu_hours"] > 0
    assert main(["plan", str(job), "annotate.kk=1"]) == 2
    assert "annotate.kk: unknown key" in capsys.readouterr().err


def test_plan_dallmi_and_ntk_select_jobs(data_dir):
    from raydapt.config import load_job

    cfg = load_job("jobs/ntk_select/medical-smollm.cpu.yaml")
    p = make_plan(cfg)
    st = {s.name: s for s in p.stages}
    n_d = sum(t.domain_rows for t in cfg.data.tasks)
    n_sel = cfg.select.n or round(cfg.select.n_factor * n_d)
    pool = min(sum(count_rows(data_dir / x) for x in cfg.data.pool), cfg.data.max_pool_rows)
    m = min(pool, round(cfg.select.m_factor * n_sel))
    assert st["grad"].rows == m + n_d and st["embed"].rows == pool + n_d
    assert st["finetune-ntk"].rows == n_d + n_sel
    assert {f"finetune-{x}" for x in cfg.select.selectors} <= set(st)
    d = make_plan(load_job("jobs/dallmi/pubmed-male-to-female.cpu.yaml"))
    names = [s.name for s in d.stages]
    assert names[:2] == ["read", "source"] and "adapt-dallmi" in names
    assert all(s.rows is not None and s.rows > 0 for s in d.stages)


@pytest.mark.parametrize("chat", [True, False])
def test_plan_offline_hub_teacher_falls_back_at_once(tmp_path, monkeypatch, chat):
    """HF_HUB_OFFLINE: a hub teacher's tokenizer comes only from the local cache (not there:
    the characters / 4 fallback, no hub retries); the fallback prompt keeps the answer cue on
    its own line under a schematic chat turn, and does not claim a chat template."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _job(tmp_path, teacher={
        "model": "hf:raydapt-test/no-such-model", "chat": chat, "answer_prefix": "The sentiment is",
        "template": "Review: {text}\nIs the sentiment of this review positive or negative? "
                    "Answer with one word."})
    p = make_plan(cfg)
    assert any("hub offline (HF_HUB_OFFLINE is set)" in n for n in p.notes)
    assert any("tokens estimated as characters / 4" in n for n in p.notes)
    assert "chat template included" not in p.render()
    if chat:
        assert p.prompt.startswith("[user]\nReview: review number 0")
        assert p.prompt.endswith("Answer with one word.\n[assistant]\nThe sentiment is")
        assert "schematically" in p.prompt_header
    else:
        assert p.prompt.endswith("Answer with one word.The sentiment is")  # what the model sees
        assert "teacher.chat is false" in p.prompt_header


def test_plan_counts_steps_by_the_loops_rule_and_says_when_none_would_run(tmp_path):
    """plan's step counts are the training loops' (raydapt.train.plan_steps): a student whose
    rows per worker do not fill one batch is said to take no step (the fit would fail), not
    given 'rows x epochs' examples."""
    cfg = _job(tmp_path, distill={"variants": ["kl"], "epochs": 2, "num_workers": 4,
                                  "batch_size": 32, "steps": 10})
    kl = {s.name: s for s in make_plan(cfg, gpu="a100").stages}["student-kl"]
    assert "step-matched: 10 steps" not in kl.note  # 20 rows / 4 workers < a batch of 8
    assert "no optimiser step would run" in kl.note and kl.hours is None
    ok = _job(tmp_path, distill={"variants": ["kl", "source_only_all"], "epochs": 2,
                                 "num_workers": 2, "batch_size": 4, "steps": 7})
    st = {s.name: s for s in make_plan(ok, gpu="a100").stages}
    # distill.steps wins: 7 steps of 2 x 2 rows; 20 rows -> 10 per worker, 5 steps per epoch
    assert "step-matched: 7 steps (2 epochs of 5) x 4 rows = 28 examples" in st["student-kl"].note
    # source_only_all: `epochs` passes over the 30 source rows: 15 per worker, 7 per epoch
    assert "14 steps (2 epochs of 7) x 4 rows = 56 examples" in st["student-source_only_all"].note
