"""The job config loader: presets, overrides with type coercion, strict errors naming the key, secrets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline import config as C
from pipeline.config import ConfigError
from pipeline.data.section import DataSection
from pipeline.train.pretrain import PretrainConfig


def load(*overrides: str, path: str | Path | None = None) -> PretrainConfig:
    return C.load(PretrainConfig, path, list(overrides))


def test_defaults_are_the_tiny_demo_and_data_geometry_follows_the_model():
    cfg = load()
    model = cfg.model.build()
    assert cfg.model.preset == "tiny"
    assert (cfg.data.num_frames, cfg.data.image_size, cfg.data.patch_size, cfg.data.tubelet_size) == \
        (model.num_frames, model.image_size, model.patch_size, model.tubelet_size) == (4, 32, 8, 2)


def test_overrides_are_coerced_to_the_field_types():
    cfg = load("train.batch_size=4", "optim.lr=3e-4", "optim.betas=0.9,0.999", "train.grad_clip=null",
               "tracking.system_metrics=false", "scaling.use_gpu=true", "model.num_frames=8",
               "model.norm_pix_loss=false", "data.pretrain_scales=[1.0, 0.5]", "train.precision=bf16",
               "data.decode_resources={decode: 1}")
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.train.grad_clip is None
    assert cfg.tracking.system_metrics is False and cfg.scaling.use_gpu is True
    assert cfg.model.overrides == {"use_mean_pooling": False, "num_frames": 8, "norm_pix_loss": False}
    assert cfg.data.num_frames == 8  # follows the model
    assert cfg.data.pretrain_scales == (1.0, 0.5)
    assert cfg.train.precision == "bf16"
    assert cfg.data.decode_resources == {"decode": 1}


def test_yaml_preset_then_overrides_win(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("run_name: from-file\nmodel:\n  preset: vit-s\n  decoder_num_hidden_layers: 2\n"
                      "optim:\n  base_lr: 1e-4\ntrain:\n  batch_size: 16\n")
    cfg = load("train.batch_size=2", path=preset)
    assert cfg.run_name == "from-file"
    assert cfg.model.build().decoder_num_hidden_layers == 2 and cfg.model.build().hidden_size == 384
    assert cfg.optim.base_lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string: still a number here
    assert cfg.train.batch_size == 2
    assert cfg.data.image_size == 224


@pytest.mark.parametrize("name", ["pretrain_tiny_demo", "pretrain_vit_s_k400", "pretrain_vit_b_k400",
                                  "pretrain_vit_s_ssv2", "pretrain_vit_b_ssv2"])
def test_presets_load_and_follow_the_paper(name):
    cfg = load(path=name)  # a bare name is looked up in configs/
    if name == "pretrain_tiny_demo":
        return
    model = cfg.model.build()
    assert (model.num_frames, model.image_size, model.decoder_num_hidden_layers) == (16, 224, 4)
    assert cfg.data.mask_ratio == 0.9 and cfg.data.mask_type == "tube"
    assert cfg.data.sampling_rate == (4 if "k400" in name else 2)
    assert cfg.optim.base_lr == pytest.approx(1.5e-4) and cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 40
    assert cfg.optim.warmup_lr == 0.0 and not model.use_mean_pooling  # the original's final encoder norm
    vit_s = "vit_s" in name
    assert cfg.train.epochs == (2400 if "ssv2" in name else 1600 if vit_s else 800)
    global_batch = cfg.train.batch_size * cfg.scaling.num_workers * cfg.train.grad_accum_steps
    assert global_batch == (1024 if vit_s else 2048)  # 32 videos x 32 (ViT-S) or 64 (ViT-B) GPUs


def test_the_giant_preset_is_videomae_v2s_geometry_sharded_in_bf16():
    cfg = load(path="pretrain_vit_g_fsdp")
    model = cfg.model.build()
    assert (model.hidden_size, model.num_hidden_layers, model.patch_size, model.intermediate_size) == \
        (1408, 40, 14, 6144)
    assert model.gradient_checkpointing and model.decoder_mask_ratio == 0.5
    assert (cfg.scaling.strategy, cfg.train.precision) == ("fsdp", "bf16")
    assert cfg.data.mask_ratio == 0.9 and cfg.data.sampling_rate == 4


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'lr'?"),
    (["modle.preset=vit-b"], "unknown config key 'modle'"),
    (["model.num_framez=8"], "unknown config key 'model.num_framez'"),
    (["train.batch_size=abc"], "train.batch_size: expected an integer, got 'abc'"),
    (["train.precision=fp8"], "train.precision: 'fp8' is not one of"),
    (["model.num_attention_heads=5"], "hidden_size 64 is not divisible by num_attention_heads 5"),
    (["data.mask_ratio=1.0"], "data.mask_ratio must lie in (0, 1), got 1.0"),
    (["data.mask_ratio=0"], "data.mask_ratio must lie in (0, 1)"),
    (["data.num_frames=8"], "data.num_frames is taken from model.num_frames"),
    (["model.preset=vit-x"], "model.preset: unknown preset 'vit-x'"),
    (["run_name=a/b"], "run_name 'a/b' must be"),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["optim.betas=0.9"], "optim.betas: expected 2 values"),
    (["nodot"], "not of the form section.key=value"),
    (["optim=3"], "optim: expected a section"),
    (["data.decode_resources={decode: 0}"], "data: decode_resources must map resource names to amounts > 0"),
    (["data.rand_augment=rand-m7-x4"], "data: RandAugment spec 'rand-m7-x4': unknown part 'x4'"),
    (["data.random_erasing=1.5"], "data: random_erasing is a probability in [0, 1], got 1.5"),
    (["data.decode_task_videos=0"], "data: decode_task_videos must be >= 1, got 0"),
    (["data.rand_augment=rand-m7-n4"], "data.rand_augment and data.random_erasing are finetuning"),
])
def test_bad_configs_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert message in str(err.value)


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load(path=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load(path=listy)


def test_round_trip_through_yaml_and_flatten_scrubs_secrets():
    cfg = load("model.num_frames=8", "tracking.tracking_uri=http://alice:s3cret@mlflow.example:5000")
    text = C.to_yaml(cfg)
    assert "s3cret" not in text and "***@mlflow.example" in text
    again = C.build(PretrainConfig, yaml.safe_load(text))  # a config stored with a checkpoint, rebuilt
    assert again.model.overrides == {"use_mean_pooling": False, "num_frames": 8}
    assert again.data.num_frames == 8
    assert again.optim == cfg.optim and again.train == cfg.train
    flat = C.flatten(cfg)
    assert flat["optim.betas"] == [0.9, 0.95] and flat["model.overrides.num_frames"] == 8
    assert "s3cret" not in str(flat)
    assert C.scrub({"aws_secret_access_key": "x", "api_token": "y", "n": 1}) == \
        {"aws_secret_access_key": "***", "api_token": "***", "n": 1}



@dataclass
class _JobWithOwnDataDefaults:
    data: DataSection = field(default_factory=lambda: DataSection(hflip=False, clips_per_video=3))


def test_a_partial_section_keeps_the_jobs_own_section_defaults(tmp_path):
    """A job whose section default differs from the section class's keeps it when one key is overridden."""
    preset = tmp_path / "job.yaml"
    preset.write_text("data:\n  clips_per_video: 5\n")
    base = {"data": {"split": "val"}}
    cfg = C.load(_JobWithOwnDataDefaults, preset, ["data.seed=7"], base=base)
    assert (cfg.data.hflip, cfg.data.clips_per_video, cfg.data.seed, cfg.data.split) == (False, 5, 7, "val")
    assert base == {"data": {"split": "val"}}  # the caller's base layer is not modified


@pytest.mark.parametrize("job, key, source", [
    ("finetune", "data.num_frames=8", "data.num_frames is taken from model.num_frames; set model.num_frames"),
    ("finetune", "data.mean=[0.5,0.5,0.5]", "data.mean is taken from model.image_mean"),
    ("pretrain", "data.std=[1,1,1]", "data.std is taken from model.image_std"),
    ("pretrain", "probe.data.sampling_rate=3", "probe.data.sampling_rate is taken from data.sampling_rate"),
    ("evaluate", "data.image_size=64", "data.image_size is taken from the model at model_uri"),
    ("probe", "data.patch_size=4", "data.patch_size is taken from the model (model_uri"),
])
def test_every_job_takes_the_clip_format_from_the_model(job, key, source):
    """One rule for data settings the model dictates: refused wherever they are set, naming the source."""
    from pipeline.eval.evaluate import EvalConfig
    from pipeline.eval.probing import ProbeConfig
    from pipeline.train.finetune import FinetuneConfig

    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvalConfig,
           "probe": ProbeConfig}
    with pytest.raises(ConfigError, match=re.escape(source)):
        C.load(cls[job], None, [key])
    cfg = C.load(PretrainConfig, None, ["model.image_mean=[0.5,0.5,0.5]", "model.image_std=[0.25,0.25,0.25]"])
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.probe.data.std == (0.25, 0.25, 0.25)  # the model's
