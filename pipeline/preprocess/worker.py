"""Run :func:`pipeline.preprocess.transcode.process_video` in a child process with a time limit per video.

A video that hangs the demuxer or decoder (or a file that blocks on read) cannot be interrupted from
a Python thread, and a decoder crash would take the Ray worker down with it. So each Ray worker process
running the job's tasks keeps one long-lived child (``python -m pipeline.preprocess.worker``, supervised
by pipeline/data/child.py, as the training decoder is); past the limit the child is killed, its temporary
output removed, and a fresh child takes the next video.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from pipeline.data.child import ChildDied, ChildProcess, ChildTimeout, parent_channel
from pipeline.preprocess.transcode import VideoSettings, process_video


class IsolatedVideoWorker:
    """Processes videos one at a time in a child process that is replaced after a timeout or crash."""

    def __init__(self, settings: VideoSettings, timeout_s: float):
        self.settings = settings
        self.timeout_s = timeout_s
        self._child = ChildProcess("pipeline.preprocess.worker")

    def process(self, src: str, dst: str | None, tmp_path: str | None) -> dict:
        """Result row for one video; ``timeout`` / ``decoder_crash`` rows when the child does not answer."""
        start = time.monotonic()
        try:
            task = {"src": src, "dst": dst, "tmp": tmp_path, "settings": asdict(self.settings)}
            return self._child.call(task, self.timeout_s)
        except ChildTimeout:
            status, error = "timeout", f"no result within {self.timeout_s:g}s; child process killed"
        except ChildDied as e:
            status, error = "decoder_crash", f"child process died (exit code {e.exit_code})"
        if tmp_path and os.path.exists(tmp_path):
            os.remove(tmp_path)
        return {"original_path": src, "status": status, "error": error, "seconds": time.monotonic() - start}

    def close(self) -> None:
        self._child.close()


def main() -> None:
    """Child side: one task per message, one result row back."""
    import av

    av.logging.set_level(av.logging.PANIC)
    recv, send, _ = parent_channel()
    while True:
        try:
            task = recv.recv()
        except EOFError:
            return
        send.send(process_video(task["src"], task["dst"], task["tmp"], VideoSettings(**task["settings"])))


if __name__ == "__main__":
    main()
