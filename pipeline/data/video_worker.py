"""Run :func:`pipeline.data.probe.process_video` in a child process with a time limit per video.

A video that hangs the demuxer or decoder (or a file that blocks on read) cannot be interrupted from
a Python thread, and a decoder crash would take the Ray worker down with it. So each worker keeps
one long-lived child (``python -m pipeline.data.video_worker``) and talks to it over pipes, one JSON
line per video; past the limit the child is killed, its temporary output removed, and a fresh child
takes the next video. Starting a child costs ~0.5 s once, not per video.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict

import pipeline
from pipeline.data.probe import VideoSettings, process_video


class IsolatedVideoWorker:
    """Processes videos one at a time in a child process that is replaced after a timeout or crash."""

    def __init__(self, settings: VideoSettings, timeout_s: float):
        self.settings = settings
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        # The child must import this package even when it is only on sys.path (e.g. a Ray job's
        # working dir), not installed.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.data.video_worker", json.dumps(asdict(self.settings))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )

    def process(self, src: str, dst: str | None, tmp_path: str | None) -> dict:
        """Result row for one video; ``timeout`` / ``decoder_crash`` rows when the child does not answer."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        start = time.monotonic()
        try:
            proc.stdin.write(json.dumps({"src": src, "dst": dst, "tmp": tmp_path}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
            line = proc.stdout.readline() if ready else None
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)
        exit_code = self._kill()
        if line is None:
            status, error = "timeout", f"no result within {self.timeout_s:g}s; worker process killed"
        else:
            status, error = "decoder_crash", f"worker process died (exit code {exit_code})"
        if tmp_path and os.path.exists(tmp_path):
            os.remove(tmp_path)
        return {"original_path": src, "status": status, "error": error, "seconds": time.monotonic() - start}

    def _kill(self) -> int | None:
        """Kill the child (a no-op if it died already); returns its exit code."""
        if self._proc is None:
            return None
        self._proc.kill()
        code = self._proc.wait()
        self._proc = None
        return code

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None


def main() -> None:
    """Child side: read one JSON task per line from stdin, answer one JSON row per line."""
    # Keep the answer channel clean: anything a library prints to fd 1 goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import av

    av.logging.set_level(av.logging.PANIC)
    settings = VideoSettings(**json.loads(sys.argv[1]))
    for line in sys.stdin:
        task = json.loads(line)
        row = process_video(task["src"], task["dst"], task["tmp"], settings)
        answers.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
