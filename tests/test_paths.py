"""Section 3: URL paths become open regular files under the root, or 400/404 and no byte
from outside. Every hostile path is sent raw, both to the ASGI app and to a live uvicorn."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import downloader
from conftest import SECRET, TEN, asgi_request, raw_request

# (raw path after /download/, expected status). Percent-decoding happens exactly once (in
# the server), so encoded and double-encoded dots and slashes never become traversal.
HOSTILE = [
    ("../secret.txt", 404),
    ("../../../../../../../../etc/passwd", 404),
    ("..%2fsecret.txt", 404),
    ("%2e%2e/secret.txt", 404),
    ("%2e%2e%2fsecret.txt", 404),
    ("%2E%2E%2Fsecret.txt", 404),
    (".%2e/secret.txt", 404),
    ("%2e./secret.txt", 404),
    ("%252e%252e%252fsecret.txt", 404),
    ("..%252fsecret.txt", 404),
    ("....//secret.txt", 404),
    ("sub/../../secret.txt", 404),
    ("sub/%2e%2e/%2e%2e/secret.txt", 404),
    ("sub/..%2f..%2fsecret.txt", 404),
    ("..%5csecret.txt", 404),  # a backslash is part of a POSIX name: no such file
    ("ten.txt%0A", 404),  # no alias: the name holds the line feed
    ("ten.txt%0D%0A", 404),
    ("sub/inner.txt%0A", 404),
    ("%2e%2e%5csecret.txt", 404),
    ("..%255csecret.txt", 404),
    ("/etc/passwd", 404),
    ("%2fetc%2fpasswd", 404),
    ("//proc/self/environ", 404),
    ("link-out", 404),
    ("linkdir-out/secret.txt", 404),
    ("linkdir-out%2fsecret.txt", 404),
    ("secret.txt%00.txt", 400),
    ("ten.txt%00", 400),
    ("%00../secret.txt", 400),
    ("..%00/secret.txt", 400),
    ("%c0%ae%c0%ae/secret.txt", 404),
    ("..%c0%afsecret.txt", 404),
    ("..%c1%9csecret.txt", 404),
    ("..%e2%88%95secret.txt", 404),
    ("..;/secret.txt", 404),
    (".hidden", 404),
    (".dotdir/inner.txt", 404),
    ("link-hidden", 404),
    ("sub/../.hidden", 404),
    ("./ten.txt", 404),
    ("sub//inner.txt", 404),
    ("", 404),
    ("sub", 404),
    ("sub/", 404),
    ("fifo", 404),
    ("socket", 404),
    ("loop", 404),
    ("ten.txt/", 404),
    ("ten.txt/..", 404),
    ("a" * 5000, 404),
    ("a/" * 3000 + "x", 404),
]


def check_refused(status: int, headers: dict[str, str], body: bytes, wanted: int) -> None:
    assert status == wanted
    assert SECRET not in body
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"detail": "Not Found" if wanted == 404 else "Malformed path"}
    assert "etag" not in headers and "last-modified" not in headers


@pytest.fixture(params=["cached", "pinned", "checked"])
def open_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way of opening: from the kernel's caches in the event loop (openat2
    RESOLVE_CACHED), O_PATH + /proc in a thread (Linux), realpath + fstat (elsewhere)."""
    if request.param == "cached" and not downloader.CACHED_OPEN:
        pytest.skip("openat2 with RESOLVE_CACHED needs Linux 5.12+")
    if request.param == "pinned" and not downloader.PINNED_OPEN:
        pytest.skip("O_PATH and /proc/self/fd are Linux-only")
    monkeypatch.setattr(downloader, "CACHED_OPEN", request.param == "cached")
    monkeypatch.setattr(downloader, "PINNED_OPEN", request.param in ("cached", "pinned"))
    return request.param


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "wanted"), HOSTILE, ids=[p[:40] for p, _ in HOSTILE])
async def test_hostile_path_asgi(root: Path, path: str, wanted: int, open_mode: str) -> None:
    app = downloader.create_app(root)
    status, headers, body = await asgi_request(app, b"/download/" + path.encode())
    check_refused(status, headers, body, wanted)


def test_hostile_paths_live(live_server) -> None:
    """The same table through real uvicorn decoding, on one server."""
    for path, wanted in HOSTILE:
        status, headers, body = raw_request(live_server.port, b"/download/" + path.encode())
        assert (path, status) == (path, wanted)
        check_refused(status, headers, body, wanted)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "body"),
    [("ten.txt", TEN), ("link-in", TEN), ("sub/inner.txt", b"inner"), ("sub%2finner.txt", b"inner"), ("r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt", "naïve ünïcode\n".encode())],
)
async def test_served_inside_root(root: Path, path: str, body: bytes, open_mode: str) -> None:
    status, _, got = await asgi_request(downloader.create_app(root), b"/download/" + path.encode())
    assert (status, got) == (200, body)


@pytest.mark.anyio
async def test_serve_hidden_setting_serves_dotfiles(root: Path) -> None:
    (root / ".hidden").write_bytes(b"not secret now")
    status, _, got = await asgi_request(downloader.create_app(root, serve_hidden=True), b"/download/.hidden")
    assert (status, got) == (200, b"not secret now")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
@pytest.mark.anyio
async def test_device_node_is_not_served(root: Path) -> None:
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    status, _, body = await asgi_request(downloader.create_app(root), b"/download/null")
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file, so no file is unreadable")
@pytest.mark.anyio
async def test_unreadable_file_is_403(root: Path) -> None:
    os.chmod(root / "ten.txt", 0)
    status, _, body = await asgi_request(downloader.create_app(root), b"/download/ten.txt")
    assert (status, json.loads(body)) == (403, {"detail": "Forbidden"})


# Unit tests of the pure pieces.

@pytest.mark.parametrize(
    ("path", "segments"),
    [("a", ["a"]), ("a/b.txt", ["a", "b.txt"]), ("é/数", ["é", "数"]), ("...", ["..."]), ("a..b", ["a..b"]), ("a\\b", ["a\\b"]), ("a\nb", ["a\nb"])],
)
def test_split_url_path_accepts(path: str, segments: list[str]) -> None:
    assert downloader.split_url_path(path) == segments


@pytest.mark.parametrize(
    ("path", "status"),
    [("", 404), ("/a", 404), ("a/", 404), ("a//b", 404), (".", 404), ("..", 404), ("a/../b", 404), ("a\x00", 400)],
)
def test_split_url_path_refuses(path: str, status: int) -> None:
    with pytest.raises(downloader.HTTPError) as caught:
        downloader.split_url_path(path)
    assert caught.value.status == status


def test_open_under_root_checks_the_opened_descriptor(root: Path) -> None:
    opened = downloader.open_under_root(str(root.resolve()), "ten.txt")
    try:
        assert (opened.info.size, opened.info.name) == (10, "ten.txt")
        assert os.pread(opened.fd, 10, 0) == TEN
    finally:
        os.close(opened.fd)


def test_failed_opens_leak_no_descriptor(root: Path, open_mode: str) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for path, _ in HOSTILE:
        with pytest.raises(downloader.HTTPError):
            downloader.open_under_root(str(root.resolve()), __import__("urllib.parse").parse.unquote(path))
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(not downloader.CACHED_OPEN, reason="openat2 with RESOLVE_CACHED needs Linux 5.12+")
def test_open_cached_serves_a_cached_file_and_refuses_what_open_under_root_refuses(root: Path) -> None:
    real = str(root.resolve())
    (root / "ten.txt").read_bytes()  # its dentry is in the cache now
    opened = downloader.open_cached("ten.txt", root=real)
    assert opened is not None
    try:
        assert (opened.info.size, os.pread(opened.fd, 10, 0)) == (10, TEN)
    finally:
        os.close(opened.fd)
    for path in ("link-out", "linkdir-out/secret.txt", "link-hidden", "fifo", "sub"):
        os.stat(root / path)  # every dentry on the way into the cache, so no EAGAIN
        with pytest.raises(downloader.HTTPError) as caught:
            downloader.open_cached(path, root=real)
        assert caught.value.status == 404


@pytest.mark.parametrize(
    ("code", "status", "headers"),
    [
        (errno.ENOENT, 404, {}), (errno.ENOTDIR, 404, {}), (errno.ELOOP, 404, {}), (errno.ENAMETOOLONG, 404, {}),
        (errno.EISDIR, 404, {}), (errno.EACCES, 403, {}), (errno.EPERM, 403, {}),
        (errno.EMFILE, 503, {"Retry-After": "1"}), (errno.ENFILE, 503, {"Retry-After": "1"}),
    ],
    ids=lambda v: errno.errorcode[v] if isinstance(v, int) and v < 100 else None,
)
def test_os_error_to_http(code: int, status: int, headers: dict[str, str]) -> None:
    """The one place OS errors become answers (like Go's toHTTPError): fixed messages only."""
    error = downloader.os_error_to_http(OSError(code, os.strerror(code), "/secret/path"))
    assert (error.status, error.headers) == (status, headers)
    assert "/secret/path" not in error.detail and os.strerror(code) not in error.detail
