"""MLflow runs: one per job, reopened by run name, parent/child, params/metrics/artifacts, system metrics.
Against a local SQLite store and a real ``mlflow server``."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


def _exercise(uri: str, tmp_path) -> None:
    run = tracking.start_run("job-a", "exp-tracking", uri, job="pretrain")
    assert not run.resumed
    run.log_params({"optim.lr": 0.001, "data.uri": "s3://user:secret@bucket/x", "none": None})
    run.log_metrics({"loss": 1.5, "lr": 1e-3}, step=1)
    run.log_metrics({"loss": 1.2}, step=2)
    (tmp_path / "report.jsonl").write_text('{"uri": "a", "reason": "empty"}\n')
    run.log_artifact(tmp_path / "report.jsonl", "data")
    run.log_text("run_name: job-a\n", "config/resolved_config.yaml")
    run.end("FAILED")

    again = tracking.start_run("job-a", "exp-tracking", uri, job="pretrain")  # the same job, rerun
    assert again.resumed and again.run_id == run.run_id
    again.log_params({"optim.lr": 0.001, "new.param": 3})  # existing params are skipped, not an error
    again.log_metrics({"loss": 1.0}, step=3)
    child = tracking.start_run("stage", "exp-tracking", uri, parent_run_id=run.run_id)
    assert child.run_id != run.run_id
    again.end()

    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["optim.lr"] == "0.001" and got.data.params["new.param"] == "3"
    assert "secret" not in got.data.params["data.uri"]
    assert got.data.tags[tracking.RUN_NAME_TAG] == "job-a" and got.data.tags[tracking.JOB_TAG] == "pretrain"
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [1.5, 1.2, 1.0]
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"config", "data"}
    assert client.get_run(child.run_id).data.tags[tracking.PARENT_TAG] == run.run_id
    other = tracking.start_run("job-a", "exp-tracking", uri, resume=False)
    assert other.run_id != run.run_id


def test_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.default_tracking_uri(tmp_path / "runs")
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    _exercise(uri, tmp_path)
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # artifacts beside the database, not in the cwd
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.default_tracking_uri(tmp_path) == "http://example:5000"


@pytest.mark.integration
def test_mlflow_server(mlflow_server, tmp_path):
    _exercise(mlflow_server, tmp_path)


@pytest.mark.integration
def test_system_metrics_from_a_worker_style_logger(mlflow_server):
    run = tracking.start_run("sysmetrics", "exp-tracking", mlflow_server)
    logger = tracking.RunLogger(run, system_metrics=True, sampling_interval=0.5)
    try:
        logger.log_metrics({"loss": 0.5}, step=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = MlflowClient(mlflow_server).get_run(run.run_id).data.metrics
            if any(k.startswith("system/cpu") for k in metrics):
                break
            time.sleep(0.5)
    finally:
        logger.close()
    assert any(k.startswith("system/cpu") for k in metrics), metrics
    assert metrics["loss"] == 0.5


def test_job_run_closes_the_run_finished_killed_or_failed(tmp_path, capsys):
    section = tracking.TrackingSection(tracking_uri=f"sqlite:///{tmp_path / 'ml.db'}", experiment="jobs")
    client = MlflowClient(section.tracking_uri)
    with tracking.job_run("ok", section, str(tmp_path), "probe") as run:
        run.log_metrics({"x": 1.0}, 0)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    with pytest.raises(KeyboardInterrupt), tracking.job_run("stopped", section, str(tmp_path), "probe",
                                                            interrupted_hint="rerun to resume") as run:
        raise KeyboardInterrupt
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert "interrupted: rerun to resume" in capsys.readouterr().out
    with pytest.raises(ValueError), tracking.job_run("broken", section, str(tmp_path), "probe") as run:
        raise ValueError("bad input")
    assert client.get_run(run.run_id).info.status == "FAILED"
    with tracking.job_run("stopped", section, str(tmp_path), "probe") as again:  # a rerun reopens by name
        pass
    assert again.run_id != run.run_id and client.get_run(again.run_id).info.status == "FINISHED"
    # without a tracking URI: a SQLite store under the local storage folder; "runs" when that is in S3
    default = tracking.TrackingSection()
    assert default.resolved_uri(str(tmp_path / "store")) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
