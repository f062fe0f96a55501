"""Section 5 against a real uvicorn: big files byte-exact, disconnects that leak nothing,
and files that change while they are sent."""

from __future__ import annotations

import hashlib
import http.client
import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import downloader
from helpers import MIB, Server, failed, free_port, write_file

def open_download(port: int, name: str, headers: dict[str, str] | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/download/{name}", headers=headers or {})
    return conn, conn.getresponse()


def test_big_file_is_byte_exact(live_server, root: Path) -> None:
    wanted = write_file(root / "big.bin", 300 * MIB)
    conn, response = open_download(live_server.port, "big.bin")
    digest = hashlib.sha256()
    while chunk := response.read(MIB):
        digest.update(chunk)
    conn.close()
    assert response.status == 200
    assert response.getheader("Content-Length") == str(300 * MIB)
    assert digest.hexdigest() == wanted


def test_disconnect_mid_body_leaks_no_fd(live_server, root: Path) -> None:
    write_file(root / "big.bin", 64 * MIB)
    http.client.HTTPConnection("127.0.0.1", live_server.port).request("GET", "/download/ten.txt")
    baseline = live_server.wait_fd_count(0, timeout=0.5)
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", live_server.port))
        sock.sendall(b"GET /download/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.close()
    assert live_server.wait_fd_count(baseline) <= baseline
    conn, response = open_download(live_server.port, "ten.txt")
    assert (response.status, response.read()) == (200, b"0123456789")
    conn.close()


def test_truncated_file_fails_the_transfer(live_server, root: Path) -> None:
    path = root / "big.bin"
    write_file(path, 200 * MIB)
    conn, response = open_download(live_server.port, "big.bin")
    assert response.status == 200
    received = len(response.read(MIB))
    os.truncate(path, 2 * MIB)
    while chunk := response.read(MIB):  # http.client returns b"" when the server closes early
        received += len(chunk)
    conn.close()
    assert 0 < received < 200 * MIB
    assert response.length > 0  # bytes announced by Content-Length that never came
    log = live_server.log.read_text()  # one line, not uvicorn's traceback (issue "Hardening" #10)
    assert "Download aborted: file shrank while being sent" in log and "Traceback" not in log


def test_bytes_appended_while_sending_are_not_sent(live_server, root: Path) -> None:
    path = root / "big.bin"
    wanted = write_file(path, 64 * MIB)
    conn, response = open_download(live_server.port, "big.bin")
    first = response.read(MIB)
    with open(path, "ab") as out:
        out.write(b"appended" * 1000)
    rest = response.read()
    conn.close()
    assert hashlib.sha256(first + rest).hexdigest() == wanted


def test_head_sends_no_body(live_server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
    conn.request("HEAD", "/download/ten.txt")
    response = conn.getresponse()
    assert (response.status, response.getheader("Content-Length"), response.read()) == (200, "10", b"")
    conn.request("GET", "/download/ten.txt")  # the same connection is still in step
    assert conn.getresponse().read() == b"0123456789"
    conn.close()


def test_fifo_does_not_hang(live_server) -> None:
    started = time.monotonic()
    conn, response = open_download(live_server.port, "fifo")
    assert response.status == 404
    assert time.monotonic() - started < 5
    conn.close()


# FileChunks directly: fixed-size reads of one range, and a short read.

@pytest.mark.anyio
async def test_file_chunks_reads_a_range_in_fixed_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = downloader.FileChunks(fd, downloader.ByteRange(10, 35), chunk_size=10)
        assert not chunks.done
        assert [chunk async for chunk in chunks] == [bytes(range(10, 20)), bytes(range(20, 30)), bytes(range(30, 35))]
        assert chunks.done
        assert [chunk async for chunk in downloader.FileChunks(fd, downloader.ByteRange(5, 5))] == []
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_file_chunks_raises_on_a_short_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 50)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = downloader.FileChunks(fd, downloader.ByteRange(0, 100), chunk_size=40)
        assert await chunks.__anext__() == b"x" * 40
        with pytest.raises(downloader.TransferAborted, match="shrank"):
            await chunks.__anext__()
    finally:
        os.close(fd)


# Under granian, a second ASGI server (no pathsend: see downloader.py, section 5).

@pytest.fixture
def granian_server(root: Path, tmp_path: Path, request: pytest.FixtureRequest):
    """granian serving downloader:app."""
    import importlib.util
    import sys

    if importlib.util.find_spec("granian") is None:
        pytest.skip("granian is not installed (tests/requirements.txt installs it)")
    port = free_port()
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "downloader:app"]
    env = {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_ACCESS_LOG": "off"}
    server = Server(command, tmp_path / "granian.log", env=env, cwd=Path(downloader.__file__).parent, port=port, timeout=20)
    try:
        yield port
    finally:
        server.stop(show_log=failed(request))


def test_under_granian_many_files_at_once_are_each_exact(granian_server: int, root: Path) -> None:
    """Many files at once, so descriptor numbers are reused all the time: every body must
    still be its own file's bytes. (Handing granian /proc/self/fd/N through pathsend
    failed this test: granian opens the path after reporting the response over.)"""
    import concurrent.futures

    files = {f"f{i}.bin": os.urandom(random_size) for i, random_size in enumerate([1024, 300_000, 3 * MIB, 5 * MIB + 7])}
    for name, data in files.items():
        (root / name).write_bytes(data)

    def fetch(name: str) -> tuple[str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", granian_server, timeout=30)
        conn.request("GET", f"/download/{name}")
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert (response.status, response.getheader("Content-Length")) == (200, str(len(files[name])))
        return name, body

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetch, list(files) * 10))
    assert all(body == files[name] for name, body in results)
    conn, response = open_download(granian_server, "f3.bin", {"Range": "bytes=10-19"})
    assert (response.status, response.read()) == (206, files["f3.bin"][10:20])
    conn.close()


# How the portable path reads: from the page cache in the event loop, a miss in a thread.

KIB = 1024


def counting_threads(monkeypatch) -> list[object]:
    """Records every function FileChunks sends to a worker thread."""
    import anyio.to_thread

    calls: list[object] = []
    real = anyio.to_thread.run_sync

    async def run_sync(func, *args, **kwargs):
        calls.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    return calls


def page_cache(monkeypatch, cached: Callable[[int], bool]) -> None:
    """os.preadv with RWF_NOWAIT as the kernel answers it, for a page cache that holds the
    bytes at the offsets where `cached(offset)` says so: the data, or EAGAIN (a miss). The
    real cache can't be emptied on demand (posix_fadvise DONTNEED is advice: this test
    failed when pages stayed), so the kernel's answer is what the test sets."""
    real = os.preadv

    def preadv(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        assert flags == downloader.RWF_NOWAIT
        if not cached(offset):
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("cached", "threads"),
    [(lambda offset: True, 0), (lambda offset: False, 4), (lambda offset: offset < 512 * KIB, 2)],
    ids=["all-cached", "all-missed", "cached-then-missed"],
)
async def test_cached_data_is_read_without_a_thread_and_a_miss_with_one(tmp_path: Path, monkeypatch, cached, threads: int) -> None:
    if not downloader.RWF_NOWAIT:
        pytest.skip("preadv with RWF_NOWAIT is Linux-only")
    path = tmp_path / "f"
    data = os.urandom(1 * MIB)  # read as 4 chunks of 256 KiB
    path.write_bytes(data)
    page_cache(monkeypatch, cached)
    calls = counting_threads(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = downloader.FileChunks(fd, downloader.ByteRange(0, len(data)), chunk_size=256 * KIB)
        assert b"".join([c async for c in chunks]) == data
    finally:
        os.close(fd)
    assert calls.count(os.pread) == threads


@pytest.mark.anyio
async def test_read_chunk_on_the_real_page_cache_returns_the_bytes(tmp_path: Path) -> None:
    """Whatever the kernel's cache holds right now (in the loop or by a thread), the bytes are right."""
    path = tmp_path / "f"
    data = os.urandom(256 * KIB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, size in ((0, 64 * KIB), (100, 1000), (200 * KIB, 56 * KIB), (250 * KIB, 64 * KIB)):
            assert await downloader.read_chunk(fd, size, offset) == data[offset : offset + size]
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_a_file_system_without_rwf_nowait_falls_back_to_threads(tmp_path: Path, monkeypatch) -> None:
    def unsupported(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    path = tmp_path / "f"
    data = os.urandom(300 * KIB)
    path.write_bytes(data)
    monkeypatch.setattr(os, "preadv", unsupported)
    calls = counting_threads(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = downloader.FileChunks(fd, downloader.ByteRange(0, len(data)), chunk_size=128 * KIB)
        assert b"".join([c async for c in chunks]) == data
    finally:
        os.close(fd)
    assert calls.count(os.pread) == 3  # 128 + 128 + 44 KiB: every read in a thread


class AsyncGate:
    async def __call__(self) -> bool:
        return False


async def refuse() -> bool:
    return False


@pytest.mark.anyio
@pytest.mark.parametrize("gate", [lambda: False, refuse, AsyncGate(), lambda: refuse()], ids=["sync", "async-def", "async-call", "returns-coroutine"])
async def test_every_kind_of_gate_is_awaited_and_can_refuse(gate) -> None:
    """A gate that refuses refuses whatever it is: a coroutine left unawaited would be truthy (and pass)."""
    assert await downloader.pass_gate(gate, started=False) is False


@pytest.mark.parametrize("scope", [{}, {"client": None, "server": ("127.0.0.1", 80)}, {"client": ("127.0.0.1", 9), "server": None}])
def test_a_connection_without_addresses_has_no_socket_to_read(scope: dict) -> None:
    """A Unix socket (uvicorn --uds) has no client address: the stall timer then does without, no error."""
    client = downloader.ClientSocket(scope)
    assert client.acked() is None
    client.give_up()
