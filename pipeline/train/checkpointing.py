"""Checkpoint layout, save, restore and export, and one rank's recovery (``Checkpointer``).

A checkpoint is a directory that is *also* a transformers-format model directory, so finetuning and
``from_pretrained`` read it directly::

    config.json, model.safetensors     the model (save_pretrained of the unwrapped module)
    train_state.pt                     optimizer, schedule, grad scaler, progress (step, epoch, position)
    rng_rank<r>.pt                     each rank's torch / numpy / python RNG states
    job_config.yaml                    the resolved job config of the run that wrote it
    checkpoint.json                    rank 0's files and their sizes, the step: the completeness check
    sharded/                           under ``scaling.strategy: fsdp`` only: every rank's shards of the
                                       model and optimizer (torch.distributed.checkpoint; train_state.pt
                                       then holds no optimizer), read back by a group of any size

Under FSDP the model files are still whole (gathered to rank 0 at each checkpoint), so exports, the probe
and finetuning read an FSDP checkpoint as any other; resuming one needs ``scaling.strategy: fsdp``, and a
DDP checkpoint resumes under DDP.

Everything is loaded with ``torch.load(weights_only=True)`` or safetensors: a checkpoint is data, never
code. Ray Train uploads the directory to ``storage_path/<run>/checkpoint_*`` and keeps the last K; every
rank reports into the same checkpoint (rank 0 writes the model and state, each rank its RNG file).

A checkpoint whose upload was cut off (a missing or short file: S3 objects arrive whole or not at all, a
local copy can stop midway) is *torn*: ``torn_reason`` finds it from ``checkpoint.json``, ``load`` refuses
it, and ``Checkpointer.load`` resumes from the newest complete one before it instead (docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.train import ranks
from pipeline.train.metrics import say
from pipeline.train.sharding import full_state_dict, is_sharded, unwrap

MODEL_FILES = ("config.json", "model.safetensors")
TRAIN_STATE = "train_state.pt"
JOB_CONFIG = "job_config.yaml"
MANIFEST = "checkpoint.json"
SHARDED = "sharded"  # torch.distributed.checkpoint's folder of an FSDP run's shards
FORMAT_VERSION = 2  # 2: checkpoint.json; 1 (no manifest) still loads
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d{8})$")


class TornCheckpoint(RuntimeError):
    """A checkpoint with a missing or short file (an upload cut off); the message says which."""


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # also at the end of training
    keep_last: int = 3  # Ray Train deletes older checkpoints
    # async: the upload runs in the background while training goes on (Ray Train's ASYNC mode; the run
    # waits for it at the end); sync: every rank waits for its upload (benchmarks/checkpoint_stall.py)
    upload: str = "async"

    def validate(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")
        if self.upload not in ("async", "sync"):
            raise ConfigError(f"checkpoint.upload must be 'async' or 'sync', got {self.upload!r}")


@dataclass
class Progress:
    """Where training stands. ``step`` counts optimizer steps; ``epoch`` and ``step_in_epoch`` are the data
    position, and ``epoch_done`` the videos of the epoch trained on (a packed bitmap over its positions,
    base64; pipeline/data/resume.py): an interrupted epoch resumes with the videos it had not trained on.
    The bitmap indexes the positions of one epoch plan: ``data_fingerprint`` names the plan's inputs
    (``data_inputs``: per source its URI, size, pieces and their digest), so a resume on other data is
    seen, and said."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    clips_seen: int = 0
    world_size: int = 1
    epoch_done: str = ""
    epoch_begun: list = field(default_factory=list)  # [position, mask of trained clips] of begun videos
    data_fingerprint: str = ""
    data_inputs: list = field(default_factory=list)


# --- RNG ----------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and ints only, so ``weights_only=True`` can read them back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "python_version": random.getstate()[0],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- save / load --------------------------------------------------------------------------------------------


def save(directory: str | os.PathLike, *, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, scaler: torch.amp.GradScaler | None, progress: Progress,
         job_config_yaml: str) -> Path:
    """Write this rank's share of a checkpoint into ``directory`` (a fresh local folder)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    sharded = is_sharded(model)
    if sharded:  # every rank writes its shards (a collective), then the whole model goes to rank 0's CPU
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(unwrap(model), optimizer)
        (path / SHARDED).mkdir()
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path / SHARDED))
        whole = full_state_dict(model, rank0_only=True)
    if rank == 0:
        unwrap(model).save_pretrained(path, state_dict=whole if sharded else None)
        torch.save({
            "format_version": FORMAT_VERSION,
            "optimizer": None if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "progress": asdict(progress),
        }, path / TRAIN_STATE)
        (path / JOB_CONFIG).write_text(job_config_yaml)
        files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.name in
                 (*MODEL_FILES, TRAIN_STATE, JOB_CONFIG)}
        manifest = {"format_version": FORMAT_VERSION, "step": progress.step, "files": files,
                    "sharded": sharded}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def torn_reason(directory: str | os.PathLike) -> str | None:
    """Why the checkpoint in ``directory`` is incomplete (None: it is whole)."""
    path = Path(directory)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        missing = [f for f in (*MODEL_FILES, TRAIN_STATE) if not (path / f).exists()]
        if missing:
            return f"missing {', '.join(missing)}"
        try:  # written before checkpoint.json existed: whole if its state loads
            state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a cut-off file fails in any of several ways
            return f"{TRAIN_STATE} unreadable ({type(e).__name__}) and no {MANIFEST}"
        return None if state.get("format_version", 1) < 2 else f"no {MANIFEST}"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name, size in manifest["files"].items():
        if not (path / name).exists():
            return f"missing {name}"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} of {size} bytes"
    return _torn_shards(path / SHARDED) if manifest.get("sharded") else None


def _torn_shards(path: Path) -> str | None:
    """Why an FSDP checkpoint's shards are incomplete: every file torch.distributed.checkpoint's metadata
    names must hold the bytes it points into (other ranks' files are in no rank's manifest)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing, cut off or unreadable: torn either way
        return f"{SHARDED}/.metadata unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).exists() else -1
        if have < size:
            return f"{SHARDED}/{name} " + ("missing" if have < 0 else f"has {have} of {size} bytes")
    return None


def checkpoint_step(name: str) -> int | None:
    """The step in a checkpoint folder's name (``checkpoint_00001000``), None for other names."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def newest_complete(run_dir: str, at_most: int | None = None) -> tuple[str, list[tuple[str, str]]]:
    """(URI of the newest whole checkpoint below ``run_dir`` at step <= ``at_most``, or "" if none; the
    torn ones passed on the way, as (URI, why))."""
    torn = []
    for step, uri in checkpoints_in(run_dir):
        if at_most is not None and step > at_most:
            continue
        with fetched(uri) as directory:
            why = torn_reason(directory)
        if why is None:
            return uri, torn
        torn.append((uri, why))
    return "", torn


def checkpoints_in(run_dir: str) -> list[tuple[int, str]]:
    """(step, URI) of every checkpoint folder below ``run_dir``, newest first."""
    folders: dict[str, int] = {}
    try:
        files = storage.list_files(run_dir)
    except storage.StorageUnavailable:
        raise  # an outage is not "no checkpoints": resuming from step 0 would throw the run away
    except storage.StorageError:  # nothing there yet
        return []
    for uri, _ in files:
        name = storage.relative_to(uri, run_dir).split("/", 1)[0]
        step = checkpoint_step(name)
        if step is not None:
            folders[name] = step
    return sorted(((step, storage.join(run_dir, name)) for name, step in folders.items()), reverse=True)


@contextlib.contextmanager
def fetched(uri: str) -> Iterator[Path]:
    """A local folder holding the checkpoint at ``uri`` (the folder itself when local; a download of
    every file below it for s3://)."""
    if not storage.is_s3(uri):
        yield Path(storage.resolve(uri)[1])
        return
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
        for file_uri, _ in storage.list_files(uri):
            target = Path(tmp) / storage.relative_to(file_uri, uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(file_uri))
        yield Path(tmp)


def read_progress(directory: str | os.PathLike) -> Progress:
    state = torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)
    return Progress(**state["progress"])


def load(directory: str | os.PathLike, *, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, scaler: torch.amp.GradScaler | None) -> Progress:
    """Restore everything ``save`` wrote into live objects; returns the progress to continue from."""
    path = Path(directory)
    reason = torn_reason(path)
    if reason:
        raise TornCheckpoint(f"checkpoint {path} is torn: {reason}")
    state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    written_sharded = state["optimizer"] is None
    if written_sharded != is_sharded(model):
        raise ConfigError(
            f"checkpoint {path} was written with scaling.strategy={'fsdp' if written_sharded else 'ddp'}: "
            "resume it with the same strategy (its exported model loads under either)")
    if written_sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(unwrap(model), optimizer)
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path / SHARDED))
        set_state_dict(unwrap(model), optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)
    else:
        unwrap(model).load_checkpoint_state(load_file(path / "model.safetensors"), source=str(path),
                                            strict=True)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return Progress(**state["progress"])


def export_model(checkpoint_dir: str | os.PathLike, dest_uri: str) -> str:
    """Copy the transformers-format model files of a checkpoint to ``dest_uri`` (local or s3://)."""
    src = Path(checkpoint_dir)
    if storage.is_s3(dest_uri):
        for name in MODEL_FILES:
            storage.upload_file(str(src / name), storage.join(dest_uri, name))
    else:
        dest = Path(storage.resolve(dest_uri)[1])
        dest.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            shutil.copyfile(src / name, dest / f".{name}.tmp")
            os.replace(dest / f".{name}.tmp", dest / name)
    return dest_uri


# --- one rank's recovery: load, save, roll back ----------------------------------------------------------


@dataclass
class TrainState:
    """The live objects a checkpoint restores (the model as trained: wrapped in DDP or not)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None


class NothingToRollBackTo(RuntimeError):
    """A rollback was asked for before any complete checkpoint exists."""


class Checkpointer:
    """One rank's checkpoints: which one to resume from (past torn ones), saving through Ray Train, and
    rolling back to the last whole one. Rank 0 decides every choice and the others follow
    (``ranks.agree_on``), so all ranks load the same checkpoint."""

    def __init__(self, state: TrainState, *, rank: int, world: int, seed: int, run_name: str,
                 run_dir: str | None, upload: str, job_config_yaml: str) -> None:
        self.state, self.rank, self.world, self.seed = state, rank, world, seed
        self.run_name, self.run_dir = run_name, run_dir
        self.upload, self.job_config_yaml = upload, job_config_yaml
        self.last_uri: str | None = None  # where a rollback goes
        self.torn_found = 0  # torn checkpoints passed over at the start

    def load(self) -> Progress | None:
        """The progress of the checkpoint Ray Train hands over, or, when that one is torn (its upload was
        cut off), of the newest complete one before it; None for a fresh start."""
        import ray.train

        restored = ray.train.get_checkpoint()
        if not restored:
            return None
        uri = self._uri_of(restored.path)

        def verdict() -> str | None:
            try:
                with restored.as_directory() as directory:
                    return torn_reason(directory)
            except storage.StorageUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - gone (removed as torn before) or unreadable
                return f"unreadable ({type(e).__name__}: {str(e)[:100]})"

        reason = ranks.agree_on(verdict())
        if reason is not None:
            return self._load_before_torn(uri, reason)
        with restored.as_directory() as directory:
            progress = self._load_from(directory)
        self.last_uri = uri
        return progress

    def save(self, progress: Progress, metrics: dict[str, float]) -> None:
        """Every rank writes its share into a local folder; Ray Train uploads them into one checkpoint, in
        the background under ``checkpoint.upload: async`` (training goes on meanwhile), and then deletes
        the local folder."""
        import ray.train

        local = tempfile.mkdtemp(prefix="videomae-checkpoint-")
        s = self.state
        save(local, rank=self.rank, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
             scaler=s.scaler, progress=progress, job_config_yaml=self.job_config_yaml)
        name = f"checkpoint_{progress.step:08d}"
        modes = ray.train.CheckpointUploadMode
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                             checkpoint_dir_name=name,
                             checkpoint_upload_mode=modes.ASYNC if self.upload == "async" else modes.SYNC,
                             delete_local_checkpoint_after_upload=True)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)  # Ray deletes it only after an upload
            raise
        if self.run_dir:
            self.last_uri = storage.join(self.run_dir, name)

    def roll_back(self) -> tuple[Progress, str]:
        """(progress, URI) of the last whole checkpoint, loaded into the live objects on every rank. An
        asynchronous upload may still be on its way, or may have failed: then an older one."""
        uri = self.last_uri
        if self.rank == 0 and uri and self.run_dir and not wait_until_whole(uri):
            uri, _ = newest_complete(self.run_dir, checkpoint_step(uri.rsplit("/", 1)[-1]))
        uri = ranks.agree_on(uri)
        if not uri:
            raise NothingToRollBackTo("no complete checkpoint yet")
        with fetched(uri) as directory:
            return self._load_from(directory), uri

    def _uri_of(self, path: str) -> str:
        """The storage URI of a path in Ray Train's storage filesystem."""
        return f"s3://{path}" if self.run_dir and storage.is_s3(self.run_dir) else path

    def _load_from(self, directory: str | Path) -> Progress:
        s = self.state
        progress = load(directory, rank=self.rank, model=s.model, optimizer=s.optimizer,
                        scheduler=s.scheduler, scaler=s.scaler)
        if not (Path(directory) / f"rng_rank{self.rank}.pt").exists():  # a new rank after a resize
            seed_everything(ranks.derive_seed(self.seed, self.rank, progress.step))
        return progress

    def _load_before_torn(self, torn_uri: str, reason: str) -> Progress | None:
        """Resume from the newest complete checkpoint older than a torn one (rank 0 chooses); once every
        rank has loaded it, rank 0 reports and removes the torn ones it passed."""
        torn_step = checkpoint_step(torn_uri.rstrip("/").rsplit("/", 1)[-1])
        at_most = None if torn_step is None else torn_step - 1
        choice = newest_complete(self.run_dir or "", at_most) if self.rank == 0 else None
        uri, passed = ranks.agree_on(choice)
        torn = [(torn_uri, reason), *passed]
        progress = None
        if uri:
            with fetched(uri) as directory:
                progress = self._load_from(directory)
            self.last_uri = uri
        ranks.barrier()  # nobody still reads what rank 0 removes
        if self.rank == 0:
            for bad, why in torn:
                say(f"[{self.run_name}] checkpoint {storage.redact(bad)} is torn ({why}): not used, removed")
                with contextlib.suppress(Exception):  # already gone, or storage refuses: reported anyway
                    storage.delete(bad, recursive=True)
            where = f"step {progress.step}" if progress else "the start (no complete checkpoint)"
            say(f"[{self.run_name}] resuming from {where} instead")
        self.torn_found = len(torn)
        return progress


def wait_until_whole(uri: str, timeout_s: float = 120.0) -> bool:
    """Whether the checkpoint at ``uri`` is (or within ``timeout_s`` becomes) whole: an asynchronous
    upload may still be on its way."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with fetched(uri) as directory:
                if torn_reason(directory) is None:
                    return True
        except storage.StorageUnavailable:
            raise
        except storage.StorageError:  # not there yet
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
