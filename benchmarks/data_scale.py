"""Data path at scale (issue 14): start-up and driver memory against manifest size, GET requests per clip
of per-file reads against WebDataset shards, and clips/s per core of both with object-storage latency.

1. Start-up. For manifests of 2k, 240k, 2M and 10M rows (a Parquet ``path`` column repeating 16 real
   small videos), each measurement in a fresh process with its own local Ray (2 CPUs): seconds from
   ``prepare_sources`` to the first batch of ``iter_batches(batch_size=8)``, and the driver's peak RSS
   above its RSS right after ``ray.init`` (sampled every 20 ms, and the kernel's peak). Baseline: the old
   driver-side path (``manifest.read_manifest`` on the driver, ``datasets.build_dataset(rows=...)``) at
   2k and 240k rows, stopped at ``--cap`` seconds.
2. GET requests. Videos on a local ``moto_server``, once as files and once as shards
   (``shards.ShardWriter`` + ``write_index``), read for one epoch of the training stream through a proxy
   on 127.0.0.1 that parses the HTTP requests on their way to the server and counts them by method
   (``LIST`` = a listing GET). A second shard set pads every sample to 1 MiB (a ``pad`` string in its
   JSON member), 256 per shard, so that a shard's bytes are those of real videos: the reader streams a
   shard in one GET whatever its size (the first version made one ranged GET per 16 MiB).
3. Throughput. Clips/s of the same two sets through Ray Data (decode_isolation "process", the default;
   an epoch longer than the window, so the stream never runs dry), counted over ``--seconds`` after a
   warm-up, with 0 and with a uniform 20-50 ms delay added by the proxy before each request is forwarded.
   Per core = clips/s / the CPUs Ray had (2). moto_server, the proxy and the driver share those cores.

Clips are tiny (4 frames, 32 px), so decoding is cheap and the costs per request and per task show.
Videos on S3 are copies of the 16 real ones under distinct keys (identical bytes, separate objects).

    python benchmarks/data_scale.py                 # about 18 minutes here
    python benchmarks/data_scale.py --quick         # 2k and 240k rows, fewer videos: about 5 minutes
    python benchmarks/data_scale.py --pause-while FILE   # on a shared machine: waits while FILE exists
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from s3_server import start_moto  # noqa: E402 - benchmarks/ is the script's folder

SIZES = {"2k": 2_000, "240k": 240_000, "2M": 2_000_000, "10M": 10_000_000}
OLD_SIZES = ("2k", "240k")  # the old path is measured where it finishes (issue: no dataset at 2M in 11 min)
CLIP = dict(num_frames=4, sampling_rate=2, image_size=32, patch_size=8, tubelet_size=2, mask_ratio=0.75,
            seed=0)
LATENCY_S = (0.020, 0.050)
MIB = 1 << 20


# --- shared helpers -----------------------------------------------------------------------------------

def make_videos(root: Path) -> list[Path]:
    """16 small real H.264 mp4s (64x64, 32 frames) below ``root``."""
    from pipeline.data.synthetic import make_dataset

    make_dataset(str(root), videos_per_class=2, num_frames=32, size=(64, 64), seed=0)
    return sorted((root / "videos").rglob("*.mp4"))


def pause_while(flag: str | None) -> float:
    """Wait while ``flag`` exists (a shared machine's "heavy job running" file), checking every 30 s, so a
    measurement starts only on a quiet machine; returns the seconds waited."""
    waited = 0.0
    while flag and os.path.exists(flag):
        print(f"  ({flag} exists: waiting)", flush=True)
        time.sleep(30)
        waited += 30
    return waited


def quiet_ray_data() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class PeakRSS:
    """This process's peak RSS above its RSS now: sampled every 20 ms, and the kernel's peak (ru_maxrss)
    when that rose after the start, which also catches a spike between two samples."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.kernel_base = self._kernel_peak()
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    @staticmethod
    def _kernel_peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def growth(self) -> int:
        self.stop.set()
        self.thread.join()
        kernel = self._kernel_peak()
        return max(self.peak, kernel if kernel > self.kernel_base else 0) - self.base


# --- 1. start-up against manifest size ----------------------------------------------------------------

def write_manifest(path: Path, rel_paths: list[str], rows: int) -> None:
    """A Parquet manifest of ``rows`` rows whose ``path`` column cycles through ``rel_paths``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = pa.array(rel_paths, pa.string())
    schema = pa.schema([("path", pa.string())])
    with pq.ParquetWriter(path, schema) as out:
        for lo in range(0, rows, 1_000_000):
            ids = pa.array(np.arange(lo, min(rows, lo + 1_000_000)) % len(rel_paths))
            out.write_table(pa.table({"path": pc.take(names, ids)}, schema=schema))


def startup_child(spec: dict) -> dict:
    """One start-up measurement (in its own process): ``spec["path"]`` is "new" (the training stream) or
    "old" (rows on the driver); stops at ``spec["cap"]`` seconds."""
    import ray

    from pipeline.data import datasets, manifest, stream
    from pipeline.data.errors import ErrorLedger
    from pipeline.data.resume import create_cursor
    from pipeline.data.sources import prepare_sources

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    quiet_ray_data()

    def stop(*_) -> None:
        raise TimeoutError

    out: dict = {}
    peak = PeakRSS()
    out["rss_base_mib"] = peak.base / MIB
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(spec["cap"]))
    started = time.perf_counter()
    try:
        cfg = datasets.DataSection(uri=spec["manifest"], decode_isolation="inline", **CLIP)
        ledger = ErrorLedger.get_or_create("startup")
        if spec["path"] == "new":
            sources = prepare_sources(cfg, "pretrain")
            out["prepare_s"] = time.perf_counter() - started
            cursor = create_cursor("startup")
            ray.get(cursor.set.remote(0, b""))
            ds = stream.build_stream(cfg, "pretrain", sources, ledger, 0, "startup")
        else:
            rows = manifest.read_manifest(cfg.uri, cfg.data_root, cfg.split)
            ds = datasets.build_dataset(cfg, "pretrain", ledger, rows=rows)
            out["prepare_s"] = time.perf_counter() - started
        batch = next(iter(ds.iter_batches(batch_size=8)))
        out["first_batch_s"] = time.perf_counter() - started
        out["clips"] = len(batch["pixel_values"])
    except TimeoutError:
        out["timeout_s"] = time.perf_counter() - started
    finally:
        signal.alarm(0)
        out["rss_growth_mib"] = peak.growth() / MIB
        ray.shutdown()
    return out


def run_startup(path: str, manifest: Path, cap: float, log: Path) -> dict:
    """``startup_child`` in a fresh interpreter (its RSS its own); a child that overruns its own cap by
    two minutes is stopped with its process group."""
    spec = json.dumps({"kind": "startup", "path": path, "manifest": str(manifest), "cap": cap})
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", spec], stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=cap + 120)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                time.sleep(5)
            proc.wait()
            return {"timeout_s": cap + 120, "error": "did not stop at its cap"}
    lines = stdout.decode().strip().splitlines()
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}, see {log}"}
    return json.loads(lines[-1])


def part_startup(root: Path, sizes: dict[str, int], cap: float, flag: str | None) -> list[dict]:
    videos = make_videos(root)
    rel = [str(v.relative_to(root)) for v in videos]
    results = []
    for name, rows in sizes.items():
        manifest = root / f"manifest-{name}.parquet"
        write_manifest(manifest, rel, rows)
        for path in ("old", "new") if name in OLD_SIZES else ("new",):
            pause_while(flag)
            result = run_startup(path, manifest, cap, root / "startup.log")
            results.append({"size": name, "rows": rows, "path": path, **result})
            print(f"  start-up {name} {path}: {result}", flush=True)
        manifest.unlink()
    return results


def fmt_s(r: dict, key: str, cap: float) -> str:
    if key in r:
        return f"{r[key]:.1f}"
    return f">{cap:.0f}" if "timeout_s" in r else "failed"


def print_startup(results: list[dict], cap: float) -> None:
    print("\n1. start-up: seconds from prepare_sources / read_manifest to the first batch of 8 clips, and "
          "the driver's peak RSS above its RSS after ray.init (fresh process and Ray per row, 2 CPUs)")
    header = (f"{'rows':>10} {'path':<5} {'dataset s':>10} {'first batch s':>14} {'RSS base MiB':>13} "
              f"{'RSS growth MiB':>15} {'new/old':>8}")
    print(header + "\n" + "-" * len(header))
    old = {r["size"]: r for r in results if r["path"] == "old"}
    for r in results:
        ratio = ""
        base = old.get(r["size"])
        if r["path"] == "new" and base and "first_batch_s" in r:
            ratio = (f"{r['first_batch_s'] / base['first_batch_s']:.2f}x" if "first_batch_s" in base
                     else f"<{r['first_batch_s'] / cap:.2f}x")
        rss = f"{r['rss_growth_mib']:.0f}" if "rss_growth_mib" in r else "-"
        rss_base = f"{r['rss_base_mib']:.0f}" if "rss_base_mib" in r else "-"
        print(f"{r['rows']:>10,} {r['path']:<5} {fmt_s(r, 'prepare_s', cap):>10} "
              f"{fmt_s(r, 'first_batch_s', cap):>14} {rss_base:>13} {rss:>15} {ratio:>8}")


# --- the S3 server and the counting proxy -------------------------------------------------------------

class _RequestStarts:
    """Finds where each HTTP/1.1 request begins in one client connection's byte stream (keep-alive sends
    many per connection): a head up to the blank line, then ``Content-Length`` bytes of body. Reads send
    no bodies; a chunked body (an upload) ends the parsing of that connection, counted as ``unparsed``."""

    def __init__(self, count) -> None:
        self.count = count
        self.head = b""
        self.body = 0
        self.lost = False

    def feed(self, data: bytes) -> list[int]:
        """Offsets in ``data`` where a request's first byte is."""
        starts, i = [], 0
        while i < len(data) and not self.lost:
            if self.body:
                take = min(self.body, len(data) - i)
                self.body -= take
                i += take
                continue
            if not self.head:
                starts.append(i)
            buffered = self.head + data[i:]
            end = buffered.find(b"\r\n\r\n")
            if end < 0:
                self.head = buffered
                break
            i += end + 4 - len(self.head)
            self.head = b""
            self._parse(buffered[:end])
        return starts

    def _parse(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        method, target = (lines[0].split(b" ") + [b""])[:2]
        headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        query = target.partition(b"?")[2]
        listing = method == b"GET" and any(k in query for k in (b"list-type", b"prefix=", b"delimiter="))
        self.count("LIST" if listing else method.decode("ascii", "replace"))
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            self.count("unparsed")
            self.lost = True
        self.body = int(headers.get(b"content-length", b"0") or 0)


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server: counts requests by kind at the server's door
    (what a bill or a rate limit counts) and can hold each request for a uniform random delay before
    forwarding its first byte, as object storage's per-request latency."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.delay = (0.0, 0.0)
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.open: dict[socket.socket, int] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def _count(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.counts[kind] += n

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.open[client] = 2  # pumps still running; the last one closes both sockets
                self.sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client), daemon=True).start()

    def _finished(self, client: socket.socket, upstream: socket.socket, towards: socket.socket) -> None:
        """One direction ended: pass the end on; when both have, close the pair (a long run opens
        thousands of connections, more than a process may hold open)."""
        with contextlib.suppress(OSError):
            towards.shutdown(socket.SHUT_WR)
        with self.lock:
            self.open[client] -= 1
            if self.open[client]:
                return
            del self.open[client]
            self.sockets = [s for s in self.sockets if s not in (client, upstream)]
        client.close()
        upstream.close()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        parser = _RequestStarts(self._count)
        try:
            while data := client.recv(1 << 16):
                sent = 0
                for start in parser.feed(data):
                    upstream.sendall(data[sent:start])
                    sent = start
                    lo, hi = self.delay
                    if hi:
                        time.sleep(random.uniform(lo, hi))
                upstream.sendall(data[sent:])
        except OSError:
            pass
        finally:
            self._finished(client, upstream, towards=upstream)

    def _responses(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(1 << 16):
                self._count("bytes down", len(data))
                client.sendall(data)
        except OSError:
            pass
        finally:
            self._finished(client, upstream, towards=client)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accepting thread
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                s.close()


# --- 2. and 3.: files against shards on S3 ------------------------------------------------------------

def upload_sets(s3, root: Path, videos: list[Path], n: int, per_shard: int) -> dict[str, dict]:
    """Upload ``n`` videos (copies of ``videos``) as files and as shards of ``per_shard`` videos, and 512
    videos as shards of 256 whose samples are padded to 1 MiB; returns each set's URI and layout."""
    from pipeline.data import shards

    data = [v.read_bytes() for v in videos]
    for i in range(n):
        s3.put_object(Bucket="bench", Key=f"files/v{i:05d}.mp4", Body=data[i % len(data)])
    sets = {"files": {"uri": "s3://bench/files/", "videos": n, "objects": n,
                      "mean_kib": sum(len(data[i % len(data)]) for i in range(n)) / n / 1024}}
    for name, count, per, pad in (("shards", n, per_shard, 0), ("shards_1mib", 512, 256, MIB)):
        local = root / name
        sample = [2 * 512 + len(d) + 1024 + pad for d in data]  # headers, video, JSON (+ pad), rounded up
        size = per * sum(sample) // len(sample) + 4 * 512
        with shards.ShardWriter(str(local), shard_bytes=size, prefix="train") as writer:
            for i in range(count):
                meta = {"label": -1, "pad": "x" * pad} if pad else {"label": -1}
                writer.add(f"v{i:05d}", data[i % len(data)], "mp4", meta)
        shards.write_index(writer.rows, str(local / shards.INDEX))
        tars = sorted(local.glob("*.tar"))
        for f in [*tars, local / shards.INDEX]:
            s3.upload_file(str(f), "bench", f"{name}/{f.name}")
        sets[name] = {"uri": f"s3://bench/{name}/", "videos": count, "objects": len(tars),
                      "mean_kib": sum(f.stat().st_size for f in tars) / count / 1024}
    return sets


def open_stream(uri: str, name: str, seed: int, isolation: str, epoch_videos: int | None = None):
    """(the training stream of ``uri``, handles to hold while it runs): a run's cursor, set to epoch 0."""
    import ray

    from pipeline.data import stream
    from pipeline.data.errors import ErrorLedger
    from pipeline.data.resume import create_cursor
    from pipeline.data.section import DataSection
    from pipeline.data.sources import prepare_sources

    cfg = DataSection(uri=uri, decode_isolation=isolation, epoch_videos=epoch_videos, **CLIP)
    sources = prepare_sources(cfg, "pretrain")
    cursor = create_cursor(name)
    ray.get(cursor.set.remote(0, b""))
    ledger = ErrorLedger.get_or_create(name)
    return stream.build_stream(cfg, "pretrain", sources, ledger, seed, name), (cursor, ledger)


def count_epoch(proxy: CountingProxy, uri: str, name: str, seed: int) -> dict:
    """Requests at the server for the start-up (sources, plan) and for one epoch's reads."""
    before = proxy.snapshot()
    ds, (cursor, ledger) = open_stream(uri, name, seed, "inline")
    setup = proxy.snapshot()
    positions = []
    for batch in ds.iter_batches(batch_size=64):
        positions += batch["position"].tolist()
    after = proxy.snapshot()
    return {"clips": len(positions), "distinct": len(set(positions)), "setup": setup - before,
            "read": after - setup, "errors": ledger.snapshot()["errors"]}


def part_gets(proxy: CountingProxy, sets: dict[str, dict], flag: str | None) -> dict[str, dict]:
    out = {}
    for i, name in enumerate(sets):
        pause_while(flag)
        out[name] = count_epoch(proxy, sets[name]["uri"], f"gets-{name}", seed=100 + i)
        print(f"  GETs {name}: {out[name]}", flush=True)
    return out


def print_gets(sets: dict[str, dict], counted: dict[str, dict]) -> None:
    print("\n2. requests at the S3 server for one epoch (1 clip per video), per 1000 clips; start-up "
          "requests (listing, index, HEADs) apart")
    header = (f"{'set':<12} {'videos':>6} {'objects':>7} {'KiB/video':>9} {'GET':>8} {'HEAD':>8} "
              f"{'LIST':>5} {'MiB/GET':>8} {'start-up req':>12} {'files/this GET':>15}")
    print(header + "\n" + "-" * len(header))
    files = counted["files"]["read"]["GET"] / counted["files"]["clips"]
    for name, c in counted.items():
        read, clips = c["read"], c["clips"]
        per = {k: 1000 * read.get(k, 0) / clips for k in ("GET", "HEAD", "LIST")}
        mib = read["bytes down"] / MIB / max(1, read["GET"])
        ratio = files / (read["GET"] / clips) if read["GET"] else float("inf")
        setup = sum(v for k, v in c["setup"].items() if k != "bytes down")
        layout = sets[name]
        print(f"{name:<12} {layout['videos']:>6} {layout['objects']:>7} {layout['mean_kib']:>9.0f} "
              f"{per['GET']:>8.1f} {per['HEAD']:>8.1f} {per['LIST']:>5.1f} {mib:>8.2f} {setup:>12} "
              f"{ratio:>14.1f}x")
        if c["distinct"] != sets[name]["videos"] or c["errors"]:
            print(f"   ! {name}: {c['distinct']} distinct positions of {sets[name]['videos']} videos, "
                  f"{c['errors']} errors")


def measure_rate(uri: str, name: str, seed: int, seconds: float, warmup: float) -> dict:
    """Clips/s of the stream over ``seconds`` that begin ``warmup`` seconds after its first batch."""
    ds, (cursor, ledger) = open_stream(uri, name, seed, "process", epoch_videos=50_000)
    clips, first, t0, now = 0, None, None, 0.0
    with contextlib.closing(iter(ds.iter_batches(batch_size=8))) as batches:
        for batch in batches:
            now = time.perf_counter()
            first = first or now
            if t0 is None:
                if now - first >= warmup:
                    t0 = now  # the window opens at the end of this batch
                continue
            clips += len(batch["position"])
            if now - t0 >= seconds:
                break
    snap = ledger.snapshot()
    del ds, batches, cursor, ledger
    gc.collect()
    time.sleep(3)  # the stopped stream's tasks wind down before the next measurement
    # a window shorter than asked means the epoch ran out first (the rate still holds for that window)
    return {"clips": clips, "window_s": now - t0, "rate": clips / (now - t0), "errors": snap["errors"]}


def part_throughput(proxy: CountingProxy, sets: dict[str, dict], rounds: int, seconds: float,
                    flag: str | None) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    measure_rate(sets["files"]["uri"], "warmup", 1, seconds=5, warmup=2)  # workers and decode helpers up
    seed = 200
    for r in range(rounds):
        for latency in ("0 ms", "20-50 ms"):
            proxy.delay = LATENCY_S if latency != "0 ms" else (0.0, 0.0)
            for name in ("files", "shards"):
                pause_while(flag)
                seed += 1
                got = measure_rate(sets[name]["uri"], f"rate-{name}-{seed}", seed, seconds, warmup=3)
                runs.setdefault((name, latency), []).append(got)
                print(f"  round {r + 1} {name} {latency}: {got}", flush=True)
    proxy.delay = (0.0, 0.0)
    return runs


def print_throughput(runs: dict[tuple[str, str], list[dict]], cpus: float, seconds: float) -> dict:
    print(f"\n3. clips/s through Ray Data ({cpus:.0f} CPUs, decode_isolation=process, {seconds:.0f} s "
          "windows after a warm-up; best of the rounds, and every round)")
    header = (f"{'latency':<10} {'set':<8} {'clips/s':>8} {'per core':>9} {'rounds (clips/s)':>22} "
              f"{'clips counted':>13} {'shards/files':>13}")
    print(header + "\n" + "-" * len(header))
    best = {}
    for (name, latency), got in runs.items():
        best[(name, latency)] = max(g["rate"] for g in got)
    for (name, latency), got in runs.items():
        rate = best[(name, latency)]
        ratio = f"{rate / best[('files', latency)]:.2f}x" if name == "shards" else ""
        rounds = ", ".join(f"{g['rate']:.1f}" for g in got)
        errors = sum(g["errors"] for g in got)
        counted = ", ".join(str(g["clips"]) for g in got)
        print(f"{latency:<10} {name:<8} {rate:>8.1f} {rate / cpus:>9.1f} {rounds:>22} {counted:>13} "
              f"{ratio:>13}" + (f"  ({errors} errors)" if errors else ""))
    return best


# --- the run --------------------------------------------------------------------------------------------

def summary(startup: list[dict], counted: dict[str, dict] | None, best: dict | None) -> None:
    print("\ntargets")
    new = {r["size"]: r for r in startup if r["path"] == "new"}
    sizes = [s for s in SIZES if s in new and "first_batch_s" in new[s]]
    if "2k" in sizes and len(sizes) > 1:
        top = sizes[-1]
        extra = new[top]["first_batch_s"] - new["2k"]["first_batch_s"]
        print(f"  first batch at {top} rows within 60 s of 2k: +{extra:.1f} s -> "
              f"{'met' if extra <= 60 else 'NOT met'}" + ("" if top == "10M" else " (10M did not run)"))
    growth = [(r["size"], r["rss_growth_mib"]) for r in new.values() if "rss_growth_mib" in r]
    if growth:
        size, most = max(growth, key=lambda g: g[1])
        print(f"  driver memory growth under 1 GiB: at most {most:.0f} MiB ({size} rows) -> "
              f"{'met' if most < 1024 else 'NOT met'}")
    if counted:
        files = counted["files"]["read"]["GET"] / counted["files"]["clips"]
        for name in ("shards", "shards_1mib"):
            c = counted[name]
            ratio = files / (c["read"]["GET"] / c["clips"])
            print(f"  {name}: {ratio:.0f}x fewer GETs per clip than files (target >= 100x) -> "
                  f"{'met' if ratio >= 100 else 'NOT met'}")
    if best:
        ratio = best[("shards", "20-50 ms")] / best[("files", "20-50 ms")]
        print(f"  shard throughput >= per-file with 20-50 ms latency: {ratio:.2f}x -> "
              f"{'met' if ratio >= 1 else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2k and 240k rows, fewer videos, 1 round")
    parser.add_argument("--cap", type=float, default=300, help="seconds before a start-up is stopped")
    parser.add_argument("--videos", type=int, default=1024, help="videos on S3 (files, and shards)")
    parser.add_argument("--per-shard", type=int, default=256, help="videos per shard")
    parser.add_argument("--seconds", type=float, default=25, help="throughput window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--pause-while", metavar="FILE",
                        help="before each measurement, wait while FILE exists")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(startup_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.videos, args.per_shard, args.seconds, args.rounds = 512, 128, 12, 1
    sizes = {k: v for k, v in SIZES.items() if not args.quick or k in OLD_SIZES}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        startup = ([] if args.skip_startup
                   else part_startup(root / "startup", sizes, args.cap, args.pause_while))
        pause_while(args.pause_while)
        moto, port = start_moto()
        proxy = CountingProxy(port)
        try:
            import boto3
            import ray

            os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
            s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")  # uploads bypass the proxy
            s3.create_bucket(Bucket="bench")
            videos = make_videos(root / "s3")
            sets = upload_sets(s3, root / "s3", videos, args.videos, args.per_shard)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            quiet_ray_data()
            cpus = ray.cluster_resources()["CPU"]
            counted = part_gets(proxy, sets, args.pause_while)
            runs = part_throughput(proxy, sets, args.rounds, args.seconds, args.pause_while)
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
            proxy.close()
            moto.terminate()
            moto.wait()
    if startup:
        print_startup(startup, args.cap)
    print_gets(sets, counted)
    best = print_throughput(runs, cpus, args.seconds)
    summary(startup, counted, best)
    print(f"({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
