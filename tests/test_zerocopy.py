"""Section 9: downloader:HTTPProtocol's http.response.zerocopysend on a real uvicorn on 127.0.0.1,
with each of its HTTP parsers (httptools, h11) and event loops (uvloop, asyncio).

The server runs in this process, in a thread, so that the tests can see which system calls
moved the bytes: every os.sendfile is recorded (and still made), and so is every read of
the served file. That is how they prove the zero-copy path really ran, not the portable one.
The streaming tests in test_streaming.py and test_clients.py run on both paths through
the `live_server` fixture."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import downloader
from conftest import PROJECT, need
from helpers import COMBINATIONS, MIB, InProcessServer, parse_byteranges, write_file



class Recorder:
    """os.sendfile and os.pread as the process makes them: calls recorded, then passed on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sendfile: list[int] = []  # bytes each call moved
        self.preads: list[int] = []  # sizes asked of os.pread
        real_sendfile, real_pread = os.sendfile, os.pread

        def sendfile(out: int, in_fd: int, offset: int, count: int) -> int:
            sent = real_sendfile(out, in_fd, offset, count)
            self.sendfile.append(sent)
            return sent

        def pread(fd: int, size: int, offset: int) -> bytes:
            self.preads.append(size)
            return real_pread(fd, size, offset)

        monkeypatch.setattr(os, "sendfile", sendfile)
        monkeypatch.setattr(os, "pread", pread)


@pytest.fixture(params=COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def zerocopy_server(request: pytest.FixtureRequest, root: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(downloader.create_app(root, access_log="off"), *request.param)
    try:
        yield server
    finally:
        server.stop()


def get(port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET", conn: http.client.HTTPConnection | None = None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, target, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


@pytest.mark.parametrize(("parser", "loop"), COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_a_download_is_sent_by_the_kernel_not_read_by_python(root: Path, tmp_path: Path, monkeypatch, parser: str, loop: str) -> None:
    wanted = write_file(root / "big.bin", 20 * MIB + 5)
    access = tmp_path / "access.log"
    server = InProcessServer(downloader.create_app(root, access_log=str(access)), parser, loop)
    calls = Recorder(monkeypatch)
    try:
        response, body = get(server.port, "/download/big.bin")
    finally:
        server.stop()
    assert (response.status, response.getheader("Content-Length")) == (200, str(20 * MIB + 5))
    assert hashlib.sha256(body).hexdigest() == wanted
    assert sum(calls.sendfile) == 20 * MIB + 5  # every body byte went through os.sendfile
    assert max(calls.sendfile) <= downloader.SENDFILE_MAX_CHUNK
    assert calls.preads == []  # and none through a read into Python
    [line] = [json.loads(text) for text in access.read_text().splitlines()]
    assert (line["status"], line["bytes"], "aborted" in line) == (200, 20 * MIB + 5, False)  # logged as complete


def test_pages_not_in_the_page_cache_are_sent_from_a_worker_thread(root: Path, monkeypatch) -> None:
    """The cache can't be emptied on demand (posix_fadvise is advice), so the probe's answer is set: every
    page a miss. The bytes still go by sendfile, each call in a worker thread, and arrive exact."""
    wanted = write_file(root / "cold.bin", 5 * MIB + 3)
    monkeypatch.setattr(downloader, "page_cached", lambda fd, offset: False)
    threaded: list[int] = []  # bytes each worker-thread sendfile moved
    real = downloader.sendfile_in_thread

    async def in_thread(socket_fd: int, fd: int, offset: int, count: int) -> int:
        threaded.append(await real(socket_fd, fd, offset, count))
        return threaded[-1]

    monkeypatch.setattr(downloader, "sendfile_in_thread", in_thread)
    calls = Recorder(monkeypatch)
    server = InProcessServer(downloader.create_app(root, access_log="off"), "httptools", "uvloop")
    try:
        response, body = get(server.port, "/download/cold.bin")
    finally:
        server.stop()
    assert (response.status, hashlib.sha256(body).hexdigest()) == (200, wanted)
    assert sum(threaded) == sum(calls.sendfile) == 5 * MIB + 3  # every byte, by sendfile, in a thread
    assert calls.preads == []


def test_ranges_and_keep_alive_on_the_zero_copy_path(zerocopy_server: InProcessServer, root: Path, monkeypatch) -> None:
    data = os.urandom(3 * MIB)
    (root / "r.bin").write_bytes(data)
    calls = Recorder(monkeypatch)
    conn = http.client.HTTPConnection("127.0.0.1", zerocopy_server.port, timeout=30)
    head, body = get(0, "/download/r.bin", method="HEAD", conn=conn)
    assert (head.status, head.getheader("Content-Length"), body) == (200, str(len(data)), b"")
    one, body = get(0, "/download/r.bin", {"Range": "bytes=100-199"}, conn=conn)
    assert (one.status, one.getheader("Content-Range"), body) == (206, f"bytes 100-199/{len(data)}", data[100:200])
    many, body = get(0, "/download/r.bin", {"Range": "bytes=0-9,2000000-2999999,-7"}, conn=conn)
    assert (many.status, many.getheader("Content-Length")) == (206, str(len(body)))
    parts = parse_byteranges(SimpleNamespace(headers={"content-type": many.getheader("Content-Type")}, content=body))
    assert [body for _, body in parts] == [data[0:10], data[2_000_000:3_000_000], data[-7:]]
    small, body = get(0, "/download/ten.txt", conn=conn)  # the connection is still in step
    assert (small.status, body) == (200, b"0123456789")
    conn.close()
    # The multipart body goes by sendfile; bodies up to COPY_UP_TO (100 bytes, ten.txt) are copied, as one message.
    assert sum(calls.sendfile) == 10 + 1_000_000 + 7
    assert calls.preads == []


async def chunked_zerocopy_app(scope, receive, send) -> None:
    """A foreign app: zerocopysend without Content-Length (chunked framing), offset and count left out."""
    assert scope["type"] == "http"
    path = scope["query_string"].decode()
    with open(path, "rb") as file:
        file.seek(5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
        await send({"type": "http.response.body", "body": b"<", "more_body": True})
        await send({"type": downloader.ZEROCOPY, "file": file, "more_body": True})
        await send({"type": downloader.ZEROCOPY, "file": file.fileno(), "offset": 0, "count": 5, "more_body": False})


@pytest.mark.parametrize(("parser", "loop"), COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_zerocopysend_with_chunked_framing_and_defaults(tmp_path: Path, parser: str, loop: str) -> None:
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    server = InProcessServer(chunked_zerocopy_app, parser, loop)
    try:
        response, body = get(server.port, f"/?{tmp_path / 'f'}")
    finally:
        server.stop()
    assert (response.status, response.getheader("Transfer-Encoding")) == (200, "chunked")
    assert body == b"<" + data[5:] + data[:5]


async def offer_app(scope, receive, send) -> None:
    """Says whether the server offered zerocopysend, and whether the stall timer can read the connection."""
    offered = downloader.ZEROCOPY in scope.get("extensions", {})
    readable = isinstance(downloader.ClientSocket(scope).acked(), int)
    body = (b"1" if offered else b"0") + (b"1" if readable else b"0")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": body})


def test_tls_connections_are_not_offered_zero_copy(tmp_path: Path) -> None:
    """sendfile would put plain text on a TLS socket: the extension is offered only without TLS. The
    stall timer can read both connections' sockets."""
    openssl = need("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    plain = InProcessServer(offer_app, "httptools", "asyncio")
    tls = InProcessServer(offer_app, "httptools", "asyncio", ssl_keyfile=str(key), ssl_certfile=str(cert))
    try:
        assert get(plain.port, "/")[1] == b"11"
        conn = http.client.HTTPSConnection("127.0.0.1", tls.port, timeout=30, context=ssl._create_unverified_context())
        assert get(0, "/", conn=conn)[1] == b"01"
        conn.close()
    finally:
        plain.stop()
        tls.stop()


def test_behind_a_proxy_the_stall_timer_still_reads_the_connection() -> None:
    """--proxy-headers puts the forwarded address in the scope, where no socket has it: HTTPProtocol names
    the connection's socket itself (downloader.socket), so no search is needed and none fails."""
    server = InProcessServer(offer_app, "httptools", "uvloop", proxy_headers=True, forwarded_allow_ips="127.0.0.1")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        assert get(0, "/", {"X-Forwarded-For": "203.0.113.7"}, conn=conn)[1] == b"11"
        # the search by addresses, while that connection is open, finds nothing for the forwarded one
        assert downloader.connection_socket({"client": ("203.0.113.7", 1), "server": ("127.0.0.1", server.port)}) is None
        local = conn.sock.getsockname()
        assert downloader.connection_socket({"client": local, "server": ("127.0.0.1", server.port)}) is not None
    finally:
        conn.close()
        server.stop()


def test_page_cached_tells_a_page_in_memory_from_one_on_disk(tmp_path: Path) -> None:
    """The zero-copy path sends a page not in the page cache from a worker thread: the probe must tell."""
    if not downloader.RWF_NOWAIT:
        pytest.skip("no preadv(RWF_NOWAIT) on this system: every page counts as cached")
    path = tmp_path / "cold.bin"
    write_file(path, 4 * MIB)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
        assert downloader.page_cached(fd, 2 * MIB) is False
        os.pread(fd, 4096, 2 * MIB)
        assert downloader.page_cached(fd, 2 * MIB) is True
    finally:
        os.close(fd)


def test_a_stall_is_no_progress_a_slow_steady_reader_is_never_cut(root: Path) -> None:
    """Issue "Hardening" #1 on the zero-copy path: the stall timer restarts with every byte the kernel
    takes, so a client reading 64 KiB every 0.4 s outlives a 2 s stall timeout three times over (a 1 s one
    failed on a loaded machine: the server shares this process with the client)."""
    size = 12 * MIB
    wanted = write_file(root / "slow.bin", size)
    server = InProcessServer(downloader.create_app(root, access_log="off", stall_timeout=2), "httptools", "uvloop")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /download/slow.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received, began = bytearray(), time.monotonic()
        while time.monotonic() - began < 6:
            chunk = sock.recv(64 * 1024)
            assert chunk, f"cut after {len(received)} bytes and {time.monotonic() - began:.1f} s"
            received += chunk
            time.sleep(0.4)
        assert len(received) < size / 2  # it really was slow: the server waited on this client
        sock.settimeout(30)
        while chunk := sock.recv(MIB):  # to the end: the server closes the connection
            received += chunk
    finally:
        sock.close()
        server.stop()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert hashlib.sha256(body).hexdigest() == wanted


def test_an_untested_uvicorn_is_one_line_and_exit_2() -> None:
    code = "import uvicorn; uvicorn.__version__ = '0.29.0'; import downloader; downloader.HTTPProtocol"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    first, last = (".".join(map(str, v)) for v in downloader.UVICORN_TESTED)
    assert result.stderr == (
        f"downloader: HTTPProtocol is tested with uvicorn {first} to {last}.x, not 0.29.0; "
        f"pip install 'uvicorn>={first},<0.{downloader.UVICORN_TESTED[1][1] + 1}'\n"
    )
