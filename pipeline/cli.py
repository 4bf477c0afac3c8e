"""The command line every config-driven job shares: ``--config FILE`` + ``--set key=value``, exit codes.

One place decides what a user sees when a job is started wrong (exit 2 and one ``error:`` line naming
the bad input, before any worker starts), stopped (SIGTERM from ``ray job stop`` unwinds like Ctrl-C,
so MLflow runs close as KILLED; exit 130) or finishes without a result (exit 1).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pipeline import config as config_lib

C = TypeVar("C")
R = TypeVar("R")


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (config, storage, manifest, checkpoint, labels), not a bug."""
    from pipeline.data.manifest import ManifestError
    from pipeline.data.storage import StorageError
    from pipeline.eval.labels import LabelError
    from pipeline.models.videomae import CheckpointError

    return config_lib.ConfigError, StorageError, ManifestError, CheckpointError, LabelError


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
        result = run(config_lib.load(config_cls, path, args.overrides))
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
