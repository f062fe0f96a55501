"""Embedding (README "Embed it"): the README's two examples run as written; the service
mounted under a prefix of a Starlette or FastAPI host, with and without GZipMiddleware;
DownloadResponse and stream_download returned from host endpoints; and GET /zip of a
folder (exact archives, hostile folder paths, compression, memory that stays flat)."""

from __future__ import annotations

import gzip as gzip_module
import hashlib
import io
import http.client
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import downloader
from conftest import OLD_MTIME, PROJECT, SECRET, TEN, UNICODE_NAME, asgi_exchange, asgi_request, need
from downloader import DownloadResponse, create_app, http_date, make_etag, stream_download
from helpers import MIB, Server, clean_env, failed, parse_byteranges, uvicorn_server, wait_for

SAMPLES = PROJECT / "static" / "downloads"
TOKEN = "t"
BIG_TEXT = b"".join(b"line %06d of a text file that GZipMiddleware would love to shrink\n" % i for i in range(4000))
PLAIN_TEXT = "a host route's own text, compressible\n" * 2000
EXPORT_CSV = b"id,item\r\n" + b"".join(f"{i},item {i}\r\n".encode() for i in range(1, 10_001))
UNICODE_BYTES = "naïve ünïcode\n".encode()

# Every file /download serves under the conftest root, by path: what /zip/ must hold.
ROOT_FILES = {
    "data.bin": bytes(range(256)),
    "empty.txt": b"",
    "link-in": TEN,
    "sub/inner.txt": b"inner",
    "ten.txt": TEN,
    UNICODE_NAME: UNICODE_BYTES,
}

ACCEPT_ENCODINGS = pytest.mark.parametrize("accept_encoding", ["gzip", None], ids=["accept-gzip", "no-accept-encoding"])


# =============================================================================
# Helpers
# =============================================================================


def asgi_client(app, accept_encoding: str | None = "gzip") -> httpx.AsyncClient:
    """An httpx client on the ASGI app that sends exactly this Accept-Encoding (None: the
    field is left out, not httpx's default)."""
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    if accept_encoding is None:
        del client.headers["accept-encoding"]
    else:
        client.headers["accept-encoding"] = accept_encoding
    return client


def file_headers(
    path: Path, *, media_type: str, disposition: str, accept_encoding: str | None, vary: bool = False, **extra: str
) -> dict[str, str]:
    """Every header of a 200 download of `path`: the fixed set, the validators from its
    stat, the empty Content-Encoding when a coding was accepted, and `extra`."""
    st = path.stat()
    headers = {
        "content-type": media_type,
        "accept-ranges": "bytes",
        "last-modified": http_date(st.st_mtime_ns / 1e9),
        "etag": make_etag(st.st_size, st.st_mtime_ns),
        "x-content-type-options": "nosniff",
        "content-disposition": disposition,
        "cache-control": "no-cache, no-transform",
    }
    if accept_encoding is not None:
        headers["content-encoding"] = ""
    headers["content-length"] = str(st.st_size)
    if vary and path.stat().st_size >= 500:
        # GZipMiddleware's identity path adds it to any body it inspected and left alone,
        # except one sent in a single message below its minimum_size (500 by default)
        headers["vary"] = "Accept-Encoding"
    headers.update(extra)
    return headers


def not_modified_headers(path: Path, **extra: str) -> dict[str, str]:
    """RFC 9110 §15.4.5: what a 304 keeps of the 200's headers."""
    st = path.stat()
    return {
        "last-modified": http_date(st.st_mtime_ns / 1e9),
        "etag": make_etag(st.st_size, st.st_mtime_ns),
        "cache-control": "no-cache, no-transform",
        **extra,
    }


def zip_contents(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def zip_compress_types(data: bytes) -> dict[str, int]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: info.compress_type for info in archive.infolist()}


@pytest.fixture
def host_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:
    """Starts host app modules under uvicorn on a port it picks (start(source, name) ->
    (port, log)) and stops them; the logs are printed when the test fails."""
    started: list[Server] = []

    def start(source: str, name: str, cwd: Path = PROJECT) -> tuple[int, Path]:
        app_dir = tmp_path / f"app-{name}"
        app_dir.mkdir()
        (app_dir / f"{name}.py").write_text(source, encoding="utf-8")
        command = [sys.executable, "-m", "uvicorn", f"{name}:app", "--app-dir", str(app_dir), "--host", "127.0.0.1", "--port", "0"]
        started.append(Server(command, tmp_path / f"{name}.log", cwd=cwd, timeout=20))
        return started[-1].port, started[-1].log

    yield start
    for server in started:
        server.stop(show_log=failed(request))


# =============================================================================
# The README's examples, run as written
# =============================================================================

EXAMPLE_RE = re.compile(r"<!-- example: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?\n)```\n", re.S)


def readme_examples() -> dict[str, str]:
    """Each fenced python block right after its `<!-- example: NAME -->` marker."""
    text = (PROJECT / "README.md").read_text(encoding="utf-8")
    return {m["name"]: m["code"] for m in EXAMPLE_RE.finditer(text)}


def run_example(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Executes the README's example in a fresh module, from the project folder (the
    examples name their files relative to it), and returns the module."""
    monkeypatch.chdir(PROJECT)
    module = types.ModuleType(f"readme_example_{name}")
    module.__file__ = str(PROJECT / f"readme_example_{name}.py")
    exec(compile(readme_examples()[name], f"README.md <!-- example: {name} -->", "exec"), module.__dict__)
    return module


def with_plain_route(app: Starlette) -> Starlette:
    """The README's app plus a non-download route of the host's own, to show that its
    GZipMiddleware is active."""

    async def plain(request) -> PlainTextResponse:
        return PlainTextResponse(PLAIN_TEXT)

    app.router.routes.append(Route("/plain", plain))
    return app


def test_readme_has_both_examples() -> None:
    examples = readme_examples()
    assert {"fastapi", "starlette"} <= set(examples)  # others (authorize, ...) belong to other files
    assert "app = Starlette(" in examples["starlette"]
    assert "api = FastAPI()" in examples["fastapi"]


@pytest.mark.anyio
@ACCEPT_ENCODINGS
async def test_readme_starlette_invoice_is_the_pdf_under_another_name(monkeypatch, accept_encoding: str | None) -> None:
    app = run_example("starlette", monkeypatch).app
    pdf_path = SAMPLES / "sample.pdf"
    pdf = pdf_path.read_bytes()
    async with asgi_client(app, accept_encoding) as c:
        whole = await c.get("/invoice")
        part = await c.get("/invoice", headers={"Range": "bytes=100-199"})
        head = await c.head("/invoice")
    assert whole.status_code == 200
    assert whole.content == pdf
    assert dict(whole.headers) == file_headers(
        pdf_path, media_type="application/pdf", disposition='attachment; filename="invoice 2026-11.pdf"',
        accept_encoding=accept_encoding, vary=accept_encoding is None,
    )
    assert (part.status_code, part.content) == (206, pdf[100:200])
    assert part.headers["content-range"] == f"bytes 100-199/{len(pdf)}"
    assert part.headers["content-length"] == "100"
    assert part.headers.get("content-encoding") == ("" if accept_encoding else None)
    # GZipMiddleware adds Vary only to a body it inspected; HEAD has none.
    assert (head.status_code, head.content, dict(head.headers)) == (200, b"", {k: v for k, v in whole.headers.items() if k != "vary"})


@pytest.mark.anyio
@ACCEPT_ENCODINGS
async def test_readme_starlette_export_csv_is_chunked_and_exact(monkeypatch, accept_encoding: str | None) -> None:
    app = run_example("starlette", monkeypatch).app
    async with asgi_client(app, accept_encoding) as c:
        response = await c.get("/export.csv")
    assert response.status_code == 200
    assert response.content == EXPORT_CSV
    assert len(response.content.split(b"\r\n")) - 1 == 10_001
    wanted = {
        "content-type": "text/csv; charset=utf-8",
        "content-disposition": 'attachment; filename="export.csv"',
        "x-content-type-options": "nosniff",
        "cache-control": "no-store, no-transform",
        "accept-ranges": "none",
    }
    if accept_encoding is not None:
        wanted["content-encoding"] = ""
    else:
        wanted["vary"] = "Accept-Encoding"
    assert dict(response.headers) == wanted  # no Content-Length: chunked


@pytest.mark.anyio
@ACCEPT_ENCODINGS
@pytest.mark.parametrize(
    ("name", "media_type", "disposition"),
    [
        ("hello.txt", "text/plain; charset=utf-8", 'attachment; filename="hello.txt"'),
        ("sample.pdf", "application/pdf", 'attachment; filename="sample.pdf"'),
        ("reports/2026-q2.csv", "text/csv; charset=utf-8", 'attachment; filename="2026-q2.csv"'),
    ],
    ids=["hello.txt", "sample.pdf", "reports-csv"],
)
async def test_readme_starlette_mounted_files_are_byte_exact(monkeypatch, accept_encoding, name, media_type, disposition) -> None:
    app = run_example("starlette", monkeypatch).app
    path = SAMPLES / name
    data = path.read_bytes()
    async with asgi_client(app, accept_encoding) as c:
        whole = await c.get(f"/files/download/{name}")
        part = await c.get(f"/files/download/{name}", headers={"Range": "bytes=3-12"})
        etag = whole.headers["etag"]
        cached = await c.get(f"/files/download/{name}", headers={"If-None-Match": etag})
    assert whole.status_code == 200
    assert whole.content == data
    assert dict(whole.headers) == file_headers(
        path, media_type=media_type, disposition=disposition, accept_encoding=accept_encoding, vary=accept_encoding is None
    )
    assert (part.status_code, part.content, part.headers["content-range"]) == (206, data[3:13], f"bytes 3-12/{len(data)}")
    assert (cached.status_code, cached.content, dict(cached.headers)) == (304, b"", not_modified_headers(path))


@pytest.mark.anyio
async def test_readme_starlette_gzip_middleware_still_compresses_host_routes(monkeypatch) -> None:
    app = with_plain_route(run_example("starlette", monkeypatch).app)
    async with asgi_client(app, "gzip") as c:
        async with c.stream("GET", "/plain") as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["vary"] == "Accept-Encoding"
    assert gzip_module.decompress(raw) == PLAIN_TEXT.encode()
    assert len(raw) < len(PLAIN_TEXT) // 10


@pytest.mark.anyio
async def test_readme_starlette_listing_urls_carry_the_mount_prefix(monkeypatch) -> None:
    app = run_example("starlette", monkeypatch).app
    served = sorted(
        str(p.relative_to(SAMPLES)) for p in SAMPLES.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(SAMPLES).parts)
    )
    async with asgi_client(app) as c:
        listing = await c.get("/files/api/files")
        files = listing.json()["files"]
        downloads = [await c.get(f["url"]) for f in files]
    assert listing.status_code == 200
    assert [f["path"] for f in files] == served
    assert [f["url"] for f in files] == [f"/files/download/{urllib.parse.quote(p)}" for p in served]
    assert listing.json()["next_cursor"] is None
    assert [(d.status_code, d.content) for d in downloads] == [(200, (SAMPLES / p).read_bytes()) for p in served]


@pytest.mark.anyio
@ACCEPT_ENCODINGS
async def test_readme_fastapi_report_and_mounted_files(monkeypatch, accept_encoding: str | None) -> None:
    api = run_example("fastapi", monkeypatch).api
    assert isinstance(api, FastAPI)
    hello = SAMPLES / "hello.txt"
    async with asgi_client(api, accept_encoding) as c:
        report = await c.get("/report")
        report_part = await c.get("/report", headers={"Range": "bytes=-5"})
        mounted = await c.get("/files/download/hello.txt")
        listing = await c.get("/files/api/files")
    assert (report.status_code, report.content) == (200, hello.read_bytes())
    assert dict(report.headers) == file_headers(
        hello, media_type="text/plain; charset=utf-8", disposition='inline; filename="report.txt"', accept_encoding=accept_encoding
    )
    assert (report_part.status_code, report_part.content) == (206, hello.read_bytes()[-5:])
    assert (mounted.status_code, mounted.content) == (200, hello.read_bytes())
    assert dict(mounted.headers) == file_headers(
        hello, media_type="text/plain; charset=utf-8", disposition='attachment; filename="hello.txt"', accept_encoding=accept_encoding
    )
    assert all(f["url"] == f"/files/download/{urllib.parse.quote(f['path'])}" for f in listing.json()["files"])
    assert "hello.txt" in [f["path"] for f in listing.json()["files"]]


def test_readme_starlette_example_runs_under_uvicorn_from_the_project_folder(host_server) -> None:
    """README: "Run from the project folder, this is a complete app (uvicorn embed_example:app)"."""
    port, _ = host_server(readme_examples()["starlette"], "embed_example")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/export.csv", headers={"Accept-Encoding": "gzip"})
    export = conn.getresponse()
    export_body = export.read()
    conn.request("GET", "/invoice", headers={"Accept-Encoding": "gzip"})
    invoice = conn.getresponse()
    invoice_body = invoice.read()
    conn.close()
    assert (export.status, export.getheader("Transfer-Encoding"), export.getheader("Content-Length")) == (200, "chunked", None)
    assert export.getheader("Content-Encoding") == ""
    assert export_body == EXPORT_CSV
    assert (invoice.status, invoice_body) == (200, (SAMPLES / "sample.pdf").read_bytes())
    assert invoice.getheader("Content-Length") == str(len(invoice_body))
    assert invoice.getheader("Content-Encoding") == ""


# =============================================================================
# Mounted under a prefix: Starlette and FastAPI hosts, with and without GZipMiddleware
# =============================================================================

HOSTS = [("starlette", False), ("starlette", True), ("fastapi", False), ("fastapi", True)]
HOST_IDS = ["starlette", "starlette+gzip", "fastapi", "fastapi+gzip"]


def host_app(framework: str, gzip: bool, service: Starlette):
    """A host app with the service at /prefix and a compressible route of its own at /plain."""

    async def plain(request) -> PlainTextResponse:
        return PlainTextResponse(PLAIN_TEXT)

    if framework == "starlette":
        return Starlette(
            routes=[Route("/plain", plain), Mount("/prefix", app=service)],
            middleware=[Middleware(GZipMiddleware)] if gzip else [],
        )
    api = FastAPI()

    @api.get("/plain")
    async def plain_api() -> PlainTextResponse:
        return PlainTextResponse(PLAIN_TEXT)

    api.mount("/prefix", service)
    if gzip:
        api.add_middleware(GZipMiddleware)
    return api


@pytest.fixture
def embed_root(root: Path) -> Path:
    """The conftest root plus big.txt: text large enough for GZipMiddleware to compress."""
    (root / "big.txt").write_bytes(BIG_TEXT)
    os.utime(root / "big.txt", (OLD_MTIME, OLD_MTIME))
    return root


@pytest.mark.anyio
@ACCEPT_ENCODINGS
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_download_is_byte_exact(embed_root: Path, framework: str, gzip: bool, accept_encoding: str | None) -> None:
    app = host_app(framework, gzip, create_app(embed_root))
    async with asgi_client(app, accept_encoding) as c:
        whole = await c.get("/prefix/download/big.txt")
        head = await c.head("/prefix/download/big.txt")
        unicode = await c.get(f"/prefix/download/{urllib.parse.quote(UNICODE_NAME)}")
    assert whole.status_code == 200
    assert whole.content == BIG_TEXT
    wanted = file_headers(
        embed_root / "big.txt", media_type="text/plain; charset=utf-8", disposition='attachment; filename="big.txt"',
        accept_encoding=accept_encoding, vary=gzip and accept_encoding is None,
    )
    assert dict(whole.headers) == wanted
    wanted.pop("vary", None)  # GZipMiddleware adds Vary only to a body it inspected; HEAD has none
    assert (head.status_code, head.content, dict(head.headers)) == (200, b"", wanted)
    assert (unicode.status_code, unicode.content) == (200, UNICODE_BYTES)


@pytest.mark.anyio
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_host_route_is_compressed_only_under_gzip(embed_root: Path, framework: str, gzip: bool) -> None:
    app = host_app(framework, gzip, create_app(embed_root))
    async with asgi_client(app, "gzip") as c:
        async with c.stream("GET", "/plain") as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.status_code == 200
    if gzip:
        assert response.headers["content-encoding"] == "gzip"
        assert gzip_module.decompress(raw) == PLAIN_TEXT.encode()
        assert response.headers["content-length"] == str(len(raw))
        assert len(raw) < len(PLAIN_TEXT) // 10
    else:
        assert response.headers.get("content-encoding") is None
        assert raw == PLAIN_TEXT.encode()


@pytest.mark.anyio
@ACCEPT_ENCODINGS
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_single_range_is_exact_206(embed_root: Path, framework: str, gzip: bool, accept_encoding: str | None) -> None:
    app = host_app(framework, gzip, create_app(embed_root))
    async with asgi_client(app, accept_encoding) as c:
        response = await c.get("/prefix/download/big.txt", headers={"Range": "bytes=1000-100999"})
    assert response.status_code == 206
    assert response.content == BIG_TEXT[1000:101000]
    assert response.headers["content-range"] == f"bytes 1000-100999/{len(BIG_TEXT)}"
    assert response.headers["content-length"] == "100000"
    assert response.headers.get("content-encoding") == ("" if accept_encoding else None)


@pytest.mark.anyio
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_multipart_ranges_are_exact(embed_root: Path, framework: str, gzip: bool) -> None:
    app = host_app(framework, gzip, create_app(embed_root))
    async with asgi_client(app, "gzip") as c:
        response = await c.get("/prefix/download/big.txt", headers={"Range": "bytes=0-9,50000-50999,-20"})
    size = len(BIG_TEXT)
    assert response.status_code == 206
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers.get("content-range") is None
    assert response.headers["content-encoding"] == ""
    assert parse_byteranges(response) == [
        ({"content-type": "text/plain; charset=utf-8", "content-range": f"bytes {a}-{b - 1}/{size}"}, BIG_TEXT[a:b])
        for a, b in [(0, 10), (50000, 51000), (size - 20, size)]
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_if_none_match_is_304(embed_root: Path, framework: str, gzip: bool) -> None:
    app = host_app(framework, gzip, create_app(embed_root))
    async with asgi_client(app, "gzip") as c:
        etag = (await c.head("/prefix/download/big.txt")).headers["etag"]
        response = await c.get("/prefix/download/big.txt", headers={"If-None-Match": etag})
    assert etag == make_etag(len(BIG_TEXT), (embed_root / "big.txt").stat().st_mtime_ns)
    assert (response.status_code, response.content) == (304, b"")
    assert dict(response.headers) == not_modified_headers(embed_root / "big.txt")


@pytest.mark.anyio
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_listing_urls_carry_the_prefix_and_download(embed_root: Path, framework: str, gzip: bool) -> None:
    app = host_app(framework, gzip, create_app(embed_root))
    async with asgi_client(app, "gzip") as c:
        listing = await c.get("/prefix/api/files")
        files = listing.json()["files"]
        downloads = [await c.get(f["url"]) for f in files]
    wanted = {**ROOT_FILES, "big.txt": BIG_TEXT}
    assert listing.status_code == 200
    assert [f["path"] for f in files] == sorted(wanted)
    assert [f["url"] for f in files] == [f"/prefix/download/{urllib.parse.quote(p)}" for p in sorted(wanted)]
    assert [(d.status_code, d.content) for d in downloads] == [(200, wanted[p]) for p in sorted(wanted)]


@pytest.mark.anyio
@pytest.mark.parametrize(("framework", "gzip"), HOSTS, ids=HOST_IDS)
async def test_mounted_catalog_link_urls_carry_the_prefix(embed_root: Path, tmp_path: Path, framework: str, gzip: bool) -> None:
    service = create_app(embed_root, catalog=tmp_path / "links.db", admin_token=TOKEN)
    app = host_app(framework, gzip, service)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with asgi_client(app, "gzip") as c:
        created = await c.post("/prefix/api/links", json={"path": "big.txt"}, headers=auth)
        link_id = created.json()["id"]
        listed = await c.get("/prefix/api/links", headers=auth)
        download = await c.get(created.json()["url"])
        unauthorised = await c.post("/prefix/api/links", json={"path": "big.txt"})
    assert created.status_code == 201
    assert created.json()["url"] == f"/prefix/files/{link_id}"
    assert [link["url"] for link in listed.json()["links"]] == [f"/prefix/files/{link_id}"]
    assert (download.status_code, download.content) == (200, BIG_TEXT)
    assert download.headers["content-length"] == str(len(BIG_TEXT))
    assert download.headers["content-encoding"] == ""
    assert (unauthorised.status_code, unauthorised.json()) == (401, {"detail": "A valid bearer token is required"})


# =============================================================================
# DownloadResponse from a host endpoint
# =============================================================================


def response_host(root: Path) -> Starlette:
    async def report(request) -> DownloadResponse:
        return DownloadResponse(
            root / "data.bin", filename="report 2026.bin", media_type="application/x-report",
            disposition="inline", headers={"X-Report": "42"},
        )

    async def plain(request) -> DownloadResponse:
        return DownloadResponse(str(root / "ten.txt"))

    async def renamed(request) -> DownloadResponse:
        return DownloadResponse(root / "ten.txt", filename="Résumé.txt")

    async def missing(request) -> DownloadResponse:
        return DownloadResponse(root / "nope.txt")

    async def fifo(request) -> DownloadResponse:
        return DownloadResponse(root / "fifo")

    async def safe(request) -> DownloadResponse:
        return DownloadResponse(request.path_params["path"], root=root)

    return Starlette(routes=[
        Route("/report", report, methods=["GET", "HEAD"]),
        Route("/plain", plain),
        Route("/renamed", renamed),
        Route("/missing", missing),
        Route("/fifo", fifo),
        Route("/safe/{path:path}", safe, methods=["GET", "HEAD"]),
    ])


@pytest.mark.anyio
async def test_download_response_headers_inline_media_type_and_extra_headers(root: Path) -> None:
    async with asgi_client(response_host(root)) as c:
        whole = await c.get("/report")
        head = await c.head("/report")
    wanted = file_headers(
        root / "data.bin", media_type="application/x-report", disposition='inline; filename="report 2026.bin"',
        accept_encoding="gzip", **{"x-report": "42"},
    )
    assert (whole.status_code, whole.content) == (200, bytes(range(256)))
    assert dict(whole.headers) == wanted
    assert (head.status_code, head.content, dict(head.headers)) == (200, b"", wanted)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "media_type", "disposition"),
    [
        ("/plain", "text/plain; charset=utf-8", 'attachment; filename="ten.txt"'),
        ("/renamed", "text/plain; charset=utf-8", "attachment; filename=\"Resume.txt\"; filename*=UTF-8''R%C3%A9sum%C3%A9.txt"),
    ],
    ids=["defaults", "unicode-filename"],
)
async def test_download_response_defaults_and_filenames(root: Path, route: str, media_type: str, disposition: str) -> None:
    async with asgi_client(response_host(root), None) as c:
        response = await c.get(route)
    assert (response.status_code, response.content) == (200, TEN)
    assert dict(response.headers) == file_headers(root / "ten.txt", media_type=media_type, disposition=disposition, accept_encoding=None)


@pytest.mark.anyio
async def test_download_response_ranges(root: Path) -> None:
    data = bytes(range(256))
    async with asgi_client(response_host(root)) as c:
        single = await c.get("/report", headers={"Range": "bytes=-16"})
        multi = await c.get("/report", headers={"Range": "bytes=0-1,100-103"})
        unsatisfiable = await c.get("/report", headers={"Range": "bytes=300-"})
    assert (single.status_code, single.content) == (206, data[240:])
    assert single.headers["content-range"] == "bytes 240-255/256"
    assert single.headers["content-type"] == "application/x-report"
    assert single.headers["x-report"] == "42"
    assert multi.status_code == 206
    assert multi.headers["content-length"] == str(len(multi.content))
    assert parse_byteranges(multi) == [
        ({"content-type": "application/x-report", "content-range": "bytes 0-1/256"}, data[0:2]),
        ({"content-type": "application/x-report", "content-range": "bytes 100-103/256"}, data[100:104]),
    ]
    assert (unsatisfiable.status_code, unsatisfiable.headers["content-range"]) == (416, "bytes */256")
    assert unsatisfiable.json() == {"detail": "Range Not Satisfiable"}


@pytest.mark.anyio
async def test_download_response_if_none_match_is_304(root: Path) -> None:
    async with asgi_client(response_host(root)) as c:
        etag = (await c.get("/report")).headers["etag"]
        cached = await c.get("/report", headers={"If-None-Match": etag})
        stale = await c.get("/report", headers={"If-None-Match": '"other"'})
    assert (cached.status_code, cached.content) == (304, b"")
    assert dict(cached.headers) == not_modified_headers(root / "data.bin", **{"x-report": "42"})
    assert (stale.status_code, stale.content) == (200, bytes(range(256)))


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["/missing", "/fifo"], ids=["missing", "fifo"])
async def test_download_response_without_a_regular_file_is_404(root: Path, route: str) -> None:
    async with asgi_client(response_host(root)) as c:
        response = await c.get(route)
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    assert response.headers["content-type"] == "application/json"


SAFE_OK = [
    (b"/safe/ten.txt", TEN),
    (b"/safe/sub/inner.txt", b"inner"),
    (b"/safe/link-in", TEN),
    (b"/safe/" + urllib.parse.quote(UNICODE_NAME).encode(), UNICODE_BYTES),
]

SAFE_HOSTILE = [
    (b"/safe/../secret.txt", 404),
    (b"/safe/%2e%2e/secret.txt", 404),
    (b"/safe/%2E%2E%2Fsecret.txt", 404),
    (b"/safe/sub/../../secret.txt", 404),
    (b"/safe/./ten.txt", 404),
    (b"/safe//etc/passwd", 404),
    (b"/safe/%252e%252e/secret.txt", 404),
    (b"/safe/link-out", 404),
    (b"/safe/linkdir-out/secret.txt", 404),
    (b"/safe/.hidden", 404),
    (b"/safe/.dotdir/inner.txt", 404),
    (b"/safe/link-hidden", 404),
    (b"/safe/loop", 404),
    (b"/safe/fifo", 404),
    (b"/safe/sub", 404),
    (b"/safe/ten.txt%00", 400),
    (b"/safe/..%5csecret.txt", 404),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("raw_path", "body"), SAFE_OK, ids=[p.decode() for p, _ in SAFE_OK])
async def test_download_response_root_mode_serves_inside(root: Path, raw_path: bytes, body: bytes) -> None:
    status, headers, got = await asgi_request(response_host(root), raw_path)
    assert (status, got) == (200, body)
    assert headers["content-length"] == str(len(body))


@pytest.mark.anyio
@pytest.mark.parametrize(("raw_path", "status"), SAFE_HOSTILE, ids=[p.decode() for p, _ in SAFE_HOSTILE])
async def test_download_response_root_mode_refuses_escapes(root: Path, raw_path: bytes, status: int) -> None:
    got_status, headers, body = await asgi_request(response_host(root), raw_path)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"detail": "Not Found" if status == 404 else "Malformed path"}
    assert SECRET not in body


# =============================================================================
# stream_download
# =============================================================================


class SyncRecorder:
    """A sync iterator of bytes that records each item pulled, the thread that pulled it,
    and close()."""

    def __init__(self, items: list[bytes]) -> None:
        self.items = list(items)
        self.pulled: list[int] = []  # thread idents
        self.closed = False

    def __iter__(self) -> SyncRecorder:
        return self

    def __next__(self) -> bytes:
        if len(self.pulled) == len(self.items):
            raise StopIteration
        self.pulled.append(threading.get_ident())
        return self.items[len(self.pulled) - 1]

    def close(self) -> None:
        self.closed = True


class AsyncRecorder:
    """The async twin of SyncRecorder (aclose instead of close)."""

    def __init__(self, items: list[bytes]) -> None:
        self.items = list(items)
        self.pulled: list[int] = []
        self.closed = False

    def __aiter__(self) -> AsyncRecorder:
        return self

    async def __anext__(self) -> bytes:
        if len(self.pulled) == len(self.items):
            raise StopAsyncIteration
        self.pulled.append(threading.get_ident())
        return self.items[len(self.pulled) - 1]

    async def aclose(self) -> None:
        self.closed = True


PIECES = [b"alpha,", b"", b"beta,", bytearray(b"gamma,"), memoryview(b"delta\n")]
PIECES_BYTES = b"alpha,beta,gamma,delta\n"


def generated_host(made: list) -> Starlette:
    """Routes returning stream_download of fresh content; each content object is appended
    to `made` (with the endpoint's thread ident) so the test can inspect it afterwards."""

    async def agen() -> AsyncIterator[bytes]:
        for piece in PIECES:
            yield piece

    def sgen() -> Iterator[bytes]:
        for piece in PIECES:
            made.append(("sync-gen-thread", threading.get_ident()))
            yield piece

    async def async_route(request):
        return stream_download(agen(), "data.csv")

    async def sync_route(request):
        made.append(("endpoint-thread", threading.get_ident()))
        return stream_download(sgen(), "report.bin")

    async def sized_route(request):
        return stream_download(agen(), "sized.txt", size=len(PIECES_BYTES), disposition="inline", headers={"X-Made": "now"})

    async def probe(request):
        kind = request.path_params["kind"]
        if kind == "sync":
            content = SyncRecorder([b"never"] * 3)
        elif kind == "async":
            content = AsyncRecorder([b"never"] * 3)
        else:
            def gen() -> Iterator[bytes]:
                try:
                    made.append(("generator-started", True))
                    yield b"never"
                finally:
                    made.append(("generator-finally", True))
            content = gen()
        made.append(content)
        return stream_download(content, "probe.txt", size=15 if kind != "generator" else 5)

    return Starlette(routes=[
        Route("/async", async_route, methods=["GET", "HEAD"]),
        Route("/sync", sync_route, methods=["GET", "HEAD"]),
        Route("/sized", sized_route, methods=["GET", "HEAD"]),
        Route("/probe/{kind}", probe, methods=["GET", "HEAD"]),
    ])


@pytest.mark.anyio
async def test_stream_download_async_generator_is_chunked_and_exact() -> None:
    async with asgi_client(generated_host([])) as c:
        response = await c.get("/async")
    assert (response.status_code, response.content) == (200, PIECES_BYTES)
    assert dict(response.headers) == {
        "content-type": "text/csv; charset=utf-8",
        "content-disposition": 'attachment; filename="data.csv"',
        "x-content-type-options": "nosniff",
        "cache-control": "no-store, no-transform",
        "accept-ranges": "none",
        "content-encoding": "",
    }


@pytest.mark.anyio
async def test_stream_download_sync_generator_runs_in_a_worker_thread() -> None:
    made: list = []
    async with asgi_client(generated_host(made), None) as c:
        response = await c.get("/sync")
    test_thread = threading.get_ident()
    endpoint_threads = [ident for kind, ident in made if kind == "endpoint-thread"]
    generator_threads = [ident for kind, ident in made if kind == "sync-gen-thread"]
    assert (response.status_code, response.content) == (200, PIECES_BYTES)
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers.get("content-encoding") is None  # no Accept-Encoding: no guard
    assert endpoint_threads == [test_thread]  # the endpoint runs on the event loop's thread
    assert len(generator_threads) == len(PIECES)
    assert test_thread not in generator_threads


@pytest.mark.anyio
async def test_stream_download_with_size_has_content_length() -> None:
    async with asgi_client(generated_host([])) as c:
        response = await c.get("/sized")
    assert (response.status_code, response.content) == (200, PIECES_BYTES)
    assert dict(response.headers) == {
        "content-type": "text/plain; charset=utf-8",
        "content-disposition": 'inline; filename="sized.txt"',
        "x-content-type-options": "nosniff",
        "cache-control": "no-store, no-transform",
        "accept-ranges": "none",
        "content-length": str(len(PIECES_BYTES)),
        "content-encoding": "",
        "x-made": "now",
    }


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"], ids=["sync-iterator", "async-iterator"])
async def test_stream_download_head_pulls_nothing_and_closes_the_content(kind: str) -> None:
    made: list = []
    async with asgi_client(generated_host(made)) as c:
        head = await c.head(f"/probe/{kind}")
    (content,) = made
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == "15"
    assert content.pulled == []
    assert content.closed is True


@pytest.mark.anyio
async def test_stream_download_head_closes_an_unstarted_generator() -> None:
    made: list = []
    async with asgi_client(generated_host(made)) as c:
        head = await c.head("/probe/generator")
        get = await c.get("/probe/generator")
    head_generator, get_generator = made[0], made[1]
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "5")
    assert inspect.getgeneratorstate(head_generator) == inspect.GEN_CLOSED
    # HEAD never started it (no item pulled, so its body and finally never ran); the GET did both.
    assert made[2:] == [("generator-started", True), ("generator-finally", True)]
    assert (get.status_code, get.content) == (200, b"never")
    assert inspect.getgeneratorstate(get_generator) == inspect.GEN_CLOSED


LIVE_GENERATED = f'''
import sys
sys.path.insert(0, {str(PROJECT)!r})
from starlette.applications import Starlette
from starlette.routing import Route
from downloader import stream_download

BLOCK = b"x" * 1000


def blocks(n):
    for _ in range(n):
        yield BLOCK


async def ablocks(n):
    for _ in range(n):
        yield BLOCK


async def route(request):
    kind, declared = request.path_params["kind"], int(request.path_params["size"])
    content = blocks(3) if kind == "sync" else ablocks(3)
    return stream_download(content, "gen.bin", size=declared)


app = Starlette(routes=[Route("/{{kind}}/{{size:int}}", route)])
'''

# (declared size, bytes the client may see before the abort); the content is 3000 bytes.
SIZE_MISMATCH = [
    (5000, 3000, "shorter"),  # all 3000 go out, then the generator ends 2000 short
    (2500, 2000, "longer"),  # the 3rd block would pass 2500: it is never sent
    (999, 0, "longer"),  # the 1st block already passes it
]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(("declared", "received", "word"), SIZE_MISMATCH, ids=["too-small-content", "too-large-content", "first-block-too-large"])
def test_stream_download_size_mismatch_aborts_the_transfer(host_server, kind: str, declared: int, received: int, word: str) -> None:
    port, log = host_server(LIVE_GENERATED, "generated")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/{kind}/{declared}")
    response = conn.getresponse()
    assert (response.status, response.getheader("Content-Length")) == (200, str(declared))
    with pytest.raises(http.client.IncompleteRead) as failure:
        response.read()  # never a complete body of the wrong length
    conn.close()
    assert failure.value.partial == b"x" * received
    assert failure.value.expected == declared - received
    wait_for(lambda: f"TransferAborted: generated content was {word} than its size" in log.read_text(), 10, "the abort in the log")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stream_download_exact_size_completes_live(host_server, kind: str) -> None:
    port, _ = host_server(LIVE_GENERATED, "generated")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/{kind}/3000")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert (response.status, response.getheader("Content-Length"), body) == (200, "3000", b"x" * 3000)


# =============================================================================
# GET /zip/{folder}
# =============================================================================

ZIP_FOLDERS = [
    ("/zip/", "root.zip", ROOT_FILES, ""),
    ("/zip/sub", "sub.zip", {"inner.txt": b"inner"}, "sub/"),
    ("/zip/sub/", "sub.zip", {"inner.txt": b"inner"}, "sub/"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("url", "filename", "files", "folder"), ZIP_FOLDERS, ids=["root", "sub", "sub-slash"])
async def test_zip_holds_exactly_what_download_serves(client: httpx.AsyncClient, url: str, filename: str, files: dict, folder: str) -> None:
    response = await client.get(url)
    listing = (await client.get("/api/files")).json()["files"]
    listed = [f["path"][len(folder):] for f in listing if f["path"].startswith(folder)]
    contents = zip_contents(response.content)
    downloads = {name: (await client.get(f"/download/{urllib.parse.quote(folder + name)}")).content for name in contents}
    assert response.status_code == 200
    assert dict(response.headers) == {
        "content-type": "application/zip",
        "content-disposition": f'attachment; filename="{filename}"',
        "x-content-type-options": "nosniff",
        "cache-control": "no-store, no-transform",
        "accept-ranges": "none",
        "content-length": str(len(response.content)),
        "content-encoding": "",
    }
    assert contents == files
    assert sorted(contents) == listed
    assert downloads == files
    assert set(zip_compress_types(response.content).values()) == {zipfile.ZIP_STORED}
    assert SECRET not in response.content


@pytest.mark.anyio
async def test_zip_head_has_get_headers_and_no_body(client: httpx.AsyncClient) -> None:
    get = await client.get("/zip/")
    head = await client.head("/zip/")
    assert (head.status_code, head.content) == (200, b"")
    assert dict(head.headers) == dict(get.headers)


ZIP_HOSTILE = [
    (b"/zip/..", 404),
    (b"/zip/../", 404),
    (b"/zip/%2e%2e", 404),
    (b"/zip/%2E%2E/", 404),
    (b"/zip/sub/../..", 404),
    (b"/zip/sub/%2e%2e/%2e%2e/outside", 404),
    (b"/zip/%252e%252e", 404),
    (b"/zip/linkdir-out", 404),
    (b"/zip/linkdir-out/", 404),
    (b"/zip/.dotdir", 404),
    (b"/zip/.dotdir/", 404),
    (b"/zip/ten.txt", 404),
    (b"/zip/link-out", 404),
    (b"/zip/loop", 404),
    (b"/zip/fifo", 404),
    (b"/zip/missing", 404),
    (b"/zip//", 404),
    (b"/zip//tmp", 404),
    (b"/zip/sub%00", 400),
    (b"/zip/sub%5c..", 404),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("raw_path", "status"), ZIP_HOSTILE, ids=[p.decode() for p, _ in ZIP_HOSTILE])
async def test_zip_hostile_folder_is_refused(root: Path, raw_path: bytes, status: int) -> None:
    got_status, headers, body = await asgi_request(create_app(root), raw_path)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"detail": "Not Found" if status == 404 else "Malformed path"}
    assert SECRET not in body


@pytest.mark.anyio
async def test_zip_compression_deflates_except_compressed_types(root: Path) -> None:
    extra = {
        "photo.png": os.urandom(4096),
        "bundle.zip": os.urandom(4096),
        "paper.pdf": os.urandom(4096),
        "sub/photo.JPG": os.urandom(4096),
        "words.txt": BIG_TEXT,
    }
    for name, data in extra.items():
        (root / name).write_bytes(data)
    async with asgi_client(create_app(root, zip_compression=True)) as c:
        response = await c.get("/zip/")
        sub = await c.get("/zip/sub")
    wanted = {**ROOT_FILES, **extra}
    stored = {"photo.png", "bundle.zip", "paper.pdf", "sub/photo.JPG"}
    assert response.status_code == 200
    assert dict(response.headers) == {
        "content-type": "application/zip",
        "content-disposition": 'attachment; filename="root.zip"',
        "x-content-type-options": "nosniff",
        "cache-control": "no-store, no-transform",
        "accept-ranges": "none",
        "content-encoding": "",
    }
    assert zip_contents(response.content) == wanted
    types_by_name = zip_compress_types(response.content)
    assert {n: t for n, t in types_by_name.items() if n in stored} == {n: zipfile.ZIP_STORED for n in stored}
    assert {n: t for n, t in types_by_name.items() if n not in stored} == {n: zipfile.ZIP_DEFLATED for n in wanted if n not in stored}
    assert len(response.content) < len(BIG_TEXT)  # words.txt really shrank
    assert zip_contents(sub.content) == {"inner.txt": b"inner", "photo.JPG": extra["sub/photo.JPG"]}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "settings",
    [{"secret": "k-1"}, {"authorize": lambda request, info: True}, {"secret": "k-1", "listing": True}],
    ids=["secret", "authorize", "secret+listing"],
)
@pytest.mark.parametrize("url", ["/zip/", "/zip/sub"], ids=["root", "sub"])
async def test_zip_is_off_when_downloads_are_protected(root: Path, settings: dict, url: str) -> None:
    async with asgi_client(create_app(root, **settings)) as c:
        response = await c.get(url)
        head = await c.head(url)
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    assert (head.status_code, head.content) == (404, b"")


@pytest.mark.anyio
async def test_zip_mounted_under_gzip_keeps_its_length(root: Path) -> None:
    app = host_app("starlette", True, create_app(root))
    async with asgi_client(app, "gzip") as c:
        response = await c.get("/prefix/zip/")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["content-encoding"] == ""
    assert zip_contents(response.content) == ROOT_FILES


def test_zip_live_with_curl_matches_content_length(live_server, tmp_path: Path) -> None:
    curl = need("curl")
    out, head = tmp_path / "root.zip", tmp_path / "headers.txt"
    subprocess.run([curl, "-sS", "--fail", "-D", str(head), "-o", str(out), f"{live_server.url}/zip/"], check=True, timeout=60)
    fields = {}
    for line in head.read_bytes().decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name:
            fields[name.strip().lower()] = value.strip()
    assert head.read_bytes().decode("latin-1").startswith("HTTP/1.1 200 ")
    assert fields["content-length"] == str(out.stat().st_size)
    assert fields["content-type"] == "application/zip"
    assert zip_contents(out.read_bytes()) == ROOT_FILES


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_zip_of_300_mib_streams_in_flat_memory(tmp_path: Path) -> None:
    """Functional bound, not a timing test: the archive is never held in memory."""
    base = tmp_path / "serve"
    (base / "big").mkdir(parents=True)
    (base / "small").mkdir()
    (base / "small" / "a.txt").write_bytes(b"warm-up")
    digests = {}
    for i, mib in enumerate([100, 80, 60, 40, 20]):  # 300 MiB
        digest = hashlib.sha256()
        with open(base / "big" / f"part{i}.bin", "wb") as out:
            for _ in range(mib):
                block = os.urandom(MIB)
                out.write(block)
                digest.update(block)
        digests[f"part{i}.bin"] = digest.hexdigest()
    with uvicorn_server(base, tmp_path / "server.log") as server:
        for target in ("/zip/small", "/download/small/a.txt"):  # imports and first-use allocations
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("GET", target)
            assert conn.getresponse().read() != b""
            conn.close()
        baseline = rss_bytes(server.pid)
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(server.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        archive = tmp_path / "big.zip"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", "/zip/big")
            response = conn.getresponse()
            received = 0
            with open(archive, "wb") as out:
                while chunk := response.read(MIB):
                    out.write(chunk)
                    received += len(chunk)
            conn.close()
        finally:
            done.set()
            sampler.join()
    growth = peak - baseline
    print(f"\n/zip of 300 MiB: server VmRSS baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, growth {growth / MIB:.1f} MiB")
    assert response.status == 200
    assert response.getheader("Content-Length") == str(received)
    assert received > 300 * MIB
    with zipfile.ZipFile(archive) as z:
        got = {}
        for info in z.infolist():
            digest = hashlib.sha256()
            with z.open(info) as entry:
                while block := entry.read(MIB):
                    digest.update(block)
            got[info.filename] = digest.hexdigest()
    assert got == digests
    assert growth < 64 * MIB


# =============================================================================
# The Response contract (issue "No surprises" #3) and the module copied alone (#4)
# =============================================================================


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["file", "generated"])
async def test_fastapi_background_tasks_run_after_the_body(root: Path, tmp_path: Path, kind: str) -> None:
    """The usual "delete the temp file after sending" pattern."""
    api = FastAPI()
    events: list[str] = []

    @api.get("/export")
    async def export(background_tasks: BackgroundTasks):
        temp = tmp_path / "export.bin"
        temp.write_bytes(TEN * 1000)
        background_tasks.add_task(lambda: (events.append(f"deleted, existed: {temp.exists()}"), temp.unlink()))
        if kind == "file":
            return DownloadResponse(temp, filename="export.bin")

        def chunks():
            events.append("body")
            yield temp.read_bytes()

        return stream_download(chunks(), "export.bin")

    async with asgi_client(api) as c:
        response = await c.get("/export")
    assert (response.status_code, response.content) == (200, TEN * 1000)
    assert events[-1] == "deleted, existed: True"
    assert not (tmp_path / "export.bin").exists()


@pytest.mark.anyio
async def test_download_response_headers_and_status_code_follow_the_response_contract(root: Path) -> None:
    response = DownloadResponse(root / "ten.txt", headers={"X-Extra": "1"})
    assert (response.status_code, response.headers["x-extra"]) == (200, "1")
    response.headers["X-Later"] = "2"
    response.headers["Cache-Control"] = "private"  # replaces ours
    response.set_cookie("seen", "yes")
    status, headers, body = await asgi_request(response, b"/", headers=[(b"range", b"bytes=0-3")])
    assert (status, body, response.status_code) == (206, b"0123", 206)
    assert (headers["x-extra"], headers["x-later"], headers["cache-control"]) == ("1", "2", "private")
    assert headers["set-cookie"].startswith("seen=yes")
    assert dict(response.headers) == headers  # once sent, `headers` are those sent, as FileResponse's
    missing = DownloadResponse(root / "nope.txt", headers={"X-Extra": "1", "Content-Type": "application/pdf"})
    status, headers, body = await asgi_request(missing, b"/")
    assert (status, missing.status_code, headers["x-extra"], headers["content-type"]) == (404, 404, "1", "application/json")
    unsatisfiable = DownloadResponse(root / "ten.txt", headers={"X-Extra": "1"})
    status, headers, _ = await asgi_request(unsatisfiable, b"/", headers=[(b"range", b"bytes=99-")])
    assert (status, headers["x-extra"], headers["content-range"]) == (416, "1", "bytes */10")
    generated = stream_download([b"abc"], "a.txt", headers={"X-Extra": "g"})
    generated.headers["X-Later"] = "h"
    status, headers, body = await asgi_request(generated, b"/", headers=[(b"if-none-match", b"*")])
    assert (status, generated.status_code, headers["x-extra"], headers["x-later"]) == (304, 304, "g", "h")
    assert dict(generated.headers) == headers


BACKGROUND_ON_DISCONNECT = f'''
import sys
sys.path.insert(0, {str(PROJECT)!r})
from pathlib import Path
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.routing import Route
from downloader import DownloadResponse, stream_download


def mark(path):
    Path(path).write_text("ran")


async def big(request):
    marker = request.query_params["marker"]
    if request.path_params["kind"] == "file":
        return DownloadResponse(request.query_params["file"], background=BackgroundTask(mark, marker))

    def forever():
        while True:
            yield b"x" * 65536

    return stream_download(forever(), "endless.bin", background=BackgroundTask(mark, marker))


app = Starlette(routes=[Route("/{{kind}}", big)])
'''


@pytest.mark.parametrize("kind", ["file", "generated"])
def test_background_runs_when_the_client_leaves_mid_body(host_server, tmp_path: Path, kind: str) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 * MIB))
    marker = tmp_path / f"marker-{kind}"
    port, _ = host_server(BACKGROUND_ON_DISCONNECT, "background")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/{kind}?" + urllib.parse.urlencode({"marker": marker, "file": big}))
    response = conn.getresponse()
    assert (response.status, len(response.read(MIB))) == (200, MIB)
    assert not marker.exists()
    conn.close()  # mid-body
    wait_for(marker.exists, 10, "the background task after the client left")


def test_module_copied_alone_serves_everything_but_the_page(root: Path, tmp_path: Path) -> None:
    """A single module promises to work vendored: only the page needs static/."""
    alone = tmp_path / "vendored"
    alone.mkdir()
    (alone / "downloader.py").write_bytes((PROJECT / "downloader.py").read_bytes())
    env = {"DOWNLOADER_ROOT": str(root), "PYTHONPATH": ""}
    for i, command in enumerate((
        [sys.executable, "-m", "uvicorn", "downloader:app", "--port", "0"],
        [sys.executable, "downloader.py", "--port", "0"],
    )):
        with Server(command, tmp_path / f"alone-{i}.log", env=env, cwd=alone, health=None) as server:
            for path, status in (("/download/ten.txt", 200), ("/api/files", 200), ("/healthz", 200), ("/static/app.js", 404), ("/", 404)):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                conn.close()
                assert (command[-3], path, response.status) == (command[-3], path, status)
            assert json.loads(body) == {"detail": "The download page is not installed: static/ is missing beside downloader.py"}
    # and without a root: the default sample files aren't there either
    for command in ([sys.executable, "downloader.py"], [sys.executable, "-m", "uvicorn", "downloader:app"]):
        result = subprocess.run(command, cwd=alone, env=clean_env(PYTHONPATH=""), capture_output=True, text=True, timeout=30)
        wanted = f"DOWNLOADER_ROOT: not set, and the default '{alone / 'static' / 'downloads'}' (the sample files) is not a directory"
        assert (result.returncode, f"downloader: {wanted}\n" in result.stderr, "Traceback" in result.stderr) == (2, True, False)


# =============================================================================
# /zip as a CPU sink (issue "Hardening" #8)
# =============================================================================


@pytest.mark.anyio
async def test_zip_of_many_tiny_files_goes_out_in_few_messages(root: Path) -> None:
    """zipstream yields a few small pieces per entry; each was a thread hop and a send."""
    many = root / "many"
    many.mkdir()
    for i in range(2000):
        (many / f"t{i:04}.txt").write_bytes(b"tiny")
    status, headers, body, messages = await asgi_exchange(create_app(root), b"/zip/many")
    assert (status, int(headers["content-length"])) == (200, len(body))
    assert len(zip_contents(body)) == 2000
    assert len(messages) <= len(body) // downloader.CHUNK_SIZE + 2  # about one per CHUNK_SIZE, not 6,000


@pytest.mark.anyio
async def test_zip_over_the_limit_is_refused_before_any_entry_is_made(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipstream

    monkeypatch.setattr(downloader, "MAX_FOLDER_FILES", 3)
    monkeypatch.setattr(zipstream, "ZipStream", lambda *a, **k: pytest.fail("an archive was started"))
    async with asgi_client(create_app(root)) as c:
        response = await c.get("/zip/")
    assert (response.status_code, response.json()) == (413, {"detail": "The folder holds more than 3 files"})


@pytest.mark.anyio
async def test_zip_archives_at_once_are_capped_per_process(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloader, "MAX_ACTIVE_ZIPS", 1)
    app = create_app(root)
    started, release = anyio.Event(), anyio.Event()

    async def slow_client_send(message: dict) -> None:
        if message["type"] == "http.response.body":
            started.set()
            await release.wait()

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: asgi_exchange(app, b"/zip/", on_send=slow_client_send))
        await started.wait()  # one archive is being sent to a client that doesn't read
        status, headers, body, _ = await asgi_exchange(app, b"/zip/sub")
        assert (status, json.loads(body), headers["retry-after"]) == (503, {"detail": "Too many archives in progress"}, "5")
        release.set()
    status, _, body, _ = await asgi_exchange(app, b"/zip/sub")  # the first one done: its slot is free again
    assert (status, zip_contents(body)) == (200, {"inner.txt": b"inner"})


@pytest.mark.anyio
async def test_a_refused_archive_gives_its_slot_back(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More failed /zip requests than there are slots (404, 413): each hands its slot back, so /zip still works."""
    monkeypatch.setattr(downloader, "MAX_ACTIVE_ZIPS", 2)
    app = create_app(root)
    for target in (b"/zip/missing", b"/zip/ten.txt", b"/zip/missing", b"/zip/missing"):
        status, _, _, _ = await asgi_exchange(app, target)
        assert status == 404
    monkeypatch.setattr(downloader, "MAX_FOLDER_FILES", 0)
    assert (await asgi_exchange(app, b"/zip/sub"))[0] == 413
    monkeypatch.setattr(downloader, "MAX_FOLDER_FILES", 100_000)
    status, _, body, _ = await asgi_exchange(app, b"/zip/sub")
    assert (status, zip_contents(body)) == (200, {"inner.txt": b"inner"})
