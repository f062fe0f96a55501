"""Section 9's guards against hostile connections, on a real uvicorn on 127.0.0.1 with
downloader:HTTPProtocol (each parser and event loop): a request head over MAX_HEAD_BYTES
is answered 431 (with httptools; h11, the fallback parser, keeps its own limit), also when
it is pipelined behind a running response; a head not complete within HEAD_TIMEOUT_S closes
the connection (408 when part of it came), idle keep-alive is left to uvicorn; a server
raises its descriptor limit. The load they are built for
(500 slowloris connections beside normal traffic) is measured by `tests/load.py hostile`."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import downloader
from conftest import PROJECT
from helpers import COMBINATIONS, InProcessServer, write_file

HEAD_TIMEOUT_S = 0.5  # the tests' HEAD_TIMEOUT_S: the guard reads the module's value when it arms


@pytest.fixture(params=COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def server(request: pytest.FixtureRequest, root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessServer]:
    monkeypatch.setattr(downloader, "HEAD_TIMEOUT_S", HEAD_TIMEOUT_S)
    running = InProcessServer(downloader.create_app(root, access_log="off", rate_limit=64 * 1024), *request.param)
    try:
        yield running
    finally:
        running.stop()


HTTPTOOLS = [c for c in COMBINATIONS if c[0] == "httptools"]


@pytest.fixture(params=HTTPTOOLS, ids=["-".join(c) for c in HTTPTOOLS])
def sized_server(request: pytest.FixtureRequest, root: Path) -> Iterator[InProcessServer]:
    """The head size limit is counted in httptools' callbacks; h11, the fallback parser, keeps its own."""
    running = InProcessServer(downloader.create_app(root, access_log="off", rate_limit=64 * 1024), *request.param)
    try:
        yield running
    finally:
        running.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_and_body(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def request(target: str, extra: bytes = b"") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n"


def test_a_head_over_the_limit_is_431_json_and_the_connection_closes(sized_server: InProcessServer) -> None:
    server = sized_server
    with connect(server.port) as sock:
        sock.sendall(request("/download/ten.txt", b"X-Pad: " + b"a" * downloader.MAX_HEAD_BYTES + b"\r\n"))
        status, body = status_and_body(read_all(sock))
    assert status == 431
    assert json.loads(body) == {"detail": "Request Header Fields Too Large"}


def test_a_huge_head_is_answered_once_past_the_limit_and_the_answer_survives(sized_server: InProcessServer) -> None:
    """A head streamed without end: the 431 comes once the limit is passed, not after 128 MiB, and the
    client reads it although it went on sending (the server drops the rest, then closes: no reset)."""
    sent = 0
    with connect(sized_server.port) as sock:
        sock.sendall(request("/download/ten.txt").removesuffix(b"\r\n") + b"X-Pad: ")
        while not select.select([sock], [], [], 0.05)[0]:
            assert sent < 64 * downloader.MAX_HEAD_BYTES, "no answer to a 1 MiB head"
            sock.sendall(b"a" * 16384)
            sent += 16384
        answered_at = sent
        for _ in range(16):
            sock.sendall(b"a" * 16384)  # a client that doesn't read while it sends
        sock.shutdown(socket.SHUT_WR)
        status, body = status_and_body(read_all(sock))
    assert status == 431 and json.loads(body) == {"detail": "Request Header Fields Too Large"}
    assert answered_at <= downloader.MAX_HEAD_BYTES + 4 * 16384


def test_a_head_just_under_the_limit_is_served(server: InProcessServer, root: Path) -> None:
    pad = b"X-Pad: " + b"a" * (downloader.MAX_HEAD_BYTES - 200) + b"\r\n"
    with connect(server.port) as sock:
        sock.sendall(request("/download/ten.txt", pad + b"Connection: close\r\n"))
        status, body = status_and_body(read_all(sock))
    assert (status, body) == (200, (root / "ten.txt").read_bytes())


def test_a_head_that_never_completes_is_408_after_the_head_timeout(server: InProcessServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /download/ten.txt HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        status, body = status_and_body(read_all(sock))
        waited = time.monotonic() - started
    assert status == 408 and json.loads(body) == {"detail": "Request Timeout"}
    assert HEAD_TIMEOUT_S * 0.9 <= waited < HEAD_TIMEOUT_S + 5


def test_slowloris_dripping_a_head_is_cut_at_the_timeout_all_the_same(server: InProcessServer) -> None:
    """The timer bounds the whole head, not the gap between bytes (each byte would restart it)."""
    with connect(server.port) as sock:
        sock.sendall(b"GET /download/ten.txt HTTP/1.1\r\n")
        started = time.monotonic()
        while not select.select([sock], [], [], HEAD_TIMEOUT_S / 5)[0]:
            assert time.monotonic() - started < HEAD_TIMEOUT_S * 4, "still open"
            sock.sendall(b"X-a: b\r\n")
        assert status_and_body(read_all(sock))[0] == 408


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server: InProcessServer) -> None:
    with connect(server.port) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 5


def test_a_slow_but_complete_head_is_served(server: InProcessServer, root: Path) -> None:
    with connect(server.port) as sock:
        for line in (b"GET /download/ten.txt HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(HEAD_TIMEOUT_S / 8)
        status, body = status_and_body(read_all(sock))
    assert (status, body) == (200, (root / "ten.txt").read_bytes())


def test_the_head_timer_never_cuts_a_response_nor_a_pipelined_request(server: InProcessServer, root: Path) -> None:
    """A download longer than the head timeout (rate limited to 64 KiB/s), then a second request that
    came in the same packet: both answered whole; then a keep-alive head left unfinished gets its 408."""
    size = 96 * 1024  # 1.5 s at 64 KiB/s: three head timeouts
    write_file(root / "slow.bin", size)
    with connect(server.port) as sock:
        sock.sendall(request("/download/slow.bin") + request("/download/ten.txt"))
        sock.settimeout(30)
        data = b""
        ten = (root / "ten.txt").read_bytes()
        while not data.endswith(ten):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(data)} bytes"
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2
        assert len(data) > size
        sock.sendall(b"GET /download/ten.txt HTTP/1.1\r\n")
        assert status_and_body(read_all(sock))[0] == 408


def test_a_huge_head_pipelined_behind_a_running_response_is_431_too(sized_server: InProcessServer, root: Path) -> None:
    """A small GET, then (in the same packets) a head of many fields without end: httptools parses the
    second head at once, while the first response runs; its size is counted all the same."""
    write_file(root / "slow.bin", 96 * 1024)  # 1.5 s at 64 KiB/s
    with connect(sized_server.port) as sock:
        sock.sendall(request("/download/slow.bin") + b"GET /download/ten.txt HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(2000):  # 2000 fields of 1 KiB: 2 MB
                sock.sendall(b"X-%d: %s\r\n" % (i, b"a" * 1000))
        data = b""
        while not data.endswith(b'{"detail": "Request Header Fields Too Large"}'):
            chunk = sock.recv(65536)
            assert chunk, data[-300:]
            data += chunk
    first, _, rest = data.partition(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert rest, data[-300:]
    head, _, body = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == (root / "slow.bin").read_bytes()  # the first answer whole, then the 431


def test_idle_keep_alive_is_uvicorns_not_the_head_timeout(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--timeout-keep-alive 3 with the head timeout at 0.5 s: an idle connection still takes a request after 1 s."""
    monkeypatch.setattr(downloader, "HEAD_TIMEOUT_S", HEAD_TIMEOUT_S)
    server = InProcessServer(downloader.create_app(root, access_log="off"), "httptools", "uvloop", timeout_keep_alive=3)
    try:
        with connect(server.port) as sock:
            sock.sendall(request("/download/ten.txt"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(1)
            sock.sendall(request("/download/ten.txt", b"Connection: close\r\n"))
            status, body = status_and_body(read_all(sock))
        assert (status, body) == (200, (root / "ten.txt").read_bytes())
    finally:
        server.stop()


def test_a_request_body_left_unread_is_no_head(server: InProcessServer, root: Path) -> None:
    """A POST answered before its 20 KiB body is read (405): the body is not taken for a next head (no 431,
    no 408), and the connection answers the next request."""
    body = b"x" * 20000
    with connect(server.port) as sock:
        sock.sendall(b"POST /download/ten.txt HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        sock.sendall(request("/download/ten.txt", b"Connection: close\r\n"))
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 405 ") and b"HTTP/1.1 200 OK" in data and data.endswith((root / "ten.txt").read_bytes())


def test_a_server_raises_its_soft_descriptor_limit_to_the_hard_one() -> None:
    """uvicorn asks for downloader:app or downloader:HTTPProtocol: the soft limit (1,024 on many systems:
    a few hundred clients) is raised to the hard one, as nginx's worker_rlimit_nofile does."""
    script = (
        "import resource, sys\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "import downloader\n"
        "downloader.HTTPProtocol\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    soft, hard = map(int, result.stdout.split())
    assert soft == hard, result.stderr
