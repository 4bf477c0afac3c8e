"""VideoMAE model behaviour without transformers: shapes, losses, masking inside the model, save / load."""

import numpy as np
import pytest
import torch
from helpers.configs import tiny_model

from pipeline.models.videomae import (
    CheckpointError,
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
    VideoMAEModel,
)
from pipeline.models.videomae.masking import make_mask, running_cell_mask
from pipeline.models.videomae.modeling import patchify
from pipeline.train.sharding import unwrap

tiny = tiny_model


def clip(batch: int = 2, config: VideoMAEConfig | None = None, seed: int = 0) -> torch.Tensor:
    c = config or tiny()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c.num_frames, c.num_channels, c.image_size, c.image_size, generator=g)


def tube(batch: int, config: VideoMAEConfig, ratio: float = 0.75, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([make_mask("tube", config.grid, ratio, rng) for _ in range(batch)]))


def test_pretraining_shapes_loss_and_backward():
    c = tiny()
    model = VideoMAEForPreTraining(c)
    mask = tube(2, c)  # 12 of 16 per time slice masked -> 24 of 32
    out = model(pixel_values=clip(2, c), bool_masked_pos=mask)
    assert out.logits.shape == (2, 24, 3 * 2 * 8 * 8)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), (
        "every parameter gets a grad"
    )
    assert grads["videomae.embeddings.patch_embeddings.projection.weight"].abs().sum() > 0


def test_pretraining_loss_is_mse_on_masked_tubelets():
    c = tiny(norm_pix_loss=False)
    model = VideoMAEForPreTraining(c).eval()
    x, mask = clip(2, c), tube(2, c)
    out = model(pixel_values=x, bool_masked_pos=mask)
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    target = patchify(x * std[:, None, None] + mean[:, None, None], 2, 8)[mask].view(2, -1, 384)
    torch.testing.assert_close(out.loss, ((out.logits - target) ** 2).mean())


def test_norm_pix_target_is_normalised_per_tubelet_and_channel():
    c = tiny()
    model = VideoMAEForPreTraining(c)
    target = model.reconstruction_target(patchify(clip(1, c), 2, 8)).view(1, 32, 128, 3)
    torch.testing.assert_close(target.mean(2), torch.zeros(1, 32, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(2), torch.ones(1, 32, 3), atol=1e-3, rtol=0)


def test_encoder_sees_only_visible_tokens():
    c = tiny(use_mean_pooling=False)
    model = VideoMAEModel(c).eval()
    x, mask = clip(2, c), tube(2, c)
    out = model(x, bool_masked_pos=mask, output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 8, 64)
    assert len(out.hidden_states) == c.num_hidden_layers + 1
    assert out.attentions[0].shape == (2, 4, 8, 8)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 8))
    # changing a masked tubelet's pixels does not change the encoding
    y = x.clone()
    first_masked = int(mask[0].nonzero()[0])
    t, rest = divmod(first_masked, 16)
    row, col = divmod(rest, 4)
    y[0, 2 * t : 2 * t + 2, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] += 5.0
    torch.testing.assert_close(model(y, bool_masked_pos=mask).last_hidden_state, out.last_hidden_state)


def test_uneven_mask_and_wrong_shapes_are_rejected():
    c = tiny()
    model = VideoMAEForPreTraining(c)
    mask = tube(2, c)
    mask[1, 0] = ~mask[1, 0]
    with pytest.raises(ValueError, match="same number"):
        model(clip(2, c), bool_masked_pos=mask)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 4, 3, 32, 32\)"):
        model(torch.randn(2, 8, 3, 32, 32), bool_masked_pos=tube(2, c))
    with pytest.raises(ValueError, match="needs bool_masked_pos"):
        model(clip(2, c))


def test_classification_pooling_and_losses():
    for pooling in (True, False):
        c = tiny(use_mean_pooling=pooling, num_labels=5)
        model = VideoMAEForVideoClassification(c)
        out = model(clip(2, c), labels=torch.tensor([1, 4]))
        assert out.logits.shape == (2, 5)
        torch.testing.assert_close(
            out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 4]))
        )
        assert (model.fc_norm is not None) == pooling and (model.videomae.layernorm is None) == pooling
    multi = VideoMAEForVideoClassification(tiny(num_labels=3))(clip(2), labels=torch.ones(2, 3))
    assert multi.loss > 0
    (logits,) = VideoMAEForVideoClassification(tiny())(clip(2), return_dict=False)
    assert logits.shape == (2, 2)


def test_decoder_masking_reconstructs_running_cell_positions():
    c = tiny(decoder_mask_ratio=0.5)
    model = VideoMAEForPreTraining(c)
    out = model(clip(2, c), bool_masked_pos=tube(2, c))
    assert out.logits.shape == (2, 16, 384)  # half of the 32 positions
    dec = torch.from_numpy(
        np.stack([running_cell_mask(c.grid, 0.5, np.random.default_rng(i)) for i in range(2)])
    )
    out = model(clip(2, c), bool_masked_pos=tube(2, c), decoder_bool_masked_pos=dec)
    assert out.logits.shape == (2, int((~dec[0]).sum()), 384)


@pytest.mark.parametrize("ratio, reconstructed", [(0.25, 3 / 4), (0.7, 2 / 4), (0.9, 1 / 4)])
def test_decoder_mask_ratios_reconstruct_what_videomae_v2_does(ratio, reconstructed):
    """V2 drops int(4 x ratio) of each 2x2 cell: 0.7 reconstructs half the masked positions (round() gave a
    quarter) and 0.9 a quarter (round() dropped all four, and the loss failed on an empty target)."""
    c = tiny(decoder_mask_ratio=ratio)
    out = VideoMAEForPreTraining(c)(clip(2, c), bool_masked_pos=tube(2, c))
    assert out.logits.shape[1] == int(32 * reconstructed) and torch.isfinite(out.loss)


def test_drop_path_and_gradient_checkpointing_train_and_match():
    c = tiny(drop_path_rate=0.2)
    model = VideoMAEForPreTraining(c).train()
    x, mask = clip(2, c), tube(2, c)
    torch.manual_seed(3)
    plain = model(x, bool_masked_pos=mask).loss
    model.gradient_checkpointing_enable()
    torch.manual_seed(3)
    checkpointed = model(x, bool_masked_pos=mask)
    checkpointed.loss.backward()
    torch.testing.assert_close(checkpointed.loss, plain)
    model.eval()  # no stochastic depth at evaluation
    assert model(x, bool_masked_pos=mask).loss == model(x, bool_masked_pos=mask).loss


def test_save_and_load_round_trip(tmp_path):
    c = tiny(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, drop_path_rate=0.1)
    model = VideoMAEForPreTraining(c).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = VideoMAEForPreTraining.from_pretrained(tmp_path)
    assert loaded.config.id2label == {0: "a", 1: "b", 2: "c"} and loaded.config.drop_path_rate == 0.1
    x, mask = clip(2, c), tube(2, c)
    torch.testing.assert_close(loaded(x, bool_masked_pos=mask).logits, model(x, bool_masked_pos=mask).logits)
    # the encoder moves into a classifier; the new head is reported
    cls, info = VideoMAEForVideoClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {
        "fc_norm.weight",
        "fc_norm.bias",
        "classifier.weight",
        "classifier.bias",
    }
    assert "mask_token" in info["unexpected_keys"]
    torch.testing.assert_close(cls.videomae(x).last_hidden_state, model.videomae(x).last_hidden_state)
    # and into the bare encoder
    enc = VideoMAEModel.from_pretrained(tmp_path, strict=None)
    torch.testing.assert_close(enc(x).last_hidden_state, model.videomae(x).last_hidden_state)
    # a bare encoder checkpoint fits the heads
    enc.save_pretrained(tmp_path / "enc")
    again, info = VideoMAEForPreTraining.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert info["missing_keys"] and all(
        k.startswith(("decoder.", "encoder_to_decoder", "mask_token")) for k in info["missing_keys"]
    )
    torch.testing.assert_close(again.videomae(x).last_hidden_state, model.videomae(x).last_hidden_state)


def test_config_json_round_trip_and_validation(tmp_path):
    c = tiny(num_labels=2, qkv_bias=False)
    assert not c.qv_bias
    c.extra["transformers_version"] = "5.24.0"
    c.save_pretrained(tmp_path)
    again = VideoMAEConfig.from_pretrained(tmp_path)
    assert again == c and again.to_dict()["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert VideoMAEConfig.from_pretrained(tmp_path, num_frames=8).num_frames == 8
    for bad, message in [
        (dict(num_attention_heads=5), "not divisible by num_attention_heads"),
        (dict(image_size=30), "image_size 30 is not divisible"),
        (dict(num_frames=5), "num_frames 5 is not divisible"),
        (dict(decoder_mask_ratio=1.5), "decoder_mask_ratio"),
        (dict(decoder_mask_ratio=0.1), r"decoder_mask_ratio must be 0 .* or lie in \[0.25, 1\)"),
        (dict(drop_path_rate=-0.1), "drop_path_rate"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny(**bad).validate()
    with pytest.raises(ValueError, match="unknown VideoMAE preset"):
        VideoMAEConfig.from_preset("vit-z")
    # vit-b is the default size; presets carry the original's LayerNorm eps, the class transformers' default
    assert VideoMAEConfig.from_preset("vit-b") == VideoMAEConfig(layer_norm_eps=1e-6)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = VideoMAEForPreTraining(tiny())
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="no VideoMAE config"):
        VideoMAEForPreTraining.from_pretrained(tmp_path / "missing")
    # wrong shapes: the checkpoint is for 16 px patches
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shapes do not match.*patch_embeddings"):
        VideoMAEForPreTraining.from_pretrained(tmp_path / "ok", patch_size=16)
    # not a checkpoint
    (tmp_path / "junk").mkdir()
    tiny().save_pretrained(tmp_path / "junk")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk/model\.safetensors is not a readable checkpoint"):
        VideoMAEForPreTraining.from_pretrained(tmp_path / "junk")
    # missing encoder keys
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "ok" / "model.safetensors")
    del state["videomae.encoder.layer.1.output.dense.weight"]
    save_file(state, tmp_path / "ok" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['videomae\.encoder\.layer\.1\.output\.dense"):
        VideoMAEForPreTraining.from_pretrained(tmp_path / "ok")
    # strict=False loads and reports it
    _, info = VideoMAEForPreTraining.from_pretrained(tmp_path / "ok", strict=False, output_loading_info=True)
    assert info["missing_keys"] == ["videomae.encoder.layer.1.output.dense.weight"]


def test_position_table_follows_frames_and_size(tmp_path):
    from pipeline.models.videomae.modeling import position_table, sinusoid_table

    # more frames extend the table: the first time slices keep their pretrained codes
    torch.testing.assert_close(position_table(tiny(num_frames=8), 64)[:, :32], position_table(tiny(), 64))
    # resizing a table to its own size is the identity; to another size, a smooth resize per time slice
    torch.testing.assert_close(position_table(tiny(position_embedding_size=32), 64), sinusoid_table(32, 64))
    resized = position_table(tiny(image_size=64, position_embedding_size=32), 64)
    assert resized.shape == (1, 2 * 8 * 8, 64)
    assert not torch.allclose(resized, sinusoid_table(128, 64))

    # a checkpoint trained at 32 px / 4 frames finetunes at 48 px / 8 frames without any weight changing
    model = VideoMAEForPreTraining(tiny())
    model.save_pretrained(tmp_path)
    cls = VideoMAEForVideoClassification.from_pretrained(tmp_path, image_size=48, num_frames=8, num_labels=3)
    assert cls.config.position_embedding_size == 32
    assert cls(torch.randn(1, 8, 3, 48, 48)).logits.shape == (1, 3)
    cls.save_pretrained(tmp_path / "ft")
    again = VideoMAEForVideoClassification.from_pretrained(tmp_path / "ft")
    torch.testing.assert_close(
        again.videomae.embeddings.position_embeddings, cls.videomae.embeddings.position_embeddings
    )
    with pytest.raises(ValueError, match="position_embedding_size must be a multiple of patch_size"):
        tiny(position_embedding_size=30).validate()


def test_bf16_autocast_on_cpus_without_bf16_gemm(monkeypatch):
    """Where bf16 GEMMs are emulated, bf16-rounded operands go through float32 kernels: bf16 results equal to
    a bf16 GEMM with float32 accumulation, and a pretraining loss close to float32's."""
    from pipeline.models.videomae import modeling

    monkeypatch.setattr(modeling, "_NATIVE_BF16_CPU", False)
    x, w, b = torch.randn(5, 64), torch.randn(32, 64), torch.randn(32)
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        y = modeling.linear(x, w, b)
    assert y.dtype == bf
    expected = (x.to(bf).double() @ w.to(bf).double().T + b.to(bf).double()).to(bf)
    torch.testing.assert_close(y, expected, atol=0, rtol=1e-2)
    assert modeling.linear(x, w, b).dtype == torch.float32  # no autocast: untouched

    c = tiny()
    model = VideoMAEForPreTraining(c)
    x, mask = clip(2, c), tube(2, c)
    with torch.autocast("cpu", dtype=bf):
        out = model(x, bool_masked_pos=mask)
    assert out.logits.dtype == bf and out.loss.dtype == torch.float32
    out.loss.backward()
    assert model.videomae.encoder.layer[0].attention.attention.qkv.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.loss, model(x, bool_masked_pos=mask).loss, atol=0, rtol=2e-2)


def test_the_models_normalisation_is_recorded_and_undone_by_the_target(tmp_path):
    """image_mean / image_std travel with the model (config.json) and un-normalise the target, so a model
    trained on other statistics than ImageNet's reconstructs the right pixels (norm_pix_loss false)."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    c = tiny(norm_pix_loss=False, image_mean=mean, image_std=std)
    c.save_pretrained(tmp_path)
    again = VideoMAEConfig.from_pretrained(tmp_path)
    assert again.image_mean == mean and again.image_std == std
    assert again.clip_format() == {"num_frames": 4, "image_size": 32, "patch_size": 8, "tubelet_size": 2,
                                   "mean": mean, "std": std}
    model = VideoMAEForPreTraining(c).eval()
    x, mask = clip(2, c), tube(2, c)
    out = model(pixel_values=x, bool_masked_pos=mask)
    raw = patchify(x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None], 2, 8)
    torch.testing.assert_close(out.loss, ((out.logits - raw[mask].view(2, -1, 384)) ** 2).mean())
    with pytest.raises(ValueError, match="image_mean needs one value per channel"):
        tiny(image_mean=(0.5, 0.5)).validate()


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model(x, bool_masked_pos=mask).loss
    loss.backward()
    named = unwrap(model).named_parameters()  # the model's own names (compile prefixes them)
    return loss.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("lever", ["activation checkpointing", "torch.compile"])
def test_activation_checkpointing_and_compile_give_eager_loss_and_gradients(lever):
    """Each large-model lever computes the same step: loss and every parameter's gradient as in eager mode.
    torch.compile runs with the aot_eager backend here (dynamo's graph capture and AOT autograd, without
    code generation, whose compile time would dominate a unit test); benchmarks/gpu_step.py times inductor."""
    c = tiny()
    model = VideoMAEForPreTraining(c).train()
    x, mask = clip(2, c), tube(2, c)
    eager_loss, eager_grads = _loss_and_grads(model, x, mask)
    if lever == "activation checkpointing":
        model.gradient_checkpointing_enable()
        loss, grads = _loss_and_grads(model, x, mask)
    else:
        compiled = torch.compile(model, backend="aot_eager")
        loss, grads = _loss_and_grads(compiled, x, mask)
        assert unwrap(compiled) is model  # checkpoints and exports hold the model itself
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
