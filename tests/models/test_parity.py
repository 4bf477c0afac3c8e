"""Numerical parity with transformers' VideoMAE classes: weights move both ways through save_pretrained /
from_pretrained directories, and outputs agree to 1e-5 in float32."""

import numpy as np
import pytest
import torch
from helpers.configs import tiny_model

from pipeline.models.videomae import (
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
    VideoMAEModel,
)
from pipeline.models.videomae.masking import make_mask

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
TOL = 1e-5


def tiny(**overrides) -> VideoMAEConfig:
    return tiny_model(num_labels=5, **overrides)


def hf_config(config: VideoMAEConfig, tmp_path) -> "transformers.VideoMAEConfig":
    """transformers' config read from our config.json, which is itself under test."""
    config.save_pretrained(tmp_path / "config")
    return transformers.VideoMAEConfig.from_pretrained(tmp_path / "config")


def inputs(config: VideoMAEConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size, generator=g)
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([make_mask("tube", config.grid, 0.75, rng) for _ in range(batch)]))
    return x, mask


def hf_to_ours(hf_model, ours_cls, tmp_path, **kwargs):
    hf_model.save_pretrained(tmp_path / "hf")
    model, info = ours_cls.from_pretrained(tmp_path / "hf", output_loading_info=True, **kwargs)
    return model, info


def ours_to_hf(model, hf_cls, tmp_path):
    model.save_pretrained(tmp_path / "ours")
    hf_model, info = hf_cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf_model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_pretraining_parity_both_ways(tmp_path, norm_pix_loss):
    config = tiny(norm_pix_loss=norm_pix_loss, use_mean_pooling=False)
    x, mask = inputs(config)
    torch.manual_seed(0)
    hf = transformers.VideoMAEForPreTraining(hf_config(config, tmp_path)).eval()
    ours, info = hf_to_ours(hf, VideoMAEForPreTraining, tmp_path)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    with torch.no_grad():
        expected, got = hf(x, bool_masked_pos=mask), ours(x, bool_masked_pos=mask)
    assert max_diff(got.logits, expected.logits) <= TOL
    assert abs(float(got.loss) - float(expected.loss)) <= TOL

    # the other way: our random weights into transformers
    torch.manual_seed(1)
    ours = VideoMAEForPreTraining(config).eval()
    hf = ours_to_hf(ours, transformers.VideoMAEForPreTraining, tmp_path)
    with torch.no_grad():
        expected, got = hf(x, bool_masked_pos=mask), ours(x, bool_masked_pos=mask)
    assert max_diff(got.logits, expected.logits) <= TOL
    assert abs(float(got.loss) - float(expected.loss)) <= TOL


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_classification_parity_both_ways(tmp_path, use_mean_pooling):
    config = tiny(use_mean_pooling=use_mean_pooling)
    x, _ = inputs(config)
    labels = torch.tensor([0, 4])
    torch.manual_seed(0)
    hf = transformers.VideoMAEForVideoClassification(hf_config(config, tmp_path)).eval()
    ours, info = hf_to_ours(hf, VideoMAEForVideoClassification, tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.config.id2label == hf.config.id2label
    with torch.no_grad():
        expected, got = hf(x, labels=labels), ours(x, labels=labels)
    assert max_diff(got.logits, expected.logits) <= TOL
    assert abs(float(got.loss) - float(expected.loss)) <= TOL

    torch.manual_seed(1)
    ours = VideoMAEForVideoClassification(config).eval()
    hf = ours_to_hf(ours, transformers.VideoMAEForVideoClassification, tmp_path)
    with torch.no_grad():
        assert max_diff(ours(x).logits, hf(x).logits) <= TOL


def test_base_model_parity_with_and_without_mask(tmp_path):
    config = tiny(use_mean_pooling=False)
    x, mask = inputs(config)
    torch.manual_seed(0)
    hf = transformers.VideoMAEModel(hf_config(config, tmp_path)).eval()
    ours, info = hf_to_ours(hf, VideoMAEModel, tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        for m in (None, mask):
            expected = hf(x, bool_masked_pos=m, output_hidden_states=True)
            got = ours(x, bool_masked_pos=m, output_hidden_states=True)
            assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= TOL
            assert len(got.hidden_states) == len(expected.hidden_states)
            assert max_diff(got.hidden_states[-1], expected.hidden_states[-1]) <= TOL
    hf_back = ours_to_hf(ours, transformers.VideoMAEModel, tmp_path)
    with torch.no_grad():
        assert max_diff(hf_back(x).last_hidden_state, ours(x).last_hidden_state) <= TOL


def test_both_attention_bias_layouts_and_bin_files_load(tmp_path):
    """Hub checkpoints keep ``attention.attention.q_bias``/``v_bias`` (what transformers 5 still writes);
    transformers 5 modules name them ``query.bias``/``value.bias``. Both, as safetensors or .bin, load."""
    from safetensors.torch import load_file

    config = tiny(use_mean_pooling=False)
    x, mask = inputs(config)
    torch.manual_seed(0)
    hf = transformers.VideoMAEForPreTraining(hf_config(config, tmp_path)).eval()
    hf.save_pretrained(tmp_path / "hub")
    hub_state = load_file(tmp_path / "hub" / "model.safetensors")
    assert any(k.endswith("attention.attention.q_bias") for k in hub_state)
    renamed = {
        k.replace(".q_bias", ".query.bias").replace(".v_bias", ".value.bias"): v for k, v in hub_state.items()
    }
    assert set(renamed) == set(hf.state_dict())  # exactly transformers 5's module layout
    with torch.no_grad():
        expected = hf(x, bool_masked_pos=mask).logits
    for name, state in (("hub", hub_state), ("t5", renamed)):
        (tmp_path / name).mkdir(exist_ok=True)
        hf.config.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink(missing_ok=True)
        torch.save(state, tmp_path / name / "pytorch_model.bin")
        model = VideoMAEForPreTraining.from_pretrained(tmp_path / name, strict=True)
        with torch.no_grad():
            assert max_diff(model(x, bool_masked_pos=mask).logits, expected) <= TOL, name


def test_cross_class_loading_matches_transformers(tmp_path):
    """A pretraining checkpoint gives both libraries' classifiers the same encoder; a bare encoder checkpoint
    fits transformers' pretraining class after our save."""
    config = tiny(use_mean_pooling=True)
    x, _ = inputs(config)
    torch.manual_seed(0)
    pre = VideoMAEForPreTraining(config).eval()
    pre.save_pretrained(tmp_path / "pre")
    ours = VideoMAEForVideoClassification.from_pretrained(tmp_path / "pre")
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "pre").eval()
    with torch.no_grad():
        assert max_diff(ours.videomae(x).last_hidden_state, hf.videomae(x).last_hidden_state) <= TOL
    VideoMAEModel.from_pretrained(tmp_path / "pre").save_pretrained(tmp_path / "enc")
    hf_pre, info = transformers.VideoMAEForPreTraining.from_pretrained(
        tmp_path / "enc", output_loading_info=True
    )
    assert not info["unexpected_keys"] and all(
        k.startswith(("decoder", "encoder_to", "mask")) for k in info["missing_keys"]
    )
    with torch.no_grad():
        assert max_diff(hf_pre.videomae(x).last_hidden_state, pre.videomae(x).last_hidden_state) <= TOL
