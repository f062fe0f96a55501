"""Running it as a sidecar: /healthz, the JSON access log, /metrics across workers, the
limits (concurrency cap, bandwidth, stall timeout), graceful SIGTERM, --proxy-headers,
and the nginx X-Accel-Redirect offload built from the README's own nginx block."""

from __future__ import annotations

import base64
import calendar
import dataclasses
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import downloader
from conftest import PROJECT, SERVER_PATHS, TEN, UNICODE_NAME, need
from helpers import MIB, Server, cli_server, failed, free_port, uvicorn_server, wait_for, write_file

SECRET = "ops-test-signing-key"
USER_AGENT = "ops-test/1.0"
LOG_KEYS = {"time", "method", "path", "status", "bytes", "range", "duration_s", "client", "user_agent"}


# -- helpers -------------------------------------------------------------------------------

@dataclasses.dataclass
class Fetched:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    client_port: int
    seconds: float


def fetch(port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> Fetched:
    """One request on a fresh connection; the whole body, and the wall time to its last byte."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    began = time.monotonic()
    conn.request(method, target, headers={"User-Agent": USER_AGENT, **(headers or {})})
    client_port = conn.sock.getsockname()[1]
    response = conn.getresponse()
    body = response.read()
    seconds = time.monotonic() - began
    conn.close()
    return Fetched(response.status, response.headers, body, client_port, seconds)


def read_log(path: Path, count: int, timeout: float = 15.0) -> list[dict]:
    """The access log's JSON lines, once there are `count` of them (or the deadline passed)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def log_time(value: str) -> float:
    return calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Processes:
    """Servers a test starts (uvicorn, `python downloader.py`, nginx), each in its own
    process group and log file, stopped when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Server] = []

    def app(self, root: Path, args: list[str] | None = None, **env: str) -> Server:
        self.servers.append(uvicorn_server(root, self.tmp_path / f"app{len(self.servers)}.log", env=env, args=args))
        return self.servers[-1]

    def cli(self, root: Path, *args: str, workers: int = 1, **env: str) -> Server:
        """`python downloader.py --port P ARGS`, once every worker has started."""
        self.servers.append(cli_server(root, self.tmp_path / f"cli{len(self.servers)}.log", *args, workers=workers, **env))
        return self.servers[-1]

    def nginx(self, config: str) -> Server:
        """nginx in the foreground on `config`, once its listen port accepts."""
        program = need("nginx")
        base = self.tmp_path / "nginx"
        base.mkdir(exist_ok=True)
        conf = base / "nginx.conf"
        conf.write_text(config)
        port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", config).group(1))
        command = [program, "-p", str(base), "-e", str(base / "error.log"), "-c", str(conf)]
        self.servers.append(Server(command, base / "error.log", port=port, health=None, timeout=15))
        return self.servers[-1]

    def stop(self, show_logs: bool) -> None:
        for server in reversed(self.servers):
            server.stop(show_log=show_logs)


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop(show_logs=failed(request))


# -- /healthz ------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_healthz_is_ok_while_root_is_readable(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.anyio
async def test_healthz_is_503_once_root_is_renamed_away_and_recovers(client: httpx.AsyncClient, root: Path) -> None:
    moved = root.rename(root.with_name("moved-away"))
    response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "detail": "the download root is not readable"}
    assert response.headers["cache-control"] == "no-store"
    moved.rename(root)
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


# -- the access log ------------------------------------------------------------------------

def test_access_log_line_for_a_complete_download(procs: Processes, root: Path, tmp_path: Path) -> None:
    wanted = write_file(root / "big.bin", 3 * MIB + 17)
    access = tmp_path / "access.log"
    server = procs.app(root, DOWNLOADER_ACCESS_LOG=str(access))
    before, began = time.time(), time.monotonic()
    got = fetch(server.port, "/download/big.bin")
    assert (got.status, hashlib.sha256(got.body).hexdigest()) == (200, wanted)
    [line] = read_log(access, 1)
    after, logged = time.time(), time.monotonic()
    assert set(line) == LOG_KEYS
    assert {k: line[k] for k in LOG_KEYS - {"time", "duration_s"}} == {
        "method": "GET", "path": "/download/big.bin", "status": 200, "bytes": 3 * MIB + 17,
        "range": None, "client": f"127.0.0.1:{got.client_port}", "user_agent": USER_AGENT,
    }
    assert int(before) <= log_time(line["time"]) <= after
    assert 0 < line["duration_s"] <= logged - began


def test_access_log_line_for_a_ranged_download(procs: Processes, root: Path, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = procs.app(root, DOWNLOADER_ACCESS_LOG=str(access))
    got = fetch(server.port, "/download/data.bin", {"Range": "bytes=100-199"})
    assert (got.status, got.headers["Content-Range"], got.body) == (206, "bytes 100-199/256", bytes(range(100, 200)))
    [line] = read_log(access, 1)
    assert set(line) == LOG_KEYS
    assert {k: line[k] for k in LOG_KEYS - {"time", "duration_s"}} == {
        "method": "GET", "path": "/download/data.bin", "status": 206, "bytes": 100,
        "range": "bytes=100-199", "client": f"127.0.0.1:{got.client_port}", "user_agent": USER_AGENT,
    }


@pytest.mark.anyio
async def test_access_log_escapes_what_could_break_a_line(root: Path, tmp_path: Path) -> None:
    """Issue "Hardening" #10: U+0085, U+2028 and U+2029 are line breaks to some readers."""
    access = tmp_path / "access.log"
    app = downloader.create_app(root, access_log=str(access))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/download/a%C2%85b%E2%80%A8c%E2%80%A9d%0Ae.txt", headers={"User-Agent": "x\u2028y".encode()})
    assert response.status_code == 404
    raw = access.read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert not any(ch in raw.decode("utf-8") for ch in "\x85\u2028\u2029")
    line = json.loads(raw)
    assert line["path"] == "/download/a\x85b\u2028c\u2029d\ne.txt"
    assert line["user_agent"] == "x\u2028y".encode().decode("latin-1")  # header bytes, read as latin-1


@pytest.mark.anyio
async def test_access_log_says_500_when_a_bug_answers_it(root: Path, tmp_path: Path) -> None:
    """A hook that raises is a bug: Starlette answers 500, and the log says so (not status 0)."""
    access = tmp_path / "access.log"

    def broken(request, file) -> bool:
        raise KeyError("the host's bug")

    app = downloader.create_app(root, authorize=broken, access_log=str(access))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t") as c:
        response = await c.get("/download/ten.txt")
    assert (response.status_code, response.json()) == (500, {"detail": "Internal Server Error"})
    [line] = [json.loads(text) for text in access.read_text().splitlines()]
    assert (line["path"], line["status"], line["aborted"]) == ("/download/ten.txt", 500, "server error: KeyError")


@pytest.mark.parametrize("path", list(SERVER_PATHS))
def test_access_log_line_for_a_download_the_client_abandons(procs: Processes, root: Path, tmp_path: Path, path: str) -> None:
    size = 64 * MIB
    write_file(root / "big.bin", size)
    access = tmp_path / "access.log"
    server = procs.app(root, args=SERVER_PATHS[path], DOWNLOADER_ACCESS_LOG=str(access))
    for _ in range(5):  # when the server notices varies: before, during or after the app returns
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/download/big.bin", headers={"User-Agent": USER_AGENT})
        client_port = conn.sock.getsockname()[1]
        response = conn.getresponse()
        assert (response.status, len(response.read(MIB))) == (200, MIB)
        conn.close()
    [line] = [line for line in read_log(access, 5) if line["client"] == f"127.0.0.1:{client_port}"]
    assert 0 < line["bytes"] < size
    assert line["aborted"] == "the client disconnected"
    assert {k: line[k] for k in ("method", "path", "status", "range", "client", "user_agent")} == {
        "method": "GET", "path": "/download/big.bin", "status": 200, "range": None,
        "client": f"127.0.0.1:{client_port}", "user_agent": USER_AGENT,
    }
    assert "ERROR" not in server.log_text()  # a client leaving is no server error (uvicorn: "returned without completing")


def test_proxy_headers_put_the_forwarded_client_in_the_access_log(procs: Processes, root: Path, tmp_path: Path) -> None:
    trusting, ignoring = tmp_path / "trusting.log", tmp_path / "ignoring.log"
    port = procs.cli(root, "--proxy-headers", DOWNLOADER_ACCESS_LOG=str(trusting)).port
    forwarded = fetch(port, "/download/ten.txt", {"X-Forwarded-For": "203.0.113.7"})
    port = procs.cli(root, DOWNLOADER_ACCESS_LOG=str(ignoring)).port
    direct = fetch(port, "/download/ten.txt", {"X-Forwarded-For": "203.0.113.7"})
    assert (forwarded.body, direct.body) == (TEN, TEN)
    assert read_log(trusting, 1)[0]["client"] == "203.0.113.7:0"
    assert read_log(ignoring, 1)[0]["client"] == f"127.0.0.1:{direct.client_port}"


# -- /metrics ------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_metrics_count_downloads_in_one_process(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await client.get("/download/ten.txt")).content == TEN
    assert (await client.get("/download/missing.txt")).status_code == 404
    assert (await client.get("/healthz")).status_code == 200  # not a download: not counted
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    got = samples(response.text)
    assert got[("downloader_requests_total", (("status", "200"),))] == 3
    assert got[("downloader_requests_total", (("status", "404"),))] == 1
    assert [k for k in got if k[0] == "downloader_requests_total"] == [
        ("downloader_requests_total", (("status", "200"),)), ("downloader_requests_total", (("status", "404"),)),
    ]
    assert got[("downloader_sent_bytes_total", ())] == 3 * len(TEN) + len(b'{"detail": "Not Found"}')
    assert got[("downloader_active_downloads", ())] == 0
    assert got[("downloader_download_seconds_count", ())] == 4


@pytest.mark.anyio
async def test_metrics_false_turns_the_route_off(root: Path) -> None:
    settings = downloader.settings_from_env({"DOWNLOADER_ROOT": str(root), "DOWNLOADER_METRICS": "false"})
    app = downloader.create_app(**dataclasses.asdict(settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        assert (await c.get("/download/ten.txt")).content == TEN
        response = await c.get("/metrics")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def worker_requests(metrics_dir: Path, pid: int) -> float:
    """downloader_requests_total as one worker's own multiprocess file holds it."""
    path = metrics_dir / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(
        s.value for m in MultiProcessCollector.merge([str(path)]) if m.name == "downloader_requests" for s in m.samples
    )


def test_metrics_sum_both_workers_and_the_multiproc_dir_is_removed(procs: Processes, root: Path, tmp_path: Path) -> None:
    size = 100_003
    write_file(root / "f.bin", size)
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = procs.cli(root, "--workers", "2", workers=2, TMPDIR=str(temp), DOWNLOADER_ACCESS_LOG="off")
    [metrics_dir] = temp.iterdir()
    assert metrics_dir.name.startswith("downloader-metrics-")
    pids = [int(p) for p in re.findall(r"Started server process \[(\d+)\]", server.log_text())]
    assert len(pids) == 2
    downloads = 0
    deadline = time.monotonic() + 20
    while downloads < 4 or not all(worker_requests(metrics_dir, pid) > 0 for pid in pids):
        assert time.monotonic() < deadline, "the downloads never reached both workers"
        got = fetch(server.port, "/download/f.bin")
        assert (got.status, len(got.body)) == (200, size)
        downloads += 1
    for _ in range(3):  # every scrape sums both workers, whichever answers it
        got = fetch(server.port, "/metrics")
        assert got.status == 200
        values = samples(got.body.decode())
        assert values[("downloader_requests_total", (("status", "200"),))] == downloads
        assert values[("downloader_sent_bytes_total", ())] == downloads * size
        assert values[("downloader_download_seconds_count", ())] == downloads
        assert values[("downloader_active_downloads", ())] == 0
    os.kill(server.pid, signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert not metrics_dir.exists()


def test_a_worker_killed_mid_download_leaves_no_active_download_behind(procs: Processes, root: Path, tmp_path: Path) -> None:
    """Issue "Hardening" #10: each worker keeps its own gauge file; a scrape sums the files of live workers
    only, so the download a kill -9 cut short is no longer counted as active."""
    write_file(root / "slow.bin", 4 * MIB)
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = procs.cli(root, "--workers", "2", workers=2, TMPDIR=str(temp), DOWNLOADER_ACCESS_LOG="off", DOWNLOADER_RATE_LIMIT=str(256 * 1024))
    [metrics_dir] = temp.iterdir()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/download/slow.bin")
    assert conn.getresponse().status == 200
    active = lambda: samples(fetch(server.port, "/metrics").body.decode())[("downloader_active_downloads", ())]  # noqa: E731
    assert active() == 1
    [serving] = [int(m.group(1)) for p in metrics_dir.iterdir() if (m := re.fullmatch(r"gauge_livesum_(\d+)\.db", p.name))
                 and sum(s.value for m in MultiProcessCollector.merge([str(p)]) for s in m.samples) == 1]
    os.kill(serving, signal.SIGKILL)
    conn.close()
    wait_for(lambda: active() == 0, 10, "the dead worker's download to leave the gauge")


# -- limits --------------------------------------------------------------------------------

def test_beyond_max_active_downloads_is_503_with_retry_after(procs: Processes, root: Path, tmp_path: Path) -> None:
    wanted = write_file(root / "slow.bin", MIB)
    access = tmp_path / "access.log"
    server = procs.app(root, DOWNLOADER_MAX_ACTIVE_DOWNLOADS="2", DOWNLOADER_RATE_LIMIT=str(MIB), DOWNLOADER_ACCESS_LOG=str(access))
    busy = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/download/slow.bin")
        response = conn.getresponse()
        assert response.status == 200
        busy.append((conn, response))
    third = fetch(server.port, "/download/ten.txt")
    assert third.status == 503
    assert third.headers["Retry-After"] == "5"
    assert third.headers["Content-Type"] == "application/json"
    assert json.loads(third.body) == {"detail": "Too many downloads in progress"}
    for conn, response in busy:
        assert hashlib.sha256(response.read()).hexdigest() == wanted
        conn.close()
    lines = read_log(access, 3)  # a line is written once a download has let go of its slot
    assert sorted((line["status"], line["bytes"]) for line in lines) == [(200, MIB), (200, MIB), (503, 0)]
    after = fetch(server.port, "/download/ten.txt")
    assert (after.status, after.body) == (200, TEN)


@pytest.mark.parametrize("path", list(SERVER_PATHS))
def test_rate_limit_paces_a_download_within_ten_percent(procs: Processes, root: Path, path: str) -> None:
    limit, size = MIB, 3 * MIB
    wanted = write_file(root / "paced.bin", size)
    server = procs.app(root, args=SERVER_PATHS[path], DOWNLOADER_RATE_LIMIT=str(limit))
    got = fetch(server.port, "/download/paced.bin")
    assert (got.status, hashlib.sha256(got.body).hexdigest()) == (200, wanted)
    ratio = size / got.seconds / limit
    assert 0.9 <= ratio <= 1.1, f"{size / got.seconds:.0f} B/s against a limit of {limit} B/s"


def test_stalled_client_is_cut_off_and_its_fds_released(procs: Processes, root: Path, tmp_path: Path) -> None:
    size = 200 * 1000 * 1000
    with open(root / "huge.bin", "wb") as out:
        out.truncate(size)  # sparse: the bytes don't matter, only that they never all fit in buffers
    access = tmp_path / "access.log"
    # uvicorn's own close waits for a client that reads nothing: the README's --http
    # protocol has the kernel reset such a connection after the stall timeout
    server = procs.app(root, args=["--http", "downloader:HTTPProtocol"], DOWNLOADER_STALL_TIMEOUT="2", DOWNLOADER_ACCESS_LOG=str(access))
    baseline = server.fd_count()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET /download/huge.bin HTTP/1.1\r\nHost: x\r\nUser-Agent: stalled\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
        assert server.fd_count() > baseline  # the connection and the file, held while it stalls
        began = time.monotonic()
        # The client now reads nothing more, and keeps the connection open.
        [line] = read_log(access, 1)
        assert time.monotonic() - began >= 1.5  # cut by the stall timeout, not by anything sooner
        assert line["aborted"] == "the client read nothing for 2.0 s"
        assert (line["status"], line["user_agent"]) == (200, "stalled")
        assert 0 < line["bytes"] < size
        wait_for(lambda: str(root / "huge.bin") not in open_files(server.pid), 5, "the file to be closed")
        assert server.wait_fd_count(baseline, timeout=5) <= baseline, f"still open: {open_files(server.pid)}"
    finally:
        sock.close()


def read_slowly(port: int, target: str, seconds: float, *, step: int, every: float) -> tuple[bytes, socket.socket]:
    """A client with a small receive buffer that reads `step` bytes every `every` seconds for `seconds`;
    fails the test if the server closes meanwhile. Returns what it read and the open socket."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    received, began = bytearray(), time.monotonic()
    while time.monotonic() - began < seconds:
        chunk = sock.recv(step)
        assert chunk, f"cut after {len(received)} bytes and {time.monotonic() - began:.1f} s"
        received += chunk
        time.sleep(every)
    return bytes(received), sock


def test_portable_path_a_stall_is_no_progress_a_slow_steady_reader_is_never_cut(procs: Processes, root: Path, tmp_path: Path) -> None:
    """Issue "Hardening" #1 under plain `uvicorn downloader:app`: one send of a 256 KiB chunk waits for
    the kernel to drain half its send queue, many stall timeouts for this client (16 KiB every 0.25 s,
    against 2 s); the bytes it acknowledges meanwhile are progress. A client that reads nothing is cut."""
    size = 8 * MIB
    wanted = write_file(root / "slow.bin", size)
    access = tmp_path / "access.log"
    server = procs.app(root, DOWNLOADER_STALL_TIMEOUT="2", DOWNLOADER_ACCESS_LOG=str(access))
    received, sock = read_slowly(server.port, "/download/slow.bin", 8, step=16 * 1024, every=0.25)
    try:
        assert len(received) < size / 4  # it really was slow
        sock.settimeout(30)
        while chunk := sock.recv(MIB):  # to the end: the server closes the connection
            received += chunk
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and hashlib.sha256(body).hexdigest() == wanted
    [line] = read_log(access, 1)
    assert ("aborted" not in line, line["bytes"]) == (True, size)

    baseline = server.wait_fd_count(0, timeout=0.5)
    _, stalled = read_slowly(server.port, "/download/slow.bin", 0.5, step=1024, every=0.1)
    try:  # it now reads nothing, and keeps the connection open
        [_, cut] = read_log(access, 2, timeout=20)
        assert cut["aborted"] == "the client read nothing for 2.0 s"
        # uvicorn's close would wait for ever for its buffer to drain: the kernel resets the connection
        assert server.wait_fd_count(baseline, timeout=10) <= baseline, f"still open: {open_files(server.pid)}"
    finally:
        stalled.close()


@pytest.mark.parametrize("path", list(SERVER_PATHS))
def test_a_slow_steady_client_outlives_the_stall_timeout_many_times(procs: Processes, root: Path, path: str) -> None:
    """A slow line: 4 KiB a second through a 4 KiB receive buffer (the kernel acknowledges in bursts a
    second or two apart), for three and a half stall timeouts. (A TCP_USER_TIMEOUT on every connection once cut such
    a client on the zero-copy path: Linux counts a zero window's probes against it.)"""
    write_file(root / "big.bin", 16 * MIB)
    server = procs.app(root, args=SERVER_PATHS[path], DOWNLOADER_STALL_TIMEOUT="4", DOWNLOADER_ACCESS_LOG="off")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET /download/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        received, began = 0, time.monotonic()
        while time.monotonic() - began < 14:
            chunk = sock.recv(4096)
            assert chunk, f"cut after {received} bytes and {time.monotonic() - began:.1f} s"
            received += len(chunk)
            time.sleep(1)
    finally:
        sock.close()


def open_files(pid: int) -> list[str]:
    """What the process's fds point at (files by path, sockets as socket:[inode])."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile
    return sorted(targets)


# -- SIGTERM -------------------------------------------------------------------------------

def test_sigterm_lets_a_running_download_finish_within_grace(procs: Processes, root: Path) -> None:
    wanted = write_file(root / "paced.bin", 2 * MIB)
    server = procs.cli(root, "--grace", "10", DOWNLOADER_RATE_LIMIT=str(MIB))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/download/paced.bin")
    response = conn.getresponse()
    assert response.status == 200
    first = response.read(64 * 1024)
    os.kill(server.pid, signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: "Shutting down" in server.log_text(), 5, "uvicorn to start shutting down")
    with pytest.raises(ConnectionRefusedError):  # it no longer accepts
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
    rest = response.read()
    conn.close()
    assert hashlib.sha256(first + rest).hexdigest() == wanted
    assert time.monotonic() - signalled < 10
    assert server.proc.wait(10) == 0  # a stop that was asked for (README: Run it as a sidecar)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_downloads_still_running_when_grace_ends_are_closed_and_logged(procs: Processes, root: Path, tmp_path: Path, stop: int) -> None:
    """Issue "No surprises" #11: each cut download ends with one access-log line saying
    so, the server prints no traceback, and it exits with status 0."""
    size = 20 * MIB
    write_file(root / "paced.bin", size)
    server = procs.cli(root, "--grace", "1", DOWNLOADER_RATE_LIMIT=str(MIB))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/download/paced.bin")
    response = conn.getresponse()
    received = len(response.read(64 * 1024))
    os.kill(server.pid, stop)
    signalled = time.monotonic()
    while chunk := response.read(64 * 1024):  # b"" once the server closes the connection
        received += len(chunk)
    conn.close()
    assert 0 < received < size
    assert server.proc.wait(10) == 0
    assert time.monotonic() - signalled < 6
    output = server.log_text()
    [line] = [json.loads(text) for text in output.splitlines() if text.startswith("{")]
    assert (line["path"], line["status"], line["aborted"]) == ("/download/paced.bin", 200, "the server shut down")
    assert received <= line["bytes"] < size
    assert "Traceback" not in output and "CancelledError" not in output


# -- nginx in front: X-Accel-Redirect ------------------------------------------------------

def nginx_config(tmp_path: Path, app_port: int, root: Path) -> str:
    """The README's nginx example, pointed at our app, a free port and the test root, inside
    a minimal top-level config that writes only under tmp_path."""
    readme = (PROJECT / "README.md").read_text()
    block = re.search(r"<!-- example: nginx -->\s*```nginx\n(.*?)```", readme, re.S).group(1)
    for old, new in (
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{app_port};"),
        ("listen 8080;", f"listen 127.0.0.1:{free_port()};"),
        ("alias /srv/files/;", f"alias {os.path.realpath(root)}/;"),
    ):
        assert block.count(old) == 1, f"the README's nginx block no longer has {old!r}"
        block = block.replace(old, new)
    base = tmp_path / "nginx"
    temp = "\n".join(f"    {kind}_temp_path {base}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the test root under tmp_path
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {base}/nginx.pid;\nerror_log {base}/error.log;\n"
        f"events {{}}\nhttp {{\n    default_type application/octet-stream;\n    access_log off;\n{temp}\n{block}}}\n"
    )


def through_nginx(procs: Processes, root: Path, tmp_path: Path, **env: str) -> tuple[Server, int]:
    need("nginx")
    server = procs.app(root, DOWNLOADER_OFFLOAD="x-accel-redirect", DOWNLOADER_SECRET=SECRET, **env)
    return server, procs.nginx(nginx_config(tmp_path, server.port, root)).port


def signed(path: str) -> str:
    return downloader.sign_url(path, secret=SECRET, expires_in=600)


def test_nginx_offload_sends_the_file_byte_exact_with_our_headers(procs: Processes, root: Path, tmp_path: Path) -> None:
    size = 20 * MIB + 3
    wanted = write_file(root / "big.bin", size)
    data = (root / "big.bin").read_bytes()
    _, port = through_nginx(procs, root, tmp_path)

    whole = fetch(port, signed("big.bin"))
    assert whole.status == 200
    assert (whole.headers["Content-Length"], hashlib.sha256(whole.body).hexdigest()) == (str(size), wanted)
    assert whole.headers.get_all("X-Accel-Redirect") is None  # nginx keeps the internal path to itself

    part = fetch(port, signed("big.bin"), {"Range": "bytes=10485760-10485859"})
    assert (part.status, part.headers["Content-Range"], part.body) == (206, f"bytes 10485760-10485859/{size}", data[10485760:10485860])

    named = fetch(port, signed(UNICODE_NAME))
    assert (named.status, named.body) == (200, "naïve ünïcode\n".encode())
    assert named.headers.get_all("Content-Disposition") == [
        "attachment; filename=\"resume __.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    ]
    assert named.headers.get_all("Content-Type") == ["text/plain; charset=utf-8"]
    assert named.headers.get_all("Cache-Control") == ["no-cache, no-transform"]
    assert named.headers.get_all("X-Content-Type-Options") == ["nosniff"]
    assert whole.headers.get_all("Content-Type") == ["application/octet-stream"]


def test_nginx_offload_carries_the_digest_on_200_and_206_but_not_on_304(procs: Processes, root: Path, tmp_path: Path) -> None:
    """The digest fields are ours, on the answer nginx completes; a 304, which nginx makes itself, carries none."""
    wanted = write_file(root / "digested.bin", 3 * MIB)
    time.sleep(downloader.MIN_STRONG_AGE_S + 0.05)  # old enough to be hashed
    _, port = through_nginx(procs, root, tmp_path)
    head = wait_for(lambda: (f := fetch(port, signed("digested.bin"), method="HEAD")).headers["Repr-Digest"] and f, 15, "the digest")
    encoded = base64.b64encode(bytes.fromhex(wanted)).decode()
    whole = fetch(port, signed("digested.bin"))
    part = fetch(port, signed("digested.bin"), {"Range": "bytes=5-9"})
    cached = fetch(port, signed("digested.bin"), {"If-None-Match": whole.headers["ETag"]})
    assert [(r.status, r.headers.get_all("Repr-Digest"), r.headers.get_all("Digest")) for r in (head, whole, part)] == [
        (status, [f"sha-256=:{encoded}:"], [f"SHA-256={encoded}"]) for status in (200, 200, 206)
    ]
    assert hashlib.sha256(whole.body).hexdigest() == wanted
    assert (cached.status, cached.headers.get_all("Repr-Digest"), cached.headers.get_all("Digest")) == (304, None, None)


QUOTED_NAMES = ["a?b.txt", "100%.txt", "x%41.txt", "a#b.txt", "semi;colon.txt", "plus+sign.txt"]


def test_nginx_offload_serves_names_the_redirect_must_quote(procs: Processes, root: Path, tmp_path: Path) -> None:
    for name in QUOTED_NAMES:
        (root / name).write_bytes(f"the file {name}".encode())
    _, port = through_nginx(procs, root, tmp_path)
    got = {name: fetch(port, signed(name)) for name in QUOTED_NAMES}
    assert {name: (g.status, g.body) for name, g in got.items()} == {name: (200, f"the file {name}".encode()) for name in QUOTED_NAMES}


def test_nginx_offload_refuses_an_unsigned_link(procs: Processes, root: Path, tmp_path: Path) -> None:
    _, port = through_nginx(procs, root, tmp_path)
    got = fetch(port, "/download/ten.txt")
    assert got.status == 403
    assert got.headers["Content-Type"] == "application/json"
    assert json.loads(got.body) == {"detail": "This link needs a valid signature"}
    assert TEN not in got.body


def test_nginx_offload_honours_the_rate_limit(procs: Processes, root: Path, tmp_path: Path) -> None:
    """nginx's limit_rate lets the first second's worth go at once (its budget is
    rate * (elapsed + 1)), so 3 MiB at 1 MiB/s take about 2 s, not 3; unlimited, milliseconds."""
    wanted = write_file(root / "three.bin", 3 * MIB)
    _, port = through_nginx(procs, root, tmp_path, DOWNLOADER_RATE_LIMIT=str(MIB))
    got = fetch(port, signed("three.bin"))
    assert (got.status, hashlib.sha256(got.body).hexdigest()) == (200, wanted)
    assert 1.5 <= got.seconds <= 3.5, f"3 MiB at 1 MiB/s took {got.seconds:.2f} s"


def test_offload_answers_with_x_accel_redirect_and_no_body(procs: Processes, root: Path) -> None:
    server = procs.app(root, DOWNLOADER_OFFLOAD="x-accel-redirect", DOWNLOADER_RATE_LIMIT="65536")
    got = fetch(server.port, "/download/r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt")  # UNICODE_NAME
    assert got.status == 200
    assert got.headers["X-Accel-Redirect"] == "/_downloader_files/r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    assert got.headers["X-Accel-Limit-Rate"] == "65536"
    assert got.body == b""
    via_link = fetch(server.port, "/download/link-in")  # the app resolves the link: nginx needs none
    assert (via_link.headers["X-Accel-Redirect"], via_link.body) == ("/_downloader_files/ten.txt", b"")


@pytest.mark.anyio
async def test_offload_counts_a_catalog_download_when_it_reaches_the_last_byte(root: Path, tmp_path: Path) -> None:
    """nginx can't say whether a transfer completed, so the count is taken when a GET's range reaches the last
    byte; ranges short of it and HEAD are not counted. (The gate is async since the catalog's calls have a
    deadline: run in a thread unawaited, it counted nothing and every download was let through.)"""
    app = downloader.create_app(root, offload="x-accel-redirect", catalog=str(tmp_path / "c.db"), admin_token="t")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        link = (await client.post("/api/links", json={"path": "ten.txt", "max_downloads": 1}, headers={"Authorization": "Bearer t"})).json()
        for got in (await client.get(link["url"], headers={"Range": "bytes=0-4"}), await client.head(link["url"]), await client.get(link["url"])):
            assert (got.status_code, got.headers["x-accel-redirect"]) == (200, "/_downloader_files/ten.txt")
        assert (await client.get(link["url"])).status_code == 410
