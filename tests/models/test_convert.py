"""Original MCG-NJU/VideoMAE checkpoints convert to our (and transformers') layout with identical outputs."""

import pytest
import torch
from helpers.original_layout import to_original

from pipeline.models.videomae import CheckpointError, VideoMAEConfig, VideoMAEForPreTraining
from pipeline.models.videomae import VideoMAEForVideoClassification as Classifier
from pipeline.models.videomae.convert import convert_checkpoint, main


def config(**overrides) -> VideoMAEConfig:
    return VideoMAEConfig.from_preset("tiny", layer_norm_eps=1e-6, **overrides)


HEADS = dict(num_frames=4, image_size=32, num_attention_heads=4, decoder_num_attention_heads=2)


def test_pretraining_checkpoint_converts(tmp_path):
    torch.manual_seed(0)
    original = VideoMAEForPreTraining(config(use_mean_pooling=False)).eval()
    state = to_original(original, finetuned=False)
    assert "encoder.blocks.0.attn.qkv.weight" in state and "decoder.blocks.0.mlp.fc2.bias" in state
    torch.save({"model": state, "epoch": 1599}, tmp_path / "checkpoint-1599.pth")
    model = convert_checkpoint(tmp_path / "checkpoint-1599.pth", tmp_path / "out", **HEADS)
    assert isinstance(model, VideoMAEForPreTraining) and not model.config.use_mean_pooling
    x = torch.randn(2, 4, 3, 32, 32)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, ::4] = True
    loaded = VideoMAEForPreTraining.from_pretrained(tmp_path / "out", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, bool_masked_pos=~mask).logits, original(x, bool_masked_pos=~mask).logits
        )


def test_finetuned_checkpoint_converts_with_cli(tmp_path, capsys):
    torch.manual_seed(0)
    original = Classifier(config(num_labels=7)).eval()
    torch.save({"module": to_original(original, finetuned=True)}, tmp_path / "ft.pth")
    args = ["--num-frames", "4", "--image-size", "32", "--num-attention-heads", "4"]
    assert main([str(tmp_path / "ft.pth"), str(tmp_path / "out"), *args]) == 0
    assert "VideoMAEForVideoClassification" in capsys.readouterr().out
    loaded = Classifier.from_pretrained(tmp_path / "out", strict=True)
    assert loaded.config.num_labels == 7 and loaded.config.use_mean_pooling
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, original(x).logits)


def test_bad_original_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "out")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(
        CheckpointError, match=r"other\.pth: keys that are not VideoMAE weights: \['fc\.weight'\]"
    ):
        convert_checkpoint(tmp_path / "other.pth", tmp_path / "out")
    (tmp_path / "text.pth").write_text("hello")
    assert main([str(tmp_path / "text.pth"), str(tmp_path / "out")]) == 1
