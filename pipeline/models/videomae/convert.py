"""Convert original MCG-NJU/VideoMAE (and VideoMAE V2) ``.pth`` checkpoints to a model directory that both
this package and transformers load.

    python -m pipeline.models.videomae.convert checkpoint-1599.pth out_dir [--num-frames 16 --image-size 224]

The original code names a pretraining model's parts ``encoder.patch_embed.proj``,
``encoder.blocks.N.attn.qkv`` (+ ``q_bias``/``v_bias``), ``encoder.norm``, ``encoder_to_decoder``,
``mask_token``, ``decoder.blocks.N``,
``decoder.norm``, ``decoder.head``; a finetuned model drops the ``encoder.`` prefix and adds ``fc_norm`` and
``head``. Checkpoints wrap the weights in ``model`` or ``module``. Frames and image size are not stored in the
weights (the position table is fixed), so they come from the arguments (defaults: 16 frames, 224 px).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from .configuration import VideoMAEConfig
from .modeling import (
    CheckpointError,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
    VideoMAEModel,
    VideoMAEPreTrainedModel,
    _read_state_dict,
)

logger = logging.getLogger(__name__)

# Attention heads are not visible in the weights: the paper's models by width (encoder, decoder).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 512: 8, 640: 8}

_BLOCK = {
    "norm1": "layernorm_before",
    "attn.qkv": "attention.attention.qkv",
    "attn.q_bias": "attention.attention.q_bias",
    "attn.v_bias": "attention.attention.v_bias",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP = {
    "patch_embed.proj": "videomae.embeddings.patch_embeddings.projection",
    "norm": "videomae.layernorm",
    "fc_norm": "fc_norm",
    "head": "classifier",
    "encoder_to_decoder": "encoder_to_decoder",
    "mask_token": "mask_token",
    "decoder.norm": "decoder.norm",
    "decoder.head": "decoder.head",
}
_BLOCK_KEY = re.compile(r"^(decoder\.)?blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def original_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original checkpoint's keys to this package's layout (fused qkv kept)."""
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        key = key.removeprefix("encoder.") if not key.startswith("encoder_to_decoder") else key
        if key in ("pos_embed", "decoder.pos_embed", "encoder.pos_embed"):
            continue  # fixed sin/cos table, rebuilt by the model for its frames and size
        block = _BLOCK_KEY.match(key)
        if block and block.group(3) in _BLOCK:
            decoder, index, name, suffix = block.groups()
            stack = "decoder.decoder_layers" if decoder else "videomae.encoder.layer"
            out[f"{stack}.{index}.{_BLOCK[name]}{suffix or ''}"] = value
            continue
        stem, _, suffix = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
        if stem in _TOP:
            out[_TOP[stem] + ("." + suffix if suffix else "")] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys that are not VideoMAE weights: {unknown}")
    return out


def infer_config(state: dict[str, Tensor], **overrides: Any) -> VideoMAEConfig:
    """Model sizes from the shapes of converted weights; ``overrides`` (frames, size, heads...) win."""
    try:
        proj = state["videomae.embeddings.patch_embeddings.projection.weight"]  # (D, C, t, p, p)
    except KeyError as e:
        raise CheckpointError(
            "no patch embedding (patch_embed.proj.weight): not a VideoMAE checkpoint"
        ) from e
    hidden, channels, tubelet, patch = proj.shape[0], proj.shape[1], proj.shape[2], proj.shape[3]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("videomae.encoder.layer."))
    fields: dict[str, Any] = dict(
        hidden_size=hidden,
        num_channels=channels,
        tubelet_size=tubelet,
        patch_size=patch,
        num_hidden_layers=layers,
        num_attention_heads=HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        intermediate_size=state["videomae.encoder.layer.0.intermediate.dense.weight"].shape[0],
        qv_bias="videomae.encoder.layer.0.attention.attention.q_bias" in state,
        use_mean_pooling="videomae.layernorm.weight" not in state,
        layer_norm_eps=1e-6,  # the original's LayerNorm
    )
    if "decoder.norm.weight" in state:
        width = state["decoder.norm.weight"].shape[0]
        fields.update(
            decoder_hidden_size=width,
            decoder_num_attention_heads=HEADS_BY_WIDTH.get(width, max(1, width // 64)),
            decoder_num_hidden_layers=len(
                {k.split(".")[2] for k in state if k.startswith("decoder.decoder_layers.")}
            ),
        )
        if "decoder.decoder_layers.0.intermediate.dense.weight" in state:
            fields["decoder_intermediate_size"] = state[
                "decoder.decoder_layers.0.intermediate.dense.weight"
            ].shape[0]
    if "classifier.weight" in state:
        fields["num_labels"] = state["classifier.weight"].shape[0]
    fields.update(overrides)
    return VideoMAEConfig(**fields).validate()


def model_class(state: dict[str, Tensor]) -> type[VideoMAEPreTrainedModel]:
    if any(k.startswith(("decoder.", "encoder_to_decoder")) for k in state):
        return VideoMAEForPreTraining
    if "classifier.weight" in state:
        return VideoMAEForVideoClassification
    return VideoMAEModel


def convert_checkpoint(
    src: str | Path, dst_dir: str | Path, **config_overrides: Any
) -> VideoMAEPreTrainedModel:
    """Read an original ``.pth`` (plain, or wrapped in ``model``/``module``), write ``dst_dir`` with
    config.json + model.safetensors, and return the loaded model. ``config_overrides`` set what the weights
    cannot tell: ``num_frames``, ``image_size``, ``num_attention_heads``, ``id2label``..."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {src}")
    try:
        state = original_to_ours(_read_state_dict(src))
        config = infer_config(state, **config_overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from e
    cls = model_class(state)
    model = cls(config)
    model.load_checkpoint_state(state, source=str(src), strict=True)
    model.save_pretrained(dst_dir)
    logger.info("converted %s to %s (%s, %d parameters)", src, dst_dir, cls.__name__, model.num_parameters())
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="original .pth checkpoint")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-attention-heads", type=int, help="if the encoder width is not a paper model's")
    parser.add_argument("--decoder-num-attention-heads", type=int, help="likewise for the decoder")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(num_frames=args.num_frames, image_size=args.image_size)
    for name in ("num_attention_heads", "decoder_num_attention_heads"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    try:
        model = convert_checkpoint(args.src, args.dst, **overrides)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {type(model).__name__}, {model.num_parameters():,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
