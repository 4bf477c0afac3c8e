"""Finetuning on a weighted mixture of a manifest and a WebDataset shard set, on the session's Ray: every
epoch draws from both in proportion, MLflow shows the clips per source, and the run ends at the planned
step."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import config as config_lib
from pipeline.data import shards
from pipeline.train.finetune import FinetuneConfig, run_finetune

pytestmark = pytest.mark.integration


def pack_split(sample_videos: Path, split: str, out: Path) -> None:
    """The split's videos as shards of 4 (keys and labels from its manifest), with their index."""
    rows = [line.split() for line in (sample_videos / f"{split}.csv").read_text().splitlines()]
    index = []
    for first in range(0, len(rows), 4):
        writer = shards.ShardWriter(str(out), None, prefix=split, first=first // 4)
        for i, (path, label) in enumerate(rows[first : first + 4], first):
            meta = {"label": int(label), "split": split, "path": path}
            writer.add(f"{split}{i:03d}", (sample_videos / path).read_bytes(), "mp4", meta)
        index += writer.close()
    shards.write_index(index, str(out / shards.INDEX))


def test_finetuning_on_a_weighted_mixture_of_a_manifest_and_shards(ray_session, sample_videos, tmp_path):
    pack_split(sample_videos, "test", tmp_path / "shards")  # the test split's videos, relabelled as train
    mix = ("[{uri: " + str(sample_videos / "train.csv") + ", weight: 1, name: manifest}, "
           "{uri: " + str(tmp_path / "shards") + ", weight: 3, name: shards, split: test}]")
    cfg = config_lib.load(FinetuneConfig, overrides=[
        "run_name=mixture", f"storage_path={tmp_path / 'runs'}", "init_from=", "model.preset=tiny",
        f"data.sources={mix}", f"data.label_map={sample_videos / 'labels.json'}", "data.epoch_videos=16",
        "data.sampling_rate=2", "data.decode_isolation=inline", "data.hflip=false", "val_split=",
        "train.batch_size=4", "train.max_steps=8", "train.log_every_steps=4", "checkpoint.every_steps=4",
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "mixup.prob=0",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}", "tracking.system_metrics=false",
    ])
    result = run_finetune(cfg)
    assert result.final_step == 8

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    by_source = {name: sum(m.value for m in client.get_metric_history(run.info.run_id, f"data/clips/{name}"))
                 for name in ("manifest", "shards")}
    # 8 steps x 4 clips = 2 epochs of 16 videos, one clip each: 4 + 12 per epoch (weights 1 : 3)
    assert by_source == {"manifest": 8, "shards": 24}
    assert run.data.params["data.num_videos"] == "16"
