"""A reduced chain pretrain -> finetune -> evaluate on real videos, Ray and MLflow (pretraining on the
train split packed as WebDataset shards, the later stages on the folder); then a rerun that skips the
finished stages and redoes only the unfinished one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from train.test_mixture import pack_split

from pipeline import config as config_lib
from pipeline.chain import PipelineConfig, as_overrides, run_pipeline
from pipeline.config import ConfigError

pytestmark = pytest.mark.integration


def _cfg(tmp_path, data, *more):
    sets = [
        "run_name=chain-test",
        f"storage_path={tmp_path / 'runs'}",
        f"data_uri={data}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment=chain-test",
        # tiny stages: a few steps each, 2 workers, clips at 4 frames x 32 px
        "pretrain.train.max_steps=4",
        "pretrain.train.batch_size=4",
        "pretrain.train.global_batch_size=null",  # a step of one micro-batch, not the demo's 32 clips
        "pretrain.data.sampling_rate=2",
        "pretrain.checkpoint.every_steps=4",
        "pretrain.tracking.system_metrics=false",
        "pretrain.probe.every_steps=0",
        "pretrain.scaling.num_workers=1",  # the chain's mechanics, not DDP (tested in tests/train/)
        "finetune.scaling.num_workers=1",  # the demo's kNN monitor would embed its own 520 videos twice
        "finetune.train.epochs=3",
        "finetune.train.batch_size=4",
        "finetune.train.global_batch_size=null",
        "finetune.data.sampling_rate=2",
        "finetune.data.clips_per_video=2",
        "finetune.data.rand_augment=rand-m7-n4-mstd0.5-inc1",  # the ViT-B recipe's regularisers run too
        "finetune.data.random_erasing=0.25",
        "finetune.optim.warmup_epochs=1",
        "finetune.train.log_every_steps=2",
        "finetune.tracking.system_metrics=false",
        "evaluate.data.sampling_rate=2",
        "evaluate.data.eval_num_clips=2",
        "evaluate.data.eval_num_crops=1",
        "evaluate.data.decode_isolation=inline",
        *more,
    ]
    return config_lib.load(PipelineConfig, "chain_tiny_demo", sets)


def test_chain_runs_all_stages_then_skips_them_and_resumes_the_unfinished_one(
    ray_session, sample_videos, tmp_path
):
    pack_split(sample_videos, "train", tmp_path / "shards")
    on_shards = f"pretrain.data.uri={tmp_path / 'shards'}"
    result = run_pipeline(_cfg(tmp_path, sample_videos, on_shards))
    chain = tmp_path / "runs" / "chain-test"
    record = json.loads((chain / "stages.json").read_text())
    assert [s for s in record if record[s]["status"] == "done"] == ["pretrain", "finetune", "evaluate"]
    # the URIs were passed along: finetune started from pretraining's export, evaluate scored finetune's
    assert record["pretrain"]["export_uri"] == str(chain / "chain-test-pretrain" / "export")
    assert record["finetune"]["export_uri"] == str(chain / "chain-test-finetune" / "export")
    ft_config = json.loads((chain / "chain-test-finetune" / "export" / "config.json").read_text())
    assert (
        ft_config["architectures"] == ["VideoMAEForVideoClassification"] and len(ft_config["id2label"]) == 8
    )
    assert (
        0.0 <= record["evaluate"]["top1"] <= 1.0 and (chain / "chain-test-evaluate" / "metrics.json").exists()
    )

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert {parent.data.tags[f"pipeline.stage.{s}"] for s in ("pretrain", "finetune", "evaluate")} == {"done"}
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'"
    )
    assert sorted(c.data.tags["pipeline.job"] for c in children) == ["evaluate", "finetune", "pretrain"]
    pretrain = next(c for c in children if c.data.tags["pipeline.job"] == "pretrain")
    assert pretrain.data.params["data.uri"] == str(tmp_path / "shards")  # the shard set, all 8 train videos
    assert pretrain.data.params["data.num_videos"] == "8"
    finetune = next(c for c in children if c.data.tags["pipeline.job"] == "finetune")
    assert "val/top1" in finetune.data.metrics and "loss" in finetune.data.metrics
    losses = [m.value for m in client.get_metric_history(finetune.info.run_id, "loss")]
    assert len(losses) >= 2

    # rerun: everything finished is skipped
    again = run_pipeline(_cfg(tmp_path, sample_videos, on_shards))
    assert (
        again.skipped == ["pretrain", "finetune", "evaluate"] and again.mlflow_run_id == result.mlflow_run_id
    )

    # the evaluate stage "did not finish": only it runs again, with finetune's recorded export
    del record["evaluate"]
    (chain / "stages.json").write_text(json.dumps(record))
    third = run_pipeline(_cfg(tmp_path, sample_videos, on_shards, "evaluate.data.eval_num_clips=1"))
    assert third.skipped == ["pretrain", "finetune"] and "evaluate" in third.outputs
    assert third.mlflow_run_id == result.mlflow_run_id


def test_stage_overrides_are_checked_before_anything_runs(tmp_path, sample_videos):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        run_pipeline(_cfg(tmp_path, sample_videos, "finetune.optim.lrr=1"))
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ConfigError, match="stages must keep the order"):
        _cfg(tmp_path, sample_videos, "stages=[evaluate,pretrain]")


def test_nested_overrides_become_dotted_strings():
    assert as_overrides({"train": {"epochs": 3}, "stages": ["a"], "x": True}) == [
        "train.epochs=3",
        'stages=["a"]',
        "x=true",
    ]


def test_the_job_script_runs_from_any_folder(tmp_path, sample_videos):
    """Ray's workers get the driver's sys.path, whose first entry is jobs/: started outside the repo, a job
    must still import the package in its Ray tasks (it failed once, when jobs/pipeline.py shadowed it).
    The probe of a random init is the lightest job whose decode tasks import it. The chain's old name
    still answers."""
    jobs = Path(__file__).resolve().parent.parent / "jobs"
    sets = ["run_name=any-folder", "model_uri=", "model.preset=tiny", f"data.uri={sample_videos}",
            "data.sampling_rate=4", "data.decode_isolation=inline", "linear=false", "storage_path=runs",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false"]
    args = [sys.executable, str(jobs / "probe.py"), *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "any-folder" / "probe.json").read_text())
    assert record["num_test"] == 8  # every test video decoded in the Ray tasks
    old_name = subprocess.run([sys.executable, str(jobs / "pipeline.py"), "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert old_name.returncode == 0 and "usage: pipeline" in old_name.stdout
    assert "jobs/pipeline.py is now jobs/chain.py" in old_name.stderr
