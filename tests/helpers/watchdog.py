"""A hard bound on every test, as a pytest plugin (tests/conftest.py loads it).

pytest-timeout fails a test past ``--timeout`` by raising in the main thread, which a call blocked in native
code never sees: a CI run then sat silent until the runner's own limit, its output ending at the test before.
Past ``--timeout`` plus the ``watchdog_margin_s`` ini option, a thread prints every Python stack, the process
tree and the native stacks (py-spy), kills the session's child processes (nothing left holding CI's output
pipe) and exits with status 3; faulthandler's own thread, which needs no GIL, exits a minute later if that
thread cannot run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("watchdog_margin_s", "seconds past --timeout before the watchdog ends the session",
                  default="180")


_TERMINAL = pytest.StashKey[object]()  # the session's own stderr, outside pytest's capture


def _terminal(config: pytest.Config):
    """The stderr pytest started with: during a test, fd 2 is pytest's capture file, which is never shown
    if the session ends by ``os._exit``. Taken once, with capturing suspended for the moment."""
    if _TERMINAL not in config.stash:
        capture = config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            config.stash[_TERMINAL] = os.fdopen(os.dup(2), "w", buffering=1)
    return config.stash[_TERMINAL]


def _watchdog_report(nodeid: str, limit: float, out) -> None:
    """Say where a test that pytest-timeout could not end is stuck, then end the session."""
    import psutil

    out.write(f"\n+++ watchdog: {nodeid} still running after {limit:.0f} s; pytest-timeout did not end it\n")
    faulthandler.dump_traceback(file=out, all_threads=True)
    for command in (["ps", "-eo", "pid,ppid,stat,etime,pcpu,rss,args", "--forest"],
                    [str(BIN / "py-spy"), "dump", "--native", "--pid", str(os.getpid())]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            out.write(done.stdout[-20000:] + done.stderr[-2000:])
    out.flush()
    for child in psutil.Process().children(recursive=True):  # nothing left holding CI's output pipe
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Arm both watchdogs around the test's setup, call and teardown (see the module docstring)."""
    timeout = float(item.config.getoption("timeout", None) or 0)
    if timeout <= 0:
        yield
        return
    limit, out = timeout + float(item.config.getini("watchdog_margin_s")), _terminal(item.config)
    timer = threading.Timer(limit, _watchdog_report, args=(item.nodeid, limit, out))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(limit + 60, exit=True, file=out)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
