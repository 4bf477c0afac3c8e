"""VideoMAEConfig: the fields, defaults and config.json format of transformers' VideoMAEConfig, without
transformers, plus a few fields it lacks (drop path, VideoMAE V2 decoder masking, gradient checkpointing).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What the data path must cut and normalise clips to, for this model: its geometry and normalisation.
CLIP_FIELDS = ("num_frames", "image_size", "patch_size", "tubelet_size")

# Encoder / decoder widths of the VideoMAE paper's models (decoder sizes of the original pretraining scripts).
PRESETS: dict[str, dict[str, Any]] = {
    "vit-s": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        decoder_hidden_size=192,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=3,
        decoder_intermediate_size=768,
    ),
    "vit-b": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        decoder_hidden_size=384,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=6,
        decoder_intermediate_size=1536,
    ),
    "vit-l": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=2048,
    ),
    "vit-h": dict(
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=16,
        intermediate_size=5120,
        decoder_hidden_size=640,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=2560,
    ),
    # VideoMAE V2's giant (ViT-g/14: 16x16 patches of 14 px at 224 px); the decoder of its pretraining scripts
    "vit-g": dict(
        patch_size=14,
        hidden_size=1408,
        num_hidden_layers=40,
        num_attention_heads=16,
        intermediate_size=6144,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=2048,
    ),
    # Tests and demos: a forward pass takes milliseconds; a 4x4 token grid per time slice, 2 time slices.
    "tiny": dict(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    ),
    # The demo and the learning benchmark: tiny enough for a CPU, large enough in time and tokens for masked
    # video modelling to pay (4 time slices of 8x8 tokens; docs/finetune_eval.md has the figures).
    "demo": dict(
        image_size=32,
        patch_size=4,
        num_frames=8,
        tubelet_size=2,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
    ),
}
for _preset in PRESETS.values():
    _preset["layer_norm_eps"] = 1e-6  # the original's norm_layer; transformers' config default is 1e-12


@dataclass(init=False)
class VideoMAEConfig:
    """Model hyper-parameters. Field names and defaults are transformers' (5.x: ``qv_bias``; the older
    ``qkv_bias`` key of Hub configs is read as an alias). Unknown keys of a config.json are kept and
    written back, so a round trip through this class loses nothing.
    """

    model_type = "videomae"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_frames: int = 16
    tubelet_size: int = 2
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    qv_bias: bool = True
    use_mean_pooling: bool = True
    decoder_num_attention_heads: int = 6
    decoder_hidden_size: int = 384
    decoder_num_hidden_layers: int = 4
    decoder_intermediate_size: int = 1536
    norm_pix_loss: bool = True
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    architectures: list[str] | None = None
    # Not in transformers; the defaults reproduce its behaviour.
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this value over the encoder layers
    decoder_mask_ratio: float = 0.0  # VideoMAE V2 running-cell decoder masking; 0 = reconstruct all masked
    head_init_scale: float = 1.0  # a new classifier's initial weights x this (the original: 0.001)
    gradient_checkpointing: bool = False
    # Image size the position table was trained at. When set and unlike image_size, the fixed table is built
    # for that size and resized bicubically per time slice (the original builds a new table), so each
    # token keeps its pretrained position code. None: the table of image_size (transformers' behaviour).
    position_embedding_size: int | None = None
    # The input normalisation the model is trained with (as transformers' processors carry it): clips are
    # normalised with it and the reconstruction target and pictures undo it.
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, kept as-is

    def __init__(self, num_labels: int | None = None, qkv_bias: bool | None = None, **kwargs: Any):
        known = {f.name: f for f in fields(self)}
        extra = dict(kwargs.pop("extra", None) or {})
        for name, f in known.items():
            if name in kwargs:
                value = kwargs.pop(name)
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        extra.update(kwargs)  # e.g. "dtype", "transformers_version", keys of newer transformers versions
        extra.pop("model_type", None)
        self.extra = extra
        if qkv_bias is not None:
            self.qv_bias = bool(qkv_bias)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if num_labels is not None and (self.id2label is None or len(self.id2label) != num_labels):
            self.num_labels = num_labels
        if self.id2label is None:
            self.num_labels = 2  # transformers' default
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    # transformers' older name for qv_bias
    @property
    def qkv_bias(self) -> bool:
        return self.qv_bias

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (time, height, width) of one clip."""
        from .masking import token_grid

        return token_grid(self.num_frames, self.image_size, self.patch_size, self.tubelet_size)

    def clip_format(self) -> dict[str, Any]:
        """The data settings this model dictates (``DataSection`` field names): geometry and normalisation."""
        return {**{name: getattr(self, name) for name in CLIP_FIELDS}, "mean": self.image_mean,
                "std": self.image_std}

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def validate(self) -> VideoMAEConfig:
        """Raise ValueError naming every impossible setting, before a long job builds the model."""
        problems = []
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "num_frames",
            "tubelet_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "decoder_hidden_size",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.decoder_num_hidden_layers, int) or self.decoder_num_hidden_layers < 0:
            problems.append(f"decoder_num_hidden_layers must be >= 0, got {self.decoder_num_hidden_layers!r}")
        if problems:
            raise ValueError("invalid VideoMAEConfig: " + "; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            problems.append(
                f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                f"decoder_num_attention_heads {self.decoder_num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            problems.append(
                f"num_frames {self.num_frames} is not divisible by tubelet_size {self.tubelet_size}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.head_init_scale > 0:
            problems.append(f"head_init_scale must be > 0, got {self.head_init_scale}")
        if self.decoder_mask_ratio != 0 and not 0.25 <= self.decoder_mask_ratio < 1.0:
            problems.append(
                f"decoder_mask_ratio must be 0 (reconstruct every masked token) or lie in [0.25, 1) (running "
                f"cells drop int(4 x ratio) of each 2x2 cell, 1 to 3), got {self.decoder_mask_ratio}"
            )
        elif self.decoder_mask_ratio > 0 and (self.image_size // self.patch_size) % 2:
            problems.append(
                f"decoder_mask_ratio > 0 (running-cell masking) needs an even token grid, got "
                f"{self.image_size // self.patch_size} tokens per side"
            )
        pes = self.position_embedding_size
        if pes is not None and (not isinstance(pes, int) or pes < self.patch_size or pes % self.patch_size):
            problems.append(
                f"position_embedding_size must be a multiple of patch_size {self.patch_size}, got {pes}"
            )
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                problems.append(f"{name} needs one value per channel ({self.num_channels}), got "
                                f"{list(getattr(self, name))}")
        if any(v <= 0 for v in self.image_std):
            problems.append(f"image_std must be > 0, got {list(self.image_std)}")
        if problems:
            raise ValueError("invalid VideoMAEConfig: " + "; ".join(problems))
        return self

    # --- serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in transformers' format (id2label keys are strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        out.update(copy.deepcopy(self.extra))
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> VideoMAEConfig:
        data = {**config, **overrides}
        if data.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"config has model_type {data['model_type']!r}, expected {cls.model_type!r}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(self.to_json_string())
        tmp.replace(target)
        return target

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> VideoMAEConfig:
        """Read ``config.json`` from a model directory, or the given JSON file (or the config.json beside a
        weights file). ``overrides`` replace fields, e.g. ``num_frames=8``."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if file.suffix != ".json":
            file = file.parent / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no VideoMAE config: {file} does not exist")
        try:
            data = json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is not a valid JSON config: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{file} does not hold a JSON object")
        try:
            return cls.from_dict(data, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VideoMAEConfig:
        """A named size: "vit-s", "vit-b", "vit-l", "vit-h", "vit-g" (224 px, 16 frames), "demo" (32 px,
        8 frames: the demo and the learning benchmark) or "tiny" (32 px, 4 frames: tests)."""
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown VideoMAE preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "quick_gelu")
