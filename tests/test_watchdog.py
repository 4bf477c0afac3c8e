"""The suite's hard bound on a test (tests/helpers/watchdog.py), in a pytest session of its own: a test stuck
where pytest-timeout cannot reach it ends the session with the test named and its stack printed, and a test
that pytest-timeout can end is still only a failure, the session going on."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

STUCK = """
import signal
import time


def test_stuck_in_native_code():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a native call: the alarm never lands
    time.sleep(120)


def test_after():
    pass
"""

SLOW = """
import time


def test_slow():
    time.sleep(120)


def test_after():
    pass
"""


def _session(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text(source)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "helpers.watchdog", "-p", "no:cacheprovider",
               "--timeout=1", "-o", "watchdog_margin_s=2", "test_case.py"]
    return subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS)},
                          capture_output=True, text=True, timeout=100)


def test_a_test_beyond_pytest_timeouts_reach_ends_the_session_naming_it_with_its_stack(tmp_path):
    done = _session(tmp_path, STUCK)
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    assert "watchdog: test_case.py::test_stuck_in_native_code still running after 3 s" in out
    assert "in test_stuck_in_native_code" in out  # the stuck frame, from the Python stacks
    assert "test_after" not in out  # the session ended there


def test_a_test_pytest_timeout_ends_is_a_failure_and_the_session_goes_on(tmp_path):
    done = _session(tmp_path, SLOW)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed" in out and "Timeout" in out
    assert "watchdog:" not in out
