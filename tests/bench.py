"""Benchmark downloader against baseline file servers on 127.0.0.1.

Usage:
    python tests/bench.py [--quick] [--json FILE] [--servers NAMES] [--no-wrk]

    --quick      smaller files (128 MiB / 32 MiB), fewer aborts and shorter runs: a smoke
                 test, under a minute on a quiet 2-CPU machine
    --json FILE  also write every figure (and the machine and plan) to FILE
    --servers    comma-separated, in run order; default ours,ours-zerocopy,starlette,aiohttp,nginx,ours-granian
                 ("granian" is accepted for "ours-granian")
    --no-wrk     use the Python keep-alive client even when /usr/bin/wrk is installed

Install the extra servers first: pip install -r tests/requirements-bench.txt

Servers:
    ours          uvicorn downloader:app, the portable path (cwd = repo root, DOWNLOADER_ROOT = fixture dir)
    ours-zerocopy python downloader.py: uvicorn with downloader:HTTPProtocol, the zero-copy path
    starlette     the baseline: a Starlette FileResponse endpoint under uvicorn
    aiohttp       an aiohttp web.FileResponse endpoint (skipped when aiohttp is missing)
    nginx         /usr/sbin/nginx with sendfile on (skipped when nginx is missing)
    ours-granian  granian --interface asgi downloader:app (skipped when granian is missing)
Every server serves GET /download/NAME from the same temp dir. Access logs are off everywhere.
"ours" inherits the environment, so e.g. DOWNLOADER_CHUNK_SIZE=65536 python tests/bench.py
--servers ours,starlette compares another chunk size.

What is measured, per server, in this order (MB = 10**6 bytes, MiB = 2**20 bytes):
    0. exact bytes: sha256 of each fixture file as downloaded; a server that fails is not measured.
    1. throughput: one stream of the big file, 3 times (best, median MB/s; median time from
       request sent to first body byte), then 8 concurrent downloads of the mid file (aggregate
       MB/s). Server CPU seconds (utime+stime, whole process tree) per GiB over both.
    2. small files: 1 KiB file with 32 keep-alive connections for a fixed time: requests/s and
       p99 latency (wrk --latency when installed, else an asyncio keep-alive client); the
       full run takes the median of 3 runs here and for each probe in 5.
    3. slow clients: 100 clients reading the big file at about 2 MB/s each for a fixed time:
       server tree RSS (sum of VmRSS) idle before, peak during (sampled), and the growth.
    4. aborted downloads: many downloads closed after 64 KiB of body; open fds and RSS of the
       server tree before and after (after waiting for the fd count to settle).
    5. responsiveness: p99 of 1 KiB requests on one keep-alive connection, idle and while
       8 big downloads run (in a niced child process), and the ratio loaded / idle.
The table shows each figure and its ratio to the starlette baseline, and which way is better;
--json also holds p50 latencies and error counts. The server is pinned to CPU 0 and the
clients to CPU 1 when there are two CPUs. Other load on the machine shows up as noise,
mostly in the p99 figures; a warning is printed when the load average is above 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# ===========================================================================
# 1. Plan: sizes, counts and durations
# ===========================================================================

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000

IO_TIMEOUT_S = 10.0  # every socket operation; bounds each request
READY_TIMEOUT_S = 30.0  # server start-up
SETTLE_TIMEOUT_S = 5.0  # waiting for the fd count to stop changing
BIG_BUF = 1 * MiB  # reused receive buffer for full-speed downloads
SLOW_BUF = 64 * KiB  # receive buffer (so at most one read) for paced and aborting clients
HEAD_LIMIT = 16 * KiB
SLOW_RATE_BPS = 2 * MB  # per slow client
ABORT_AFTER = 64 * KiB  # body bytes read before an aborted download closes
ABORT_WORKERS = 8
RAMP_S = 0.3  # background downloads get going before the loaded probe starts
SETTLED_S = 0.3  # an fd count unchanged this long has settled
RSS_SAMPLE_S = 0.05
MAX_REQUESTS_PER_CONN = 1_000_000  # bounds the Python keep-alive loop besides its deadline
WRK = Path("/usr/bin/wrk")
NGINX = Path("/usr/sbin/nginx")


@dataclass(frozen=True)
class Plan:
    big_size: int
    mid_size: int
    small_size: int
    reps: int  # single-stream repetitions
    concurrent: int  # parallel downloads (mid file; big file while probing)
    small_conns: int
    small_s: int  # wrk wants whole seconds
    slow_clients: int
    slow_s: float
    aborts: int
    probe_s: int  # one idle or loaded latency probe
    load_runs: int  # 1 KiB runs (small files, each probe); the table shows their median


FULL = Plan(1 * GiB, 256 * MiB, 1 * KiB, reps=3, concurrent=8, small_conns=32, small_s=2,
            slow_clients=100, slow_s=10, aborts=1000, probe_s=1, load_runs=3)
QUICK = Plan(128 * MiB, 32 * MiB, 1 * KiB, reps=3, concurrent=8, small_conns=32, small_s=1,
             slow_clients=100, slow_s=4, aborts=200, probe_s=1, load_runs=1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ===========================================================================
# 2. Fixtures: random files with known sha256
# ===========================================================================


@dataclass(frozen=True)
class Fixture:
    name: str
    size: int
    sha256: str

    @property
    def url(self) -> str:
        return f"/download/{self.name}"


def write_random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def make_fixtures(root: Path, plan: Plan) -> dict[str, Fixture]:
    """big.bin, mid.bin and small.bin in `root`, keyed big/mid/small."""
    root.mkdir()
    sizes = {"big": plan.big_size, "mid": plan.mid_size, "small": plan.small_size}
    return {
        key: Fixture(f"{key}.bin", size, write_random_file(root / f"{key}.bin", size))
        for key, size in sizes.items()
    }


# ===========================================================================
# 3. Process tree accounting from /proc
# ===========================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                children[int(_stat_fields(int(entry.name))[1])].append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # the process went away while we looked
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def _sum_over_tree(root: int, measure: Callable[[int], float]) -> float:
    total = 0.0
    for pid in tree_pids(root):
        try:
            total += measure(pid)
        except OSError:
            continue  # exited between listing and reading
    return total


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # kernel threads and zombies have no VmRSS


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def tree_rss(root: int) -> int:
    return int(_sum_over_tree(root, _rss_bytes))


def tree_cpu(root: int) -> float:
    return _sum_over_tree(root, _cpu_seconds)


def tree_fds(root: int) -> int:
    return int(_sum_over_tree(root, lambda pid: len(os.listdir(f"/proc/{pid}/fd"))))


def settled_fds(root: int) -> int:
    """The tree's fd count once unchanged for SETTLED_S (or after SETTLE_TIMEOUT_S)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last, stable_since = tree_fds(root), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < SETTLED_S:
        time.sleep(0.05)
        now = tree_fds(root)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def pin_tree(root: int, cpu: int) -> None:
    """Pin every thread of every process in the tree; threads made later inherit it."""
    for pid in tree_pids(root):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            continue


# ===========================================================================
# 4. Servers: one command per server, started in their own session
# ===========================================================================

STARLETTE_APP = '''
import os
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route

ROOT = os.environ["BENCH_ROOT"]

async def download(request):
    return FileResponse(os.path.join(ROOT, request.path_params["name"]))

app = Starlette(routes=[Route("/download/{name}", download)])
'''

AIOHTTP_APP = '''
import os, sys
from aiohttp import web

ROOT = os.environ["BENCH_ROOT"]

async def download(request):
    return web.FileResponse(os.path.join(ROOT, request.match_info["name"]))

app = web.Application()
app.router.add_get("/download/{name}", download)
web.run_app(app, host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
'''

NGINX_CONF = '''
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port};
        location /download/ {{ alias {root}/; }}
    }}
}}
'''


@dataclass(frozen=True)
class ServerSpec:
    argv: list[str]
    cwd: Path
    env: dict[str, str]


def uvicorn_argv(target: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", target, "--host", HOST, "--port", str(port),
            "--no-access-log", "--log-level", "warning", *extra]


def spec_ours(tmp: Path, root: Path, port: int) -> ServerSpec | str:
    env = os.environ | {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_ACCESS_LOG": "off"}
    return ServerSpec(uvicorn_argv("downloader:app", port), REPO, env)


def spec_ours_zerocopy(tmp: Path, root: Path, port: int) -> ServerSpec | str:
    env = os.environ | {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_PORT": str(port), "DOWNLOADER_HOST": HOST, "DOWNLOADER_ACCESS_LOG": "off"}
    return ServerSpec([sys.executable, "downloader.py"], REPO, env)


def spec_starlette(tmp: Path, root: Path, port: int) -> ServerSpec | str:
    (tmp / "bench_starlette_app.py").write_text(STARLETTE_APP)
    argv = uvicorn_argv("bench_starlette_app:app", port, "--app-dir", str(tmp))
    return ServerSpec(argv, tmp, os.environ | {"BENCH_ROOT": str(root)})


def spec_aiohttp(tmp: Path, root: Path, port: int) -> ServerSpec | str:
    if importlib.util.find_spec("aiohttp") is None:
        return "aiohttp is not importable (pip install -r tests/requirements-bench.txt)"
    (tmp / "bench_aiohttp_app.py").write_text(AIOHTTP_APP)
    argv = [sys.executable, str(tmp / "bench_aiohttp_app.py"), HOST, str(port)]
    return ServerSpec(argv, tmp, os.environ | {"BENCH_ROOT": str(root)})


def spec_nginx(tmp: Path, root: Path, port: int) -> ServerSpec | str:
    if not NGINX.exists():
        return f"{NGINX} not found"
    prefix = tmp / "nginx"
    prefix.mkdir(exist_ok=True)
    # As root, nginx would switch workers to "nobody", who cannot read our 0700 temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = NGINX_CONF.format(user=user, tmp=prefix, host=HOST, port=port, root=root)
    (prefix / "nginx.conf").write_text(conf)
    argv = [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
            "-e", str(prefix / "nginx-error.log")]
    return ServerSpec(argv, prefix, dict(os.environ))


def spec_ours_granian(tmp: Path, root: Path, port: int) -> ServerSpec | str:
    if importlib.util.find_spec("granian") is None:
        return "granian is not importable (pip install -r tests/requirements-bench.txt)"
    argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST,
            "--port", str(port), "--workers", "1", "--no-ws", "--log-level", "warning",
            "downloader:app"]
    return ServerSpec(argv, REPO, os.environ | {"DOWNLOADER_ROOT": str(root)})


SERVERS: dict[str, Callable[[Path, Path, int], ServerSpec | str]] = {
    "ours": spec_ours,
    "ours-zerocopy": spec_ours_zerocopy,
    "starlette": spec_starlette,
    "aiohttp": spec_aiohttp,
    "nginx": spec_nginx,
    "ours-granian": spec_ours_granian,
}
ALIASES = {"granian": "ours-granian"}
BASELINE = "starlette"


class ServerFailed(Exception):
    pass


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(name: str, spec: ServerSpec, port: int, tmp: Path, probe_url: str) -> Running:
    """Start the server in a new session and wait until it answers `probe_url` with 200."""
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = Running(proc, port, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if http_get(port, probe_url, bytearray(HEAD_LIMIT)).status == 200:
                return server
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    stop_server(server)
    raise ServerFailed(f"no 200 for {probe_url} within {READY_TIMEOUT_S:.0f} s:\n"
                       f"{server.log_tail()}")


def stop_server(server: Running) -> None:
    """SIGTERM our server's process group, then SIGKILL whatever is left of it."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.proc.wait(timeout=5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        log(f"  server pid {server.pid} ignored SIGTERM; killing its group")
    try:
        os.killpg(server.pid, signal.SIGKILL)  # stragglers (workers) in the group we created
    except ProcessLookupError:
        pass
    server.proc.wait(timeout=5)


# ===========================================================================
# 5. HTTP clients: raw sockets, reused buffers, bounded loops
# ===========================================================================


@dataclass
class Transfer:
    status: int
    length: int  # Content-Length
    received: int  # body bytes received
    ttfb_s: float  # request sent -> first body byte
    seconds: float  # connect -> last byte read

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.received == self.length


def get_request(port: int, path: str, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{connection}\r\n".encode()


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head; ValueError without a Content-Length."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value)
    raise ValueError(f"no Content-Length in response: {lines[0]!r}")


def read_head(sock: socket.socket, buf: bytearray) -> tuple[int, int, int, int]:
    """Read a response head into `buf`: (status, length, head_len, bytes_in_buf)."""
    view = memoryview(buf)
    filled = 0
    while filled < HEAD_LIMIT:
        n = sock.recv_into(view[filled:HEAD_LIMIT])
        if n == 0:
            raise ConnectionError("connection closed before the response head")
        filled += n
        end = buf.find(b"\r\n\r\n", 0, filled)
        if end >= 0:
            return (*parse_head(bytes(buf[:end])), end + 4, filled)
    raise ValueError("response head larger than HEAD_LIMIT")


def http_get(port: int, path: str, buf: bytearray, *,
             on_body: Callable[[memoryview], object] | None = None,
             max_body: int | None = None, rate_bps: float | None = None,
             deadline: float | None = None) -> Transfer:
    """GET `path` on a new connection, reading the body into `buf` (reused, not kept).

    `on_body` sees each piece of the body (e.g. a hash's update). Stops after `max_body`
    body bytes or at `deadline` (time.perf_counter()) if given, and paces reads to
    `rate_bps` if given. Every socket call times out after IO_TIMEOUT_S.
    """
    view = memoryview(buf)
    t_connect = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(get_request(port, path))
        t_sent = time.perf_counter()
        status, length, head_len, filled = read_head(sock, buf)
        want = length if max_body is None else min(length, max_body)
        got = filled - head_len
        if on_body is not None:
            on_body(view[head_len:filled])
        t_first = time.perf_counter() if got else None
        while got < want and (deadline is None or time.perf_counter() < deadline):
            n = sock.recv_into(view, min(len(buf), want - got))
            if n == 0:
                break  # server closed early: the Transfer is incomplete
            t_first = t_first or time.perf_counter()
            if on_body is not None:
                on_body(view[:n])
            got += n
            if rate_bps:
                pace(t_first, got, rate_bps, deadline)
    t_end = time.perf_counter()
    return Transfer(status, length, got, (t_first or t_end) - t_sent, t_end - t_connect)


def pace(t_start: float, done: int, rate_bps: float, deadline: float | None) -> None:
    """Sleep until `done` bytes since `t_start` is no faster than `rate_bps`."""
    wake = t_start + done / rate_bps
    if deadline is not None:
        wake = min(wake, deadline)
    delay = wake - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def parallel(n: int, call: Callable[[], Transfer]) -> list[Transfer]:
    """Run `call` n times at once, one thread each (recv_into releases the GIL)."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: call(), range(n)))


@dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def parse_wrk_duration(text: str) -> float:
    """wrk latency like '412.00us', '1.23ms', '2.00s' -> milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"odd wrk latency {text!r}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[match[2]]
    return float(match[1]) * scale


def wrk_load(port: int, path: str, conns: int, seconds: int) -> Load:
    """Keep-alive GETs for `seconds` with wrk; requests/s and p99 from --latency."""
    url = f"http://{HOST}:{port}{path}"
    argv = [str(WRK), "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99):
        raise ValueError(f"cannot read wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return Load(float(rps[1]), parse_wrk_duration(p50[1]), parse_wrk_duration(p99[1]), errors)


async def keepalive_client(port: int, path: str, deadline: float,
                           latencies: list[float]) -> int:
    """Sequential GETs on one connection until `deadline`; returns the error count."""
    reader, writer = await asyncio.open_connection(HOST, port)
    request = get_request(port, path, close=False)
    errors = 0
    try:
        for _ in range(MAX_REQUESTS_PER_CONN):
            if time.perf_counter() >= deadline:
                break
            started = time.perf_counter()
            writer.write(request)
            status, length = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            errors += status != 200
    finally:
        writer.close()
    return errors


def python_load(port: int, path: str, conns: int, seconds: int) -> Load:
    """The fallback for wrk: `conns` asyncio keep-alive connections for `seconds`."""
    latencies: list[float] = []

    async def run() -> list[int]:
        deadline = time.perf_counter() + seconds
        clients = [keepalive_client(port, path, deadline, latencies) for _ in range(conns)]
        return await asyncio.wait_for(asyncio.gather(*clients), seconds + IO_TIMEOUT_S)

    started = time.perf_counter()
    errors = sum(asyncio.run(run()))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50, p99 = (percentile(latencies, 0.50), percentile(latencies, 0.99)) if latencies else (0, 0)
    return Load(len(latencies) / elapsed, p50 * 1e3, p99 * 1e3, errors)


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


LoadFn = Callable[[int, str, int, int], Load]


def median_load(load: LoadFn, port: int, path: str, conns: int, seconds: int,
                runs: int) -> Load:
    """The median of each figure over `runs` runs (errors summed): a burst of other work
    on the machine moves one run's p99, not the median."""
    results = [load(port, path, conns, seconds) for _ in range(runs)]
    return Load(statistics.median(r.rps for r in results),
                statistics.median(r.p50_ms for r in results),
                statistics.median(r.p99_ms for r in results),
                sum(r.errors for r in results))


# ===========================================================================
# 6. Measurements: one function per section of the report
# ===========================================================================


def verify_bytes(port: int, fixtures: dict[str, Fixture]) -> str | None:
    """None when every fixture comes back whole with the right sha256, else what went wrong."""
    buf = bytearray(BIG_BUF)
    for fx in fixtures.values():
        digest = hashlib.sha256()
        t = http_get(port, fx.url, buf, on_body=digest.update)
        if not t.complete or t.length != fx.size:
            return (f"{fx.name}: status {t.status}, {t.received} of {t.length} bytes"
                    f" (want {fx.size})")
        if digest.hexdigest() != fx.sha256:
            return f"{fx.name}: sha256 differs"
    return None


def require_complete(transfers: list[Transfer], what: str) -> None:
    bad = [t for t in transfers if not t.complete]
    if bad:
        raise ServerFailed(f"{what}: {len(bad)} incomplete, e.g. {bad[0]}")


def measure_throughput(server: Running, fixtures: dict[str, Fixture], plan: Plan) -> dict:
    """Single-stream big file (best/median/TTFB), concurrent mid file, CPU per GiB."""
    big, mid = fixtures["big"], fixtures["mid"]
    buf = bytearray(BIG_BUF)
    cpu_before = tree_cpu(server.pid)
    singles = [http_get(server.port, big.url, buf) for _ in range(plan.reps)]
    require_complete(singles, "single stream")
    started = time.perf_counter()
    group = parallel(plan.concurrent, lambda: http_get(server.port, mid.url, bytearray(BIG_BUF)))
    group_s = time.perf_counter() - started
    require_complete(group, "concurrent")
    cpu_s = tree_cpu(server.pid) - cpu_before
    sent = sum(t.received for t in singles + group)
    rates = [t.received / t.seconds / MB for t in singles]
    return {
        "single_best_MBps": max(rates),
        "single_median_MBps": statistics.median(rates),
        "ttfb_ms": statistics.median(t.ttfb_s for t in singles) * 1e3,
        "concurrent_MBps": sum(t.received for t in group) / group_s / MB,
        "cpu_s_per_GiB": cpu_s / (sent / GiB),
    }


def measure_small_files(server: Running, fixtures: dict[str, Fixture], plan: Plan,
                        load: LoadFn) -> dict:
    """Requests/s and p99 for the 1 KiB file over `small_conns` keep-alive connections."""
    result = median_load(load, server.port, fixtures["small"].url, plan.small_conns,
                         plan.small_s, plan.load_runs)
    return {"small_rps": result.rps, "small_p50_ms": result.p50_ms,
            "small_p99_ms": result.p99_ms, "small_errors": result.errors}


def measure_slow_clients(server: Running, fixtures: dict[str, Fixture], plan: Plan) -> dict:
    """Tree RSS idle, and peak while `slow_clients` read the big file at SLOW_RATE_BPS."""
    idle = tree_rss(server.pid)
    peak = idle
    deadline = time.perf_counter() + plan.slow_s
    url = fixtures["big"].url

    def slow_client() -> Transfer:
        return http_get(server.port, url, bytearray(SLOW_BUF), rate_bps=SLOW_RATE_BPS,
                        deadline=deadline)

    with ThreadPoolExecutor(max_workers=plan.slow_clients) as pool:
        futures = [pool.submit(slow_client) for _ in range(plan.slow_clients)]
        while (not all(f.done() for f in futures)
               and time.perf_counter() < deadline + IO_TIMEOUT_S):
            peak = max(peak, tree_rss(server.pid))
            time.sleep(RSS_SAMPLE_S)
        transfers = [f.result() for f in futures]
    return {
        "slow_MBps": sum(t.received for t in transfers) / plan.slow_s / MB,
        "rss_idle_MiB": idle / MiB,
        "rss_peak_MiB": peak / MiB,
        "rss_growth_MiB": (peak - idle) / MiB,
    }


def measure_aborts(server: Running, fixtures: dict[str, Fixture], plan: Plan) -> dict:
    """Open fds and RSS of the tree before and after `aborts` downloads cut mid-body."""
    url = fixtures["big"].url
    fds_before, rss_before = settled_fds(server.pid), tree_rss(server.pid)
    with ThreadPoolExecutor(max_workers=ABORT_WORKERS) as pool:
        transfers = list(pool.map(
            lambda _: http_get(server.port, url, bytearray(SLOW_BUF), max_body=ABORT_AFTER),
            range(plan.aborts)))
    cut = sum(1 for t in transfers if t.status == 200 and 0 < t.received < t.length)
    fds_after, rss_after = settled_fds(server.pid), tree_rss(server.pid)
    still_serves = http_get(server.port, fixtures["small"].url, bytearray(HEAD_LIMIT)).complete
    return {
        "aborted": cut,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "fds_growth": fds_after - fds_before,
        "abort_rss_before_MiB": rss_before / MiB,
        "abort_rss_after_MiB": rss_after / MiB,
        "abort_rss_growth_MiB": (rss_after - rss_before) / MiB,
        "serves_after_aborts": still_serves,
    }


def background_downloads(port: int, path: str, n: int, seconds: float, total: object) -> None:
    """Child process: `n` threads download `path` over and over for `seconds`, niced so the
    latency probe in the parent (on the same client CPU) is not queued behind them."""
    os.nice(10)
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()

    def loop() -> None:
        buf = bytearray(BIG_BUF)
        while time.perf_counter() < deadline:
            try:
                got = http_get(port, path, buf, deadline=deadline).received
            except OSError:
                got = 0
            with lock:
                total.value += got

    threads = [threading.Thread(target=loop) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure_responsiveness(server: Running, fixtures: dict[str, Fixture], plan: Plan,
                           load: LoadFn) -> dict:
    """p99 of 1 KiB requests on one connection, idle and while `concurrent` big downloads run."""
    small, big = fixtures["small"].url, fixtures["big"].url
    idle = median_load(load, server.port, small, 1, plan.probe_s, plan.load_runs)
    ctx = multiprocessing.get_context("fork")
    total = ctx.Value("d", 0.0)
    load_s = RAMP_S + (plan.probe_s + 0.1) * plan.load_runs + 0.2  # wrk outlasts its -d
    child = ctx.Process(target=background_downloads,
                        args=(server.port, big, plan.concurrent, load_s, total))
    child.start()
    try:
        time.sleep(RAMP_S)
        loaded = median_load(load, server.port, small, 1, plan.probe_s, plan.load_runs)
    finally:
        child.join(timeout=load_s + IO_TIMEOUT_S)
        if child.is_alive():
            child.terminate()
            child.join()
    return {
        "probe_idle_p50_ms": idle.p50_ms,
        "probe_idle_p99_ms": idle.p99_ms,
        "probe_loaded_p50_ms": loaded.p50_ms,
        "probe_loaded_p99_ms": loaded.p99_ms,
        "probe_loaded_rps": loaded.rps,
        "probe_load_MBps": total.value / load_s / MB,
        "responsiveness_ratio": loaded.p99_ms / idle.p99_ms if idle.p99_ms else float("nan"),
        "probe_errors": idle.errors + loaded.errors,
    }


def wait_hashed(port: int) -> None:
    """Ours hashes the fixtures in the background (README: Integrity): measured once that is done, as a server
    runs after its first minutes (tests/bench_digests.py measures it while it hashes)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/sha256sums/", timeout=IO_TIMEOUT_S) as response:
                if response.headers["Digests-Pending"] == "0":
                    return
        except urllib.error.HTTPError:  # digests switched off (DOWNLOADER_DIGESTS=false), or no listing
            return
        time.sleep(0.5)
    raise ServerFailed("the fixtures were not hashed within 600 s")


def bench_server(name: str, tmp: Path, root: Path, fixtures: dict[str, Fixture], plan: Plan,
                 load: LoadFn, pin: bool) -> dict:
    """Start one server, run every measurement, stop it. {"skipped": why} when it cannot run."""
    port = free_port()
    spec = SERVERS[name](tmp, root, port)
    if isinstance(spec, str):
        return {"skipped": spec}
    started = time.monotonic()
    try:
        server = start_server(name, spec, port, tmp, fixtures["small"].url)
    except ServerFailed as exc:
        return {"skipped": f"did not start: {exc}"}
    try:
        if pin:
            pin_tree(server.pid, 0)
        log(f"[{name}] pid {server.pid}, port {port}, up in {time.monotonic() - started:.1f} s")
        wrong = verify_bytes(port, fixtures)
        if wrong:
            return {"skipped": f"wrong bytes: {wrong}"}
        if name.startswith("ours"):
            wait_hashed(port)
        figures: dict = {"sha256_ok": True}
        steps = [("throughput", lambda: measure_throughput(server, fixtures, plan)),
                 ("small files", lambda: measure_small_files(server, fixtures, plan, load)),
                 ("slow clients", lambda: measure_slow_clients(server, fixtures, plan)),
                 ("aborts", lambda: measure_aborts(server, fixtures, plan)),
                 ("responsiveness",
                  lambda: measure_responsiveness(server, fixtures, plan, load))]
        for label, step in steps:
            step_started = time.monotonic()
            figures |= step()
            log(f"[{name}] {label}: {time.monotonic() - step_started:.1f} s")
        return figures
    except (OSError, ValueError, ServerFailed) as exc:
        return {"skipped": f"failed: {exc!r}\n{server.log_tail()}"}
    finally:
        stop_server(server)


# ===========================================================================
# 7. Report: one table, ratios to the baseline
# ===========================================================================

# (key, label, format, better): "^" higher is better, "v" lower is better, "" information
METRICS = [
    ("single_best_MBps", "single stream best MB/s", "{:,.0f}", "^"),
    ("single_median_MBps", "single stream median MB/s", "{:,.0f}", "^"),
    ("ttfb_ms", "time to first byte ms", "{:.2f}", "v"),
    ("concurrent_MBps", "8 concurrent aggregate MB/s", "{:,.0f}", "^"),
    ("cpu_s_per_GiB", "server CPU s per GiB", "{:.3f}", "v"),
    ("small_rps", "1 KiB x32 conns req/s", "{:,.0f}", "^"),
    ("small_p99_ms", "1 KiB x32 conns p99 ms", "{:.2f}", "v"),
    ("slow_MBps", "100 slow clients total MB/s", "{:,.0f}", "^"),
    ("rss_idle_MiB", "RSS idle MiB", "{:.1f}", "v"),
    ("rss_peak_MiB", "RSS peak, slow clients MiB", "{:.1f}", "v"),
    ("rss_growth_MiB", "RSS growth over idle MiB", "{:.1f}", "v"),
    ("aborted", "downloads aborted mid-body", "{:,}", ""),
    ("fds_before", "open fds before aborts", "{}", "v"),
    ("fds_after", "open fds after aborts", "{}", "v"),
    ("abort_rss_growth_MiB", "RSS growth after aborts MiB", "{:.1f}", "v"),
    ("probe_idle_p99_ms", "1 KiB p99 idle ms", "{:.2f}", "v"),
    ("probe_loaded_p99_ms", "1 KiB p99 under 8 downloads ms", "{:.2f}", "v"),
    ("responsiveness_ratio", "p99 loaded / idle", "{:.1f}", "v"),
    ("probe_load_MBps", "8 downloads during probe MB/s", "{:,.0f}", ""),
]


def format_cell(value: object, fmt: str, base: object) -> str:
    """The figure, and its ratio to the baseline's when both are positive numbers."""
    if value is None:
        return "-"
    text = fmt.format(value)
    numbers = isinstance(base, (int, float)) and isinstance(value, (int, float))
    if numbers and base > 0 and value >= 0:
        text += f" ({value / base:.2f}x)"
    return text


def print_figures(results: dict[str, dict], ran: list[str]) -> None:
    """One row per metric, one column per server that ran."""
    base = results.get(BASELINE, {})
    width = 34
    header = f"{'figure':<{width}}  " + "  ".join(f"{name:>20}" for name in ran)
    print(header)
    print("-" * len(header))
    for key, label, fmt, better in METRICS:
        arrow = {"^": "(higher better)", "v": "(lower better)"}.get(better, "")
        cells = [format_cell(results[name].get(key), fmt, base.get(key)) for name in ran]
        print(f"{label:<{width}}  " + "  ".join(f"{cell:>20}" for cell in cells) + f"  {arrow}")


def print_notes(results: dict[str, dict], ran: list[str]) -> None:
    """Errors seen, servers that broke after the aborts, and servers skipped with why."""
    for name in ran:
        errors = results[name].get("small_errors", 0) + results[name].get("probe_errors", 0)
        if errors:
            print(f"note: {name}: {errors} non-200 or socket errors in the 1 KiB runs")
        if not results[name].get("serves_after_aborts", True):
            print(f"note: {name}: did not serve the 1 KiB file after the aborts")
    if BASELINE not in ran:
        print(f"note: no ratios: the {BASELINE} baseline did not run")
    for name, r in results.items():
        if "skipped" in r:
            print(f"skipped {name}: " + textwrap.indent(r["skipped"], "    ").strip())


def print_table(results: dict[str, dict]) -> None:
    ran = [name for name, r in results.items() if "skipped" not in r]
    if ran:
        print_figures(results, ran)
    print_notes(results, ran)


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "loadavg": os.getloadavg(),
            "python": platform.python_version(),
            "uvloop": importlib.util.find_spec("uvloop") is not None,
            "httptools": importlib.util.find_spec("httptools") is not None}


# ===========================================================================
# 8. Main
# ===========================================================================


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller files, shorter runs")
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated: " + ", ".join(SERVERS))
    parser.add_argument("--no-wrk", action="store_true", help="use the Python client, not wrk")
    args = parser.parse_args(argv)
    names = [ALIASES.get(n.strip(), n.strip()) for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    args.servers = list(dict.fromkeys(names))
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    pin = (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})  # the client side; threads and children inherit it
    load: LoadFn = python_load if args.no_wrk or not WRK.exists() else wrk_load
    started = time.monotonic()
    host = machine()
    busy = host["loadavg"][0]
    if busy > 0.5:
        log(f"warning: load average {busy:.1f} before starting; other work will add noise")
    tmp = Path(tempfile.mkdtemp(prefix="downloader-bench-"))
    try:
        root = tmp / "files"
        log(f"making fixtures in {root}")
        fixtures = make_fixtures(root, plan)
        results = {name: bench_server(name, tmp, root, fixtures, plan, load, pin)
                   for name in args.servers}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    mode = "quick" if args.quick else "full"
    print(f"\ndownloader bench ({mode}, {elapsed:.0f} s; big {plan.big_size // MiB} MiB, "
          f"mid {plan.mid_size // MiB} MiB, small {plan.small_size} B; 1 KiB load by "
          f"{'wrk' if load is wrk_load else 'python'}; pinned: {pin}; load average "
          f"{host['loadavg'][0]:.1f} at start; ratios vs {BASELINE})\n")
    print_table(results)
    if args.json:
        host["loadavg_at_end"] = os.getloadavg()
        report = {"mode": mode, "seconds": elapsed, "machine": host, "plan": asdict(plan),
                  "small_load_client": "wrk" if load is wrk_load else "python",
                  "baseline": BASELINE, "servers": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
