"""Job config loading: overrides, env expansion, clear errors, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydapt.cli import main
from raydapt.config import ConfigError, apply_overrides, config_hash, load_job

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(p for p in (REPO / "jobs").rglob("*.yaml")
              if not p.name.endswith(".sweep.yaml"))  # sweep files: tests/unit/test_sweep.py


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_job_yaml_loads_and_starts_with_a_comment(job):
    text = job.read_text()
    assert text.startswith("#"), f"{job} must start with a comment: command, result, cost"
    assert "raydapt " in text.splitlines()[0]
    load_job(job)


def test_overrides_are_typed(tmp_path):
    cfg = load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml",
                   ["distill.epochs=5", "annotate.lam=0.25", "distill.variants=[kl]",
                    "teacher.pool.concurrency=[1, 4]"])
    assert cfg.distill.epochs == 5 and cfg.annotate.lam == 0.25
    assert cfg.distill.variants == ["kl"] and cfg.teacher.pool.concurrency == (1, 4)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml", ["distill.epoch=2"])
    msg = str(e.value)
    assert "distill.epoch: unknown key" in msg and "epochs" in msg


def test_wrong_type_and_literal_name_allowed_values():
    with pytest.raises(ConfigError, match=r"annotate\.index: .*'flat', 'ivf' or 'hnsw'"):
        load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml", ["annotate.index=foo"])
    with pytest.raises(ConfigError, match=r"distill\.epochs"):
        load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml", ["distill.epochs=many"])
    with pytest.raises(ConfigError, match="verbalizer"):
        load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml", ["data.labels=[a, b]"])


def test_select_on_dev_needs_a_dev_file_and_excludes_select_on_source():
    job = REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml"
    with pytest.raises(ConfigError, match=r"select_on_dev needs data\.dev"):
        load_job(job, ["annotate.select_on_source=false", "annotate.select_on_dev=true"])
    with pytest.raises(ConfigError, match="both true: choose one"):
        load_job(job, ["annotate.select_on_source=true", "annotate.select_on_dev=true",
                       "data.dev.path=dvd.jsonl"])
    cfg = load_job(job, ["annotate.select_on_source=false", "annotate.select_on_dev=true",
                         "data.dev.path=dvd.jsonl", "data.max_dev_rows=300"])
    assert cfg.data.dev.path == "dvd.jsonl" and cfg.data.max_dev_rows == 300
    # the dev file is checked before the first stage, like source and target
    _, data = cfg.inputs()
    assert [d.key for d in data][-1] == "data.dev.path"
    off = load_job(job, ["data.dev.path=dvd.jsonl"])  # named but not used: not an input
    assert "data.dev.path" not in [d.key for d in off.inputs()[1]]


def test_bad_override_forms():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_env_expansion(monkeypatch, tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("method: simda\ndata: {root: '${MY_ROOT:-/default}/x'}\n")
    assert load_job(job).data.root == "/default/x"
    monkeypatch.setenv("MY_ROOT", "/elsewhere")
    assert load_job(job).data.root == "/elsewhere/x"
    job.write_text("method: simda\ndata: {root: '${NOT_SET_ANYWHERE}'}\n")
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        load_job(job)


def test_missing_file_and_unknown_method(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")
    j = tmp_path / "j.yaml"
    j.write_text("method: magic\n")
    with pytest.raises(ConfigError, match="method: must be one of"):
        load_job(j)


def test_config_hash_is_stable_and_sensitive():
    a = load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml")
    b = load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml")
    c = load_job(REPO / "jobs/simda/amazon-books-to-kitchen.cpu.yaml", ["annotate.k=8"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_cli_schema_and_clean_error(capsys, tmp_path):
    assert main(["config", "schema", "--method", "simda"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "annotate" in schema["properties"]
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raydapt: error: job file not found") and "Traceback" not in err


def test_relative_tracking_uris_become_absolute(tmp_path, monkeypatch):
    from raydapt.core.tracking import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlruns.db") == f"sqlite:///{tmp_path}/mlruns.db"
    assert absolute_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_tracking_uri("http://host:5000") == "http://host:5000"
    assert absolute_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()


def test_job_file_messages_say_what_is_wrong(tmp_path, capsys):
    """Issue 28: an empty YAML said `method: must be one of [...] (got None)`; a directory and a
    symlink loop both said "not found"; `raydapt run` with no job called overrides required."""
    from raydapt.cli import main

    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing.yaml")
    cases = {"empty.yaml": "empty.yaml is empty: a job file names its method (dallmi, "
                           "ntk_select, simda) and its data",
             ".": "is a directory, not a job file",
             "a.yaml": "a.yaml is a symlink loop",
             "gone.yaml": f"gone.yaml is a symlink to a missing target ({tmp_path}/missing.yaml)"}
    for name, want in cases.items():
        assert main(["run", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("raydapt: error:") and want in err, (name, err)
        assert "not found" not in err
    # an empty file plus overrides is a job built on the command line
    assert main(["config", "show", str(tmp_path / "empty.yaml"), "method=simda"]) == 0
    assert capsys.readouterr().out.startswith("method: simda")
    with pytest.raises(SystemExit):
        main(["run"])
    err = capsys.readouterr().err
    assert "the following arguments are required: job" in err and "overrides" not in \
        err.splitlines()[-1]


def test_plan_without_data_says_unknown_not_zero(tmp_path):
    """Issue 28: `plan` with absent data printed 0.000 GPU-hours."""
    from raydapt.ops.plan import make_plan

    cfg = load_job(REPO / "jobs/simda/amazon-mistral7b.gpu.yaml", [f"data.root={tmp_path}"])
    text = make_plan(cfg).render()
    (total,) = [ln for ln in text.splitlines() if ln.startswith("total:")]
    assert total.startswith("total: GPU-hours unknown (>= "), total
    assert "teacher" in total and "0.000 GPU-hours" not in total
