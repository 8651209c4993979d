"""What a user sees in MLflow: experiment kind and description, results table and chart on the
parent run, child-run tags, standard run metadata and datasets. Real sqlite stores, tiny runs."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from raydapt.core.tracking import Tracker


def _tracker(tmp_path, experiment: str = "ui") -> Tracker:
    return Tracker(enabled=True, uri=f"sqlite:///{tmp_path}/m.db", experiment=experiment,
                   artifact_location=str(tmp_path / "art"))


def test_experiment_is_model_development_with_a_description(tmp_path):
    tr = _tracker(tmp_path)
    with tr.job("j1"):
        pass
    exp = MlflowClient(tracking_uri=tr.uri).get_experiment_by_name("ui")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "raydapt" in exp.tags["mlflow.note.content"]

    # an experiment made before (no kind) gets the kind on the next job
    cl = MlflowClient(tracking_uri=tr.uri)
    cl.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    tr2 = _tracker(tmp_path, "old")
    with tr2.job("j2"):
        pass
    assert cl.get_experiment_by_name("old").tags["mlflow.experimentKind"] == \
        "custom_model_development"
