"""VideoMAE (Tong et al. 2022) in plain PyTorch, state-dict compatible with transformers' classes.

Parameter names follow transformers (``videomae.encoder.layer.{i}.attention.attention...``) except that the
query/key/value projections are one fused ``qkv`` Linear plus ``q_bias`` / ``v_bias`` (the key has no
bias), as in the original code; loading and saving translate to and from transformers' layout.

Why it is faster than transformers' implementation for pretraining (see docs/model.md for figures):
the patch embedding is a GEMM over the *visible* tubelets only (the Conv3d weight is reused as a matrix),
one fused qkv GEMM, ``scaled_dot_product_attention``, the target is built only for the reconstructed
tubelets, the video is patchified once for both the encoder input and the target, and on CPUs without bf16
instructions bf16 autocast uses float32 kernels on bf16-rounded operands (``linear``, ``attention``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .configuration import VideoMAEConfig
from .masking import running_cell_mask

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"


# --- outputs ---------------------------------------------------------------------------------------------


class ModelOutput:
    """Attribute, key and tuple access to the non-None fields, like transformers' ModelOutput."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | str | slice) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None  # (B, N_visible, D)
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings + each layer's output
    attentions: tuple[Tensor, ...] | None = None  # (B, heads, N, N) per layer


@dataclass
class VideoMAEForPreTrainingOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, N_reconstructed, tubelet * patch * patch * C)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, num_labels)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


# --- building blocks -------------------------------------------------------------------------------------


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sin/cos position table (1, num_positions, dim), computed in float64 as transformers does."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = position / torch.pow(10000.0, (2 * (j // 2) / dim).to(torch.float64))
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()[None]


def position_table(config: VideoMAEConfig, dim: int) -> Tensor:
    """The (1, N, dim) table for the config's token grid. Frames need no care: the 1-D table of more time
    slices extends that of fewer. A different image size changes which row a (y, x) position gets, so with
    ``position_embedding_size`` the table of the trained size is resized per time slice instead."""
    t, h, w = config.grid
    side = (config.position_embedding_size or config.image_size) // config.patch_size
    if side == h == w:
        return sinusoid_table(t * h * w, dim)
    table = sinusoid_table(t * side * side, dim).view(t, side, side, dim).permute(0, 3, 1, 2)  # (t, D, s, s)
    table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, t * h * w, dim)


def patchify(pixel_values: Tensor, tubelet_size: int, patch_size: int) -> Tensor:
    """(B, T, C, H, W) -> (B, N, tubelet * patch * patch * C), token order t, y, x; channels last within a
    tubelet (the order of transformers' reconstruction target)."""
    b, t, c, h, w = pixel_values.shape
    x = pixel_values.reshape(
        b, t // tubelet_size, tubelet_size, c, h // patch_size, patch_size, w // patch_size, patch_size
    )
    return x.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(b, -1, tubelet_size * patch_size * patch_size * c)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x: (B, N, D), index: (B, M) -> (B, M, D)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def split_mask(bool_masked_pos: Tensor, num_patches: int) -> tuple[Tensor, Tensor]:
    """Indices (B, N_visible) and (B, N_masked) of a (B, N) mask, each ascending (transformers' order)."""
    if bool_masked_pos.dim() != 2 or bool_masked_pos.shape[1] != num_patches:
        raise ValueError(
            f"bool_masked_pos must have shape (batch, {num_patches}), got {tuple(bool_masked_pos.shape)}"
        )
    mask = bool_masked_pos.bool()
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"bool_masked_pos must mask the same number of tokens in every sample, got {counts.tolist()}"
        )
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, then masked
    num_visible = num_patches - int(counts[0])
    return order[:, :num_visible], order[:, num_visible:]


def _has_native_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


_NATIVE_BF16_CPU = _has_native_bf16_gemm()


def _emulate_bf16(x: Tensor) -> bool:
    """True under CPU bf16 autocast on a CPU without bf16 matrix instructions (e.g. AVX2 only), where
    torch's bf16 GEMM and attention kernels are emulated and several times slower than float32 ones
    (benchmarks/model_step.py measures both on the machine at hand)."""
    return (
        not _NATIVE_BF16_CPU
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear. Where bf16 GEMMs are emulated (see ``_emulate_bf16``), bf16-rounded operands go through the
    float32 kernel: the same products as a bf16 GEMM with float32 accumulation, at float32 speed."""
    if not _emulate_bf16(x):
        return F.linear(x, weight, bias)
    bf16 = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        bias = None if bias is None else bias.to(bf16).float()
        return F.linear(x.to(bf16).float(), weight.to(bf16).float(), bias).to(bf16)


def attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """scaled_dot_product_attention; float32 kernel on bf16 inputs where bf16 is emulated (as ``linear``)."""
    if not _emulate_bf16(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout).to(q.dtype)


class Linear(nn.Linear):
    """nn.Linear through ``linear`` (same parameters and state-dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return {"relu": F.relu, "silu": F.silu, "swish": F.silu}[name]


class Submodules(nn.Module):
    """Named container that reproduces transformers' module paths (``attention.output.dense``...)."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


class VideoMAESelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv GEMM; the key has no bias (VideoMAE's q/v bias)."""

    def __init__(self, dim: int, num_heads: int, qv_bias: bool, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None

    def forward(self, x: Tensor, output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        b, n, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        dropout = self.dropout if self.training else 0.0
        probs = None
        if output_attentions:  # the fused kernel does not expose the probabilities
            probs = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = attention(q, k, v, dropout)
        return out.transpose(1, 2).reshape(b, n, d), probs


class VideoMAELayer(nn.Module):
    """Pre-norm transformer block (timm's Block) under transformers' parameter names."""

    def __init__(
        self, config: VideoMAEConfig, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0
    ):
        super().__init__()
        eps = config.layer_norm_eps
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = Submodules(
            attention=VideoMAESelfAttention(
                dim, num_heads, config.qv_bias, config.attention_probs_dropout_prob
            ),
            output=Submodules(dense=Linear(dim, dim)),
        )
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = Submodules(dense=Linear(dim, mlp_dim))
        self.output = Submodules(dense=Linear(mlp_dim, dim))
        self.act = _activation(config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = drop_path

    def _residual(self, x: Tensor) -> Tensor:
        """Stochastic depth: drop the whole branch for a random subset of samples."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - self.drop_path)
        return x * keep / (1.0 - self.drop_path)

    def forward(self, x: Tensor, output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        a, probs = self.attention.attention(self.layernorm_before(x), output_attentions)
        x = x + self._residual(self.dropout(self.attention.output.dense(a)))
        h = self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))
        return x + self._residual(self.dropout(h)), probs


def run_layers(
    layers: Iterable[VideoMAELayer],
    x: Tensor,
    use_checkpoint: bool,
    output_hidden_states: bool,
    output_attentions: bool,
) -> tuple[Tensor, tuple | None, tuple | None]:
    hidden = [x] if output_hidden_states else None
    attentions = [] if output_attentions else None
    for layer in layers:
        if use_checkpoint:
            x, probs = checkpoint(layer, x, output_attentions, use_reentrant=False)
        else:
            x, probs = layer(x, output_attentions)
        if hidden is not None:
            hidden.append(x)
        if attentions is not None:
            attentions.append(probs)
    return x, hidden and tuple(hidden), attentions and tuple(attentions)


class VideoMAEPatchEmbeddings(nn.Module):
    """Tubelet embedding. The Conv3d holds the weights (transformers' shape); the forward pass is a GEMM on
    patchified tubelets, so the pretraining encoder embeds only the visible ones."""

    def __init__(self, config: VideoMAEConfig):
        super().__init__()
        t, p = config.tubelet_size, config.patch_size
        self.projection = nn.Conv3d(config.num_channels, config.hidden_size, (t, p, p), stride=(t, p, p))

    def forward(self, patches: Tensor) -> Tensor:
        """patches: (B, M, tubelet * patch * patch * C) in ``patchify`` order -> (B, M, D)."""
        w = self.projection.weight  # (D, C, t, p, p) -> (D, t * p * p * C)
        return linear(patches, w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1), self.projection.bias)


class VideoMAEEmbeddings(nn.Module):
    def __init__(self, config: VideoMAEConfig):
        super().__init__()
        self.patch_embeddings = VideoMAEPatchEmbeddings(config)
        # Fixed, not a parameter: rebuilt for the config's frames / size, never stored in checkpoints.
        self.register_buffer(
            "position_embeddings", position_table(config, config.hidden_size), persistent=False
        )

    def forward(self, patches: Tensor, visible: Tensor | None) -> Tensor:
        pos = self.position_embeddings[0]  # (N, D)
        if visible is None:
            return self.patch_embeddings(patches) + pos
        return self.patch_embeddings(gather_tokens(patches, visible)) + pos[visible]  # (B, N_vis, D)


# --- loading and saving ----------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the keys."""


def _read_state_dict(file: Path) -> dict[str, Tensor]:
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip raise many unrelated types
        raise CheckpointError(f"{file} is not a readable checkpoint: {type(e).__name__}: {e}") from e
    for key in ("model", "module", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return state


def find_weights(path: Path) -> list[Path]:
    """The weight file(s) of a model directory or a weights file; error naming what was looked for."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no VideoMAE checkpoint at {path}: no such file or directory")
    if (path / SAFE_WEIGHTS_NAME).is_file():
        return [path / SAFE_WEIGHTS_NAME]
    if (path / SAFE_INDEX_NAME).is_file():
        index = json.loads((path / SAFE_INDEX_NAME).read_text())
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    if (path / BIN_WEIGHTS_NAME).is_file():
        return [path / BIN_WEIGHTS_NAME]
    raise FileNotFoundError(
        f"no weights in {path}: expected {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} or {BIN_WEIGHTS_NAME}"
    )


_ATTN = ".attention.attention."


def from_transformers_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fuse query/key/value into ``qkv``; accept the Hub's ``q_bias``/``v_bias`` and transformers 5's
    ``query.bias``/``value.bias``. A position table stored by some converters is dropped (it is fixed)."""
    out, groups = {}, {}
    for key, value in state.items():
        if _ATTN in key:
            prefix, name = key.split(_ATTN)
            groups.setdefault(prefix + _ATTN, {})[name] = value
        elif key.endswith("position_embeddings") and value.dim() == 3:
            _check_fixed_table(key, value)  # ours is rebuilt for the config's frames and size
        else:
            out[key] = value
    for prefix, p in groups.items():
        if "qkv.weight" in p:  # already our layout
            out.update({prefix + k: v for k, v in p.items()})
            continue
        missing = [n for n in ("query.weight", "key.weight", "value.weight") if n not in p]
        if missing:
            raise CheckpointError(f"attention weights incomplete at {prefix}: missing {missing}")
        out[prefix + "qkv.weight"] = torch.cat(
            (p.pop("query.weight"), p.pop("key.weight"), p.pop("value.weight"))
        )
        for ours, names in (("q_bias", ("q_bias", "query.bias")), ("v_bias", ("v_bias", "value.bias"))):
            for name in names:
                if name in p:
                    out[prefix + ours] = p.pop(name)
        key_bias = p.pop("key.bias", None)
        if key_bias is not None and bool(key_bias.abs().max() > 0):
            raise CheckpointError(f"{prefix}key.bias is non-zero; VideoMAE's key projection has no bias")
        out.update({prefix + k: v for k, v in p.items()})  # anything else surfaces as unexpected
    return out


def _check_fixed_table(key: str, table: Tensor) -> None:
    expected = sinusoid_table(table.shape[1], table.shape[2])
    if not torch.allclose(table.float(), expected, atol=1e-4):
        raise CheckpointError(
            f"{key} is a learned position table; this VideoMAE uses the fixed sin/cos table "
            f"(rebuilt for any frames / size), so those weights cannot be used"
        )


def to_transformers_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split ``qkv`` into query/key/value weights and keep ``q_bias``/``v_bias``: what transformers 5.x
    itself writes (it renames them to query/value biases on load) and what transformers 4.x reads."""
    out = {}
    for key, value in state.items():
        if key.endswith(_ATTN + "qkv.weight"):
            prefix = key[: -len("qkv.weight")]
            for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                out[f"{prefix}{name}.weight"] = part.contiguous()
        else:
            out[key] = value.contiguous()
    return out


# --- models ----------------------------------------------------------------------------------------------


class VideoMAEPreTrainedModel(nn.Module):
    """Weight init, gradient checkpointing and transformers-style from_pretrained / save_pretrained."""

    base_model_prefix = "videomae"
    # Parameters a checkpoint of another VideoMAE class may lack: new heads, initialised and reported.
    _head_prefixes: tuple[str, ...] = ()

    def __init__(self, config: VideoMAEConfig):
        super().__init__()
        config.validate()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        """The original pretraining init: xavier-uniform linear layers, zero biases, unit norms. The tubelet
        Conv3d keeps PyTorch's default, as the original never initialises it."""
        if isinstance(module, nn.Linear):
            self._init_linear(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VideoMAESelfAttention) and module.q_bias is not None:
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)

    def _init_linear(self, weight: Tensor) -> None:
        nn.init.xavier_uniform_(weight)

    def post_init(self) -> None:
        self.apply(self._init_weights)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def gradient_checkpointing_enable(self) -> None:
        self.config.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.config.gradient_checkpointing = False

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _use_checkpoint(self) -> bool:
        return self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def save_pretrained(self, save_directory: str | os.PathLike,
                        state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write config.json + model.safetensors in transformers' layout (its classes load them with no
        missing or unexpected keys). ``state_dict``: these weights instead of the module's own (a sharded
        module's, gathered)."""
        from safetensors.torch import save_file

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(path)
        weights = self.state_dict() if state_dict is None else state_dict
        state = to_transformers_layout({k: v.detach().cpu() for k, v in weights.items()})
        tmp = path / (SAFE_WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / SAFE_WEIGHTS_NAME)
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: VideoMAEConfig | None = None,
        strict: bool | None = None,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ):
        """Load a directory written by transformers' or our ``save_pretrained`` (model.safetensors, a sharded
        safetensors index, or pytorch_model.bin), or a weights file with config.json beside it.

        Checkpoints of another VideoMAE class load as transformers does: a VideoMAEForPreTraining
        checkpoint gives VideoMAEForVideoClassification its encoder (the classifier is new), a
        VideoMAEModel checkpoint fits either head class. ``strict=None`` (default) fails on missing encoder
        weights and reports new heads and unused weights; ``strict=True`` fails on any missing or unexpected
        key; ``strict=False`` only reports. Shape mismatches fail unless ``ignore_mismatched_sizes`` (then
        those weights are re-initialised, e.g. a classifier with another number of labels).
        ``config_overrides`` change the config, e.g. ``num_frames=8`` or ``num_labels=10``; a new
        ``image_size`` keeps the checkpoint's position codes (``position_embedding_size``, see
        ``position_table``) unless ``position_embedding_size`` is given too.
        """
        path = Path(path)
        if config is None:
            stored = VideoMAEConfig.from_pretrained(path)
            size = config_overrides.get("image_size", stored.image_size)
            if size != stored.image_size and "position_embedding_size" not in config_overrides:
                config_overrides["position_embedding_size"] = (
                    stored.position_embedding_size or stored.image_size
                )
            config = VideoMAEConfig.from_dict(stored.to_dict(), **config_overrides)
        elif config_overrides:
            config = VideoMAEConfig.from_dict(config.to_dict(), **config_overrides)
        files = find_weights(path)
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(_read_state_dict(file))
        model = cls(config)
        info = model.load_checkpoint_state(
            state,
            source=", ".join(map(str, files)),
            strict=strict,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
        )
        model.eval()
        return (model, info) if output_loading_info else model

    def load_checkpoint_state(
        self,
        state: dict[str, Tensor],
        source: str = "state dict",
        strict: bool | None = None,
        ignore_mismatched_sizes: bool = False,
    ) -> dict[str, list[str]]:
        """Load a state dict in transformers' (or our) layout; returns the missing / unexpected keys."""
        try:
            state = from_transformers_layout(state)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from e
        own = self.state_dict()
        prefix = self.base_model_prefix + "."
        has_prefix = any(k.startswith(prefix) for k in state)
        if isinstance(self, VideoMAEModel):  # base model from a head checkpoint: heads become unexpected
            if has_prefix:
                state = {k.removeprefix(prefix): v for k, v in state.items()}
        elif not has_prefix:  # head model from a base-model checkpoint
            state = {
                (prefix + k if k.split(".")[0] in ("embeddings", "encoder", "layernorm") else k): v
                for k, v in state.items()
            }
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if mismatched and not ignore_mismatched_sizes:
            raise CheckpointError(
                f"{source}: shapes do not match the config (pass ignore_mismatched_sizes=True "
                f"to re-initialise them): " + "; ".join(mismatched)
            )
        missing_encoder = [k for k in missing if not k.startswith(self._head_prefixes)]
        if strict or (strict is None and missing_encoder):
            problems = []
            if missing:
                problems.append(f"missing keys {missing}")
            if strict and unexpected:
                problems.append(f"unexpected keys {unexpected}")
            if problems:
                raise CheckpointError(f"{source} does not fit {type(self).__name__}: " + "; ".join(problems))
        mismatched_keys = [m.split(":")[0] for m in mismatched]
        to_load = {k: v for k, v in state.items() if k in own and k not in mismatched_keys}
        self.load_state_dict(to_load, strict=False)
        info = {
            "missing_keys": missing + mismatched_keys,
            "unexpected_keys": unexpected,
            "mismatched_keys": mismatched,
        }
        if missing or mismatched:
            logger.warning(
                "%s: newly initialised in %s: %s", source, type(self).__name__, missing + mismatched_keys
            )
        if unexpected:
            logger.info("%s: not used by %s: %s", source, type(self).__name__, unexpected)
        return info


def _outputs(return_dict: bool | None, output: ModelOutput):
    return output.to_tuple() if return_dict is False else output


class VideoMAEModel(VideoMAEPreTrainedModel):
    """The encoder. With ``bool_masked_pos`` it embeds and encodes only the visible tokens."""

    _head_prefixes = ("layernorm.",)

    def __init__(self, config: VideoMAEConfig):
        super().__init__(config)
        self.embeddings = VideoMAEEmbeddings(config)
        dpr = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.encoder = Submodules(
            layer=nn.ModuleList(
                VideoMAELayer(
                    config, config.hidden_size, config.num_attention_heads, config.intermediate_size, p
                )
                for p in dpr
            )
        )
        self.layernorm = (
            None if config.use_mean_pooling else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )
        self.post_init()

    def check_pixel_values(self, pixel_values: Tensor) -> None:
        c = self.config
        expected = (c.num_frames, c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, expected))}) = "
                f"(B, frames, channels, height, width) for this config, got "
                f"{tuple(pixel_values.shape)}; change num_frames / image_size in the config to "
                f"use other clip sizes"
            )

    def encode(
        self,
        patches: Tensor,
        visible: Tensor | None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """patches: (B, N, K) from ``patchify``; visible: (B, N_vis) token indices or None for all."""
        x = self.embeddings(patches, visible)
        x, hidden, attentions = run_layers(
            self.encoder.layer, x, self._use_checkpoint(), output_hidden_states, output_attentions
        )
        if self.layernorm is not None:
            x = self.layernorm(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=hidden, attentions=attentions)

    def forward(
        self,
        pixel_values: Tensor,
        bool_masked_pos: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        self.check_pixel_values(pixel_values)
        visible = None
        if bool_masked_pos is not None:
            visible, _ = split_mask(bool_masked_pos, self.config.num_patches)
        patches = patchify(pixel_values, self.config.tubelet_size, self.config.patch_size)
        out = self.encode(patches, visible, bool(output_hidden_states), bool(output_attentions))
        return _outputs(return_dict, out)


class VideoMAEDecoder(nn.Module):
    def __init__(self, config: VideoMAEConfig):
        super().__init__()
        self.decoder_layers = nn.ModuleList(
            VideoMAELayer(
                config,
                config.decoder_hidden_size,
                config.decoder_num_attention_heads,
                config.decoder_intermediate_size,
            )
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.decoder_hidden_size)  # eps 1e-5 as transformers (the original: 1e-6)
        self.head = Linear(
            config.decoder_hidden_size, config.num_channels * config.tubelet_size * config.patch_size**2
        )

    def forward(self, x: Tensor, return_token_num: int, use_checkpoint: bool = False) -> Tensor:
        x, _, _ = run_layers(self.decoder_layers, x, use_checkpoint, False, False)
        return self.head(self.norm(x[:, -return_token_num:]))


class VideoMAEForPreTraining(VideoMAEPreTrainedModel):
    """Masked autoencoder: the encoder sees the visible tubelets, the decoder predicts the pixels of the
    masked ones (all of them, or with ``decoder_mask_ratio`` > 0 the running-cell subset of VideoMAE V2)."""

    _head_prefixes = ("videomae.layernorm.", "encoder_to_decoder.", "mask_token", "decoder.")

    def __init__(self, config: VideoMAEConfig):
        super().__init__(config)
        self.videomae = VideoMAEModel(config)
        self.encoder_to_decoder = Linear(config.hidden_size, config.decoder_hidden_size, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_hidden_size))
        self.register_buffer(
            "position_embeddings",
            position_table(config, config.decoder_hidden_size),
            persistent=False,
        )
        self.decoder = VideoMAEDecoder(config)
        self.post_init()

    def post_init(self) -> None:
        super().post_init()
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.encoder_to_decoder.reset_parameters()  # PyTorch's default, as in the original

    def decoder_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """Running-cell decoder mask (True = not reconstructed), seeded from torch's RNG."""
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ())))
        masks = [
            running_cell_mask(self.config.grid, self.config.decoder_mask_ratio, rng)
            for _ in range(batch_size)
        ]
        return torch.from_numpy(np.stack(masks)).to(device)

    def reconstruction_target(self, patches: Tensor) -> Tensor:
        """Pixels the decoder is trained to predict, from normalised patches (B, M, t*p*p*C): un-normalised
        with the model's ``image_mean`` / ``image_std``, then, with norm_pix_loss, normalised per tubelet and
        channel."""
        c = self.config
        x = patches.float().unflatten(-1, (-1, c.num_channels))  # (B, M, t*p*p, C)
        x = x * x.new_tensor(c.image_std) + x.new_tensor(c.image_mean)
        if c.norm_pix_loss:
            x = (x - x.mean(dim=-2, keepdim=True)) / (
                x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
            )
        return x.flatten(-2)

    def forward(
        self,
        pixel_values: Tensor,
        bool_masked_pos: Tensor | None = None,
        decoder_bool_masked_pos: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> VideoMAEForPreTrainingOutput | tuple:
        """pixel_values (B, T, C, H, W) normalised; bool_masked_pos (B, N), True = hidden from the encoder.

        decoder_bool_masked_pos (B, N), True = not reconstructed (VideoMAE V2; generated with the
        running-cell pattern when ``config.decoder_mask_ratio`` > 0 and not given). logits: (B, M, K) for
        the M reconstructed tokens in ascending token order.
        """
        if bool_masked_pos is None:
            raise ValueError(
                "VideoMAEForPreTraining needs bool_masked_pos (B, num_patches): see masking.make_mask"
            )
        c = self.config
        self.videomae.check_pixel_values(pixel_values)
        visible, masked = split_mask(bool_masked_pos, c.num_patches)
        if decoder_bool_masked_pos is None and c.decoder_mask_ratio > 0:
            decoder_bool_masked_pos = self.decoder_mask(pixel_values.shape[0], pixel_values.device)
        if decoder_bool_masked_pos is not None:  # decoder reconstructs the positions it does not mask
            masked, _ = split_mask(decoder_bool_masked_pos, c.num_patches)

        patches = patchify(pixel_values, c.tubelet_size, c.patch_size)  # (B, N, K), one copy of the clip
        enc = self.videomae.encode(patches, visible, bool(output_hidden_states), bool(output_attentions))
        x = self.encoder_to_decoder(enc.last_hidden_state)  # (B, N_vis, D_dec)
        pos = self.position_embeddings[0]  # (N, D_dec)
        x = torch.cat((x + pos[visible], self.mask_token + pos[masked]), dim=1)  # (B, N_vis + M, D_dec)
        logits = self.decoder(x, masked.shape[1], self._use_checkpoint())  # (B, M, K)
        with torch.no_grad():
            target = self.reconstruction_target(gather_tokens(patches, masked))
        if decoder_bool_masked_pos is None:
            loss = F.mse_loss(logits.float(), target)
        else:  # VideoMAE V2: only tokens hidden from the encoder count, not those it saw
            weight = torch.gather(bool_masked_pos.bool(), 1, masked).float()  # (B, M)
            per_token = (logits.float() - target).pow(2).mean(-1)
            loss = (per_token * weight).sum() / weight.sum().clamp(min=1.0)
        out = VideoMAEForPreTrainingOutput(
            loss=loss, logits=logits, hidden_states=enc.hidden_states, attentions=enc.attentions
        )
        return _outputs(return_dict, out)


class VideoMAEForVideoClassification(VideoMAEPreTrainedModel):
    """Encoder + mean pooling + fc_norm + linear classifier; with ``use_mean_pooling=False`` the first
    token after the encoder's final norm (transformers' behaviour; VideoMAE has no CLS token)."""

    _head_prefixes = ("videomae.layernorm.", "fc_norm.", "classifier.")

    def __init__(self, config: VideoMAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.videomae = VideoMAEModel(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size) if config.use_mean_pooling else None
        self.classifier = (
            Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def _init_linear(self, weight: Tensor) -> None:
        """The original finetuning model's init (timm's ViT): truncated normal, std ``initializer_range``."""
        nn.init.trunc_normal_(weight, std=self.config.initializer_range)

    def post_init(self) -> None:
        super().post_init()
        if isinstance(self.classifier, nn.Linear):  # the original's init_scale: a new head starts near zero
            with torch.no_grad():
                self.classifier.weight.mul_(self.config.head_init_scale)
                self.classifier.bias.mul_(self.config.head_init_scale)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """As transformers: regression for one label, cross entropy for int labels, else multi-label."""
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        out = self.videomae(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        x = out.last_hidden_state  # (B, N, D)
        pooled = self.fc_norm(x.mean(1)) if self.fc_norm is not None else x[:, 0]
        logits = self.classifier(pooled)
        loss = self.loss(logits, labels) if labels is not None else None
        return _outputs(
            return_dict,
            ImageClassifierOutput(
                loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
            ),
        )


__all__ = [
    "VideoMAEModel",
    "VideoMAEForPreTraining",
    "VideoMAEForVideoClassification",
    "VideoMAEPreTrainedModel",
    "CheckpointError",
    "patchify",
    "sinusoid_table",
    "split_mask",
]
