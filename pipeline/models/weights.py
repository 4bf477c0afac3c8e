"""Where finetuning and evaluation get their weights: one URI, many kinds of source.

``model_uri`` may name, locally or in ``s3://``:

- a model directory in transformers' format (``config.json`` + ``model.safetensors``): one of ours
  (a checkpoint or an export) or one saved by transformers;
- a run folder of ours (``<storage_path>/<run_name>``): its ``export/`` if the run finished, else its
  newest ``checkpoint_*``;
- an original VideoMAE checkpoint file (``.pth``/``.pt``, MCG-NJU/VideoMAE), converted on the fly.

Problems are reported before any training or inference starts, naming the URI: nothing there, a file
that is not a checkpoint, a checkpoint of another architecture size than asked for, a pretraining
checkpoint given to evaluation (no classifier), a classifier for other labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.models.videomae import CheckpointError, VideoMAEConfig, VideoMAEForVideoClassification, convert

CACHE_DIR = Path(os.environ.get("PIPELINE_MODEL_CACHE", "~/.cache/videomae-pipeline/models")).expanduser()
ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")
# Config fields that fix the shapes of the encoder's weights: a checkpoint must agree with them.
# What an original checkpoint's weights cannot tell (fixed position tables, heads); taken from the config.
CONVERT_FIELDS = ("num_frames", "image_size", "num_attention_heads", "decoder_num_attention_heads")
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "tubelet_size",
    "num_channels",
    "qv_bias",
)


def _local_copy(uri: str) -> Path:
    """A local folder/file for ``uri``: local paths as they are, S3 objects downloaded once into a cache."""
    if not storage.is_s3(uri):
        return Path(storage.resolve(uri)[1])
    target = CACHE_DIR / hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    if target.exists():
        return target / "file" if (target / "file").exists() else target
    files = [(u, s) for u, s in storage.list_files(uri) if "/checkpoint_" not in u[len(uri.rstrip("/")) :]]
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if not files and storage.exists(uri):  # a single object (an original .pth)
            tmp.mkdir(parents=True)
            (tmp / "file").write_bytes(storage.read_bytes(uri))
        for file_uri, _ in files:
            local = tmp / storage.relative_to(file_uri, uri)
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(file_uri))
        if not tmp.exists():
            raise FileNotFoundError(f"no model at {storage.redact(uri)}: nothing there")
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "file" if (target / "file").exists() else target


def _newest_checkpoint_uri(uri: str) -> str | None:
    try:
        dirs = {
            f.split("/checkpoint_")[0] + "/checkpoint_" + f.split("/checkpoint_")[1].split("/")[0]
            for f, _ in storage.list_files(uri)
            if "/checkpoint_" in f and f.endswith("/config.json")
        }
    except storage.StorageError:
        return None
    return max(dirs) if dirs else None


def locate(uri: str) -> str:
    """The URI of the model directory (or original checkpoint file) that ``uri`` stands for."""
    if not uri:
        raise CheckpointError("no model given (empty URI)")
    if uri.endswith(ORIGINAL_SUFFIXES) or storage.exists(storage.join(uri, "config.json")):
        if not storage.exists(uri):
            raise CheckpointError(f"no checkpoint at {storage.redact(uri)}: not found")
        return uri
    if not storage.exists(uri):
        raise CheckpointError(f"no model at {storage.redact(uri)}: not found")
    export = storage.join(uri, "export")
    if storage.exists(storage.join(export, "config.json")):
        return export
    newest = _newest_checkpoint_uri(uri)
    if newest:
        return newest
    raise CheckpointError(
        f"{storage.redact(uri)} is not a model: expected config.json + model.safetensors (a transformers "
        "directory or a checkpoint of ours), a run folder with export/ or checkpoint_*/, or an original "
        "VideoMAE .pth file"
    )


def model_dir(uri: str, convert: dict[str, Any] | None = None) -> Path:
    """A local transformers-format directory for ``uri`` (downloading and converting as needed;
    ``convert`` holds the CONVERT_FIELDS an original checkpoint needs)."""
    located = locate(uri)
    local = _local_copy(located)
    if local.is_file() or located.endswith(ORIGINAL_SUFFIXES):
        return _convert_original(local, located, convert or {})
    return local


def _convert_original(file: Path, uri: str, overrides: dict[str, Any]) -> Path:
    """Original VideoMAE ``.pth`` -> a transformers-format directory in the cache (once per settings)."""

    key = json.dumps([uri, sorted(overrides.items())])
    target = CACHE_DIR / ("converted-" + hashlib.sha1(key.encode()).hexdigest()[:16])
    if (target / "config.json").exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name, dir=CACHE_DIR))
    try:
        convert.convert_checkpoint(file, tmp, **overrides)
        if not target.exists():
            os.replace(tmp, target)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to convert means "not an original checkpoint"
        raise CheckpointError(f"{storage.redact(uri)} is not a convertible VideoMAE checkpoint: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_config(uri: str, convert: dict[str, Any] | None = None) -> VideoMAEConfig:
    """The model config behind ``uri`` with a clear error for anything that is not a VideoMAE model."""
    directory = model_dir(uri, convert)
    try:
        return VideoMAEConfig.from_pretrained(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{storage.redact(uri)}: not a VideoMAE model config: {e}") from e


def check_architecture(source: VideoMAEConfig, wanted: dict[str, Any], uri: str) -> None:
    """Fail when the config asks for an encoder of another shape than the checkpoint holds."""
    clashes = [
        f"{k}: checkpoint {getattr(source, k)!r}, config {wanted[k]!r}"
        for k in ARCHITECTURE_FIELDS
        if k in wanted and wanted[k] != getattr(source, k)
    ]
    if clashes:
        raise CheckpointError(
            f"{storage.redact(uri)} does not match the configured model: "
            + "; ".join(clashes)
            + " (drop these model overrides to take the checkpoint's architecture)"
        )


def load_for_finetuning(
    uri: str, id2label: dict[int, str], **overrides: Any
) -> VideoMAEForVideoClassification:
    """A classifier for ``id2label`` whose encoder comes from ``uri`` (pretraining checkpoint, encoder or
    another classifier); the head is new unless the source is a classifier for exactly these labels."""
    convert = {k: overrides[k] for k in CONVERT_FIELDS if k in overrides}
    source = read_config(uri, convert)
    check_architecture(source, overrides, uri)
    config = VideoMAEConfig.from_dict(source.to_dict(), **overrides, id2label=dict(id2label), label2id=None)
    config.architectures = None
    same_head = source.id2label == config.id2label and (source.architectures or [""])[0].endswith(
        "VideoMAEForVideoClassification"
    )
    try:
        model, info = VideoMAEForVideoClassification.from_pretrained(
            model_dir(uri, convert), config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except FileNotFoundError as e:
        raise CheckpointError(f"{storage.redact(uri)}: {e}") from e
    heads = VideoMAEForVideoClassification._head_prefixes
    bad = [m for m in info["mismatched_keys"] if not m.startswith(heads)]
    if bad:
        raise CheckpointError(f"{storage.redact(uri)}: weights do not fit the model: {bad}")
    if same_head and info["missing_keys"]:
        raise CheckpointError(f"{storage.redact(uri)}: classifier checkpoint lacks {info['missing_keys']}")
    return model


def load_classifier(uri: str) -> VideoMAEForVideoClassification:
    """A finetuned classifier for inference; a checkpoint without a trained head is refused."""
    config = read_config(uri)
    if not (config.architectures or [""])[0].endswith("VideoMAEForVideoClassification"):
        kind = (config.architectures or ["an unknown model"])[0]
        raise CheckpointError(
            f"{storage.redact(uri)} holds {kind}, not a finetuned "
            "VideoMAEForVideoClassification: finetune it first (jobs/finetune.py)"
        )
    try:
        model = VideoMAEForVideoClassification.from_pretrained(model_dir(uri), config=config, strict=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{storage.redact(uri)}: {e}") from e
    return model.eval()
