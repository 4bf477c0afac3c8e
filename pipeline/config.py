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
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.storage import redact

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


class CliValue(str):
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
        node[path[-1]] = CliValue(value)
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
        return yaml.safe_load(value) if isinstance(value, CliValue) else value
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, CliValue) and value.lower() in ("null", "none", "~"))
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
            if value == choice or (isinstance(value, CliValue) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, CliValue):
            parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
            value = [CliValue(v) if isinstance(v, str) else v for v in parsed]
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
        if isinstance(value, CliValue):
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, CliValue):
            low = value.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, CliValue):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, CliValue):
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
            hint = f"; set {source} instead" if " " not in source else ""  # a key, or words (no key to set)
            raise ConfigError(f"{derived} is taken from {source}{hint}")
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
