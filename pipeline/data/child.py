"""One supervisor for work that can hang or crash inside C code: a long-lived child process, one request
at a time, with a time limit per request.

Decoding (decord, PyAV) and transcoding can block forever in C or crash the interpreter, and a Python
thread cannot interrupt C code. So that work runs in a child process (``python -m <module>``) that the
parent talks to over two pipes (``multiprocessing`` Connections: pickled messages). The parent waits for
each answer at most until a deadline; past it the child is killed (SIGKILL works on C code) and the next
request starts a fresh one. A child that dies mid-request is reported with its exit code, and the next
request starts a fresh one too. Starting a child costs its imports once, not per request, and that time is
not counted against a request's limit.

Used by the training decoder (pipeline/data/decode.py) and the preprocessing worker
(pipeline/preprocess/worker.py); a child module calls :func:`parent_channel` and answers in a loop.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import pipeline

STARTUP_TIMEOUT_S = 120.0


class ChildTimeout(Exception):
    """No answer before the deadline; the child was killed."""


class ChildDied(Exception):
    """The child exited (crashed) during a request."""

    def __init__(self, exit_code: int | None):
        super().__init__(f"child process exited with code {exit_code}")
        self.exit_code = exit_code


class ChildProcess:
    """``python -m module <fd in> <fd out> *args`` as a restartable request/answer server."""

    def __init__(self, module: str, args: Sequence[str] = (), pass_fds: Sequence[int] = ()):
        self.module, self.args, self.pass_fds = module, list(args), tuple(pass_fds)
        self._proc: subprocess.Popen | None = None
        self._recv: Connection | None = None
        self._send: Connection | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child and wait (``STARTUP_TIMEOUT_S`` at most) until it says it is ready."""
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        env = dict(os.environ)
        # The child must import this package even where it is only on sys.path (a Ray job's working dir).
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.module, str(child_r), str(child_w), *self.args],
            pass_fds=(child_r, child_w, *self.pass_fds),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        os.close(child_r)
        os.close(child_w)
        self._recv, self._send = Connection(parent_r, writable=False), Connection(parent_w, readable=False)
        try:
            ready = self._recv.poll(STARTUP_TIMEOUT_S) and self._recv.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        except BaseException:
            self.kill()
            raise
        if not ready:
            code = self._proc.poll()
            self.kill()
            raise RuntimeError(
                f"the helper process {self.module} did not start (exit code {code}, limit "
                f"{STARTUP_TIMEOUT_S}s); run `python -m {self.module}` to see why"
            )

    def send(self, message: Any) -> None:
        """Send a message, starting the child first if none is running."""
        if not self.running:
            self.kill()
            self.start()
        try:
            self._send.send(message)
        except (BrokenPipeError, OSError):
            raise ChildDied(self.kill()) from None

    def receive(self, deadline: float) -> Any:
        """The child's next message, waiting until ``deadline`` (``time.monotonic()``) at most."""
        try:
            if not self._recv.poll(max(deadline - time.monotonic(), 0.0)):
                self.kill()
                raise ChildTimeout()
            return self._recv.recv()
        except (EOFError, OSError):
            raise ChildDied(self.kill()) from None

    def call(self, message: Any, timeout_s: float) -> Any:
        """Send ``message`` and wait at most ``timeout_s`` for the answer."""
        self.send(message)
        return self.receive(time.monotonic() + timeout_s)

    def kill(self) -> int | None:
        """Kill the child (a no-op if there is none); returns its exit code."""
        if self._proc is None:
            return None
        self._proc.kill()
        code = self._proc.wait()
        for conn in (self._recv, self._send):
            conn.close()
        self._proc = self._recv = self._send = None
        return code

    def close(self) -> None:
        """Let the child end (its input closes), then make sure it did."""
        if self._proc is None:
            return
        self._send.close()  # the child reads EOF and returns; closing twice is harmless
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self.kill()


def parent_channel() -> tuple[Connection, Connection, list[str]]:
    """In a child started by :class:`ChildProcess`: (receive, send, extra args); tells the parent "ready".
    Call it after the slow imports, so they do not count against the first request's time limit."""
    recv = Connection(int(sys.argv[1]), writable=False)
    send = Connection(int(sys.argv[2]), readable=False)
    send.send(("ready",))
    return recv, send, sys.argv[3:]
