"""Shared fixtures: a root of small known files beside a secret, an httpx client on the
ASGI app, a live uvicorn server on 127.0.0.1, and `need` for system programs; raw
requests to a live server or the ASGI app. The plumbing behind them is in helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import PROJECT, Postgres, Seaweed, Server, failed, uvicorn_server

sys.path.insert(0, str(PROJECT))
# The digest caches of every app and server the tests start (DOWNLOADER_DIGEST_CACHE's default) go to a
# folder of this run's, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="downloader-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

import downloader  # noqa: E402

SECRET = b"TOP-SECRET-7f3a9c: never served"
TEN = b"0123456789"
UNICODE_NAME = "résumé 数据.txt"
OLD_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z: a fixed, strong Last-Modified


def make_root(base: Path) -> Path:
    """base/secret.txt beside base/root/, which holds every kind of entry the tests need."""
    (base / "secret.txt").write_bytes(SECRET)
    (base / "outside").mkdir()
    (base / "outside" / "secret.txt").write_bytes(SECRET)
    root = base / "root"
    root.mkdir()
    (root / "ten.txt").write_bytes(TEN)
    (root / "empty.txt").write_bytes(b"")
    (root / UNICODE_NAME).write_bytes("naïve ünïcode\n".encode())
    (root / "data.bin").write_bytes(bytes(range(256)))
    (root / ".hidden").write_bytes(SECRET)
    (root / ".dotdir").mkdir()
    (root / ".dotdir" / "inner.txt").write_bytes(SECRET)
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_bytes(b"inner")
    (root / "link-out").symlink_to(base / "secret.txt")
    (root / "linkdir-out").symlink_to(base / "outside")
    (root / "link-in").symlink_to(root / "ten.txt")
    (root / "link-hidden").symlink_to(root / ".hidden")
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket"))
    sock.close()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (OLD_MTIME, OLD_MTIME))
    return root


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


@pytest.fixture
async def client(root: Path) -> Iterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=downloader.create_app(root))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL server for the whole run (helpers.Postgres): skips where it isn't installed."""
    server = Postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Seaweed]:
    """One throwaway SeaweedFS for the whole run (helpers.Seaweed); tests keep apart by key prefix."""
    server = Seaweed()
    try:
        yield server
    finally:
        server.close()


CATALOGS = ["sqlite", "postgresql"]


@pytest.fixture(params=CATALOGS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a test's catalog lives, once for each database: a SQLite file, then a new database on the
    session's PostgreSQL server (dropped afterwards, its connections cut)."""
    if request.param == "sqlite":
        yield str(tmp_path / "catalog.db")
        return
    server: Postgres = request.getfixturevalue("postgres")
    url = server.database()
    try:
        yield url
    finally:
        server.sql(f"DROP DATABASE {Postgres.dbname(url)} WITH (FORCE)")


def need(program: str) -> str:
    """The path of a system program, or skip the test saying which package CI installs."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (.ci/run installs it)")
    return path


SERVER_PATHS = {
    "portable": [],  # uvicorn's own protocol: FileChunks, what any ASGI server gets
    "zerocopy": ["--http", "downloader:HTTPProtocol"],  # ours, as `python downloader.py` runs it: sendfile
}


@pytest.fixture(params=list(SERVER_PATHS))
def live_server(root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """A real uvicorn on the `root` fixture, once with each streaming path; its log is printed when the test fails."""
    server = uvicorn_server(root, tmp_path / "server.log", args=SERVER_PATHS[request.param])
    try:
        yield server
    finally:
        server.stop(show_log=failed(request))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def raw_request(port: int, target: bytes, method: bytes = b"GET", headers: bytes = b"", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request with the target sent byte for byte (no client normalises it); returns
    the status, lower-cased headers and body of a Content-Length framed response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return status, parsed, body


async def asgi_request(app, target: bytes, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Calls the ASGI app with the request target's path exactly as given (percent escapes
    and `..` included), decoded once as uvicorn does, and its query string; httpx would
    normalise the path before the app saw it."""
    status, got, body, _ = await asgi_exchange(app, target, method, headers)
    return status, got, body


async def asgi_exchange(app, target: bytes, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, on_send=None) -> tuple[int, dict[str, str], bytes, list[dict]]:
    """asgi_request, plus the body messages as the server got them; `on_send(message)` is
    awaited after each (a slow client, say)."""
    from urllib.parse import unquote

    import anyio

    raw_path, _, query = target.partition(b"?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "root_path": "", "query_string": query,
        "raw_path": raw_path, "path": unquote(raw_path.decode("ascii")),
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }
    messages: list[dict] = []
    request_sent = False

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()

    async def send(message: dict) -> None:
        messages.append(message)
        if on_send is not None:
            await on_send(message)

    await app(scope, receive, send)
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    got = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], got, body, [m for m in messages[1:] if m.get("body")]
