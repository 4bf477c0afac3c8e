"""The object store goes away mid-run: pretraining reads its videos from S3 and writes its checkpoints
there; the S3 endpoint goes away for longer than a video's decode time limit and comes back with its
objects. The outage starts in the first epoch (12 steps, a few seconds) and lasts past its end, so the
second epoch's video reads, and the checkpoint uploads, meet it. The run finishes at its planned step, no
video is blamed for the outage, no checkpoint is lost.
"""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest
from helpers.runs import pretrain_in_thread, tiny_config
from mlflow.tracking import MlflowClient

from pipeline import storage
from pipeline.train import checkpointing

pytestmark = pytest.mark.integration

OUTAGE_S = 20.0


def test_a_storage_outage_is_waited_out_without_bad_videos_or_lost_checkpoints(
    ray_session, s3_server, s3_bucket, sample_videos, tmp_path
):
    for path in sorted((sample_videos / "videos").rglob("*.mp4")):
        storage.upload_file(str(path), f"{s3_bucket}/videos/{path.parent.name}/{path.name}")
    sets = {"run_name": "outage", "storage_path": f"{s3_bucket}/runs", "data.decode_isolation": "process",
            "data.decode_timeout_s": "5", "train.max_steps": "30", "checkpoint.every_steps": "15",
            "checkpoint.keep_last": "20", "data.max_error_fraction": "0.05", "scaling.num_workers": "1"}
    cfg = tiny_config(tmp_path, f"{s3_bucket}/videos", **sets)

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)

    def checkpoints() -> set[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/outage/").get("Contents", [])
        return {o["Key"].split("/")[2] for o in listed if o["Key"].endswith(checkpointing.MANIFEST)}

    mlflow = MlflowClient(cfg.tracking.tracking_uri)

    def steps_logged() -> int:
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        history = [m for r in runs for m in mlflow.get_metric_history(r.info.run_id, "loss")]
        return max((m.step for m in history), default=0)

    thread, outcome = pretrain_in_thread(cfg)
    deadline = time.monotonic() + 300
    while thread.is_alive() and steps_logged() < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert thread.is_alive(), outcome.get("error") or "the run ended before the outage"
    before = checkpoints()
    s3_server.stop()  # the outage: every read, listing and upload now fails to connect
    time.sleep(OUTAGE_S)
    s3_server.start()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after storage came back"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]

    assert result.final_step == 30
    report = storage.read_text(result.error_report_uri)
    assert report == "", f"videos were blamed for the outage: {report[:500]}"
    after = checkpoints()
    assert before <= after and after >= {"checkpoint_00000015", "checkpoint_00000030"}
    with checkpointing.fetched(f"{s3_bucket}/runs/outage/checkpoint_00000030") as directory:
        assert checkpointing.torn_reason(Path(directory)) is None
