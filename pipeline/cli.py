"""The command line every config-driven job shares: ``--config FILE`` + ``--set key=value``, exit codes.

One place decides what a user sees when a job is started wrong (exit 2 and one ``error:`` line naming
the bad input, before any worker starts), stopped (SIGTERM from ``ray job stop`` unwinds like Ctrl-C,
so MLflow runs close as KILLED; exit 130) or finishes without a result (exit 1).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline import config as config_lib
from pipeline.data.labels import LabelError
from pipeline.data.manifest import ManifestError
from pipeline.models.videomae import CheckpointError
from pipeline.storage import StorageError

C = TypeVar("C")
R = TypeVar("R")


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (config, storage, manifest, checkpoint, labels), not a bug."""

    return config_lib.ConfigError, StorageError, ManifestError, CheckpointError, LabelError


def in_ray_job_copy(cwd: Path) -> bool:
    """True inside the temporary copy of the working dir that ``ray job submit --working-dir`` runs in
    (``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``), which Ray deletes later."""
    parts = cwd.parts
    pairs = zip(parts, parts[1:], strict=False)  # each folder with its child
    return any(a == "runtime_resources" and b == "working_dir_files" for a, b in pairs)


def check_outputs_outlive_job(storage_path: str, cwd: Path | None = None) -> None:
    """Refuse a relative ``storage_path`` in a Ray job: its checkpoints would vanish with the job's copy."""
    cwd = cwd or Path.cwd()
    relative = bool(storage_path) and "://" not in storage_path and not os.path.isabs(storage_path)
    if relative and in_ray_job_copy(cwd):
        raise config_lib.ConfigError(
            f"storage_path {storage_path!r} is relative, and this job runs in Ray's temporary copy of the "
            f"working dir ({cwd}), which Ray deletes: give s3://bucket/prefix or an absolute path that "
            "every node shares, e.g. --set storage_path=s3://my-bucket/runs"
        )


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    default_preset: str | None,
    config_example: str,
    set_example: str,
    config_cls: type[C],
    run: Callable[[C], R],
    succeeded: Callable[[R], bool],
) -> int:
    """Parse the CLI, load the config (``default_preset`` from configs/ when none is given), run it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"YAML preset: a path, or a name in configs/ ({config_example})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {set_example} (repeatable)")
    args = parser.parse_args(argv)
    default = config_lib.CONFIG_DIR / f"{default_preset}.yaml" if default_preset else None
    path = args.config or (str(default) if default and default.exists() else None)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.time()
    try:
        cfg = config_lib.load(config_cls, path, args.overrides)
        check_outputs_outlive_job(getattr(cfg, "storage_path", ""))
        result = run(cfg)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{prog} took {time.time() - started:.0f} s", flush=True)
    return 0 if succeeded(result) else 1
