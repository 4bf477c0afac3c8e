"""The VideoMAE model family, state-dict and config.json compatible with transformers' classes."""

from .configuration import VideoMAEConfig
from .modeling import (
    CheckpointError,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
    VideoMAEModel,
    VideoMAEPreTrainedModel,
)

__all__ = [
    "CheckpointError",
    "VideoMAEConfig",
    "VideoMAEForPreTraining",
    "VideoMAEForVideoClassification",
    "VideoMAEModel",
    "VideoMAEPreTrainedModel",
]
