"""A recording TCP proxy on 127.0.0.1 in front of the test S3 server: what requests reach the server's door
(method, path, ``Range``), and a connection cut once after a given number of response bytes (a stream that
dies mid-body). The idea of benchmarks/data_scale.py's counting proxy, with what the tests need to see."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    range: str | None  # the Range header, e.g. "bytes=65536-"


class _Heads:
    """Splits one connection's client bytes into HTTP/1.1 requests (keep-alive sends several): a head up
    to the blank line, then ``Content-Length`` bytes of body, skipped."""

    def __init__(self, record) -> None:
        self.record = record
        self.buffer = b""
        self.body = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.body:
                skip = min(self.body, len(self.buffer))
                self.body -= skip
                self.buffer = self.buffer[skip:]
                if self.body:
                    return
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            method, target = (lines[0].split(" ") + [""])[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            self.record(Request(method, target.partition("?")[0], headers.get("range")))
            self.body = int(headers.get("content-length") or 0)


class RecordingProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``, recording every request in ``requests``.
    ``cut_once_after(n)``: the next connection to carry ``n`` response bytes is closed right there."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.requests: list[Request] = []
        self.cut_at: int | None = None
        self.on_cut: Callable[[], None] | None = None
        self.cuts = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_once_after(self, nbytes: int, on_cut: Callable[[], None] | None = None) -> None:
        """Close the next connection that carries ``nbytes`` response bytes (headers included) after
        them; ``on_cut()`` runs first, before the client can see the end (e.g. to replace the object)."""
        with self.lock:
            self.cut_at, self.on_cut = nbytes, on_cut

    def _record(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        heads = _Heads(self._record)
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                heads.feed(data)
                upstream.sendall(data)
        _end(client, upstream)

    def _responses(self, upstream: socket.socket, client: socket.socket) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                with self.lock:
                    cut = self.cut_at is not None and sent + len(data) >= self.cut_at
                    if cut:
                        data, self.cut_at, on_cut = data[: self.cut_at - sent], None, self.on_cut
                        self.cuts += 1
                client.sendall(data)
                sent += len(data)
                if cut:
                    if on_cut is not None:
                        on_cut()
                    break
        _end(client, upstream)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accepting thread
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                _end(s)


def _end(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
