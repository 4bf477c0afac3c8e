"""Finetuning: bad input fails at start (no Ray); runs on Ray Train are in test_pipeline_job.py (resume)
and test_learning.py (it learns)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import config as config_lib
from pipeline.data.labels import LabelError
from pipeline.models.videomae import (
    CheckpointError,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
)
from pipeline.train.finetune import FinetuneConfig, check_finetune_inputs


def _cfg(tmp_path: Path, data: Path, *more: str):
    return config_lib.load(
        FinetuneConfig,
        overrides=[
            f"storage_path={tmp_path / 'runs'}",
            f"data.uri={data}",
            "data.sampling_rate=2",
            "data.decode_isolation=inline",
            "data.hflip=false",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}",
            "tracking.system_metrics=false",
            *more,
        ]
    )


@pytest.fixture()
def data(ray_session, sample_videos, tmp_path) -> Path:
    """A copy of the sample dataset; the session's Ray (the training split is read on the cluster)."""
    copy = tmp_path / "data"
    shutil.copytree(sample_videos, copy)
    return copy


def test_prepare_takes_the_checkpoints_architecture_and_labels(data, tmp_path):
    VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny", num_frames=8)).save_pretrained(tmp_path / "pre")
    p = check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'pre'}", "model.preset=vit-s"))
    names = {i: n for n, i in json.loads((data / "labels.json").read_text()).items()}
    assert p.id2label == names
    assert p.model_config["hidden_size"] == 64 and p.cfg.data.num_frames == 8  # the checkpoint's, not vit-s
    assert p.model_config["drop_path_rate"] == 0.1 and p.model_config["use_mean_pooling"]  # the recipe
    assert p.init_from == str(tmp_path / "pre")


def test_checkpoint_of_the_wrong_kind_or_size_fails_at_start(data, tmp_path):
    VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny")).save_pretrained(tmp_path / "pre")
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64, config 48"):
        check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'pre'}", "model.hidden_size=48"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text('{"model_type": "bert"}')
    save_file({"x": torch.zeros(1)}, str(tmp_path / "text" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a VideoMAE model config"):
        check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'text'}"))
    (tmp_path / "other").mkdir()
    VideoMAEConfig.from_preset("tiny").save_pretrained(tmp_path / "other")
    save_file({"encoder.weight": torch.zeros(3)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys"):
        check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'other'}"))
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'junk.pth'}"))
    with pytest.raises(CheckpointError, match="not found"):
        check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'nothing-here'}"))


def test_a_classifier_for_other_labels_gets_a_new_head(data, tmp_path):
    config = VideoMAEConfig.from_preset("tiny", id2label={0: "a", 1: "b"})
    VideoMAEForVideoClassification(config).save_pretrained(tmp_path / "cls")
    p = check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'cls'}"))
    assert len(p.model_config["id2label"]) == 8


def test_bad_labels_and_splits_fail_at_start(data, tmp_path):
    (tmp_path / "two.txt").write_text("0 right_slow\n1 left_slow\n")
    with pytest.raises(LabelError, match="labels not in the label map of 2 classes"):
        check_finetune_inputs(_cfg(tmp_path, data, f"data.label_map={tmp_path / 'two.txt'}"))
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(ln for ln in lines if not ln.endswith(" 5")) + "\n")
    with pytest.raises(LabelError, match="1 of 8 classes have no example in the train split: left_fast"):
        check_finetune_inputs(_cfg(tmp_path, data))
    (data / "val.csv").write_text("")
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelError, match="val split"):
        check_finetune_inputs(_cfg(tmp_path, data))
    (data / "train.csv").write_text("videos/unlabeled.mp4\n")
    with pytest.raises(LabelError, match="have no label"):
        check_finetune_inputs(_cfg(tmp_path, data, "val_split="))


def test_an_original_videomae_pth_is_converted(data, tmp_path):
    from helpers.original_layout import to_original

    original = VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny", layer_norm_eps=1e-6))
    torch.save({"model": to_original(original, finetuned=False)}, tmp_path / "checkpoint-799.pth")
    heads = ["model.num_frames=4", "model.image_size=32", "model.num_attention_heads=4"]
    p = check_finetune_inputs(_cfg(tmp_path, data, f"init_from={tmp_path / 'checkpoint-799.pth'}", *heads))
    assert p.model_config["hidden_size"] == 64 and p.model_config["num_hidden_layers"] == 2
    model = VideoMAEForVideoClassification(VideoMAEConfig.from_dict(p.model_config))
    from pipeline.models.weights import load_for_finetuning

    loaded = load_for_finetuning(
        p.init_from,
        p.id2label,
        **{k: p.model_config[k] for k in ("num_frames",)},
        image_size=32,
        num_attention_heads=4,
    )
    weight = "videomae.encoder.layer.0.attention.output.dense.weight"
    assert torch.equal(loaded.state_dict()[weight], original.state_dict()[weight])
    assert model.state_dict()[weight].shape == loaded.state_dict()[weight].shape


def test_weights_are_found_in_s3_run_folders(s3_bucket, tmp_path, monkeypatch):
    from pipeline import storage
    from pipeline.models import weights

    monkeypatch.setattr(weights, "CACHE_DIR", tmp_path / "cache")
    model = VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "local")
    run = f"{s3_bucket}/runs/pre"
    for name in ("config.json", "model.safetensors"):  # a run still training: checkpoints only
        for step in ("00000010", "00000020"):
            storage.upload_file(str(tmp_path / "local" / name), f"{run}/checkpoint_{step}/{name}")
    assert weights.locate(run) == f"{run}/checkpoint_00000020"
    for name in ("config.json", "model.safetensors"):  # finished: its export wins
        storage.upload_file(str(tmp_path / "local" / name), f"{run}/export/{name}")
    assert weights.locate(run) == f"{run}/export"
    loaded = weights.load_for_finetuning(run, {0: "a", 1: "b"})
    key = "videomae.encoder.layer.1.output.dense.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    with pytest.raises(CheckpointError, match="not found"):
        weights.locate(f"{s3_bucket}/runs/missing")


@pytest.mark.parametrize("name", ["finetune_vit_b_k400", "finetune_vit_b_ssv2"])
def test_vit_b_presets_follow_the_paper_recipe(name):
    cfg = config_lib.load(FinetuneConfig, name)
    model = cfg.model.build()
    assert cfg.model.preset == "vit-b" and model.hidden_size == 768
    assert model.drop_path_rate == 0.1 and model.use_mean_pooling
    assert cfg.optim.layer_decay == 0.75 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.weight_decay == 0.05
    assert cfg.optim.base_lr == pytest.approx(5e-4) and cfg.optim.warmup_epochs == 5
    assert cfg.optim.warmup_lr == 0.0 and model.head_init_scale == pytest.approx(1e-3)
    videos_per_step = cfg.train.batch_size * cfg.scaling.num_workers * cfg.train.grad_accum_steps // 2
    assert videos_per_step == 384  # 64 GPUs x 6 videos of the original scripts
    assert (cfg.mixup.mixup_alpha, cfg.mixup.cutmix_alpha, cfg.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert cfg.data.rand_augment == "rand-m7-n4-mstd0.5-inc1" and cfg.data.random_erasing == 0.25
    assert cfg.data.clips_per_video == 2 and cfg.data.clips_share_frames  # num_sample 2
    ssv2 = "ssv2" in name
    assert cfg.train.epochs == (30 if ssv2 else 75)
    assert (cfg.data.sampling_rate, cfg.data.finetune_sampling, cfg.data.hflip) == (
        (2, "segment", False) if ssv2 else (4, "dense", True)
    )
