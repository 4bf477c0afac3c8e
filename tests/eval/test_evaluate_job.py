"""The evaluation job end to end on real videos, real Ray (actors) and a real local MLflow store.

Learning is asserted in test_learning.py; here an untrained classifier checks the plumbing: every
video scored on every view, report, predictions and picture consistent, bad input refused at start.
"""

import io
import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import config as config_lib
from pipeline.data.labels import LabelError
from pipeline.eval.evaluate import EvalConfig, run_evaluate
from pipeline.models.videomae import (
    CheckpointError,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
)


def _names(root) -> dict[int, str]:
    return {i: n for n, i in json.loads((root / "labels.json").read_text()).items()}


def _classifier_dir(path, id2label, **kw):
    torch.manual_seed(0)
    config = VideoMAEConfig.from_preset("tiny", id2label=id2label, **kw)
    VideoMAEForVideoClassification(config).save_pretrained(path)
    return path


def _cfg(tmp_path, model_uri, data_uri, *more):
    return config_lib.load(
        EvalConfig,
        overrides=[
            f"model_uri={model_uri}",
            f"data.uri={data_uri}",
            "data.sampling_rate=2",
            "data.eval_num_clips=2",
            "data.eval_num_crops=3",
            f"storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.system_metrics=false",
            "inference.batch_size=8",
            *more,
        ],
    )


@pytest.mark.integration
def test_evaluate_scores_every_view_and_writes_consistent_outputs(ray_session, sample_videos, tmp_path):
    names = _names(sample_videos)
    model = _classifier_dir(tmp_path / "model", names)
    result = run_evaluate(_cfg(tmp_path, model, sample_videos))
    report = result.report
    test_videos = len((sample_videos / "test.csv").read_text().splitlines())
    assert report.num_videos == test_videos and report.views_per_video == 6
    assert report.confusion.sum() == test_videos
    out = tmp_path / "runs" / "evaluate-demo"
    table = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(table) == test_videos
    assert all(r["num_views"] == 6 and len(r["top5_classes"]) == 5 for r in table)
    assert all(r["label_name"] == names[r["label"]] for r in table)
    assert sum(r["correct"] for r in table) / len(table) == pytest.approx(report.top1)
    assert all(abs(sum(r["top5_scores"]) - 1) < 1 or len(names) > 5 for r in table)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(report.top1) and metrics["gaps"] == []
    assert Image.open(io.BytesIO((out / "confusion_matrix.png").read_bytes())).format == "PNG"
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["top1"] == pytest.approx(report.top1) and run.info.status == "FINISHED"
    logged = {f.path for f in client.list_artifacts(result.mlflow_run_id, "evaluation")}
    assert "evaluation/predictions.parquet" in logged and "evaluation/confusion_matrix.png" in logged


@pytest.mark.integration
def test_evaluate_reports_a_class_without_examples_and_unreadable_videos(
    ray_session, sample_videos, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(sample_videos, data)
    lines = (data / "test.csv").read_text().splitlines()
    kept = [ln for ln in lines if not ln.endswith(" 7")]  # class 7 gets no test example
    broken = data / "videos" / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    (data / "test.csv").write_text("\n".join([*kept, "videos/broken.mp4 0"]) + "\n")
    model = _classifier_dir(tmp_path / "model", _names(data))
    report = run_evaluate(
        _cfg(tmp_path, model, data, "data.eval_num_clips=1", "data.eval_num_crops=1")
    ).report
    assert report.num_videos == len(kept)
    gaps = " | ".join(report.gaps)
    assert "no examples: " + _names(data)[7] in gaps
    assert "1 of " in gaps and "produced no view" in gaps and "could not be read" in gaps


def test_evaluate_refuses_bad_input_before_starting(sample_videos, tmp_path):
    names = _names(sample_videos)
    # a pretraining checkpoint has no trained classifier
    VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny")).save_pretrained(tmp_path / "pre")
    with pytest.raises(CheckpointError, match="not a finetuned VideoMAEForVideoClassification"):
        run_evaluate(_cfg(tmp_path, tmp_path / "pre", sample_videos))
    # a classifier for fewer classes than the data has: labels not in the label map
    few = _classifier_dir(tmp_path / "few", {0: names[0], 1: names[1]})
    with pytest.raises(LabelError, match="label map and the model's id2label differ"):
        run_evaluate(_cfg(tmp_path, few, sample_videos))
    (tmp_path / "lm.txt").write_text(f"0 {names[0]}\n1 {names[1]}\n")
    with pytest.raises(LabelError, match="labels not in the label map of 2 classes"):
        run_evaluate(_cfg(tmp_path, few, sample_videos / "test.csv", f"data.label_map={tmp_path / 'lm.txt'}"))
    # nothing there / not a model
    with pytest.raises(CheckpointError, match="not found"):
        run_evaluate(_cfg(tmp_path, tmp_path / "missing", sample_videos))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a model"):
        run_evaluate(_cfg(tmp_path, tmp_path / "junk", sample_videos))
    # an empty split
    empty = tmp_path / "empty"
    shutil.copytree(sample_videos, empty, ignore=shutil.ignore_patterns("*.mp4"))
    (empty / "test.csv").write_text("")
    model = _classifier_dir(tmp_path / "model", names)
    with pytest.raises(LabelError, match="test split"):
        run_evaluate(_cfg(tmp_path, model, empty))
