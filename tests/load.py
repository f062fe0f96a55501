"""Load scenarios for the hardening issue: slow readers, hostile heads, a mixed-traffic soak.

Usage:
    python tests/load.py slow    [--clients 1000] [--rate 1024] [--seconds 300] [--ramp 5]
    python tests/load.py hostile [--seconds 60] [--slowloris 500] [--oversized 20]
    python tests/load.py soak    [--minutes 10] [--concurrency 16] [--sample 10]
                                 [--csv soak.csv] [--plot soak.png]
    common: [--path zerocopy|portable] [--json FILE]

A smoke run of each takes about 20 s to a minute, e.g.
    python tests/load.py slow --clients 50 --seconds 15
    python tests/load.py hostile --seconds 20
    python tests/load.py soak --minutes 0.5 --sample 5

The script raises its own RLIMIT_NOFILE soft limit to the hard limit (the server, its child,
inherits it), writes fixtures to a temp dir, starts the server on a free 127.0.0.1 port in its
own session (tests/bench.py's start_server/stop_server), runs the scenario from one asyncio
event loop, stops the server and removes the temp dir. The server is `python downloader.py`
(--path zerocopy, the default: bench's "ours-zerocopy", root and port given as
DOWNLOADER_ROOT/DOWNLOADER_PORT) or `python -m uvicorn downloader:app` (--path portable:
bench's "ours"), both with DOWNLOADER_ACCESS_LOG=off. Server RSS and descriptors are
bench's tree_rss/tree_fds, summed over the server's process tree; "settled" is bench's
settled_fds (unchanged for 0.3 s, at most 5 s). The probe GETs /download/small.txt (1 KiB)
on a fresh connection every 100 ms; its latency runs from connect to the body's last byte.

Scenarios and pass criteria:
    slow     N clients each connect (client SO_RCVBUF 4 KiB, set before connect, so the kernel
             can't absorb the body), GET /download/big.bin (max(64 MiB, R*T + 16 MiB) of random
             bytes) and read the body at R bytes/s for T seconds; starts are spread over the
             ramp. Figures: clients cut before T (closed, reset, refused; reasons counted), body
             KiB read per client, server RSS baseline/peak and growth per connection, descriptors
             baseline/peak/settled after the clients closed, probe p50/p99/max and errors.
             Pass: none cut; growth <= 64 KiB per connection; settled descriptors <= baseline;
             probe p99 <= 50 ms.
    hostile  For D seconds, while the probe runs: S slowloris connections (spread over 2 s;
             each sends "GET /download/small.txt HTTP/1.1", "Host: x" and then one 8-byte
             header line every 5 s, never ending the head, never reconnecting) and O oversized
             heads (spread over the first half of D; each streams an X-Pad header in 64 KiB
             pieces, 20 ms apart, up to 1 MiB or until the server answers or closes, then ends
             the head and waits up to 10 s). Figures: slowloris connections the server ended
             (answered, closed or reset) and after how many seconds (min/median/max), the
             status lines it sent; for oversized heads the status lines (or how they ended) and
             the bytes sent when the answer came; probe; RSS and descriptors before/peak/after.
             Pass (the issue's target: 431 over 16 KiB, 408 and close after 10 s): every
             oversized head answered 431; every slowloris connection ended by the server
             within D; probe p99 <= 50 ms; settled descriptors <= before.
    soak     M minutes of C concurrent keep-alive clients against small.txt (1 KiB), one.bin
             (1 MiB), twenty.bin (20 MiB) and many/ (200 files of 64 B to 8 KiB). Request mix
             by weight: full GET 30 (20% of them aborted after part of the body), single Range
             15, 2-3 ranges (multipart/byteranges) 10, HEAD 10, If-None-Match with the file's
             ETag (304) 10, one /api/files page 10 (following next_cursor), a missing file
             (404) 5. Every body read whole is compared with the fixture (multipart parts by
             their Content-Range, listing entries by size). RSS (MiB) and descriptors are sampled
             every --sample seconds, plus once after the traffic stopped and descriptors
             settled; the samples go to --csv and to --plot (PNG: RSS and descriptors against
             minutes, two panels; needs matplotlib, see tests/requirements-bench.txt). Figures:
             requests by kind, aborts, 5xx, mismatches, other unexpected statuses, client
             errors, RSS first/last/max and its slope over the second half (MiB per minute,
             least squares), descriptors first/last/max.
             Pass: 0 mismatches; 0 5xx.

Output: a short summary on stdout with PASS/FAIL per criterion (progress on stderr), every
figure in --json FILE. Exit status 0 when every criterion passes, 1 when one fails, 2 when
the server can't be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import random
import re
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import bench
from bench import HOST, KiB, MiB, log

# ===========================================================================
# 1. Constants
# ===========================================================================

SPECS = {"zerocopy": bench.spec_ours_zerocopy, "portable": bench.spec_ours}
SMALL_NAME = "small.txt"
PROBE_PATH = f"/download/{SMALL_NAME}"
PROBE_INTERVAL_S = 0.1
PROBE_P99_MAX_MS = 50.0
IO_TIMEOUT_S = bench.IO_TIMEOUT_S  # connect, and any wait for an answer
SAMPLE_S = 0.25  # RSS/descriptor sampling in slow and hostile

BIG_NAME = "big.bin"
BIG_MIN = 64 * MiB
SLOW_RCVBUF = 4 * KiB
GROWTH_MAX_KIB = 64.0

LORIS_HEAD = b"GET /download/small.txt HTTP/1.1\r\nHost: x\r\n"
LORIS_LINE = b"X-a: b\r\n"
LORIS_INTERVAL_S = 5.0
LORIS_RAMP_S = 2.0
PAD_HEAD = b"GET /download/small.txt HTTP/1.1\r\nHost: x\r\nX-Pad: "
PAD_PIECE = b"a" * (64 * KiB)
PAD_MAX = 1 * MiB
PAD_PAUSE_S = 0.02
EXPECTED_OVERSIZED = 431

SOAK_WEIGHTS = {"full": 30, "range": 15, "multirange": 10, "head": 10, "conditional": 10,
                "listing": 10, "missing": 5}
ABORT_SHARE = 0.2
MANY_FILES = 200
REQUEST_TIMEOUT_S = 30.0  # one soak request, 20 MiB body included


# ===========================================================================
# 2. Fixtures and the server
# ===========================================================================


def write_small(root: Path) -> None:
    """The probe's 1 KiB text file."""
    (root / SMALL_NAME).write_bytes(b"0123456789abcdef" * 64)


def prepare_slow(root: Path, args: argparse.Namespace) -> None:
    """small.txt, and big.bin larger than the slowest client can read plus socket buffers."""
    write_small(root)
    bench.write_random_file(root / BIG_NAME, max(BIG_MIN, int(args.rate * args.seconds) + 16 * MiB))


def prepare_hostile(root: Path, args: argparse.Namespace) -> None:
    """Only the probe's file: hostile requests ask for it too."""
    write_small(root)


def prepare_soak(root: Path, args: argparse.Namespace) -> None:
    """small.txt, one.bin (1 MiB), twenty.bin (20 MiB), many/part-NNN.bin (200 of 64 B to 8 KiB)."""
    write_small(root)
    bench.write_random_file(root / "one.bin", 1 * MiB)
    bench.write_random_file(root / "twenty.bin", 20 * MiB)
    (root / "many").mkdir()
    rng = random.Random(1)
    for i in range(MANY_FILES):
        bench.write_random_file(root / "many" / f"part-{i:03}.bin", rng.randint(64, 8 * KiB))


def raise_fd_limit() -> int:
    """Raise our RLIMIT_NOFILE soft limit to the hard limit (as far as the kernel allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def serving(path: str, tmp: Path, root: Path) -> Iterator[bench.Running]:
    """The server under test on a free port, serving `root`; stopped (its whole group) on exit."""
    port = bench.free_port()
    spec = SPECS[path](tmp, root, port)
    assert isinstance(spec, bench.ServerSpec)  # ours never skip
    server = bench.start_server(f"downloader-{path}", spec, port, tmp, PROBE_PATH)
    try:
        yield server
    finally:
        bench.stop_server(server)


# ===========================================================================
# 3. Shared measurements: repeat, sampler, probe
# ===========================================================================


async def repeat(interval: float, stop: asyncio.Event, action: Callable[[], Awaitable[None]]) -> None:
    """Await `action` now and every `interval` s until `stop` is set; late turns are skipped."""
    next_at = time.monotonic()
    while not stop.is_set():
        await action()
        next_at = max(next_at + interval, time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), next_at - time.monotonic())


@dataclass
class Sample:
    """One look at the server tree."""
    seconds: float  # since the sampler started
    rss: int  # bytes
    fds: int
    requests: int = 0  # soak: requests done so far


class Sampler:
    """Server tree RSS and descriptor samples, taken in a thread so the event loop keeps going."""

    def __init__(self, pid: int, count: Callable[[], int] = lambda: 0) -> None:
        self.pid, self.count = pid, count
        self.started = time.monotonic()
        self.samples: list[Sample] = []

    async def sample(self) -> None:
        """Append one sample of the tree's RSS and descriptors."""
        rss, fds = await asyncio.to_thread(lambda: (bench.tree_rss(self.pid), bench.tree_fds(self.pid)))
        self.samples.append(Sample(time.monotonic() - self.started, rss, fds, self.count()))

    async def settled(self) -> int:
        """A sample taken once the descriptor count settled (bench.settled_fds); returns that count."""
        fds = await asyncio.to_thread(bench.settled_fds, self.pid)
        rss = await asyncio.to_thread(bench.tree_rss, self.pid)
        self.samples.append(Sample(time.monotonic() - self.started, rss, fds, self.count()))
        return fds

    @property
    def peak_rss(self) -> int:
        """The largest RSS sampled so far, in bytes."""
        return max(s.rss for s in self.samples)

    @property
    def peak_fds(self) -> int:
        """The most descriptors sampled so far."""
        return max(s.fds for s in self.samples)


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-cased names) of a response head without its blank line.
    bench.parse_head gives only the status and Content-Length, and needs the latter."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


class Probe:
    """Latency of GET /download/small.txt on a fresh connection, from connect to the last byte."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []  # seconds
        self.errors: Counter[str] = Counter()

    async def once(self) -> None:
        """One probe request: its latency, or the error or non-200 status counted."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(bench.get_request(self.port, PROBE_PATH))
                    status, length = bench.parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
                    await reader.readexactly(length)
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            self.errors[type(exc).__name__] += 1
            return
        if status != 200:
            self.errors[f"status {status}"] += 1
            return
        self.latencies.append(time.perf_counter() - started)

    def figures(self) -> dict:
        """Request count, p50/p99/max in ms (None without a success) and errors by kind."""
        ordered = sorted(self.latencies)

        def ms(fraction: float) -> float | None:
            return bench.percentile(ordered, fraction) * 1e3 if ordered else None

        return {"probe_requests": len(ordered) + sum(self.errors.values()),
                "probe_p50_ms": ms(0.50), "probe_p99_ms": ms(0.99),
                "probe_max_ms": ordered[-1] * 1e3 if ordered else None,
                "probe_errors": sum(self.errors.values()), "probe_error_kinds": dict(self.errors)}


@contextlib.asynccontextmanager
async def watching(sampler: Sampler, interval: float, probe: Probe | None = None) -> AsyncIterator[None]:
    """Sample (and probe, if given) in the background for the duration of the block."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(repeat(interval, stop, sampler.sample))]
    if probe is not None:
        tasks.append(asyncio.create_task(repeat(PROBE_INTERVAL_S, stop, probe.once)))
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def fmt(value: float | None, spec: str = ".1f") -> str:
    """`value` formatted by `spec`, or '-' for None."""
    return "-" if value is None else format(value, spec)


def counted(counts: dict) -> str:
    """'a x3, b x1' from {'a': 3, 'b': 1}; 'none' when empty."""
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "none"


def probe_line(figures: dict) -> str:
    """The summary line of the probe's figures."""
    errors = figures["probe_errors"]
    return (f"  probe ({PROBE_PATH}, {figures['probe_requests']} requests): p50 "
            f"{fmt(figures['probe_p50_ms'], '.2f')} ms, p99 {fmt(figures['probe_p99_ms'], '.2f')} ms, "
            f"max {fmt(figures['probe_max_ms'], '.2f')} ms, errors {errors}"
            + (f" ({counted(figures['probe_error_kinds'])})" if errors else ""))


def probe_ok(figures: dict) -> bool:
    """The probe's pass criterion: some successes, and p99 within PROBE_P99_MAX_MS."""
    p99 = figures["probe_p99_ms"]
    return p99 is not None and p99 <= PROBE_P99_MAX_MS


def spread(values: list[float]) -> str:
    """min/median/max, or '-' when empty."""
    if not values:
        return "-"
    return f"{min(values):.1f}/{statistics.median(values):.1f}/{max(values):.1f}"


# ===========================================================================
# 4. slow: many clients reading a big file slowly
# ===========================================================================


@dataclass
class SlowClient:
    status: int | None = None
    body: int = 0  # body bytes read
    cut: str | None = None  # why the connection ended before its time was up


async def recv_by(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int,
                  end: float) -> bytes | None:
    """Up to `size` bytes, b"" at EOF, None when nothing came before `end` (time.monotonic)."""
    try:
        async with asyncio.timeout(max(0.0, end - time.monotonic())):
            return await loop.sock_recv(sock, size)
    except TimeoutError:
        return None


async def read_paced(loop: asyncio.AbstractEventLoop, sock: socket.socket, rate: int, end: float,
                     client: SlowClient) -> None:
    """Read the response head, then the body at `rate` bytes/s until `end` or the server ends it."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = await recv_by(loop, sock, 1024, end)
        if not piece:
            client.cut = "no response head" if piece is None else "closed before the head"
            return
        head += piece
    client.status = int(head.split(None, 2)[1])
    if client.status != 200:
        client.cut = f"status {client.status}"
        return
    client.body = len(head) - head.index(b"\r\n\r\n") - 4
    paced_from = time.monotonic()
    step = max(1, min(rate, 4096))
    while (wake := paced_from + client.body / rate) < end:
        await asyncio.sleep(wake - time.monotonic())
        piece = await recv_by(loop, sock, step, end)
        if piece is None:
            return  # time is up while waiting for data
        if not piece:
            client.cut = "closed by the server"
            return
        client.body += len(piece)


async def slow_client(port: int, delay: float, rate: int, seconds: float) -> SlowClient:
    """After `delay`, GET big.bin with a small receive buffer and read it slowly for `seconds`."""
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    client = SlowClient()
    end = time.monotonic() + seconds
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                await loop.sock_connect(sock, (HOST, port))
            await loop.sock_sendall(sock, bench.get_request(port, f"/download/{BIG_NAME}", close=False))
            await read_paced(loop, sock, rate, end, client)
        except (OSError, TimeoutError) as exc:
            client.cut = type(exc).__name__
    return client


async def run_slow(server: bench.Running, args: argparse.Namespace, root: Path) -> dict:
    """The slow scenario against a running server (fixtures in `root`, written by prepare_slow)."""
    sampler, probe = Sampler(server.pid), Probe(server.port)
    fds_baseline = await sampler.settled()
    rss_baseline = sampler.samples[-1].rss
    log(f"slow: {args.clients} clients at {args.rate} B/s for {args.seconds:g} s "
        f"(ramp {args.ramp:g} s): about {args.ramp + args.seconds:.0f} s")
    async with watching(sampler, SAMPLE_S, probe):
        clients = await asyncio.gather(*(
            slow_client(server.port, i * args.ramp / args.clients, args.rate, args.seconds)
            for i in range(args.clients)))
    peak_rss, peak_fds = sampler.peak_rss, sampler.peak_fds
    fds_settled = await sampler.settled()
    bodies = [c.body / KiB for c in clients]
    return {
        "clients": args.clients, "rate_Bps": args.rate, "seconds": args.seconds,
        "cut": sum(c.cut is not None for c in clients),
        "cut_reasons": dict(Counter(c.cut for c in clients if c.cut is not None)),
        "body_KiB_min": min(bodies), "body_KiB_median": statistics.median(bodies),
        "rss_baseline_MiB": rss_baseline / MiB, "rss_peak_MiB": peak_rss / MiB,
        "rss_growth_KiB_per_conn": (peak_rss - rss_baseline) / args.clients / KiB,
        "fds_baseline": fds_baseline, "fds_peak": peak_fds, "fds_settled": fds_settled,
        **probe.figures(),
    }


def report_slow(f: dict) -> tuple[list[str], list[tuple[str, bool]]]:
    """Summary lines and (criterion, passed) pairs of the slow scenario's figures."""
    lines = [
        f"  clients cut before {f['seconds']:g} s: {f['cut']} of {f['clients']}"
        + (f" ({counted(f['cut_reasons'])})" if f["cut"] else ""),
        f"  body read per client KiB: min {f['body_KiB_min']:.1f}, median {f['body_KiB_median']:.1f}"
        f" (at {f['rate_Bps']} B/s)",
        f"  server RSS MiB: baseline {f['rss_baseline_MiB']:.1f}, peak {f['rss_peak_MiB']:.1f};"
        f" growth {f['rss_growth_KiB_per_conn']:.1f} KiB per connection",
        f"  server descriptors: baseline {f['fds_baseline']}, peak {f['fds_peak']},"
        f" settled {f['fds_settled']}",
        probe_line(f),
    ]
    criteria = [
        ("none cut", f["cut"] == 0),
        (f"growth <= {GROWTH_MAX_KIB:g} KiB per connection", f["rss_growth_KiB_per_conn"] <= GROWTH_MAX_KIB),
        ("descriptors back to baseline", f["fds_settled"] <= f["fds_baseline"]),
        (f"probe p99 <= {PROBE_P99_MAX_MS:g} ms", probe_ok(f)),
    ]
    return lines, criteria


# ===========================================================================
# 5. hostile: slowloris and oversized heads
# ===========================================================================


@dataclass
class Ending:
    """How a hostile connection ended: how, after how long, what the server said."""
    how: str = "still open"  # answered, closed, an error name, or "connect failed: ..."
    after_s: float | None = None  # connect -> the server's answer, close or reset
    status_line: str | None = None
    sent: int = 0  # bytes written so far
    sent_at_end: int | None = None  # bytes written when the server answered or closed


async def first_answer(reader: asyncio.StreamReader) -> tuple[str, str | None]:
    """("answered", status line), ("closed", None) at EOF, or (error name, None)."""
    try:
        data = await reader.read(4096)
    except OSError as exc:
        return type(exc).__name__, None
    if not data:
        return "closed", None
    return "answered", data.split(b"\r\n", 1)[0].decode("latin-1")


def send(writer: asyncio.StreamWriter, ending: Ending, data: bytes) -> None:
    """Write `data` and count it as sent."""
    writer.write(data)
    ending.sent += len(data)


Talk = Callable[[asyncio.StreamWriter, Ending, "asyncio.Task[tuple[str, str | None]]"], Awaitable[None]]


async def hostile(port: int, delay: float, talk: Talk, limit_s: float) -> Ending:
    """After `delay`, connect and let `talk` write (for at most `limit_s`) while the server's
    first answer is watched for; returns how the connection ended."""
    await asyncio.sleep(delay)
    ending = Ending()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), IO_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        ending.how = f"connect failed: {type(exc).__name__}"
        return ending
    started = time.monotonic()
    answer = asyncio.create_task(first_answer(reader))

    def ended(task: asyncio.Task[tuple[str, str | None]]) -> None:
        """Note when and how the server answered, and what had been sent by then."""
        if not task.cancelled():
            ending.after_s, ending.sent_at_end = time.monotonic() - started, ending.sent
            ending.how, ending.status_line = task.result()

    answer.add_done_callback(ended)
    try:
        async with asyncio.timeout(limit_s):
            await talk(writer, ending, answer)
    except (OSError, TimeoutError) as exc:
        await asyncio.wait({answer}, timeout=0.5)  # a reset on send may follow an answer
        if not answer.done() and not isinstance(exc, TimeoutError):
            ending.how, ending.after_s = f"{type(exc).__name__} on send", time.monotonic() - started
    finally:
        answer.cancel()
        writer.close()
    return ending


def slowloris_talk(deadline: float) -> Talk:
    """Start a head, then add a short header line every LORIS_INTERVAL_S until `deadline`."""

    async def talk(writer: asyncio.StreamWriter, ending: Ending, answer: asyncio.Task) -> None:
        """The slowloris request: never a complete head."""
        send(writer, ending, LORIS_HEAD)
        while not answer.done() and time.monotonic() < deadline:
            await asyncio.wait({answer}, timeout=max(0.0, min(LORIS_INTERVAL_S, deadline - time.monotonic())))
            if not answer.done() and time.monotonic() < deadline:
                send(writer, ending, LORIS_LINE)
                await writer.drain()

    return talk


async def oversized_talk(writer: asyncio.StreamWriter, ending: Ending, answer: asyncio.Task) -> None:
    """Stream an X-Pad header up to PAD_MAX, then end the head and wait for the answer."""
    send(writer, ending, PAD_HEAD)
    pad = 0
    while not answer.done() and pad < PAD_MAX:
        send(writer, ending, PAD_PIECE)
        pad += len(PAD_PIECE)
        await writer.drain()
        await asyncio.sleep(PAD_PAUSE_S)
    if not answer.done():
        send(writer, ending, b"\r\n\r\n")
        await writer.drain()
        await asyncio.wait({answer}, timeout=IO_TIMEOUT_S)


async def run_hostile(server: bench.Running, args: argparse.Namespace, root: Path) -> dict:
    """The hostile scenario against a running server (fixtures in `root`, written by prepare_hostile)."""
    sampler, probe = Sampler(server.pid), Probe(server.port)
    fds_before = await sampler.settled()
    rss_before = sampler.samples[-1].rss
    log(f"hostile: {args.slowloris} slowloris, {args.oversized} oversized heads for {args.seconds:g} s")
    deadline = time.monotonic() + args.seconds
    async with watching(sampler, SAMPLE_S, probe):
        loris = [hostile(server.port, i * LORIS_RAMP_S / args.slowloris, slowloris_talk(deadline),
                         args.seconds + IO_TIMEOUT_S) for i in range(args.slowloris)]
        big = [hostile(server.port, i * args.seconds / 2 / args.oversized, oversized_talk,
                       2 * IO_TIMEOUT_S) for i in range(args.oversized)]
        endings = await asyncio.gather(*loris, *big)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))  # the probe runs D seconds
    loris_end, big_end = endings[:args.slowloris], endings[args.slowloris:]
    peak_rss, peak_fds = sampler.peak_rss, sampler.peak_fds
    fds_after = await sampler.settled()
    return {
        "seconds": args.seconds,
        "slowloris": args.slowloris,
        "slowloris_ended_by_server": sum(e.after_s is not None for e in loris_end),
        "slowloris_ended_after_s": sorted(e.after_s for e in loris_end if e.after_s is not None),
        "slowloris_status_lines": dict(Counter(e.status_line for e in loris_end if e.status_line)),
        "slowloris_endings": dict(Counter(e.how for e in loris_end)),
        "oversized": args.oversized,
        "oversized_answers": dict(Counter(e.status_line or e.how for e in big_end)),
        "oversized_sent_KiB_at_answer": sorted(e.sent_at_end / KiB for e in big_end
                                               if e.sent_at_end is not None),
        "oversized_statuses": [int(e.status_line.split()[1]) if e.status_line else None
                               for e in big_end],
        "rss_before_MiB": rss_before / MiB, "rss_peak_MiB": peak_rss / MiB,
        "rss_after_MiB": sampler.samples[-1].rss / MiB,
        "fds_before": fds_before, "fds_peak": peak_fds, "fds_after": fds_after,
        **probe.figures(),
    }


def report_hostile(f: dict) -> tuple[list[str], list[tuple[str, bool]]]:
    """Summary lines and (criterion, passed) pairs of the hostile scenario's figures."""
    lines = [
        f"  slowloris: {f['slowloris']} connections, {f['slowloris_ended_by_server']} ended by the server,"
        f" after s min/median/max {spread(f['slowloris_ended_after_s'])}",
        f"    endings: {counted(f['slowloris_endings'])}",
        f"    status lines: {counted(f['slowloris_status_lines'])}",
        f"  oversized heads: {f['oversized']}; answers: {counted(f['oversized_answers'])}",
        f"    KiB sent when answered or closed, min/median/max: {spread(f['oversized_sent_KiB_at_answer'])}",
        probe_line(f),
        f"  server RSS MiB: before {f['rss_before_MiB']:.1f}, peak {f['rss_peak_MiB']:.1f},"
        f" after {f['rss_after_MiB']:.1f}",
        f"  server descriptors: before {f['fds_before']}, peak {f['fds_peak']}, after {f['fds_after']}",
    ]
    criteria = [
        (f"every oversized head answered {EXPECTED_OVERSIZED}",
         all(s == EXPECTED_OVERSIZED for s in f["oversized_statuses"])),
        (f"every slowloris connection ended by the server within {f['seconds']:g} s",
         f["slowloris_ended_by_server"] == f["slowloris"]),
        (f"probe p99 <= {PROBE_P99_MAX_MS:g} ms", probe_ok(f)),
        ("descriptors back to before", f["fds_after"] <= f["fds_before"]),
    ]
    return lines, criteria


# ===========================================================================
# 6. soak: mixed traffic for minutes
# ===========================================================================


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 client connection, (re)opened when needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.stale = 0  # reused connections the server had closed (the request was sent again)

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None

    async def exchange(self, raw: bytes) -> tuple[int, dict[str, str]]:
        """Send `raw` on the open connection; the response's status and headers."""
        reader, writer = self.streams
        writer.write(raw)
        return parse_response_head((await reader.readuntil(b"\r\n\r\n"))[:-4])

    async def head_of(self, raw: bytes) -> tuple[int, dict[str, str]]:
        """Send `raw` and read the response head; once more on a new connection when a reused
        one turns out closed before any byte of the answer."""
        if self.streams is not None:
            try:
                return await self.exchange(raw)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
            except ConnectionError:
                pass
            self.close()
            self.stale += 1
        self.streams = await asyncio.open_connection(HOST, self.port)
        return await self.exchange(raw)

    async def request(self, method: str, target: str, headers: dict[str, str] | None = None,
                      read_at_most: int | None = None) -> Response:
        """One request; with `read_at_most`, the body is cut there and the connection closed."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{self.port}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        status, head = await self.head_of(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        has_body = method != "HEAD" and status >= 200 and status not in (204, 304)
        if has_body and "content-length" not in head:
            raise ValueError(f"{method} {target}: {status} without Content-Length")
        length = int(head["content-length"]) if has_body else 0
        if read_at_most is not None and read_at_most < length:
            body = await self.streams[0].readexactly(read_at_most)
            self.close()
        else:
            body = await self.streams[0].readexactly(length)
            if head.get("connection", "").lower() == "close":
                self.close()
        return Response(status, head, body)


@dataclass
class SoakStats:
    requests: Counter[str] = field(default_factory=Counter)
    aborts: int = 0
    server_errors: int = 0  # 5xx
    mismatches: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)  # "kind status"
    errors: Counter[str] = field(default_factory=Counter)  # "kind: exception"


def multipart_parts(body: bytes, content_type: str) -> list[tuple[int, int, bytes]]:
    """(first byte, last byte, data) of each part of a multipart/byteranges body."""
    boundary = content_type.partition("boundary=")[2].strip().strip('"')
    delimiter = b"--" + boundary.encode("latin-1")
    parts = []
    at = body.index(delimiter) + len(delimiter)
    while not body.startswith(b"--", at):
        head_end = body.index(b"\r\n\r\n", at)
        _, headers = parse_response_head(b"HTTP/1.1 206 part" + body[at:head_end])
        first, last = content_range(headers["content-range"])
        data = body[head_end + 4:head_end + 4 + last - first + 1]
        parts.append((first, last, data))
        at = body.index(delimiter, head_end + 4 + len(data)) + len(delimiter)
    return parts


def content_range(value: str) -> tuple[int, int]:
    """(first, last) of a `bytes FIRST-LAST/SIZE` Content-Range."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/\d+", value)
    if not match:
        raise ValueError(f"odd Content-Range {value!r}")
    return int(match[1]), int(match[2])


class SoakClient:
    """One client task of the soak: a connection, its own random mix, shared stats."""

    def __init__(self, port: int, files: dict[str, bytes], stats: SoakStats, seed: int) -> None:
        self.conn = Connection(port)
        self.files, self.stats = files, stats
        self.rng = random.Random(seed)
        self.paths = list(files)
        self.weights = [1.0 if "/" in p else MANY_FILES / 2 for p in self.paths]  # many/: 40%
        self.etags: dict[str, str] = {}
        self.cursor: str | None = None
        self.actions: dict[str, Callable[[], Awaitable[None]]] = {
            "full": self.full, "range": self.range, "multirange": self.multirange, "head": self.head,
            "conditional": self.conditional, "listing": self.listing, "missing": self.missing}

    async def run(self, deadline: float) -> None:
        """Requests of random kinds until `deadline`; an error is counted and the connection closed."""
        kinds, weights = list(SOAK_WEIGHTS), list(SOAK_WEIGHTS.values())
        try:
            while time.monotonic() < deadline:
                kind = self.rng.choices(kinds, weights)[0]
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        await self.actions[kind]()
                except (OSError, TimeoutError, ValueError, KeyError,
                        asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    self.stats.errors[f"{kind}: {type(exc).__name__}"] += 1
                    self.conn.close()
        finally:
            self.conn.close()

    def pick(self) -> str:
        """A random fixture path (many/ 40%, each of the other three 20%)."""
        return self.rng.choices(self.paths, self.weights)[0]

    async def get(self, kind: str, method: str, target: str, expected: int,
                  headers: dict[str, str] | None = None, read_at_most: int | None = None) -> Response | None:
        """The response when its status is `expected`, else None (counted as 5xx or unexpected)."""
        response = await self.conn.request(method, target, headers, read_at_most)
        self.stats.requests[kind] += 1
        if response.status >= 500:
            self.stats.server_errors += 1
        if response.status != expected:
            self.stats.unexpected[f"{kind} {response.status}"] += 1
            return None
        if "etag" in response.headers and target.startswith("/download/"):
            self.etags[target] = response.headers["etag"]
        return response

    def compare(self, kind: str, got: bytes, want: bytes) -> None:
        """Count a mismatch of `kind` unless `got` is `want`."""
        if got != want:
            self.stats.mismatches[kind] += 1

    async def full(self) -> None:
        """GET a whole file, or (ABORT_SHARE of the time) part of it, then close."""
        path = self.pick()
        data = self.files[path]
        cut = self.rng.randint(1, max(1, len(data) // 2)) if self.rng.random() < ABORT_SHARE else None
        response = await self.get("full", "GET", f"/download/{path}", 200, read_at_most=cut)
        if response is None:
            return
        if cut is None:
            self.compare("full", response.body, data)
        else:
            self.stats.aborts += 1
            self.compare("full", response.body, data[:cut])

    async def range(self) -> None:
        """GET one random range: 206, the right Content-Range and bytes."""
        path = self.pick()
        data = self.files[path]
        first = self.rng.randrange(len(data))
        last = self.rng.randint(first, len(data) - 1)
        response = await self.get("range", "GET", f"/download/{path}", 206, {"Range": f"bytes={first}-{last}"})
        if response is not None:
            ok = content_range(response.headers.get("content-range", "")) == (first, last)
            self.compare("range", response.body if ok else b"", data[first:last + 1])

    async def multirange(self) -> None:
        """GET 2-3 ranges: 206 multipart/byteranges, each part's bytes as its Content-Range says."""
        path = self.pick()
        data = self.files[path]
        cuts = sorted(self.rng.sample(range(len(data)), 2 * self.rng.randint(2, 3)))
        spec = ",".join(f"{a}-{b}" for a, b in zip(cuts[::2], cuts[1::2]))
        response = await self.get("multirange", "GET", f"/download/{path}", 206, {"Range": f"bytes={spec}"})
        if response is None:
            return
        parts = multipart_parts(response.body, response.headers.get("content-type", ""))
        for first, last, got in parts:
            self.compare("multirange", got, data[first:last + 1])
        if not parts:
            self.stats.mismatches["multirange"] += 1

    async def head(self) -> None:
        """HEAD a file: 200 and its size as Content-Length."""
        path = self.pick()
        response = await self.get("head", "HEAD", f"/download/{path}", 200)
        if response is not None and response.headers.get("content-length") != str(len(self.files[path])):
            self.stats.mismatches["head"] += 1

    async def conditional(self) -> None:
        """GET with If-None-Match: the file's ETag (a HEAD first if unknown): 304."""
        path = self.pick()
        target = f"/download/{path}"
        if target not in self.etags:
            await self.get("head", "HEAD", target, 200)
        if target in self.etags:
            await self.get("conditional", "GET", target, 304, {"If-None-Match": self.etags[target]})

    async def listing(self) -> None:
        """One /api/files page after this client's cursor: every entry's size as the fixture's."""
        query = f"limit={self.rng.choice((10, 50, 100))}"
        if self.cursor:
            query += "&cursor=" + urllib.parse.quote(self.cursor, safe="")
        response = await self.get("listing", "GET", f"/api/files?{query}", 200)
        if response is None:
            return
        page = json.loads(response.body)
        self.cursor = page["next_cursor"]
        for item in page["files"]:
            if len(self.files.get(item["path"], b"")) != item["size"]:
                self.stats.mismatches["listing"] += 1

    async def missing(self) -> None:
        """GET a file that doesn't exist: 404."""
        await self.get("missing", "GET", f"/download/missing-{self.rng.randrange(1000)}.bin", 404)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def slope_per_minute(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS (MiB per minute) over the second half of the samples' time."""
    half = samples[-1].seconds / 2
    late = [s for s in samples if s.seconds >= half]
    if len(late) < 2:
        return None
    return statistics.linear_regression([s.seconds / 60 for s in late],
                                        [s.rss / MiB for s in late]).slope


def write_csv(samples: list[Sample], path: Path) -> None:
    """One row per sample: seconds, minutes, RSS MiB, descriptors, requests so far."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seconds", "minutes", "rss_mib", "fds", "requests"])
        for s in samples:
            out.writerow([f"{s.seconds:.1f}", f"{s.seconds / 60:.3f}", f"{s.rss / MiB:.2f}", s.fds, s.requests])


def plot_soak(samples: list[Sample], title: str, path: Path) -> None:
    """RSS and descriptors against minutes, two stacked panels (matplotlib, imported only here)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.seconds / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(minutes, [s.rss / MiB for s in samples], marker=".")
    top.set_ylabel("server RSS (MiB)")
    bottom.plot(minutes, [s.fds for s in samples], marker=".", color="tab:orange")
    bottom.set_ylabel("open descriptors")
    bottom.set_xlabel("minutes")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_soak(server: bench.Running, args: argparse.Namespace, root: Path) -> dict:
    """The soak against a running server; `root` holds the fixtures the bodies are compared with."""
    files = read_tree(root)
    stats = SoakStats()
    sampler = Sampler(server.pid, lambda: sum(stats.requests.values()))
    clients = [SoakClient(server.port, files, stats, seed) for seed in range(args.concurrency)]
    log(f"soak: {args.concurrency} clients for {args.minutes:g} min, sampling every {args.sample:g} s")
    await sampler.settled()  # the idle baseline: the first sample
    deadline = time.monotonic() + args.minutes * 60
    async with watching(sampler, args.sample):
        await asyncio.gather(*(c.run(deadline) for c in clients))
    await sampler.settled()
    samples = sampler.samples
    total = sum(stats.requests.values())
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stats.requests.items()))
    title = (f"soak, {args.path} path, {args.concurrency} clients, {args.minutes:g} min: {total} requests"
             f"\n({kinds}; {stats.aborts} aborted)")
    write_csv(samples, args.csv)
    plot_soak(samples, title, args.plot)
    rss = [s.rss / MiB for s in samples]
    fds = [s.fds for s in samples]
    return {
        "minutes": args.minutes, "concurrency": args.concurrency,
        "requests": dict(sorted(stats.requests.items())), "requests_total": total, "aborts": stats.aborts,
        "server_errors_5xx": stats.server_errors,
        "mismatches": sum(stats.mismatches.values()), "mismatch_kinds": dict(stats.mismatches),
        "unexpected": dict(stats.unexpected), "client_errors": dict(stats.errors),
        "stale_keepalive": sum(c.conn.stale for c in clients),
        "rss_first_MiB": rss[0], "rss_last_MiB": rss[-1], "rss_max_MiB": max(rss),
        "rss_slope_MiB_per_min": slope_per_minute(samples),
        "fds_first": fds[0], "fds_last": fds[-1], "fds_max": max(fds),
        "csv": str(args.csv), "plot": str(args.plot),
        "samples": [asdict(s) for s in samples],
    }


def report_soak(f: dict) -> tuple[list[str], list[tuple[str, bool]]]:
    """Summary lines and (criterion, passed) pairs of the soak's figures."""
    lines = [
        f"  requests: {f['requests_total']} ({counted(f['requests'])}); aborted mid-body {f['aborts']}",
        f"  5xx: {f['server_errors_5xx']}; mismatches: {f['mismatches']}"
        + (f" ({counted(f['mismatch_kinds'])})" if f["mismatches"] else ""),
        f"  other unexpected statuses: {counted(f['unexpected'])}; client errors: {counted(f['client_errors'])};"
        f" stale keep-alive connections: {f['stale_keepalive']}",
        f"  server RSS MiB: first {f['rss_first_MiB']:.1f}, last {f['rss_last_MiB']:.1f}, max {f['rss_max_MiB']:.1f};"
        f" second-half slope {fmt(f['rss_slope_MiB_per_min'], '+.3f')} MiB/min",
        f"  server descriptors: first {f['fds_first']}, last {f['fds_last']} (settled), max {f['fds_max']}",
        f"  samples: {len(f['samples'])} in {f['csv']}; plot {f['plot']}",
    ]
    criteria = [("0 mismatches", f["mismatches"] == 0), ("0 5xx", f["server_errors_5xx"] == 0)]
    return lines, criteria


# ===========================================================================
# 7. Main
# ===========================================================================


class Scenario(NamedTuple):
    prepare: Callable[[Path, argparse.Namespace], None]
    run: Callable[[bench.Running, argparse.Namespace, Path], Awaitable[dict]]
    report: Callable[[dict], tuple[list[str], list[tuple[str, bool]]]]


SCENARIOS = {
    "slow": Scenario(prepare_slow, run_slow, report_slow),
    "hostile": Scenario(prepare_hostile, run_hostile, report_hostile),
    "soak": Scenario(prepare_soak, run_soak, report_soak),
}


def positive(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number from 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The scenario and its options; --path and --json are common to all."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--path", choices=SPECS, default="zerocopy",
                        help="zerocopy: python downloader.py; portable: uvicorn downloader:app")
    common.add_argument("--json", type=Path, help="write every figure to this file")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    slow = sub.add_parser("slow", parents=[common], help="many clients reading a big file slowly")
    slow.add_argument("--clients", type=count, default=1000)
    slow.add_argument("--rate", type=count, default=1024, help="bytes/s each client reads")
    slow.add_argument("--seconds", type=positive, default=300.0, help="how long each client reads")
    slow.add_argument("--ramp", type=positive, default=5.0, help="seconds over which clients start")
    hostile = sub.add_parser("hostile", parents=[common], help="slowloris and oversized heads")
    hostile.add_argument("--seconds", type=positive, default=60.0)
    hostile.add_argument("--slowloris", type=count, default=500)
    hostile.add_argument("--oversized", type=count, default=20)
    soak = sub.add_parser("soak", parents=[common], help="mixed traffic; RSS and descriptors over time")
    soak.add_argument("--minutes", type=positive, default=10.0)
    soak.add_argument("--concurrency", type=count, default=16)
    soak.add_argument("--sample", type=positive, default=10.0, help="seconds between samples")
    soak.add_argument("--csv", type=Path, default=Path("soak.csv"))
    soak.add_argument("--plot", type=Path, default=Path("soak.png"))
    return parser.parse_args(argv)


def print_summary(args: argparse.Namespace, figures: dict, lines: list[str],
                  criteria: list[tuple[str, bool]]) -> None:
    """The human-readable summary on stdout."""
    print(f"\n{args.scenario} ({args.path} path, {figures['elapsed_s']:.0f} s)")
    for line in lines:
        print(line)
    if figures["server_exit"] is not None:
        print(f"  server exited early with status {figures['server_exit']}; its log ends:")
        print(textwrap.indent(figures["server_log_tail"], "    "))
    if figures["server_tracebacks"]:
        print(f"  server log: {figures['server_tracebacks']} traceback(s)")
    for label, ok in criteria:
        print(f"  {'PASS' if ok else 'FAIL'} {label}")


def main(argv: list[str]) -> int:
    """Prepare fixtures, start the server, run the scenario, stop the server, report."""
    args = parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    log(f"RLIMIT_NOFILE soft limit {raise_fd_limit()}")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="downloader-load-"))
    try:
        root = tmp / "files"
        root.mkdir()
        scenario.prepare(root, args)
        try:
            with serving(args.path, tmp, root) as server:
                log(f"server pid {server.pid}, port {server.port} ({args.path} path)")
                figures = asyncio.run(scenario.run(server, args, root))
                figures["server_exit"] = server.proc.poll()
        except bench.ServerFailed as exc:
            print(f"the server did not start: {exc}", file=sys.stderr)
            return 2
        figures["server_tracebacks"] = server.log_path.read_text(errors="replace").count("Traceback")
        figures["server_log_tail"] = server.log_tail()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures["elapsed_s"] = time.monotonic() - started
    lines, criteria = scenario.report(figures)
    print_summary(args, figures, lines, criteria)
    if args.json:
        report = {"scenario": args.scenario, "path": args.path,
                  "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "machine": bench.machine(), "figures": figures,
                  "criteria": {label: ok for label, ok in criteria}}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0 if all(ok for _, ok in criteria) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
