"""The ``model`` section of the training and probe jobs: a named size plus any VideoMAEConfig field."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.config import ConfigError
from pipeline.models.videomae import VideoMAEConfig
from pipeline.models.videomae.configuration import CLIP_FIELDS, PRESETS


def _videomae_fields() -> dict[str, Any]:
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
        if self.preset.lower().replace("_", "-") not in PRESETS:
            raise ConfigError(
                f"model.preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}"
            )

    def build(self, **more: Any) -> VideoMAEConfig:
        return VideoMAEConfig.from_preset(self.preset, **{**self.overrides, **more})

    def validate(self) -> None:
        self.build().validate()


def derived_from_model(section: str, source: str = "model") -> dict[str, str]:
    """``__derived_keys__`` of a job config: the clip geometry and normalisation of the ``section`` data
    config are the model's, and setting them there is refused with a pointer to ``source``."""
    if " " in source:  # words, not a config section: every key is the model's
        return {f"{section}.{name}": source for name in (*CLIP_FIELDS, "mean", "std")}
    keys = {f"{section}.{name}": f"{source}.{name}" for name in CLIP_FIELDS}
    keys.update({f"{section}.mean": f"{source}.image_mean", f"{section}.std": f"{source}.image_std"})
    return keys
