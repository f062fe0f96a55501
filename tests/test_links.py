"""Section 6: signed links (HMAC, expiry, key rotation), the ID catalog (Python, CLI and
admin API; expiry, revocation, download limits counted in completed transfers, racing
workers), and the authorize hook of create_app."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import datetime
import json
import os
import tempfile
import re
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

import downloader
from conftest import SERVER_PATHS, TEN, UNICODE_NAME, asgi_request, need
from downloader import Catalog, HTTPError, create_app, link_signature, sign_url, verify_link
from helpers import Postgres, cli_server, run_cli, uvicorn_server, wait_for

KEY = "k-3f9a"
TOKEN = "admin-7c1e"
FAR = 4_102_444_800  # 2100-01-01T00:00:00Z: an expiry no test outlives
SIG_RE = r"[A-Za-z0-9_-]{43}"  # base64url of 32 bytes, unpadded


# =============================================================================
# Helpers
# =============================================================================


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def asgi_get(app, target: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, str], bytes]:
    """conftest.asgi_request for a str target: the path reaches the app exactly as written."""
    return await asgi_request(app, target.encode("ascii"), method, headers)


def query_of(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def with_query(url: str, **changes: str | None) -> str:
    """`url` with query fields replaced (None: removed), in the original order."""
    path, _, _ = url.partition("?")
    fields = {**query_of(url), **changes}
    return path + "?" + urllib.parse.urlencode({k: v for k, v in fields.items() if v is not None})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


GONE = {"detail": "This download link has been used up"}
REVOKED = {"detail": "This download link was revoked"}
EXPIRED = {"detail": "This download link has expired"}
UNKNOWN = {"detail": "Unknown download link"}
NEEDS_SIGNATURE = {"detail": "This link needs a valid signature"}
INVALID = {"detail": "Invalid link signature"}
LINK_EXPIRED = {"detail": "This link has expired"}


# =============================================================================
# Signing: sign_url and verify_link on plain values
# =============================================================================


def test_sign_url_layout_and_signature() -> None:
    url = sign_url("sub/inner.txt", secret=KEY, expires_at=FAR)
    assert url == f"/download/sub/inner.txt?expires={FAR}&signature={link_signature('sub/inner.txt', FAR, KEY)}"
    assert re.fullmatch(rf"/download/sub/inner\.txt\?expires={FAR}&signature={SIG_RE}", url)


def test_sign_url_quotes_the_path_and_signs_it_decoded() -> None:
    url = sign_url(UNICODE_NAME, secret=KEY, expires_at=FAR, prefix="/p")
    quoted = "r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    assert url == f"/p/download/{quoted}?expires={FAR}&signature={link_signature(UNICODE_NAME, FAR, KEY)}"


def test_sign_url_expires_in_counts_from_the_injected_clock() -> None:
    assert query_of(sign_url("ten.txt", secret=KEY, expires_in=90, now=1_000_000))["expires"] == "1000090"


@pytest.mark.parametrize("kwargs", [{}, {"expires_in": 60, "expires_at": FAR}], ids=["neither", "both"])
def test_sign_url_needs_exactly_one_expiry(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sign_url("ten.txt", secret=KEY, **kwargs)


def test_verify_link_accepts_until_the_expiry_second() -> None:
    query = query_of(sign_url("ten.txt", secret=KEY, expires_at=1000))
    verify_link("ten.txt", query, [KEY], now=999)
    verify_link("ten.txt", query, [KEY], now=999.999)


@pytest.mark.parametrize("now", [1000, 1000.5, 10**9], ids=["at-expiry", "half-second-after", "long-after"])
def test_verify_link_refuses_from_the_expiry_second(now: float) -> None:
    query = query_of(sign_url("ten.txt", secret=KEY, expires_at=1000))
    with pytest.raises(HTTPError) as caught:
        verify_link("ten.txt", query, [KEY], now=now)
    assert (caught.value.status, caught.value.detail) == (403, "This link has expired")


def test_verify_link_tampered_expiry_is_invalid_not_expired() -> None:
    """The signature is checked first: a moved expiry must not be reported as 'expired'."""
    query = query_of(sign_url("ten.txt", secret=KEY, expires_at=1000))
    with pytest.raises(HTTPError) as caught:
        verify_link("ten.txt", {**query, "expires": "999"}, [KEY], now=5000)
    assert (caught.value.status, caught.value.detail) == (403, "Invalid link signature")


VERIFY_CASES = [
    # (query changes, detail)
    ({"signature": None}, "This link needs a valid signature"),
    ({"expires": None}, "This link needs a valid signature"),
    ({"expires": "abc"}, "Invalid link signature"),
    ({"expires": "-1000"}, "Invalid link signature"),
    ({"expires": "１０００"}, "Invalid link signature"),  # fullwidth digits: isdigit() but not ASCII
    ({"expires": "9" * 13}, "Invalid link signature"),
    ({"signature": "é" * 43}, "Invalid link signature"),
]


@pytest.mark.parametrize(("changes", "detail"), VERIFY_CASES, ids=["no-signature", "no-expires", "expires-abc", "expires-negative", "expires-fullwidth", "expires-13-digits", "signature-non-ascii"])
def test_verify_link_refuses_malformed_queries(changes: dict, detail: str) -> None:
    query = query_of(sign_url("ten.txt", secret=KEY, expires_at=1000))
    query = {k: v for k, v in {**query, **changes}.items() if v is not None}
    with pytest.raises(HTTPError) as caught:
        verify_link("ten.txt", query, [KEY], now=0)
    assert (caught.value.status, caught.value.detail) == (403, detail)


def test_rotation_first_key_signs_and_every_key_verifies() -> None:
    assert sign_url("ten.txt", secret=["new", "old"], expires_at=FAR) == sign_url("ten.txt", secret="new", expires_at=FAR)
    for signer in ("new", "old"):
        verify_link("ten.txt", query_of(sign_url("ten.txt", secret=signer, expires_at=FAR)), ["new", "old"], now=0)
    with pytest.raises(HTTPError) as caught:
        verify_link("ten.txt", query_of(sign_url("ten.txt", secret="retired", expires_at=FAR)), ["new", "old"], now=0)
    assert (caught.value.status, caught.value.detail) == (403, "Invalid link signature")


# =============================================================================
# Signing through HTTP
# =============================================================================


@pytest.mark.anyio
async def test_signed_link_round_trip(root: Path) -> None:
    async with asgi_client(create_app(root, secret=KEY)) as c:
        response = await c.get(sign_url("ten.txt", secret=KEY, expires_in=60))
        unsigned = await c.get("/download/ten.txt")
    assert (response.status_code, response.content) == (200, TEN)
    assert response.headers["content-disposition"] == 'attachment; filename="ten.txt"'
    assert (unsigned.status_code, unsigned.json()) == (403, NEEDS_SIGNATURE)
    assert "etag" not in unsigned.headers


@pytest.mark.anyio
async def test_signed_link_to_unicode_name_round_trip(root: Path) -> None:
    async with asgi_client(create_app(root, secret=KEY)) as c:
        response = await c.get(sign_url(UNICODE_NAME, secret=KEY, expires_in=60))
    assert (response.status_code, response.content) == (200, (root / UNICODE_NAME).read_bytes())


def _good(path: str = "ten.txt", key: str = KEY) -> str:
    return sign_url(path, secret=key, expires_at=FAR)


def _swap_last(signature: str) -> str:
    return signature[:-1] + ("A" if signature[-1] != "A" else "B")


TAMPERED = [
    # (id, target built from a good link, detail)
    ("path-changed-to-alias", lambda: _good().replace("/download/ten.txt", "/download/link-in"), INVALID),
    ("path-changed-case", lambda: _good().replace("/download/ten.txt", "/download/TEN.txt"), INVALID),
    ("other-file", lambda: _good().replace("/download/ten.txt", "/download/data.bin"), INVALID),
    ("subdir-prefix-added", lambda: _good().replace("/download/ten.txt", "/download/sub/ten.txt"), INVALID),
    ("expiry-plus-1", lambda: with_query(_good(), expires=str(FAR + 1)), INVALID),
    ("expiry-minus-1", lambda: with_query(_good(), expires=str(FAR - 1)), INVALID),
    ("signature-changed", lambda: with_query(_good(), signature=_swap_last(query_of(_good())["signature"])), INVALID),
    ("signature-truncated", lambda: with_query(_good(), signature=query_of(_good())["signature"][:-1]), INVALID),
    ("signature-padded", lambda: with_query(_good(), signature=query_of(_good())["signature"] + "="), INVALID),
    ("signature-empty", lambda: with_query(_good(), signature=""), INVALID),
    ("signature-missing", lambda: with_query(_good(), signature=None), NEEDS_SIGNATURE),
    ("expires-missing", lambda: with_query(_good(), expires=None), NEEDS_SIGNATURE),
    ("query-missing", lambda: "/download/ten.txt", NEEDS_SIGNATURE),
    ("other-secret", lambda: _good(key="not-" + KEY), INVALID),
    ("signature-of-other-file", lambda: with_query(_good(), signature=query_of(_good("data.bin"))["signature"]), INVALID),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "detail"), [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
async def test_tampered_link_is_403(root: Path, make, detail: dict) -> None:
    status, headers, body = await asgi_get(create_app(root, secret=KEY), make())
    assert (status, body) == (403, json.dumps(detail).encode())
    assert headers["content-type"] == "application/json"
    assert "content-disposition" not in headers


ENCODED_VARIANTS = [
    # (id, path signed, target path as sent)
    ("escaped-letter", "ten.txt", "/download/t%65n.txt"),
    ("all-escaped", "ten.txt", "/download/%74%65%6E%2E%74%78%74"),
    ("lower-case-hex", UNICODE_NAME, "/download/r%c3%a9sum%c3%a9%20%e6%95%b0%e6%8d%ae.txt"),
    ("escaped-slash", "sub/inner.txt", "/download/sub%2Finner.txt"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("signed", "target"), [c[1:] for c in ENCODED_VARIANTS], ids=[c[0] for c in ENCODED_VARIANTS])
async def test_percent_encoded_spelling_of_the_signed_path_is_valid(root: Path, signed: str, target: str) -> None:
    query = sign_url(signed, secret=KEY, expires_at=FAR).partition("?")[2]
    status, _, body = await asgi_get(create_app(root, secret=KEY), f"{target}?{query}")
    assert (status, body) == (200, (root / signed).read_bytes())


@pytest.mark.anyio
async def test_link_expired_in_the_past_is_403(root: Path) -> None:
    async with asgi_client(create_app(root, secret=KEY)) as c:
        response = await c.get(sign_url("ten.txt", secret=KEY, expires_at=time.time() - 1))
        head = await c.head(sign_url("ten.txt", secret=KEY, expires_at=time.time() - 1))
    assert (response.status_code, response.json()) == (403, LINK_EXPIRED)
    assert (head.status_code, head.content) == (403, b"")


@pytest.mark.anyio
async def test_rotation_old_key_still_verifies_and_new_one_signs(root: Path) -> None:
    async with asgi_client(create_app(root, secret=["new", "old"])) as c:
        by_old = await c.get(sign_url("ten.txt", secret="old", expires_in=60))
        by_new = await c.get(sign_url("ten.txt", secret="new", expires_in=60))
        by_retired = await c.get(sign_url("ten.txt", secret="retired", expires_in=60))
    assert (by_old.status_code, by_old.content) == (200, TEN)
    assert (by_new.status_code, by_new.content) == (200, TEN)
    assert (by_retired.status_code, by_retired.json()) == (403, INVALID)


@pytest.mark.anyio
async def test_range_on_signed_link_is_exact_206(root: Path) -> None:
    async with asgi_client(create_app(root, secret=KEY)) as c:
        response = await c.get(sign_url("ten.txt", secret=KEY, expires_in=60), headers={"Range": "bytes=2-4"})
        suffix = await c.get(sign_url("ten.txt", secret=KEY, expires_in=60), headers={"Range": "bytes=-3"})
    assert (response.status_code, response.content) == (206, b"234")
    assert (response.headers["content-range"], response.headers["content-length"]) == ("bytes 2-4/10", "3")
    assert (suffix.status_code, suffix.headers["content-range"], suffix.content) == (206, "bytes 7-9/10", b"789")


@pytest.mark.anyio
async def test_if_none_match_on_signed_link_is_304(root: Path) -> None:
    async with asgi_client(create_app(root, secret=KEY)) as c:
        url = sign_url("ten.txt", secret=KEY, expires_in=60)
        first = await c.get(url)
        again = await c.get(url, headers={"If-None-Match": first.headers["etag"]})
        forged = await c.get(with_query(url, signature=""), headers={"If-None-Match": first.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["etag"] == first.headers["etag"]
    assert "content-length" not in again.headers or again.headers["content-length"] == "0"
    assert "content-disposition" not in again.headers
    # a 304 must not confirm a file to someone without a valid link
    assert (forged.status_code, forged.json()) == (403, INVALID)


@pytest.mark.anyio
async def test_secret_switches_listing_off(root: Path) -> None:
    async with asgi_client(create_app(root, secret=KEY)) as c:
        listing = await c.get("/api/files")
        page = await c.get("/")
    # Issue "No surprises" #13: the 404 says why, right after the start-up line pointed here.
    reason = {"detail": "The listing is off: downloads need signed links (DOWNLOADER_SECRET). DOWNLOADER_LISTING=true lists files with signed links"}
    assert (listing.status_code, listing.json()) == (404, reason)
    assert (page.status_code, page.json()) == (404, reason)


@pytest.mark.anyio
async def test_listing_switched_on_with_secret_hands_out_links_signed_by_first_key(root: Path) -> None:
    async with asgi_client(create_app(root, secret=["new", "old"], listing=True)) as c:
        files = (await c.get("/api/files")).json()["files"]
        ten = next(f for f in files if f["path"] == "ten.txt")
        download = await c.get(ten["url"])
    assert re.fullmatch(rf"/download/ten\.txt\?expires=\d+&signature={SIG_RE}", ten["url"])
    verify_link("ten.txt", query_of(ten["url"]), ["new"], now=time.time())
    assert (download.status_code, download.content) == (200, TEN)


def test_cli_sign_prints_a_url_curl_downloads(root: Path, tmp_path: Path) -> None:
    curl = need("curl")
    with uvicorn_server(root, tmp_path / "server.log", env={"DOWNLOADER_SECRET": KEY}) as server:
        before = int(time.time())
        result = run_cli("sign", "ten.txt", "--ttl", "1h", "--base-url", server.url, DOWNLOADER_SECRET=KEY, DOWNLOADER_ROOT=str(root))
        after = int(time.time()) + 1
        assert (result.returncode, result.stderr) == (0, "")
        match = re.fullmatch(rf"{re.escape(server.url)}/download/ten\.txt\?expires=(\d+)&signature={SIG_RE}\n", result.stdout)
        assert match, result.stdout
        assert before + 3600 <= int(match.group(1)) <= after + 3600
        url = result.stdout.strip()
        got = subprocess.run([curl, "-sS", "-f", url], capture_output=True, timeout=30)
        assert (got.returncode, got.stdout) == (0, TEN), got.stderr
        refused = subprocess.run([curl, "-sS", "-w", "\n%{http_code}", f"{server.url}/download/ten.txt"], capture_output=True, timeout=30)
        assert refused.stdout == b'{"detail": "This link needs a valid signature"}\n403'
        tampered = subprocess.run([curl, "-sS", "-w", "\n%{http_code}", url.replace("ten.txt", "data.bin")], capture_output=True, timeout=30)
        assert tampered.stdout == b'{"detail": "Invalid link signature"}\n403'


def test_cli_sign_without_secret_is_refused(root: Path) -> None:
    result = run_cli("sign", "ten.txt", DOWNLOADER_ROOT=str(root))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "downloader: DOWNLOADER_SECRET: not set; sign needs the key the server verifies with\n"


# =============================================================================
# Catalog: the Python API
# =============================================================================


@pytest.mark.anyio
async def test_catalog_register_download_revoke_in_python(root: Path, db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt", name="report.txt")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", link.id)
    assert (link.path, link.name, link.expires_at, link.max_downloads, link.downloads, link.revoked) == ("ten.txt", "report.txt", None, None, 0, False)
    assert catalog.get(link.id) == link
    assert catalog.list() == [link]
    async with asgi_client(create_app(root, catalog=db)) as c:
        first = await c.get(f"/files/{link.id}")
        second = await c.get(f"/files/{link.id}")
        assert catalog.revoke(link.id) is True
        revoked = await c.get(f"/files/{link.id}")
        revoked_head = await c.head(f"/files/{link.id}")
    assert (first.status_code, first.content) == (200, TEN)
    assert first.headers["content-disposition"] == 'attachment; filename="report.txt"'
    assert (second.status_code, second.content) == (200, TEN)
    assert (revoked.status_code, revoked.json()) == (410, REVOKED)
    assert (revoked_head.status_code, revoked_head.content) == (410, b"")
    assert catalog.get(link.id).downloads == 2
    assert catalog.get(link.id).revoked is True
    assert catalog.revoke(link.id) is True  # twice is harmless
    assert catalog.revoke("no-such-id") is False
    assert catalog.get("no-such-id") is None


def test_catalog_refuses_a_limit_below_one(db: str) -> None:
    with pytest.raises(ValueError):
        Catalog(db).add("ten.txt", max_downloads=0)


def test_catalog_claim_stops_at_the_limit(db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=2)
    assert [catalog.claim(link.id) for _ in range(3)] == [True, True, False]
    assert catalog.get(link.id).downloads == 2
    unlimited = catalog.add("ten.txt")
    assert all(catalog.claim(unlimited.id) for _ in range(5))
    catalog.revoke(unlimited.id)
    assert catalog.claim(unlimited.id) is False
    assert catalog.claim("no-such-id") is False


@pytest.mark.anyio
async def test_files_id_serves_the_same_headers_as_download(root: Path, db: str) -> None:
    link = Catalog(db).add("ten.txt")
    async with asgi_client(create_app(root, catalog=db)) as c:
        by_path = await c.get("/download/ten.txt")
        by_id = await c.get(f"/files/{link.id}")
        head = await c.head(f"/files/{link.id}")
    assert (by_id.status_code, by_id.content) == (200, TEN)
    assert dict(by_id.headers) == dict(by_path.headers)
    assert (head.status_code, head.content, dict(head.headers)) == (200, b"", dict(by_path.headers))


@pytest.mark.anyio
async def test_unknown_link_is_404(root: Path, db: str) -> None:
    async with asgi_client(create_app(root, catalog=db)) as c:
        response = await c.get("/files/0b7f4bf6-2f0b-4b8c-9c55-000000000000")
        head = await c.head("/files/nope")
    async with asgi_client(create_app(root)) as c:
        no_catalog = await c.get("/files/nope")
    assert (response.status_code, response.json()) == (404, UNKNOWN)
    assert (head.status_code, head.content) == (404, b"")
    assert (no_catalog.status_code, no_catalog.json()) == (404, {"detail": "Not Found"})


@pytest.mark.anyio
async def test_link_expired_in_the_past_is_410(root: Path, db: str) -> None:
    catalog = Catalog(db)
    past = catalog.add("ten.txt", expires_at=time.time() - 1)
    future = catalog.add("ten.txt", expires_at=time.time() + 3600)
    async with asgi_client(create_app(root, catalog=db)) as c:
        expired = await c.get(f"/files/{past.id}")
        valid = await c.get(f"/files/{future.id}")
    assert (expired.status_code, expired.json()) == (410, EXPIRED)
    assert (valid.status_code, valid.content) == (200, TEN)


@pytest.mark.anyio
async def test_link_whose_file_vanished_is_404(root: Path, db: str) -> None:
    link = Catalog(db).add("ten.txt")
    (root / "ten.txt").unlink()
    async with asgi_client(create_app(root, catalog=db)) as c:
        response = await c.get(f"/files/{link.id}")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


# =============================================================================
# Catalog: download limits count completed transfers only
# =============================================================================


@pytest.mark.anyio
async def test_head_range_and_304_do_not_use_up_a_one_time_link(root: Path, db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=1)
    url = f"/files/{link.id}"
    async with asgi_client(create_app(root, catalog=db)) as c:
        head = await c.head(url)
        preview = await c.get(url, headers={"Range": "bytes=0-3"})
        cached = await c.get(url, headers={"If-None-Match": head.headers["etag"]})
        assert catalog.get(link.id).downloads == 0
        full = await c.get(url)
        assert catalog.get(link.id).downloads == 1
        after = await c.get(url)
        after_head = await c.head(url)
        after_range = await c.get(url, headers={"Range": "bytes=0-3"})  # the client it went to: its own download
        other_range = await c.get(url, headers={"Range": "bytes=0-3", "User-Agent": "another client"})
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "10")
    assert (preview.status_code, preview.headers["content-range"], preview.content) == (206, "bytes 0-3/10", b"0123")
    assert (cached.status_code, cached.content) == (304, b"")
    assert (full.status_code, full.content) == (200, TEN)
    assert (after.status_code, after.json()) == (410, GONE)
    assert (after_head.status_code, after_head.content) == (410, b"")
    assert (after_range.status_code, after_range.content) == (206, b"0123")
    assert (other_range.status_code, other_range.json()) == (410, GONE)
    assert catalog.get(link.id).downloads == 1


@pytest.mark.anyio
async def test_range_reaching_the_last_byte_counts_as_a_download(root: Path, db: str) -> None:
    """aria2c splits a file into segments: only the one holding the last byte counts."""
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=2)
    async with asgi_client(create_app(root, catalog=db)) as c:
        segments = [await c.get(f"/files/{link.id}", headers={"Range": r}) for r in ("bytes=0-2", "bytes=3-5", "bytes=6-8")]
        assert catalog.get(link.id).downloads == 0
        last = await c.get(f"/files/{link.id}", headers={"Range": "bytes=9-"})
        assert catalog.get(link.id).downloads == 1
        suffix = await c.get(f"/files/{link.id}", headers={"Range": "bytes=-1"})  # uses left: each tail counts
        assert catalog.get(link.id).downloads == 2
        gone = await c.get(f"/files/{link.id}", headers={"Range": "bytes=0-2", "User-Agent": "another client"})
    assert [(s.status_code, s.content) for s in segments] == [(206, b"012"), (206, b"345"), (206, b"678")]
    assert (last.status_code, last.headers["content-range"], last.content) == (206, "bytes 9-9/10", b"9")
    assert (suffix.status_code, suffix.content) == (206, b"9")
    assert (gone.status_code, gone.json()) == (410, GONE)


@pytest.mark.parametrize("path", list(SERVER_PATHS))
def test_one_time_link_raced_by_20_clients_on_2_workers_serves_one_whole_body(root: Path, tmp_path: Path, db: str, path: str) -> None:
    data = os.urandom(4 * 1024 * 1024 + 123)
    (root / "big.bin").write_bytes(data)
    link = Catalog(db).add("big.bin", max_downloads=1)
    log = tmp_path / "server.log"
    # With --workers, uvicorn logs its address before the workers accept connections:
    # uvicorn_server waits for both workers' "Application startup complete." too.
    with uvicorn_server(root, log, env={"DOWNLOADER_CATALOG": str(db)}, args=["--workers", "2", *SERVER_PATHS[path]]) as server:
        clients = 20
        barrier = threading.Barrier(clients)
        outcomes: list[str] = [""] * clients

        def fetch(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                barrier.wait(30)
                conn.request("GET", f"/files/{link.id}")
                response = conn.getresponse()
                body = response.read()
                if response.status == 410:
                    outcomes[i] = "gone" if json.loads(body) == GONE else f"410 {body[:80]!r}"
                elif response.status == 200 and body == data:
                    outcomes[i] = "full"
                elif response.status == 200 and len(body) < len(data):
                    outcomes[i] = "aborted"
                else:
                    outcomes[i] = f"{response.status} {len(body)} bytes"
            except (http.client.HTTPException, OSError):
                outcomes[i] = "aborted"  # IncompleteRead, reset or closed mid-body
            finally:
                conn.close()

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert outcomes.count("full") == 1, outcomes
        assert set(outcomes) - {"full"} <= {"gone", "aborted"}, outcomes
        assert Catalog(db).get(link.id).downloads == 1
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", f"/files/{link.id}")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (410, GONE)
        conn.close()


@pytest.mark.parametrize("path", list(SERVER_PATHS))
def test_a_download_manager_completes_a_one_time_link_and_no_second_client_does(root: Path, tmp_path: Path, db: str, path: str) -> None:
    """Issue "Hardening" #6: aria2c's segments go on after its tail segment counted the download (the
    client it went to may fetch ranges for LINK_HOLD_S); a second aria2c (it starts without a Range)
    and curl get 410. Five fresh one-time links in a row, each completed."""
    aria2c, curl = need("aria2c"), need("curl")
    data = os.urandom(6 * 1024 * 1024 + 17)
    (root / "big.bin").write_bytes(data)
    catalog = Catalog(db)
    with uvicorn_server(root, tmp_path / "server.log", env={"DOWNLOADER_CATALOG": str(db)}, args=SERVER_PATHS[path]) as server:
        for run in range(5):
            link = catalog.add("big.bin", max_downloads=1)
            url = f"http://127.0.0.1:{server.port}/files/{link.id}"
            segmented = [aria2c, "-q", "-x8", "-s8", "-k1M", "--max-tries=1", "--allow-overwrite=true", "-o", "big.bin", url]
            first = subprocess.run([*segmented, "-d", str(tmp_path / f"first{run}")], capture_output=True, text=True, timeout=60)
            assert first.returncode == 0, first.stdout + first.stderr
            assert (tmp_path / f"first{run}" / "big.bin").read_bytes() == data
            second = subprocess.run([*segmented, "-d", str(tmp_path / f"second{run}")], capture_output=True, text=True, timeout=60)
            assert second.returncode != 0 and not (tmp_path / f"second{run}" / "big.bin").exists()
            other = subprocess.run([curl, "-s", "-w", "%{http_code}", "-o", "/dev/null", url], capture_output=True, text=True, timeout=30)
            assert other.stdout == "410"
            assert catalog.get(link.id).downloads == 1


# =============================================================================
# Catalog: when the SQLite file fails
# =============================================================================

CATALOG_DOWN = {"detail": "The link catalog is unavailable"}


@pytest.fixture
def quick_catalog(monkeypatch: pytest.MonkeyPatch) -> float:
    """CATALOG_TIMEOUT_S shortened, so that waiting for a lock that never ends takes a fraction of a second."""
    monkeypatch.setattr(downloader, "CATALOG_TIMEOUT_S", 0.3)
    return 0.3


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    return tmp_path / "catalog.db"


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process's write lock on the catalog, held until the block ends."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.anyio
async def test_a_locked_catalog_answers_503_with_retry_after_within_the_timeout(root: Path, sqlite_db: Path, quick_catalog: float) -> None:
    link = Catalog(sqlite_db).add("ten.txt", max_downloads=1)
    app = create_app(root, catalog=sqlite_db, admin_token=TOKEN)
    async with asgi_client(app) as c:
        with locked(sqlite_db):
            began = time.monotonic()
            refused = await c.get(f"/files/{link.id}")
            waited = time.monotonic() - began
            health = await c.get("/healthz")
            created = await c.post("/api/links", json={"path": "ten.txt"}, headers={"Authorization": f"Bearer {TOKEN}"})
        served = await c.get(f"/files/{link.id}")
    assert (refused.status_code, refused.json(), refused.headers["retry-after"]) == (503, CATALOG_DOWN, "5")
    assert waited < quick_catalog + 2
    assert (health.status_code, health.json()) == (503, {"status": "unavailable", "detail": "the link catalog can't be read and written"})
    assert (created.status_code, created.json()) == (503, CATALOG_DOWN)
    assert (served.status_code, served.content) == (200, TEN)  # the lock gone, the link was never used
    assert Catalog(sqlite_db).get(link.id).downloads == 1


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["deleted", "corrupt"])
async def test_a_deleted_or_corrupt_catalog_answers_503_and_is_never_made_anew(root: Path, sqlite_db: Path, quick_catalog: float, fault: str) -> None:
    link = Catalog(sqlite_db).add("ten.txt")
    app = create_app(root, catalog=sqlite_db, admin_token=TOKEN)
    for name in (sqlite_db.name, sqlite_db.name + "-wal", sqlite_db.name + "-shm"):
        (sqlite_db.parent / name).unlink(missing_ok=True)
    if fault == "corrupt":
        sqlite_db.write_bytes(b"not a database " * 1000)
    async with asgi_client(app) as c:
        refused = await c.get(f"/files/{link.id}")
        health = await c.get("/healthz")
        listed = await c.get("/api/links", headers={"Authorization": f"Bearer {TOKEN}"})
        download = await c.get("/download/ten.txt")
    assert (refused.status_code, refused.json()) == (503, CATALOG_DOWN)
    assert health.status_code == 503 and "catalog" in health.json()["detail"]
    assert (listed.status_code, listed.json()) == (503, CATALOG_DOWN)
    assert (download.status_code, download.content) == (200, TEN)  # /download needs no catalog
    assert sqlite_db.exists() == (fault == "corrupt")


@pytest.mark.anyio
async def test_requests_waiting_on_a_locked_catalog_leave_the_thread_pool_to_file_reads(root: Path, sqlite_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """60 one-time downloads wait on the lock: CATALOG_THREADS of them in worker threads, the rest in the
    event loop, so the thread pool (file reads and opens that miss the page cache) stays free; each gets
    its 503."""
    monkeypatch.setattr(downloader, "CATALOG_TIMEOUT_S", 1.5)
    link = Catalog(sqlite_db).add("ten.txt", max_downloads=1)
    app = create_app(root, catalog=sqlite_db)
    threads = app.state.service.catalog_threads
    statuses: list[int] = []
    waits: list[float] = []
    async with asgi_client(app) as c:

        async def gated() -> None:
            began = time.monotonic()
            statuses.append((await c.get(f"/files/{link.id}")).status_code)
            waits.append(time.monotonic() - began)

        with locked(sqlite_db):
            async with anyio.create_task_group() as group:
                for _ in range(60):
                    group.start_soon(gated)
                while threads.borrowed_tokens < downloader.CATALOG_THREADS:
                    await anyio.sleep(0.01)
                pool = anyio.to_thread.current_default_thread_limiter()
                in_use = pool.borrowed_tokens
                began = time.monotonic()
                await anyio.to_thread.run_sync(time.sleep, 0)  # a file read's turn in the pool
                took = time.monotonic() - began
    assert in_use <= downloader.CATALOG_THREADS + 1, f"{in_use} worker threads busy beside 60 waiting requests"
    assert took < 0.5
    assert statuses == [503] * 60
    assert max(waits) < 2 * 1.5 + 1.5, f"a 503 took {max(waits):.1f} s: waiting for a thread must time out too"


@pytest.mark.parametrize("path", list(SERVER_PATHS))
def test_a_catalog_that_fails_mid_download_aborts_it_and_the_log_says_why(root: Path, tmp_path: Path, sqlite_db: Path, path: str) -> None:
    """The count is taken before the last byte: a catalog that can't take it then (locked) aborts the
    transfer, one byte short, logged as aborted, not as a complete 200; nothing is counted."""
    data = os.urandom(1024 * 1024)
    (root / "big.bin").write_bytes(data)
    link = Catalog(sqlite_db).add("big.bin", max_downloads=1)
    access = tmp_path / "access.log"
    env = {"DOWNLOADER_CATALOG": str(sqlite_db), "DOWNLOADER_RATE_LIMIT": str(512 * 1024), "DOWNLOADER_ACCESS_LOG": str(access)}
    with uvicorn_server(root, tmp_path / "server.log", env=env, args=SERVER_PATHS[path]) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"/files/{link.id}")
        response = conn.getresponse()
        assert response.status == 200
        with locked(sqlite_db):
            body = b""
            with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
                while chunk := response.read(65536):
                    body += chunk
            conn.close()
            line = wait_for(lambda: access.exists() and access.read_text().strip(), 15, "the access log line")
    assert len(body) < len(data) and data.startswith(body)
    logged = json.loads(line)
    assert (logged["status"], logged["aborted"]) == (200, "the link catalog is unavailable")
    assert Catalog(sqlite_db).get(link.id).downloads == 0


# =============================================================================
# Catalog: when PostgreSQL fails
# =============================================================================


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server of the test's own, to stop and freeze (the session's serves other tests)."""
    server = Postgres()
    try:
        yield server
    finally:
        for pid in server.pids() if (server.data / "postmaster.pid").exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        server.close()


@pytest.mark.anyio
async def test_postgresql_stopped_answers_503_at_once_and_a_restart_needs_no_restart_of_ours(root: Path, own_postgres: Postgres) -> None:
    url = own_postgres.database()
    link = Catalog(url).add("ten.txt", max_downloads=5)
    async with asgi_client(create_app(root, catalog=url, admin_token=TOKEN)) as c:
        assert (await c.get(f"/files/{link.id}")).status_code == 200  # a connection now waits for reuse
        own_postgres.stop()
        began = time.monotonic()
        refused = await c.get(f"/files/{link.id}")
        listed = await c.get("/api/links", headers={"Authorization": f"Bearer {TOKEN}"})
        created = await c.post("/api/links", json={"path": "ten.txt"}, headers={"Authorization": f"Bearer {TOKEN}"})
        health = await c.get("/healthz")
        took = time.monotonic() - began
        download = await c.get("/download/ten.txt")
        own_postgres.start()
        served = await c.get(f"/files/{link.id}")  # the first request after the restart: no stale connection used
        health_after = await c.get("/healthz")
    for response in (refused, listed, created):
        assert (response.status_code, response.json(), response.headers["retry-after"]) == (503, CATALOG_DOWN, "5")
    assert (health.status_code, health.json()) == (503, {"status": "unavailable", "detail": "the link catalog can't be read and written"})
    assert took < 2, f"four answers took {took:.1f} s: a server that is down refuses at once"
    assert (download.status_code, download.content) == (200, TEN)
    assert (served.status_code, served.content) == (200, TEN)
    assert health_after.status_code == 200
    assert Catalog(url).get(link.id).downloads == 2


@pytest.mark.anyio
async def test_postgresql_frozen_answers_503_within_the_abandon_time_and_holds_few_threads(root: Path, own_postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts and never answers (SIGSTOP: a hung host, a stuck disk under it): each request
    gets its 503 within CATALOG_ABANDON_S; the calls left behind keep CATALOG_THREADS threads at most, and
    give them back once the server answers again."""
    monkeypatch.setattr(downloader, "CATALOG_TIMEOUT_S", 0.5)
    monkeypatch.setattr(downloader, "CATALOG_ABANDON_S", 1.5)
    url = own_postgres.database()
    link = Catalog(url).add("ten.txt")
    app = create_app(root, catalog=url)
    threads = app.state.service.catalog_threads
    statuses: list[int] = []
    waits: list[float] = []
    async with asgi_client(app) as c:
        for _ in range(3):  # connections to reuse, each idle past PG_CHECK_IDLE_S when the server freezes
            async with anyio.create_task_group() as group:
                for _ in range(downloader.CATALOG_THREADS):
                    group.start_soon(c.get, f"/files/{link.id}")
        await anyio.sleep(downloader.PG_CHECK_IDLE_S + 0.1)
        for pid in own_postgres.pids():
            os.kill(pid, signal.SIGSTOP)
        try:

            async def one() -> None:
                began = time.monotonic()
                statuses.append((await c.get(f"/files/{link.id}")).status_code)
                waits.append(time.monotonic() - began)

            async with anyio.create_task_group() as group:
                for _ in range(12):
                    group.start_soon(one)
            held = threads.borrowed_tokens
            download = await c.get("/download/ten.txt")
        finally:
            for pid in own_postgres.pids():
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while threads.borrowed_tokens and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        after = await c.get(f"/files/{link.id}")
    assert statuses == [503] * 12
    assert max(waits) < 0.5 + 1.5 + 1, f"a 503 took {max(waits):.1f} s"
    assert 0 < held <= downloader.CATALOG_THREADS
    assert (download.status_code, download.content) == (200, TEN)
    assert threads.borrowed_tokens == 0
    assert (after.status_code, after.content) == (200, TEN)


@pytest.mark.anyio
async def test_a_restart_of_postgresql_between_two_requests_costs_no_request(root: Path, own_postgres: Postgres) -> None:
    """Connections a restart broke are dropped before reuse, however recently they were used."""
    url = own_postgres.database()
    link = Catalog(url).add("ten.txt")
    async with asgi_client(create_app(root, catalog=url)) as c:
        async with anyio.create_task_group() as group:  # CATALOG_THREADS connections, all idle now
            for _ in range(downloader.CATALOG_THREADS):
                group.start_soon(c.get, f"/files/{link.id}")
        own_postgres.stop()
        own_postgres.start()
        statuses = []

        async def one() -> None:
            statuses.append((await c.get(f"/files/{link.id}")).status_code)

        async with anyio.create_task_group() as group:  # at once: every stale connection is tried
            for _ in range(2 * downloader.CATALOG_THREADS):
                group.start_soon(one)
        for _ in range(2 * downloader.CATALOG_THREADS):
            await one()
    assert statuses == [200] * (4 * downloader.CATALOG_THREADS)


def test_a_statement_that_fails_leaves_its_connection_for_reuse(postgres: Postgres) -> None:
    url = postgres.database()
    name = Postgres.dbname(url)
    catalog = Catalog(url)
    link = catalog.add("ten.txt")

    def backends() -> str:
        return postgres.sql(f"SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE datname = '{name}' AND application_name = 'downloader'")

    before = backends()
    for _ in range(3):
        with pytest.raises(downloader.CatalogError, match="NUL"):
            catalog.add("a\x00b")  # PostgreSQL text can't hold a NUL: the statement fails, the connection is fine
        assert catalog.get(link.id) == link
    assert backends() == before != ""


def test_a_frozen_postgresql_does_not_hold_up_shutdown(root: Path, tmp_path: Path, own_postgres: Postgres) -> None:
    """A call left behind waits on a server that never answers; SIGTERM still ends the server, without
    connecting anew (which would wait connect_timeout) once its connection is cut."""
    url = own_postgres.database() + "&connect_timeout=30"
    link = Catalog(url).add("ten.txt")
    with cli_server(root, tmp_path / "server.log", DOWNLOADER_CATALOG=url) as server:
        assert httpx.get(f"{server.url}/files/{link.id}").status_code == 200
        time.sleep(downloader.PG_CHECK_IDLE_S + 0.1)  # the next reuse checks the connection: it hangs
        for pid in own_postgres.pids():
            os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        refused = httpx.get(f"{server.url}/files/{link.id}", timeout=30)
        waited = time.monotonic() - began
        server.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        server.proc.wait(20)
        stopped = time.monotonic() - began
    assert (refused.status_code, refused.json()) == (503, CATALOG_DOWN)
    assert downloader.CATALOG_ABANDON_S - 0.5 < waited < downloader.CATALOG_ABANDON_S + 2
    assert stopped < 5, f"shutdown took {stopped:.1f} s"


@pytest.mark.anyio
@pytest.mark.parametrize("link_id", ["x%00", "%00", "not-a-uuid", "0B7F4BF6-2F0B-4B8C-9C55-000000000000", "{0b7f4bf6-2f0b-4b8c-9c55-000000000000}"])
async def test_an_id_the_catalog_never_made_is_404_on_either_database(root: Path, db: str, link_id: str) -> None:
    async with asgi_client(create_app(root, catalog=db, admin_token=TOKEN)) as c:
        got = await c.get(f"/files/{link_id}")
        revoked = await c.delete(f"/api/links/{link_id}", headers={"Authorization": f"Bearer {TOKEN}"})
        health = await c.get("/healthz")
    assert (got.status_code, got.json()) == (404, UNKNOWN)
    assert (revoked.status_code, revoked.json()) == (404, UNKNOWN)
    assert health.status_code == 200


def test_claims_racing_a_sweep_of_expired_holders_never_fail(postgres: Postgres) -> None:
    """Re-claims while thousands of expired holders are swept: no deadlock, no lock timeout."""
    url = postgres.database()
    catalog = Catalog(url)
    name = Postgres.dbname(url)
    links = [catalog.add("ten.txt", max_downloads=1000).id for _ in range(6)]
    outcomes: list[object] = []
    for trial in range(5):
        now = 1e6 * (trial + 1)
        postgres.sql(f"INSERT INTO holders (link, holder, claimed) SELECT 'gone', 'h' || g || '-{trial}', {now} FROM generate_series(1, 20000) g", name)
        for i, link in enumerate(links):
            assert catalog.claim(link, f"holder-{i}", now=now)
        barrier = threading.Barrier(len(links))

        def claim(i: int) -> None:
            barrier.wait()
            try:
                outcomes.append(Catalog(url).claim(links[i], f"holder-{i}", now=now + 2 * downloader.LINK_HOLD_S))
            except downloader.CatalogError as exc:
                outcomes.append(exc)

        workers = [threading.Thread(target=claim, args=(i,)) for i in range(len(links))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
    assert outcomes == [True] * 30
    assert int(postgres.sql("SELECT count(*) FROM holders WHERE claimed < 5e6", name)) < 20000 * 5  # swept


def expired_holders(catalog: Catalog) -> int:
    with catalog._session() as run:
        return int(next(iter(dict(run("SELECT count(*) AS n FROM holders WHERE claimed < 1000").fetchone()).values())))


def test_a_sweep_deletes_one_batch_and_the_next_claim_sweeps_again(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloader, "HOLDERS_SWEPT_AT_ONCE", 100)
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=1000).id
    with catalog._session() as run:
        for i in range(250):
            run("INSERT INTO holders (link, holder, claimed) VALUES ('gone', :h, 1)", {"h": f"h{i}"})
    left = []
    for i in range(4):
        assert catalog.claim(link, f"client-{i}", now=1e6 + i)
        left.append(expired_holders(catalog))
    assert left == [150, 50, 0, 0]


def test_a_sweep_skips_a_holder_row_another_transaction_locks(postgres: Postgres) -> None:
    url = postgres.database()
    catalog = Catalog(url)
    link = catalog.add("ten.txt", max_downloads=1000).id
    postgres.sql("INSERT INTO holders (link, holder, claimed) SELECT 'gone', 'h' || g, 1 FROM generate_series(1, 10) g", Postgres.dbname(url))
    with psycopg.connect(url) as other:
        other.execute("SELECT * FROM holders WHERE holder = 'h1' FOR UPDATE")
        began = time.monotonic()
        assert catalog.claim(link, "a client", now=1e6)
        took = time.monotonic() - began
        left = expired_holders(catalog)
    assert took < 1 and left == 1


def test_revoking_a_used_up_link_ends_its_holders_hold(db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=1).id
    assert catalog.claim(link, "a client") and catalog.claim(link, "a client", held=True)
    catalog.revoke(link)
    assert catalog.claim(link, "a client", held=True) is False


def test_an_unlimited_link_records_no_holder(db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt").id
    assert catalog.claim(link, "a client")
    with catalog._session() as run:
        assert run("SELECT * FROM holders").fetchall() == []


@pytest.mark.anyio
async def test_healthz_is_503_on_a_read_only_postgresql(root: Path, postgres: Postgres) -> None:
    url = postgres.database()
    Catalog(url)
    postgres.sql(f"ALTER DATABASE {Postgres.dbname(url)} SET default_transaction_read_only = on")
    async with asgi_client(create_app(root, catalog=url)) as c:
        health = await c.get("/healthz")
    assert (health.status_code, health.json()) == (503, {"status": "unavailable", "detail": "the link catalog can't be read and written"})


@pytest.mark.anyio
async def test_a_row_lock_held_elsewhere_is_503_within_the_timeout_and_never_counts_later(root: Path, postgres: Postgres) -> None:
    """The server's lock_timeout ends the wait: the call fails, it is not left behind to land later."""
    url = postgres.database()
    link = Catalog(url).add("ten.txt", max_downloads=5)
    async with asgi_client(create_app(root, catalog=url)) as c:
        with psycopg.connect(url) as other:
            other.execute("SELECT * FROM links FOR UPDATE")
            began = time.monotonic()
            refused = await c.get(f"/files/{link.id}")
            took = time.monotonic() - began
        await anyio.sleep(1)
    assert (refused.status_code, refused.json()) == (503, CATALOG_DOWN)
    assert took < downloader.CATALOG_TIMEOUT_S + 1
    assert Catalog(url).get(link.id).downloads == 0


def test_a_role_without_ddl_rights_serves_and_one_that_cant_write_fails_in_one_line(root: Path, postgres: Postgres) -> None:
    url = postgres.database()
    name = Postgres.dbname(url)
    link = Catalog(url).add("ten.txt", max_downloads=2)
    for role, rights in ((f"{name}_rw", "SELECT, INSERT, UPDATE, DELETE"), (f"{name}_ro", "SELECT")):
        postgres.sql(f"CREATE ROLE {role} LOGIN", name)  # roles belong to the server: named after the database
        postgres.sql(f"GRANT {rights} ON links, holders, downloader_schema TO {role}", name)
    as_rw, as_ro = (url.replace("postgres@", f"{name}_{kind}@") for kind in ("rw", "ro"))
    assert Catalog(as_rw).claim(link.id, "a client") is True  # no CREATE on the schema: none needed
    result = run_cli("revoke", link.id, DOWNLOADER_CATALOG=as_ro, DOWNLOADER_ROOT=str(root))
    assert (result.returncode, result.stderr) == (1, "downloader: the link catalog is unavailable: permission denied for table links\n")
    assert Catalog(url).get(link.id).revoked is False


def test_a_postgresql_url_libpq_cant_read_is_one_line_without_the_password(root: Path) -> None:
    for url in ("postgresql://u:p%zzSECRET@localhost/db", "postgresql://u:SE CRET@[::1/db"):
        result = run_cli("--port", "0", DOWNLOADER_CATALOG=url, DOWNLOADER_ROOT=str(root))
        assert result.returncode == 2
        assert result.stderr == "downloader: DOWNLOADER_CATALOG: not a URL libpq reads: postgresql://[user[:password]@][host][:port][/dbname][?param=value&...]\n"
    for url, scheme in (("postgresl://u:SECRET@/db?host=/run", "postgresl"), (" POSTGRESQL://u:SECRET@db/x", "POSTGRESQL"), ("postgresql+psycopg://u:SECRET@db/x", "postgresql+psycopg")):
        result = run_cli("--port", "0", DOWNLOADER_CATALOG=url, DOWNLOADER_ROOT=str(root))
        assert (result.returncode, result.stderr) == (2, f"downloader: DOWNLOADER_CATALOG: a URL with scheme {scheme!r}: the catalog is a SQLite file path or a postgresql:// URL\n")


def test_postgresql_that_cant_be_reached_stops_start_up_in_one_line_without_the_password(root: Path, tmp_path: Path) -> None:
    url = f"postgresql://downloader:s3cret-pw@/links?host={tmp_path}/no-server"
    result = run_cli("--port", "0", DOWNLOADER_CATALOG=url, DOWNLOADER_ROOT=str(root))
    assert result.returncode == 2
    assert result.stderr.startswith("downloader: DOWNLOADER_CATALOG: can't open the catalog: connection"), result.stderr
    assert "No such file or directory; Is the server running" in result.stderr  # libpq's two lines, joined
    assert result.stderr.count("\n") == 1 and "s3cret-pw" not in result.stderr
    with pytest.raises(downloader.SettingsError, match="can't open the catalog"):
        create_app(root, catalog=url)


def test_a_cli_command_with_postgresql_down_is_one_line(root: Path, own_postgres: Postgres) -> None:
    url = own_postgres.database()
    Catalog(url).add("ten.txt")
    own_postgres.stop()
    result = run_cli("list", DOWNLOADER_CATALOG=url, DOWNLOADER_ROOT=str(root))
    assert result.returncode == 2
    assert result.stderr.startswith("downloader: DOWNLOADER_CATALOG: can't open the catalog: connection")
    assert result.stderr.count("\n") == 1, result.stderr


# =============================================================================
# Catalog: schema versions
# =============================================================================


OLD_ID = "0b7f4bf6-2f0b-4b8c-9c55-5a1d2c3e4f60"


def test_a_catalog_from_before_schema_versions_is_migrated_keeping_its_links(tmp_path: Path) -> None:
    """A SQLite catalog written before versions (links alone, user_version 0) gains the holders table."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute(
            "CREATE TABLE links (id TEXT PRIMARY KEY, path TEXT NOT NULL, name TEXT, created REAL NOT NULL,"
            " expires_at REAL, max_downloads INTEGER, downloads INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0)"
        )
        old.execute(f"INSERT INTO links (id, path, created, max_downloads, downloads) VALUES ('{OLD_ID}', 'ten.txt', 1.5, 2, 1)")
    catalog = Catalog(path)
    with contextlib.closing(sqlite3.connect(path)) as check:
        version = check.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert (version, tables) == (len(Catalog.SCHEMA), {"links", "holders"})
    assert catalog.get(OLD_ID) == downloader.Link(OLD_ID, "ten.txt", None, 1.5, None, 2, 1, False)
    assert catalog.claim(OLD_ID, "a client") is True and catalog.claim(OLD_ID, "a client", held=True) is True


def test_a_catalog_from_a_newer_downloader_is_refused_in_one_line(root: Path, db: str, request: pytest.FixtureRequest) -> None:
    Catalog(db)
    if db.startswith("postgresql"):
        request.getfixturevalue("postgres").sql("UPDATE downloader_schema SET version = 99", Postgres.dbname(db))
        where = f"PostgreSQL database {Postgres.dbname(db)!r}"
    else:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as newer:
            newer.execute("PRAGMA user_version = 99")
        where = repr(db)
    with pytest.raises(ValueError, match=re.escape(f"{where} has catalog schema version 99; this downloader knows up to {len(Catalog.SCHEMA)}")):
        Catalog(db)
    result = run_cli("list", DOWNLOADER_CATALOG=db, DOWNLOADER_ROOT=str(root))
    assert (result.returncode, result.stderr) == (2, f"downloader: DOWNLOADER_CATALOG: {where} has catalog schema version 99; this downloader knows up to {len(Catalog.SCHEMA)}\n")


def test_replicas_starting_together_create_the_schema_once(postgres: Postgres) -> None:
    url = postgres.database()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            Catalog(url)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    workers = [threading.Thread(target=start) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    name = Postgres.dbname(url)
    assert errors == []
    assert postgres.sql("SELECT version FROM downloader_schema", name) == str(len(Catalog.SCHEMA))


# =============================================================================
# Catalog: the CLI
# =============================================================================


def test_cli_add_download_list_revoke(root: Path, db: str) -> None:
    env = {"DOWNLOADER_CATALOG": str(db), "DOWNLOADER_ROOT": str(root)}
    added = run_cli("add", "ten.txt", "--max-downloads", "2", "--name", "report.txt", "--ttl", "1h", "--base-url", "https://dl.example/p/", **env)
    assert (added.returncode, added.stderr) == (0, "")
    match = re.fullmatch(r"(\S+) https://dl\.example/p/files/(\S+)\n", added.stdout)
    assert match and match.group(1) == match.group(2), added.stdout
    link_id = match.group(1)
    link = Catalog(db).get(link_id)
    assert (link.path, link.name, link.max_downloads, link.downloads) == ("ten.txt", "report.txt", 2, 0)
    assert time.time() + 3500 < link.expires_at <= time.time() + 3600

    async def download() -> httpx.Response:
        async with asgi_client(create_app(root, catalog=db)) as c:
            return await c.get(f"/files/{link_id}")

    first = anyio.run(download)
    assert (first.status_code, first.content) == (200, TEN)
    assert first.headers["content-disposition"] == 'attachment; filename="report.txt"'

    listed = run_cli("list", **env)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(link.expires_at))
    assert (listed.returncode, listed.stderr) == (0, "")
    assert listed.stdout == f"id\tpath\tdownloads\tmax_downloads\texpires\tstate\n{link_id}\tten.txt\t1\t2\t{expires}\tactive\n"

    revoked = run_cli("revoke", link_id, **env)
    assert (revoked.returncode, revoked.stdout, revoked.stderr) == (0, f"revoked {link_id}\n", "")
    after = anyio.run(download)
    assert (after.status_code, after.json()) == (410, REVOKED)
    assert run_cli("list", **env).stdout.splitlines()[1] == f"{link_id}\tten.txt\t1\t2\t{expires}\trevoked"


def test_cli_list_shows_states(root: Path, db: str) -> None:
    catalog = Catalog(db)
    used = catalog.add("ten.txt", max_downloads=1)
    catalog.claim(used.id)
    old = catalog.add("data.bin", expires_at=1_000_000_000)
    result = run_cli("list", DOWNLOADER_CATALOG=str(db), DOWNLOADER_ROOT=str(root))
    assert result.stdout.splitlines() == [
        "id\tpath\tdownloads\tmax_downloads\texpires\tstate",
        f"{used.id}\tten.txt\t1\t1\t-\tused-up",
        f"{old.id}\tdata.bin\t0\t-\t2001-09-09T01:46:40Z\texpired",
    ]


CLI_ERRORS = [
    # (id, args, exit status, stderr)
    ("add-missing-file", ["add", "missing.txt"], 1, "downloader: cannot add 'missing.txt': Not Found (no file under {root} by that path)\n"),
    ("add-outside-root", ["add", "../secret.txt"], 1, "downloader: cannot add '../secret.txt': Not Found (no file under {root} by that path)\n"),
    ("add-hidden-file", ["add", ".hidden"], 1, "downloader: cannot add '.hidden': Not Found (no file under {root} by that path)\n"),
    ("add-zero-limit", ["add", "ten.txt", "--max-downloads", "0"], 1, "downloader: cannot add 'ten.txt': max_downloads must be a whole number from 1 to 1000000000\n"),
    ("add-huge-limit", ["add", "ten.txt", "--max-downloads", "99999999999999999999999"], 1, "downloader: cannot add 'ten.txt': max_downloads must be a whole number from 1 to 1000000000\n"),
    ("add-bad-name", ["add", "ten.txt", "--name", "a/b"], 1, "downloader: cannot add 'ten.txt': name must be a file name: printable, without /\n"),
    ("add-not-utf8", ["add", "bad\udcffname.txt"], 1, "downloader: cannot add 'bad\\udcffname.txt': Not Found (no file under {root} by that path)\n"),
    ("revoke-unknown", ["revoke", "nope"], 1, "downloader: unknown ID nope\n"),
]


@pytest.mark.parametrize(("args", "status", "stderr"), [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_catalog_errors(root: Path, db: str, args: list[str], status: int, stderr: str) -> None:
    result = run_cli(*args, DOWNLOADER_CATALOG=str(db), DOWNLOADER_ROOT=str(root))
    assert (result.returncode, result.stdout, result.stderr) == (status, "", stderr.format(root=root.resolve()))
    assert Catalog(db).list() == []


@pytest.mark.parametrize("path", ["nope.txt", "../secret.txt", ".hidden", "sub", "not-utf8-\udcff.txt"])
def test_cli_sign_refuses_what_download_would_not_serve(root: Path, path: str) -> None:
    """Issue "No surprises" #12: `add` checked the file, `sign` printed a URL for anything."""
    (root / "not-utf8-\udcff.txt").write_bytes(b"a file no URL can name")
    result = run_cli("sign", path, DOWNLOADER_SECRET=KEY, DOWNLOADER_ROOT=str(root))
    wanted = f"downloader: cannot sign {path!r}: Not Found (no file under {root.resolve()} by that path)\n"
    assert (result.returncode, result.stdout, result.stderr) == (1, "", wanted)


def test_cli_catalog_commands_need_the_catalog(root: Path) -> None:
    result = run_cli("list", DOWNLOADER_ROOT=str(root))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "downloader: DOWNLOADER_CATALOG: not set; list needs the catalog (a file or a postgresql:// URL)\n"


# =============================================================================
# Catalog: the admin API
# =============================================================================

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BEARER_401 = {"detail": "A valid bearer token is required"}


@pytest.fixture
async def admin(root: Path, db: str) -> Iterator[httpx.AsyncClient]:
    async with asgi_client(create_app(root, catalog=db, admin_token=TOKEN)) as c:
        yield c


@pytest.mark.anyio
async def test_admin_api_register_download_list_revoke(admin: httpx.AsyncClient, db: str) -> None:
    before = time.time()
    created = await admin.post("/api/links", json={"path": "ten.txt", "ttl": 600, "max_downloads": 3, "name": "r.txt"}, headers=AUTH)
    after = time.time()
    assert created.status_code == 201
    assert created.headers["content-type"] == "application/json"
    body = created.json()
    link_id = body["id"]
    assert body == {
        "id": link_id, "path": "ten.txt", "name": "r.txt", "created": body["created"], "expires_at": body["expires_at"],
        "max_downloads": 3, "downloads": 0, "revoked": False, "url": f"/files/{link_id}",
    }
    # times in RFC 3339, as /api/files shows them (issue "No surprises" #12)
    assert int(before) <= parse_rfc3339(body["created"]) <= after
    assert int(before) + 600 <= parse_rfc3339(body["expires_at"]) <= after + 600
    stored = Catalog(db).get(link_id)
    assert (stored.path, stored.name, stored.max_downloads, int(stored.expires_at)) == ("ten.txt", "r.txt", 3, parse_rfc3339(body["expires_at"]))

    download = await admin.get(body["url"])
    assert (download.status_code, download.content) == (200, TEN)
    assert download.headers["content-disposition"] == 'attachment; filename="r.txt"'

    listed = await admin.get("/api/links", headers=AUTH)
    assert (listed.status_code, listed.json()) == (200, {"links": [{**body, "downloads": 1}]})

    deleted = await admin.delete(f"/api/links/{link_id}", headers=AUTH)
    assert (deleted.status_code, deleted.content) == (204, b"")
    gone = await admin.get(body["url"])
    assert (gone.status_code, gone.json()) == (410, REVOKED)
    listed = await admin.get("/api/links", headers=AUTH)
    assert listed.json() == {"links": [{**body, "downloads": 1, "revoked": True}]}
    unknown = await admin.delete("/api/links/nope", headers=AUTH)
    assert (unknown.status_code, unknown.json()) == (404, UNKNOWN)


def parse_rfc3339(text: str) -> int:
    return int(datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp())


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "expires_at"),
    [
        ({"ttl": "1h"}, 3600),
        ({"ttl": "90"}, 90),
        ({"ttl": 45}, 45),
        ({"expires_at": "2030-01-01T00:00:00Z"}, None),
        ({"expires_at": "2030-01-01T01:00:00+01:00"}, None),
        ({"expires_at": 1_893_456_000}, None),
    ],
    ids=["ttl-1h", "ttl-text-seconds", "ttl-number", "expires-rfc3339", "expires-offset", "expires-posix"],
)
async def test_admin_api_takes_the_cli_vocabulary(admin: httpx.AsyncClient, fields: dict, expires_at: int | None) -> None:
    """ttl as the CLI's --ttl takes it; expires_at in RFC 3339; answers in RFC 3339."""
    before = int(time.time())
    created = await admin.post("/api/links", json={"path": "ten.txt", **fields}, headers=AUTH)
    after = int(time.time()) + 1
    assert created.status_code == 201
    got = parse_rfc3339(created.json()["expires_at"])
    if expires_at is None:
        assert got == 1_893_456_000  # 2030-01-01T00:00:00Z
    else:
        assert before + expires_at <= got <= after + expires_at


@pytest.mark.anyio
async def test_admin_api_expires_at_in_the_past_gives_410(admin: httpx.AsyncClient) -> None:
    created = await admin.post("/api/links", json={"path": "ten.txt", "expires_at": 1_000_000_000}, headers=AUTH)
    assert (created.status_code, created.json()["expires_at"]) == (201, "2001-09-09T01:46:40Z")
    response = await admin.get(created.json()["url"])
    assert (response.status_code, response.json()) == (410, EXPIRED)


@pytest.mark.anyio
async def test_admin_api_one_time_link(admin: httpx.AsyncClient) -> None:
    created = (await admin.post("/api/links", json={"path": "data.bin", "max_downloads": 1}, headers=AUTH)).json()
    assert (created["max_downloads"], created["expires_at"], created["name"]) == (1, None, None)
    first = await admin.get(created["url"])
    second = await admin.get(created["url"])
    assert (first.status_code, first.content) == (200, bytes(range(256)))
    assert (second.status_code, second.json()) == (410, GONE)


BAD_AUTH = [
    ("none", {}),
    ("wrong-token", {"Authorization": "Bearer wrong"}),
    ("token-prefix", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
    ("empty-bearer", {"Authorization": "Bearer "}),
    ("basic-scheme", {"Authorization": f"Basic {TOKEN}"}),
    ("token-alone", {"Authorization": TOKEN}),
]
ADMIN_CALLS = [("GET", "/api/links", None), ("POST", "/api/links", {"path": "ten.txt"}), ("DELETE", "/api/links/some-id", None)]


@pytest.mark.anyio
@pytest.mark.parametrize("headers", [c[1] for c in BAD_AUTH], ids=[c[0] for c in BAD_AUTH])
@pytest.mark.parametrize(("method", "url", "body"), ADMIN_CALLS, ids=[c[0] for c in ADMIN_CALLS])
async def test_admin_api_without_the_right_token_is_401(admin: httpx.AsyncClient, db: str, headers: dict, method: str, url: str, body) -> None:
    response = await admin.request(method, url, json=body, headers=headers)
    assert (response.status_code, response.json()) == (401, BEARER_401)
    assert response.headers["www-authenticate"] == 'Bearer realm="downloader"'
    assert Catalog(db).list() == []


@pytest.mark.anyio
async def test_admin_api_right_token_any_scheme_case(admin: httpx.AsyncClient) -> None:
    response = await admin.get("/api/links", headers={"Authorization": f"bearer {TOKEN}"})
    assert (response.status_code, response.json()) == (200, {"links": []})


@pytest.mark.anyio
@pytest.mark.parametrize("settings", [{"admin_token": TOKEN}, {"catalog": "DB"}, {}], ids=["no-catalog", "no-token", "neither"])
async def test_admin_api_is_404_unless_configured(root: Path, db: str, settings: dict) -> None:
    settings = {k: (str(db) if v == "DB" else v) for k, v in settings.items()}
    async with asgi_client(create_app(root, **settings)) as c:
        listed = await c.get("/api/links", headers=AUTH)
        created = await c.post("/api/links", json={"path": "ten.txt"}, headers=AUTH)
        deleted = await c.delete("/api/links/x", headers=AUTH)
    for response in (listed, created, deleted):
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
        assert "www-authenticate" not in response.headers


BAD_LINK_REQUESTS = [
    # (id, body as bytes, status, detail); nothing is stored (issue "No surprises" review: 500s stored links)
    ("not-json", b"path=ten.txt", 400, "The body must be JSON"),
    ("json-nan", b'{"path": "ten.txt", "ttl": NaN}', 400, "The body must be JSON"),
    ("json-infinity", b'{"path": "ten.txt", "ttl": Infinity}', 400, "The body must be JSON"),
    ("json-list", b'["ten.txt"]', 400, "path (a string) is required"),
    ("no-path", b"{}", 400, "path (a string) is required"),
    ("path-not-string", b'{"path": 1}', 400, "path (a string) is required"),
    ("unknown-field", b'{"path": "ten.txt", "owner": "x"}', 400, "unknown fields: owner"),
    ("ttl-zero", b'{"path": "ten.txt", "ttl": 0}', 400, "ttl must be a number from 1 to 3153600000"),
    ("ttl-huge", b'{"path": "ten.txt", "ttl": 1e400}', 400, "ttl must be a number from 1 to 3153600000"),
    ("ttl-too-long", b'{"path": "ten.txt", "ttl": 99999999999999999999}', 400, "ttl must be a number from 1 to 3153600000"),
    ("ttl-list", b'{"path": "ten.txt", "ttl": [1]}', 400, "ttl must be a number from 1 to 3153600000"),
    ("ttl-bad-string", b'{"path": "ten.txt", "ttl": "soon"}', 400, "ttl must be seconds or a duration such as 45s, 30m, 1h or 7d"),
    ("ttl-huge-string", b'{"path": "ten.txt", "ttl": "99999999999999999999d"}', 400, "ttl must be seconds or a duration such as 45s, 30m, 1h or 7d"),
    ("ttl-fullwidth-digit", '{"path": "ten.txt", "ttl": "\uff11h"}'.encode(), 400, "ttl must be seconds or a duration such as 45s, 30m, 1h or 7d"),
    ("expires-huge", b'{"path": "ten.txt", "expires_at": 1e300}', 400, "expires_at must be a number from 0 to 253402300799"),
    ("expires-negative", b'{"path": "ten.txt", "expires_at": -1}', 400, "expires_at must be a number from 0 to 253402300799"),
    ("expires-bad-string", b'{"path": "ten.txt", "expires_at": "tomorrow"}', 400, "expires_at must be an RFC 3339 time such as 2026-12-01T00:00:00Z"),
    ("expires-no-zone", b'{"path": "ten.txt", "expires_at": "2030-01-01T00:00:00"}', 400, "expires_at must be an RFC 3339 time such as 2026-12-01T00:00:00Z"),
    ("max-zero", b'{"path": "ten.txt", "max_downloads": 0}', 400, "max_downloads must be a whole number from 1 to 1000000000"),
    ("max-bool", b'{"path": "ten.txt", "max_downloads": true}', 400, "max_downloads must be a whole number from 1 to 1000000000"),
    ("max-fraction", b'{"path": "ten.txt", "max_downloads": 1.5}', 400, "max_downloads must be a whole number from 1 to 1000000000"),
    ("max-huge", b'{"path": "ten.txt", "max_downloads": 99999999999999999999999}', 400, "max_downloads must be a whole number from 1 to 1000000000"),
    ("ttl-and-expires", b'{"path": "ten.txt", "ttl": 60, "expires_at": 4102444800}', 400, "give ttl or expires_at, not both"),
    ("name-with-slash", b'{"path": "ten.txt", "name": "a/b.txt"}', 400, "name must be a file name: printable, without /"),
    ("name-empty", b'{"path": "ten.txt", "name": ""}', 400, "name must be a file name: printable, without /"),
    ("name-dot-dot", b'{"path": "ten.txt", "name": ".."}', 400, "name must be a file name: printable, without /"),
    ("name-nul", b'{"path": "ten.txt", "name": "a\\u0000b"}', 400, "name must be a file name: printable, without /"),
    ("name-line-feed", b'{"path": "ten.txt", "name": "a\\nb"}', 400, "name must be a file name: printable, without /"),
    ("name-lone-surrogate", b'{"path": "ten.txt", "name": "\\ud800"}', 400, "name must be a file name: printable, without /"),
    ("path-lone-surrogate", b'{"path": "\\udcfften.txt"}', 404, "Not Found"),
    ("missing-file", b'{"path": "missing.txt"}', 404, "Not Found"),
    ("outside-root", b'{"path": "../secret.txt"}', 404, "Not Found"),
    ("symlink-out", b'{"path": "link-out"}', 404, "Not Found"),
    ("hidden-file", b'{"path": ".hidden"}', 404, "Not Found"),
    ("directory", b'{"path": "sub"}', 404, "Not Found"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "status", "detail"), [c[1:] for c in BAD_LINK_REQUESTS], ids=[c[0] for c in BAD_LINK_REQUESTS])
async def test_admin_api_refuses_bad_link_requests(admin: httpx.AsyncClient, db: str, body: bytes, status: int, detail: str) -> None:
    response = await admin.post("/api/links", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (status, {"detail": detail})
    assert Catalog(db).list() == []


@pytest.mark.anyio
async def test_admin_api_under_a_mount_prefix_returns_prefixed_urls(root: Path, db: str) -> None:
    host = Starlette(routes=[Mount("/p", app=create_app(root, catalog=db, admin_token=TOKEN))])
    async with asgi_client(host) as c:
        created = await c.post("/p/api/links", json={"path": "ten.txt"}, headers=AUTH)
        link_id = created.json()["id"]
        listed = await c.get("/p/api/links", headers=AUTH)
        download = await c.get(created.json()["url"])
        deleted = await c.delete(f"/p/api/links/{link_id}", headers=AUTH)
    assert (created.status_code, created.json()["url"]) == (201, f"/p/files/{link_id}")
    assert [link["url"] for link in listed.json()["links"]] == [f"/p/files/{link_id}"]
    assert (download.status_code, download.content) == (200, TEN)
    assert deleted.status_code == 204


# =============================================================================
# The authorize hook
# =============================================================================


def _sync_allow(request, file) -> bool:
    return True


async def _async_allow(request, file) -> bool:
    return True


class _AsyncCallable:
    async def __call__(self, request, file) -> bool:
        return True


HOOK_KINDS = [("sync", _sync_allow), ("async", _async_allow), ("async-callable-object", _AsyncCallable()), ("lambda", lambda request, file: True)]


@pytest.mark.anyio
@pytest.mark.parametrize("hook", [k[1] for k in HOOK_KINDS], ids=[k[0] for k in HOOK_KINDS])
async def test_hook_returning_true_allows(root: Path, hook) -> None:
    async with asgi_client(create_app(root, authorize=hook)) as c:
        response = await c.get("/download/ten.txt")
        part = await c.get("/download/ten.txt", headers={"Range": "bytes=1-2"})
    assert (response.status_code, response.content) == (200, TEN)
    assert (part.status_code, part.content) == (206, b"12")


def _returning(value):
    def sync_hook(request, file):
        return value

    async def async_hook(request, file):
        return value

    return sync_hook, async_hook


DENYING_VALUES = [("false", False), ("none", None), ("one", 1), ("string-true", "True"), ("object", object()), ("list", [True])]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [0, 1], ids=["sync", "async"])
@pytest.mark.parametrize("value", [v[1] for v in DENYING_VALUES], ids=[v[0] for v in DENYING_VALUES])
async def test_hook_returning_anything_but_true_denies_403(root: Path, value, kind: int) -> None:
    """Fail closed: a hook that forgets to return (None) or returns a truthy non-True denies."""
    hook = _returning(value)[kind]
    async with asgi_client(create_app(root, authorize=hook)) as c:
        response = await c.get("/download/ten.txt")
        head = await c.head("/download/ten.txt")
    assert (response.status_code, response.json()) == (403, {"detail": "Forbidden"})
    assert "content-disposition" not in response.headers and "etag" not in response.headers
    assert (head.status_code, head.content) == (403, b"")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_hook_raising_401_sends_www_authenticate(root: Path, kind: str) -> None:
    def sync_hook(request, file):
        raise HTTPError(401, "Log in to download", headers={"WWW-Authenticate": "Bearer"})

    async def async_hook(request, file):
        raise HTTPError(401, "Log in to download", headers={"WWW-Authenticate": "Bearer"})

    async with asgi_client(create_app(root, authorize=sync_hook if kind == "sync" else async_hook)) as c:
        response = await c.get("/download/ten.txt")
    assert (response.status_code, response.json()) == (401, {"detail": "Log in to download"})
    assert response.headers["www-authenticate"] == "Bearer"
    assert "etag" not in response.headers


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_hook_sees_the_request_and_the_resolved_file(root: Path, kind: str) -> None:
    seen: list[tuple[str, str, int, str, str]] = []

    def record(request, file) -> bool:
        shown = (file.name, file.size, file.path) if file is not None else (None, None, None)
        seen.append((request.url.path, *shown, request.headers.get("x-user", "")))
        return request.headers.get("x-user") == "alice"

    async def async_record(request, file) -> bool:
        return record(request, file)

    async with asgi_client(create_app(root, authorize=record if kind == "sync" else async_record)) as c:
        inner = await c.get("/download/sub/inner.txt", headers={"X-User": "alice"})
        via_link = await c.get("/download/link-in", headers={"X-User": "bob"})
        missing = await c.get("/download/missing.txt", headers={"X-User": "alice"})
        missing_refused = await c.get("/download/missing.txt", headers={"X-User": "bob"})
    assert (inner.status_code, inner.content) == (200, b"inner")
    assert (via_link.status_code, via_link.json()) == (403, {"detail": "Forbidden"})
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    # a refused client gets the refusal for a missing file too, so it can't probe what exists
    assert (missing_refused.status_code, missing_refused.json()) == (403, {"detail": "Forbidden"})
    real = os.path.realpath(root)
    # the symlink keeps its own name, its path is what it resolves to; a missing file reaches
    # the hook as None
    assert seen == [
        ("/download/sub/inner.txt", "inner.txt", 5, os.path.join(real, "sub", "inner.txt"), "alice"),
        ("/download/link-in", "link-in", 10, os.path.join(real, "ten.txt"), "bob"),
        ("/download/missing.txt", None, None, None, "alice"),
        ("/download/missing.txt", None, None, None, "bob"),
    ]


@pytest.mark.anyio
async def test_hook_guards_catalog_links_and_a_denial_uses_up_nothing(root: Path, db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=1)
    allowed = {"yes": False}
    async with asgi_client(create_app(root, catalog=db, authorize=lambda request, file: allowed["yes"])) as c:
        denied = await c.get(f"/files/{link.id}")
        assert catalog.get(link.id).downloads == 0
        allowed["yes"] = True
        served = await c.get(f"/files/{link.id}")
    assert (denied.status_code, denied.json()) == (403, {"detail": "Forbidden"})
    assert (served.status_code, served.content) == (200, TEN)
    assert catalog.get(link.id).downloads == 1


@pytest.mark.anyio
async def test_hook_runs_after_the_signature_check(root: Path) -> None:
    calls: list[str] = []

    def hook(request, file) -> bool:
        calls.append(file.name)
        return True

    async with asgi_client(create_app(root, secret=KEY, authorize=hook)) as c:
        forged = await c.get("/download/ten.txt?expires=4102444800&signature=x")
        signed = await c.get(sign_url("ten.txt", secret=KEY, expires_in=60))
    assert (forged.status_code, forged.json()) == (403, INVALID)
    assert (signed.status_code, signed.content) == (200, TEN)
    assert calls == ["ten.txt"]


def test_authorize_must_be_callable(root: Path) -> None:
    with pytest.raises(downloader.SettingsError) as caught:
        create_app(root, authorize="yes")
    assert str(caught.value) == "authorize: must be a callable"


@pytest.mark.anyio
async def test_the_client_of_a_used_up_link_gets_one_files_worth_of_ranges_more_and_no_more(root: Path, db: str) -> None:
    """After the count, its client (address and User-Agent) may fetch ranges: at most the file's size in
    all, never the whole file without Range; then 410 like everyone else."""
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=1)
    url = f"/files/{link.id}"
    async with asgi_client(create_app(root, catalog=db)) as c:
        full = await c.get(url)
        unranged = await c.get(url)
        rest = [await c.get(url, headers={"Range": r}) for r in ("bytes=0-5", "bytes=6-")]
        more = await c.get(url, headers={"Range": "bytes=0-0"})
    assert (full.status_code, full.content) == (200, TEN)
    assert (unranged.status_code, unranged.json()) == (410, GONE)
    assert [(r.status_code, r.content) for r in rest] == [(206, b"012345"), (206, b"6789")]
    assert (more.status_code, more.json()) == (410, GONE)
    assert catalog.get(link.id).downloads == 1


@pytest.mark.anyio
async def test_over_http_a_hold_ends_link_hold_s_after_the_count(root: Path, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloader, "LINK_HOLD_S", 0.5)
    link = Catalog(db).add("ten.txt", max_downloads=1)
    async with asgi_client(create_app(root, catalog=db)) as c:
        full = await c.get(f"/files/{link.id}")
        within = await c.get(f"/files/{link.id}", headers={"Range": "bytes=0-1"})
        await anyio.sleep(0.6)
        after = await c.get(f"/files/{link.id}", headers={"Range": "bytes=2-3"})
    assert [(r.status_code, r.content) for r in (full, within)] == [(200, TEN), (206, b"01")]
    assert (after.status_code, after.json()) == (410, GONE)


def test_a_hold_ends_link_hold_s_after_the_count_however_often_it_is_used(db: str) -> None:
    catalog = Catalog(db)
    link = catalog.add("ten.txt", max_downloads=1)
    assert catalog.claim(link.id, "h", now=1000.0)
    assert catalog.holds(link.id, "h", 1, 10, now=1000.0 + downloader.LINK_HOLD_S - 1)
    assert not catalog.holds(link.id, "h", 1, 10, now=1000.0 + downloader.LINK_HOLD_S + 1)
    assert not catalog.holds(link.id, "other", 1, 10, now=1001.0)
    assert [catalog.claim(link.id, "other", now=1001.0), catalog.claim(link.id, "h", held=True, now=1001.0)] == [False, True]


@pytest.mark.anyio
async def test_small_file_whose_last_download_was_taken_meanwhile_is_410(root: Path, tmp_path: Path) -> None:
    """A body that goes out in one message is counted before it is sent: if a racing
    download took the last one between the check and the count, the answer is a clean
    410, not a 500 (nor the file)."""
    app = downloader.create_app(root, catalog=str(tmp_path / "race.db"), access_log="off")
    catalog = app.state.service.catalog
    link = catalog.add("ten.txt", max_downloads=1)
    catalog.claim = lambda *args, **kwargs: False  # the racing worker won the last download
    async with asgi_client(app) as c:
        response = await c.get(f"/files/{link.id}")
    assert (response.status_code, response.json()) == (410, {"detail": "This download link has been used up"})


@pytest.mark.anyio
@pytest.mark.parametrize("tail", ["%0A", "%0D%0A", "%0a", "%20"])
async def test_a_signed_link_with_a_trailing_line_feed_is_no_alias(root: Path, tail: str) -> None:
    """Issue "Hardening" #3: the route took `.*` up to a line feed, so `name%0A` verified and served `name`."""
    url = sign_url("ten.txt", secret=KEY, expires_in=60)
    path, _, query = url.partition("?")
    status, _, body = await asgi_get(create_app(root, secret=KEY), f"{path}{tail}?{query}")
    assert (status, json.loads(body)) == (403, {"detail": "Invalid link signature"})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(["1h", "7d", "0", "１h", "2030-01-01T00:00:00Z", "2030-01-01", "\ud800", "..", "a/b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
LINK_BODIES = st.fixed_dictionaries(
    {"path": st.sampled_from(["ten.txt", "sub/inner.txt", "missing.txt", "../secret.txt", "\udcff.txt"]) | JSON_VALUES},
    optional={key: JSON_VALUES for key in ("ttl", "expires_at", "max_downloads", "name", "other")},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=LINK_BODIES)
def test_admin_api_fuzzed_never_fails_and_stores_only_valid_links(root: Path, tmp_path: Path, body: dict) -> None:
    """Issue "Hardening" #9: 400 naming the field or 404, or 201 and a link that lists as valid JSON."""
    db = Path(tempfile.mkdtemp(dir=tmp_path)) / "links.db"

    async def check() -> None:
        async with asgi_client(create_app(root, catalog=db, admin_token=TOKEN)) as admin:
            raw = json.dumps(body, allow_nan=False).encode("utf-8", "surrogatepass")
            created = await admin.post("/api/links", content=raw, headers={**AUTH, "Content-Type": "application/json"})
            listed = await admin.get("/api/links", headers=AUTH)
        assert created.status_code in (201, 400, 404), created.text
        assert listed.status_code == 200
        links = json.loads(listed.content, parse_constant=lambda name: pytest.fail(f"{name} in the answer"))["links"]
        assert len(links) == (created.status_code == 201)
        if links:
            assert links[0]["path"] == body["path"] and 1 <= (links[0]["max_downloads"] or 1) <= downloader.MAX_DOWNLOADS_CAP

    anyio.run(check)
