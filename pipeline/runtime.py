"""What every job does on the driver before its work: start Ray, check its run name, find its folder.

One place for rules that were repeated job by job: which Ray to join (the cluster of ``ray job submit``,
else a private local instance, never a stranger's that happens to run on the machine), what a run name
may be (it names folders and MLflow runs), and where a job's outputs go.
"""

from __future__ import annotations

import os
import re
import sys

from pipeline import storage
from pipeline.config import ConfigError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def init_ray(address: str | None = None) -> None:
    """Join ``address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    quiet_progress_bars(sys.stdout.isatty())


def quiet_progress_bars(terminal: bool) -> None:
    """Ray Data's per-operator progress bars only on a terminal: in a log (``ray job logs``, CI) their
    redraws (``\x1b[A``) fill it with copies of the bars. Off the terminal Ray Data still prints one line
    as each dataset starts executing, naming its operators."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = terminal
    context.enable_operator_progress_bars = terminal


def check_run_name(name: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"run_name {name!r} must be 1-128 letters, digits, '.', '_' or '-' "
            "(it names folders and MLflow runs)"
        )


def run_folder(storage_path: str, run_name: str) -> str:
    """``<storage_path>/<run_name>``, a local path made absolute (Ray workers need one meaning for it)."""
    return storage.join(storage.absolute(storage_path), run_name)
