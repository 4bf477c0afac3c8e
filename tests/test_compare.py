"""Comparison of MLflow runs against a real local SQLite store and a real ``mlflow server``."""

import importlib.util
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import tracking
from pipeline.compare import CompareError, compare

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compare_job", REPO / "jobs" / "compare.py")
compare_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_job)


def _make_runs(uri: str, experiment: str) -> list[str]:
    """Two finetunes differing in lr, one pretrain; metrics logged over steps."""
    ids = []
    for name, lr, job, slope in (
        ("ft-a", 1e-3, "finetune", 0.1),
        ("ft-b", 5e-4, "finetune", 0.05),
        ("pre", 1e-3, "pretrain", 0.02),
    ):
        run = tracking.start_run(name, experiment, uri, job=job, resume=False)
        run.log_params({"optim.lr": lr, "model.depth": 2, "data.frames": 4})
        for step in range(5):
            run.log_metrics({"train/loss": 2.0 - slope * step, "lr": lr}, step)
        if job == "finetune":
            run.log_metrics({"val/top1": 0.5 + slope}, 4)
        else:  # the pretraining's frozen-feature kNN monitor
            run.log_metrics({"probe/knn_top1": 0.25}, 0)
            run.log_metrics({"probe/knn_top1": 0.5}, 4)
        run.end("FINISHED")
        ids.append(run.run_id)
    return ids


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds): its URI and the three run ids."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, _make_runs(uri, "exp")


def test_compare_by_ids_in_local_store(local_store, tmp_path):
    uri, (a, b, _) = local_store
    comparison, logged = compare([a, b], tracking_uri=uri, out_png=str(tmp_path / "c.png"))
    table = comparison.table()
    assert "optim.lr" in table and "model.depth" not in table  # identical params are not listed
    assert "2 identical" in table
    assert "val/top1" in table and "0.6" in table and "0.55" in table
    assert set(comparison.curves) == {"train/loss", "val/top1"}  # lr is not a loss/accuracy curve
    last_points = [p[-1] for p in comparison.curves["train/loss"]]
    assert last_points == [(4, pytest.approx(1.6)), (4, pytest.approx(1.8))]
    image = Image.open(tmp_path / "c.png")
    assert image.format == "PNG"
    client = MlflowClient(uri)
    artifacts = {f.path for f in client.list_artifacts(logged, "comparison")}
    assert artifacts == {"comparison/table.txt", "comparison/comparison.json", "comparison/curves.png"}
    assert client.get_run(logged).data.tags["pipeline.compared_runs"] == f"{a},{b}"


def test_compare_by_experiment_and_tag_skips_earlier_comparisons(local_store):
    uri, (a, b, pre) = local_store
    compare([a, b], tracking_uri=uri, out_png=None, log_experiment="exp")  # a comparison run inside "exp"
    everything, _ = compare(experiments=["exp"], tracking_uri=uri, out_png=None, log_experiment=None)
    assert {r.info.run_id for r in everything.runs} == {a, b, pre}
    finetunes, _ = compare(
        tags={tracking.JOB_TAG: "finetune"}, tracking_uri=uri, out_png=None, log_experiment=None
    )
    assert {r.info.run_id for r in finetunes.runs} == {a, b}
    assert everything.final_metrics["val/top1"][2] is None  # the pretrain run has no accuracy: shown as "-"


def test_the_pretraining_probe_curve_is_drawn_beside_the_loss(local_store, tmp_path):
    uri, (a, _, pre) = local_store
    comparison, _ = compare([a, pre], tracking_uri=uri, out_png=str(tmp_path / "c.png"), log_experiment=None)
    assert {"train/loss", "probe/knn_top1"} <= set(comparison.curves)
    assert comparison.curves["probe/knn_top1"][1] == [(0, 0.25), (4, 0.5)]
    assert comparison.final_metrics["probe/knn_top1"] == [None, 0.5]


def test_compare_errors_name_what_was_asked(local_store):
    uri, (a, b, _) = local_store
    with pytest.raises(CompareError, match="no MLflow experiment named 'nope'; known: .*exp"):
        compare(experiments=["nope"], tracking_uri=uri, out_png=None, log_experiment=None)
    with pytest.raises(CompareError, match="no MLflow run with id 'deadbeef'"):
        compare(["deadbeef"], tracking_uri=uri, out_png=None, log_experiment=None)
    with pytest.raises(CompareError, match="no runs match"):
        compare(tags={"pipeline.job": "evaluate"}, tracking_uri=uri, out_png=None, log_experiment=None)
    with pytest.raises(CompareError, match=r"\['val/top9'\] were not logged"):
        compare([a, b], metrics=["val/top9"], tracking_uri=uri, out_png=None, log_experiment=None)


@pytest.mark.integration
def test_compare_job_against_mlflow_server(mlflow_server, tmp_path, capsys):
    a, b, _ = _make_runs(mlflow_server, "compare-server")
    out = tmp_path / "curves.png"
    assert (
        compare_job.main([a, b, "--tracking-uri", mlflow_server, "--out", str(out), "--metric", "train/loss"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "optim.lr" in printed and "logged to MLflow run" in printed
    assert Image.open(io.BytesIO(out.read_bytes())).size[0] > 300
    logged = printed.strip().splitlines()[-1].split()[4]
    client = MlflowClient(mlflow_server)
    assert "comparison/curves.png" in {f.path for f in client.list_artifacts(logged, "comparison")}
    assert compare_job.main(["--experiment", "missing", "--tracking-uri", mlflow_server]) == 2
    assert "no MLflow experiment named 'missing'" in capsys.readouterr().err
