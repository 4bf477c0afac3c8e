"""Typed job configuration: dataclasses <- YAML preset <- ``--set a.b=c`` overrides.

Every job (pretrain, finetune, evaluate, ...) declares a dataclass tree and loads it with :func:`load`.
The loader is strict on purpose: an unknown key, a value of the wrong type, an unreadable YAML file or
an impossible combination fails *before* Ray starts anything, with a message naming the key, because a
typo found after an hour of data loading costs an hour.

Conventions a job's dataclasses follow:

- fields have defaults (the embedded default run needs no file at all);
- a class may define ``validate(self) -> None`` raising :class:`ConfigError` (or ``ValueError``) for
  impossible settings; it is called bottom-up after loading, so a parent may rely on valid children;
- a class may set ``__extra_keys__ = ("field_name", checker)``: unknown keys then go into that ``dict``
  field instead of failing, and ``checker() -> dict[str, type]`` lists the allowed extra keys and their
  types (used for the model's architecture overrides, which live in another class).

Nothing here reads credentials: AWS keys, tokens and passwords come from the environment at the point of
use and never enter a config, so a config can be printed, logged to MLflow and stored with checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.data.datasets import DataConfig
from pipeline.data.storage import redact
from pipeline.train.probe_monitor import ProbeSection

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Keys whose values must never reach a log or MLflow even if a user puts them in a config.
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration problem; the message names the key (``optim.lr``) or the file."""


# --- reading ---------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML preset as a dict. A bare name (``pretrain_vit_b_k400``) is looked up in ``configs/``."""
    file = Path(path)
    if not file.exists() and not file.suffix and (CONFIG_DIR / f"{path}.yaml").exists():
        file = CONFIG_DIR / f"{path}.yaml"
    try:
        text = file.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], str]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], "1e-3"); the value stays a string until its type is known."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.split("."), value.strip()


class _Raw(str):
    """A value typed on the command line: coerced to the field's type, unlike a YAML value (already typed)."""


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating sections as needed); later overrides win."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = _Raw(value)
    return data


# --- building typed objects ------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` or a ConfigError naming ``key``. Strings from the CLI are parsed; YAML
    values must already have the right type (an int where a float is wanted is fine)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, _Raw) else value
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, _Raw) and value.lower() in ("null", "none", "~"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, _Raw) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, _Raw):
            parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
            value = [_Raw(v) if isinstance(v, str) else v for v in parsed]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, _Raw):
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, _Raw):
            low = value.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, _Raw):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, _Raw):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if is_dataclass(tp):
        if isinstance(value, Mapping):
            return build(tp, value, prefix=key)
        raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def build(cls: type[T], data: Mapping[str, Any] | None = None, prefix: str = "") -> T:
    """An instance of dataclass ``cls`` from a nested mapping, strictly: every key known and typed."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls) if f.init}
    extra_field, extra_types = None, {}
    if hasattr(cls, "__extra_keys__"):
        extra_field, checker = cls.__extra_keys__
        extra_types = checker()
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name in by_name and name != extra_field:
            default = _section_default(by_name[name], hints[name])
            if default is not None and isinstance(value, Mapping):
                value = _deep_merge(default, value)  # a partial section keeps the job's own defaults
            kwargs[name] = _coerce(value, hints[name], key)
        elif name == extra_field and isinstance(value, Mapping):
            for sub, sub_value in value.items():
                extras[sub] = _coerce_extra(sub, sub_value, extra_types, f"{key}.{sub}")
        elif extra_field and name in extra_types:
            extras[name] = _coerce_extra(name, value, extra_types, key)
        else:
            raise _unknown_key(key, [n for n in by_name if n != extra_field] + list(extra_types))
    if extra_field:
        kwargs[extra_field] = extras
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e
    return obj


def _section_default(f: Any, hint: Any) -> dict[str, Any] | None:
    """A dataclass field's default section as a mapping, so overriding one key keeps the others."""
    if not (is_dataclass(hint) and f.default_factory is not MISSING):
        return None
    return to_dict(f.default_factory())


def _coerce_extra(name: str, value: Any, allowed: dict[str, Any], key: str) -> Any:
    if name not in allowed:
        raise _unknown_key(key, allowed)
    return _coerce(value, allowed[name], key)


def validate(obj: Any, prefix: str = "") -> None:
    """Call ``validate()`` on every section, children first; errors become ConfigErrors naming the section."""
    for f in fields(obj):
        child = getattr(obj, f.name)
        if is_dataclass(child) and not isinstance(child, type):
            validate(child, f"{prefix}.{f.name}" if prefix else f.name)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            where = f"{prefix}: " if prefix and not str(e).startswith(prefix) else ""
            raise ConfigError(f"{where}{e}") from e


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
         base: Mapping[str, Any] | None = None) -> T:
    """The job config: ``cls`` defaults <- ``base`` <- YAML file at ``path`` <- ``overrides``, validated."""
    data = _deep_merge(copy.deepcopy(dict(base or {})), read_yaml(path) if path else {})
    data = apply_overrides(data, overrides)
    for derived, source in getattr(cls, "__derived_keys__", {}).items():
        head, _, leaf = derived.rpartition(".")
        node = data
        for part in head.split(".") if head else []:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            raise ConfigError(f"{derived} is taken from {source}; set {source} instead")
    obj = build(cls, data)
    validate(obj)
    return obj


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


# --- writing ---------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists/scalars (tuples become lists) for YAML, JSON and checkpoints."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(scrub(to_dict(obj)), sort_keys=False, default_flow_style=False)


def from_yaml_text(cls: type[T], text: str) -> T:
    """Rebuild a config stored with a checkpoint."""
    data = yaml.safe_load(text) or {}
    obj = build(cls, data)
    validate(obj)
    return obj


def scrub(data: Any, key: str = "") -> Any:
    """Replace values under secret-looking keys and credentials inside URIs, recursively."""
    if isinstance(data, Mapping):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v not in (None, "") else scrub(v, k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [scrub(v, key) for v in data]
    if isinstance(data, str):
        return redact(data)
    return data


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-3, ...}`` with secrets scrubbed: the MLflow params of a run."""
    data = scrub(to_dict(obj))
    out: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        else:
            out[path] = node

    walk(data, prefix)
    return out


def replace(obj: T, **changes: Any) -> T:
    """dataclasses.replace that accepts dotted keys: ``replace(cfg, **{"optim.lr": 1e-3})``."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(obj, head), **sub)
    return dataclasses.replace(obj, **flat)


# --- sections shared by the training jobs ----------------------------------------------------------------


def _videomae_fields() -> dict[str, Any]:
    from pipeline.models.videomae import VideoMAEConfig

    hints = typing.get_type_hints(VideoMAEConfig)
    skip = {"extra", "id2label", "label2id", "architectures", "problem_type"}
    return {f.name: hints[f.name] for f in fields(VideoMAEConfig) if f.name not in skip}


@dataclass
class ModelSection:
    """A named size plus any VideoMAEConfig field as an override, written flat:
    ``model: {preset: vit-b, decoder_num_hidden_layers: 4}`` or ``--set model.num_frames=8``."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    __extra_keys__ = ("overrides", _videomae_fields)

    def __post_init__(self) -> None:
        from pipeline.models.videomae.configuration import PRESETS

        if self.preset.lower().replace("_", "-") not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; "
                              f"choose one of {sorted(PRESETS)}")

    def build(self, **more: Any):
        from pipeline.models.videomae import VideoMAEConfig

        return VideoMAEConfig.from_preset(self.preset, **{**self.overrides, **more})

    def validate(self) -> None:
        self.build().validate()


@dataclass
class OptimSection:
    """AdamW and the per-step LR schedule. Unless ``lr`` is set, the peak, the end and the start of the
    schedule are ``base_lr``, ``min_lr`` and ``warmup_lr`` x videos per step / 256 (the original's linear
    scaling rule, which counts videos: a step of B clips at ``data.clips_per_video`` N holds B / N)."""

    base_lr: float = 1.5e-4  # peak LR per 256 videos of global batch
    lr: float | None = None  # absolute peak LR (overrides base_lr scaling; min_lr / warmup_lr then absolute)
    min_lr: float = 1e-5  # end of the cosine (per 256 videos, unless lr is set)
    warmup_lr: float = 0.0  # start of the linear warmup; the original's schedule starts at 0
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    layer_decay: float | None = None  # layer-wise LR decay (finetuning: 0.75)

    def validate(self) -> None:
        for name in ("base_lr", "min_lr", "warmup_lr", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ConfigError("optim.warmup_epochs / optim.warmup_steps must be >= 0")


@dataclass
class TrainSection:
    """Batch, length and numerics of the optimisation loop."""

    batch_size: int = 8  # clips per worker per micro-step; global batch = this x workers x grad_accum_steps
    grad_accum_steps: int = 1
    epochs: float = 800.0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    steps_per_epoch: int | None = None  # None = clips per epoch // global batch, from the manifest
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16) on GPU, fp32 on CPU
    prefetch_batches: int = 2  # batches Ray Data prepares ahead of the loop on each worker
    shuffle_buffer_batches: int = 0  # per-worker local shuffle buffer (x batch_size clips), seeded by epoch
    log_every_steps: int = 10  # progress line + MLflow metrics

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"train.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 (or null for no clipping), got {self.grad_clip}")


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # also at the end of training
    keep_last: int = 3  # Ray Train deletes older checkpoints

    def validate(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")


@dataclass
class TrackingSection:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under the local runs folder
    experiment: str = "videomae-pretrain"
    parent_run_id: str | None = None  # make this job's run a child of another (the chained pipeline)
    recon_every_steps: int = 0  # reconstruction PNG every N steps (0 = only at the end)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) of rank 0's node
    system_metrics_interval_s: float = 10.0

    def validate(self) -> None:
        if self.recon_every_steps < 0:
            raise ConfigError(f"tracking.recon_every_steps must be >= 0, got {self.recon_every_steps}")


@dataclass
class ScalingSection:
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool | None = None  # None: GPUs if the cluster has at least num_workers of them
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker failures Ray Train recovers from (restart from the last checkpoint)
    ray_address: str | None = None  # None: RAY_ADDRESS (set under `ray job submit`), else a local Ray

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")


# --- the pretraining job ---------------------------------------------------------------------------------

# Clip geometry lives in the model config; the data pipeline is given the same values (one source of truth).
GEOMETRY = ("num_frames", "image_size", "patch_size", "tubelet_size")
# The probe's clips are cut and normalised as the training clips.
PROBE_FROM_DATA = ("sampling_rate", "mean", "std")


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; see configs/pretrain_*.yaml and docs/training.md."""

    run_name: str = "pretrain-tiny-demo"  # rerunning with the same name resumes the run
    seed: int = 0
    storage_path: str = "runs"  # local folder or s3://bucket/prefix; the run is <storage_path>/<run_name>
    # The original's pretraining encoder ends in a LayerNorm before encoder_to_decoder; in transformers'
    # config that is use_mean_pooling: false (finetuning then pools and uses its own fc_norm).
    model: ModelSection = field(default_factory=lambda: build(ModelSection, {"use_mean_pooling": False}))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    probe: ProbeSection = field(default_factory=ProbeSection)  # frozen-feature kNN during training

    __derived_keys__ = {
        **{f"data.{name}": f"model.{name}" for name in GEOMETRY},
        **{f"probe.data.{name}": f"model.{name}" for name in GEOMETRY},
        **{f"probe.data.{name}": f"data.{name}" for name in PROBE_FROM_DATA},
    }

    def __post_init__(self) -> None:
        model = self.model.build()
        geometry = {name: getattr(model, name) for name in GEOMETRY}
        self.data = dataclasses.replace(self.data, **geometry)
        like_training = {name: getattr(self.data, name) for name in PROBE_FROM_DATA}
        self.probe = dataclasses.replace(
            self.probe, data=dataclasses.replace(self.probe.data, **geometry, **like_training)
        )

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.run_name):
            raise ConfigError(f"run_name {self.run_name!r} must be 1-128 letters, digits, '.', '_' or '-' "
                              "(it names folders and MLflow runs)")
        if not self.storage_path:
            raise ConfigError("storage_path is empty: give a local folder or s3://bucket/prefix")
        if not 0.0 < self.data.mask_ratio < 1.0:
            raise ConfigError(f"data.mask_ratio must lie in (0, 1), got {self.data.mask_ratio}")
        if self.data.mask_type not in ("tube", "random"):
            raise ConfigError(f"data.mask_type must be 'tube' or 'random', got {self.data.mask_type!r}")
        if self.data.clips_per_video < 1:
            raise ConfigError(f"data.clips_per_video must be >= 1, got {self.data.clips_per_video}")
        if self.data.rand_augment or self.data.random_erasing:  # set here, they would be ignored
            raise ConfigError(
                "data.rand_augment and data.random_erasing are finetuning augmentations; VideoMAE "
                "pretraining uses multi-scale crops and masking only (data.pretrain_scales, data.mask_*)"
            )
