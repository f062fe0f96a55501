"""An s3:// root (section 6): a bucket of a real SeaweedFS (helpers.Seaweed), which checks SigV4
signatures and expiry. Pure functions first (the presigner against AWS's own example), then the
app over ASGI: every range and conditional case of the local tests answered alike from disk and
from the bucket, the listing, /zip, the catalog, redirect mode, and the store failing (helpers.Relay).
Then real servers and clients: curl, wget, aria2c, a 1 GiB object, objects replaced mid-download,
clients that leave, 100 slow clients, presigned URLs expiring, start-up errors."""

from __future__ import annotations

import calendar
import hashlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import obstore
import pytest

import test_conditional as conditional
import test_ranges as ranges
from conftest import SECRET, TEN, UNICODE_NAME, asgi_exchange, asgi_request, need
from helpers import MIB, PROJECT, Relay, Seaweed, Server, cli_server, failed, free_port, parse_byteranges, run_cli, wait_for

import downloader
from downloader import ByteRange, HTTPError, presign_url, servable_key, store_error_to_http

pytestmark = pytest.mark.anyio

FILES = {
    "ten.txt": TEN,
    "empty.txt": b"",
    UNICODE_NAME: "naïve ünïcode\n".encode(),
    "data.bin": bytes(range(256)),
    "big.bin": ranges.BIG,
    "sub/inner.txt": b"inner",
    "sub/deeper/a b+c.txt": b"deeper",
    ".hidden": SECRET,
    ".dotdir/inner.txt": SECRET,
}
OUTSIDE = {"secret.txt": SECRET}  # in the bucket, beside the prefix served: never reachable


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def test_presign_matches_the_aws_documentation_example() -> None:
    """AWS's worked example of a query-string presigned GET (S3 API reference, "Authenticating Requests: Using
    Query Parameters", virtual-hosted style): the same URL and signature, byte for byte."""
    url = presign_url(
        "https://examplebucket.s3.amazonaws.com", "", "test.txt", access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region="us-east-1", expires_in=86400,
        now=calendar.timegm((2013, 5, 24, 0, 0, 0)),
    )
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z"
        "&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_presign_path_style_encodes_key_and_signs_overrides() -> None:
    url = presign_url(
        "http://127.0.0.1:9000", "bucket", "a dir/é+&?.txt", access_key="AK", secret_key="SK", region="eu-west-1",
        expires_in=60, now=0, session_token="TOKEN", overrides={"response-content-disposition": 'attachment; filename="x"'},
    )
    path, _, query = url.partition("?")
    assert path == "http://127.0.0.1:9000/bucket/a%20dir/%C3%A9%2B%26%3F.txt"
    params = urllib.parse.parse_qs(query)
    assert params["response-content-disposition"] == ['attachment; filename="x"']
    assert params["X-Amz-Security-Token"] == ["TOKEN"]
    assert params["X-Amz-Credential"] == ["AK/19700101/eu-west-1/s3/aws4_request"]
    names = [part.split("=")[0] for part in query.split("&")]
    assert names[:-1] == sorted(names[:-1]) and names[-1] == "X-Amz-Signature"  # SigV4's canonical order


ANNOUNCED_ETAGS = [
    ('"0123abcd"', '"0123abcd"'),  # a store's strong ETag is the validator
    ('"d41d8cd98f00b204e9800998ecf8427e-3"', '"d41d8cd98f00b204e9800998ecf8427e-3"'),  # a multipart upload's
    ('W/"weak"', downloader.make_etag(10, 10**18)),  # not strong: ours, from size and time
    (None, downloader.make_etag(10, 10**18)),
    ("unquoted", downloader.make_etag(10, 10**18)),
]


@pytest.mark.parametrize(("store_etag", "announced"), ANNOUNCED_ETAGS)
def test_the_validator_is_the_stores_etag_when_strong(store_etag: str | None, announced: str) -> None:
    info = downloader.FileInfo(10, 10**18, "f.txt", "f.txt", etag=store_etag)
    plan = downloader.plan_response("GET", {}, info, media_type="text/plain", disposition="", cache_control="no-cache", now=2e9, boundary="b")
    assert dict(plan.headers)["ETag"] == announced


SERVABLE_KEYS = [
    ("ten.txt", False, True),
    ("sub/inner.txt", False, True),
    ("a b+c&d?.txt", False, True),
    (".hidden", False, False),
    (".hidden", True, True),
    ("sub/.git/config", False, False),
    ("odd//double.txt", True, False),
    ("./dot.txt", True, False),
    ("sub/../up.txt", True, False),
    ("folder-marker/", True, False),
    ("nul\x00.txt", True, False),
]


@pytest.mark.parametrize(("key", "serve_hidden", "want"), SERVABLE_KEYS, ids=[repr(k) for k, _, _ in SERVABLE_KEYS])
def test_servable_key(key: str, serve_hidden: bool, want: bool) -> None:
    assert servable_key(key, serve_hidden) is want


STORE_ERRORS = [
    (FileNotFoundError("no such key"), 404),
    (obstore.exceptions.NotFoundError("no such key"), 404),
    (TimeoutError(), 504),
    (obstore.exceptions.GenericError("connection refused"), 502),
    (obstore.exceptions.PermissionDeniedError("403"), 502),
    (ConnectionResetError(), 502),
]


@pytest.mark.parametrize(("exc", "status"), STORE_ERRORS, ids=[type(e).__name__ for e, _ in STORE_ERRORS])
def test_store_error_to_http(exc: BaseException, status: int) -> None:
    answer = store_error_to_http(exc)
    assert answer.status == status
    assert str(exc) not in answer.detail or not str(exc)


ROOT_SETTINGS = [
    ({"DOWNLOADER_ROOT": "s3://bucket"}, "s3://bucket"),
    ({"DOWNLOADER_ROOT": "s3://bucket/"}, "s3://bucket"),
    ({"DOWNLOADER_ROOT": " s3://my.bucket-1/a/b/ "}, "s3://my.bucket-1/a/b"),
    ({"DOWNLOADER_ROOT": "s3://Bucket/x"},
     "DOWNLOADER_ROOT: 's3://Bucket/x': 'Bucket' is not a bucket name (3 to 63 lower-case letters, digits, dots and hyphens): s3://bucket/prefix"),
    ({"DOWNLOADER_ROOT": "s3://"}, "DOWNLOADER_ROOT: 's3://': '' is not a bucket name (3 to 63 lower-case letters, digits, dots and hyphens): s3://bucket/prefix"),
    ({"DOWNLOADER_ROOT": "s3://bucket/a/../b"}, "DOWNLOADER_ROOT: 's3://bucket/a/../b' has an empty, . or .. segment in its prefix"),
    ({"DOWNLOADER_ROOT": "s3://bucket/a//b"}, "DOWNLOADER_ROOT: 's3://bucket/a//b' has an empty, . or .. segment in its prefix"),
    ({"DOWNLOADER_S3_MODE": "redirect"}, "DOWNLOADER_S3_MODE: applies only to a bucket root (root s3://bucket/prefix)"),
    ({"DOWNLOADER_S3_URL_TTL": "60"}, "DOWNLOADER_S3_URL_TTL: applies only to a bucket root (root s3://bucket/prefix)"),
    ({"DOWNLOADER_ROOT": "s3://bucket", "DOWNLOADER_S3_MODE": "sideways"}, "DOWNLOADER_S3_MODE: must be proxy or redirect"),
    ({"DOWNLOADER_ROOT": "s3://bucket", "DOWNLOADER_S3_URL_TTL": "60"}, "DOWNLOADER_S3_URL_TTL: applies only with s3_mode=redirect"),
    ({"DOWNLOADER_ROOT": "s3://bucket", "DOWNLOADER_S3_MODE": "redirect", "DOWNLOADER_S3_URL_TTL": "0"},
     "DOWNLOADER_S3_URL_TTL: must be a whole number of seconds from 1 to 604800"),
    ({"DOWNLOADER_ROOT": "s3://bucket", "DOWNLOADER_S3_MODE": "redirect", "DOWNLOADER_RATE_LIMIT": "65536"},
     "DOWNLOADER_RATE_LIMIT: can't apply in s3_mode=redirect: the object store sends the bytes"),
    ({"DOWNLOADER_ROOT": "s3://bucket", "DOWNLOADER_OFFLOAD": "x-accel-redirect"},
     "DOWNLOADER_OFFLOAD: nginx sends files from disk: a bucket root can't be offloaded (s3_mode=redirect hands bytes to the store)"),
]


@pytest.mark.parametrize(("environ", "want"), ROOT_SETTINGS, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in ROOT_SETTINGS])
def test_bucket_settings(environ: dict[str, str], want: str) -> None:
    """Checked without reaching the bucket (that happens when the app is built)."""
    if want.startswith("s3://"):
        assert downloader.settings_from_env(environ).root == want
    else:
        with pytest.raises(downloader.SettingsError) as caught:
            downloader.settings_from_env(environ)
        assert str(caught.value) == want


class ScriptedBucket:
    """ObjectChunks's bucket, its GETs' bodies scripted: each a list of chunks, an exception breaking it there."""

    def __init__(self, *bodies: list) -> None:
        self.bodies, self.calls, self.errors = list(bodies), [], []
        self.on_error = self.errors.append

    async def open_window(self, info, start: int, stop: int, chunk_size: int):
        self.calls.append((start, stop))
        body = self.bodies.pop(0)

        async def stream():
            for piece in body:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece

        return stream()


SCRIPTED = downloader.FileInfo(10, 0, "f", "f", etag='"e"')


async def read_all(chunks: downloader.ObjectChunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_a_body_broken_mid_window_is_asked_again_from_where_it_stopped() -> None:
    bucket = ScriptedBucket([b"ab", ConnectionResetError()], [b"cdef"])
    assert await read_all(downloader.ObjectChunks(bucket, SCRIPTED, ByteRange(0, 6))) == b"abcdef"
    assert (bucket.calls, bucket.errors) == ([(0, 6), (2, 6)], ["failed"])


async def test_retries_count_per_break_not_per_transfer() -> None:
    """S3_RETRIES (2) breaks in a row abort; three breaks, each after progress, don't."""
    bucket = ScriptedBucket([b"a", OSError()], [b"b", OSError()], [b"c", OSError()], [b"def"])
    assert await read_all(downloader.ObjectChunks(bucket, SCRIPTED, ByteRange(0, 6))) == b"abcdef"
    stuck = ScriptedBucket([b"a", OSError()], [OSError()], [OSError()], [b"never"])
    with pytest.raises(downloader.TransferAborted, match="failed mid-transfer"):
        await read_all(downloader.ObjectChunks(stuck, SCRIPTED, ByteRange(0, 6)))
    assert stuck.calls == [(0, 6), (1, 6), (1, 6)]


async def test_a_store_that_sends_more_than_asked_aborts() -> None:
    """A store that ignores the Range (the whole object for bytes 2-4) never puts other bytes in the body."""
    with pytest.raises(downloader.TransferAborted, match="more than was asked"):
        await read_all(downloader.ObjectChunks(ScriptedBucket([b"0123456789"]), SCRIPTED, ByteRange(2, 5)))


# ---------------------------------------------------------------------------
# Over ASGI: the bucket answers as the disk does
# ---------------------------------------------------------------------------


def new_prefix() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def put_all(seaweed: Seaweed, prefix: str, files: dict[str, bytes]) -> None:
    store = seaweed.store(prefix)
    for key, content in files.items():
        obstore.put(store, key, content)


@pytest.fixture(scope="module")
def mirrored(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, int]:
    """FILES in a bucket prefix (and, outside the prefix, OUTSIDE) and on disk with the
    objects' Last-Modified as their mtime; returns the prefix, the disk root and that time. Waits until that
    time is two seconds old, so that If-Range by date treats it as strong on both sides (MIN_STRONG_AGE_S)."""
    prefix = new_prefix()
    put_all(seaweed, prefix, FILES)  # (keys no URL names, a//b or ./a, SeaweedFS refuses: servable_key's table has them)
    put_all(seaweed, "", {f"{prefix}-outside/{k}": v for k, v in OUTSIDE.items()})
    modified = int(obstore.head(seaweed.store(prefix), "ten.txt")["last_modified"].timestamp())
    root = tmp_path_factory.mktemp("mirror")
    for path, content in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
        os.utime(root / path, (modified, modified))
    while time.time() < modified + 2:
        time.sleep(0.1)
    return prefix, root, modified


@pytest.fixture
def aws(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> Seaweed:
    """The AWS_* variables of the test server in this process's environment (what create_app reads)."""
    for name, value in seaweed.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return seaweed


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture
async def both(aws: Seaweed, mirrored: tuple[str, Path, int]) -> Iterator[tuple[httpx.AsyncClient, httpx.AsyncClient, int]]:
    """A client of the disk root and one of the bucket prefix holding the same files; their mtime."""
    prefix, root, modified = mirrored
    # (digests off on the disk: objects have none, and what is compared is ranges and preconditions)
    async with asgi_client(downloader.create_app(root, digests=False)) as disk, asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as bucket:
        yield disk, bucket, modified


@pytest.mark.anyio
async def test_objects_have_no_digest(both: tuple[httpx.AsyncClient, httpx.AsyncClient, int]) -> None:
    """Objects are not hashed (README: Integrity): no digest fields, sha256 null, no SHA256SUMS."""
    _, bucket, _ = both
    download = await bucket.get("/download/ten.txt")
    listed = (await bucket.get("/api/files")).json()["files"]
    sums = await bucket.get("/sha256sums/")
    assert (download.status_code, "repr-digest" in download.headers, "digest" in download.headers) == (200, False, False)
    assert listed and {f["sha256"] for f in listed} == {None}
    assert (sums.status_code, sums.json()) == (404, {"detail": "No digests: objects are not hashed"})


def shift_dates(headers: dict[str, str], modified: int) -> dict[str, str]:
    """The local tests' headers with their dates (relative to test_conditional.MTIME) moved to `modified`."""
    formats = {"IMF": "%a, %d %b %Y %H:%M:%S GMT", "RFC850": "%A, %d-%b-%y %H:%M:%S GMT", "ASCTIME": "%a %b %e %H:%M:%S %Y"}
    moved = {}
    for name in ("IMF", "LATER", "EARLIER", "RFC850", "ASCTIME", "DAY_BEFORE_RFC850", "DAY_BEFORE_ASCTIME"):
        value = getattr(conditional, name)
        form = next(f for key, f in formats.items() if name.endswith(key)) if not name.endswith(("LATER", "EARLIER")) else formats["IMF"]
        then = downloader.parse_http_date(value, now=conditional.MTIME + 86400)
        moved[value] = time.strftime(form, time.gmtime(modified + then - conditional.MTIME))
    out = {}
    for key, value in headers.items():
        for old in sorted(moved, key=len, reverse=True):
            value = value.replace(old, moved[old])
        out[key] = value
    return out


async def ask(client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    etag = (await client.head(path)).headers.get("etag", '"none"')
    return await client.request(method, path, headers={k: v.replace("<etag>", etag) for k, v in headers.items()})


def comparable(response: httpx.Response) -> tuple[object, ...]:
    """What must be equal from disk and from the bucket: all but the validators' values and the boundary."""
    skip = {"etag", "last-modified", "content-type", "date"}
    headers = {k: v for k, v in response.headers.items() if k not in skip}
    body: object = response.content
    media_type = response.headers.get("content-type", "")
    if media_type.startswith("multipart/byteranges"):  # (a boundary of random characters, always as many)
        body = parse_byteranges(response) if response.content else b""
        media_type = "multipart/byteranges"
    validators = ("etag" in response.headers, "last-modified" in response.headers)
    return response.status_code, headers, media_type, body, validators


DIFFERENTIAL = (
    [("GET", "/download/ten.txt", {"Range": h}) for h, _ in ranges.RANGE_CASES]
    + [("HEAD", "/download/ten.txt", {"Range": h} if h else {}) for h in ranges.HEAD_CASES]
    + [("GET", "/download/empty.txt", {"Range": h}) for h in ranges.EMPTY_FILE_CASES]
    + [("GET", "/download/big.bin", {"Range": "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(n))}) for n in (100, 101)]
    + [("GET", "/download/ten.txt", h) for h, _ in conditional.PROCEED_CASES]
    + [(m, "/download/ten.txt", h) for h in conditional.NOT_MODIFIED_CASES for m in ("GET", "HEAD")]
    + [("GET", "/download/ten.txt", h) for h in conditional.PRECONDITION_FAILED_CASES]
    + [("GET", f"/download/{p}", {}) for p in FILES if not p.startswith(".")]
    + [("GET", "/download/" + urllib.parse.quote(UNICODE_NAME), {"User-Agent": "curl/8.0"})]
)


@pytest.mark.parametrize(("method", "path", "headers"), DIFFERENTIAL, ids=[f"{m} {p} {conditional.headers_id(h)}" for m, p, h in DIFFERENTIAL])
async def test_bucket_answers_as_the_disk_does(both: tuple[httpx.AsyncClient, httpx.AsyncClient, int], method: str, path: str, headers: dict[str, str]) -> None:
    """Every range case (Go's table included) and conditional case of test_ranges and test_conditional, on the
    same bytes with the same Last-Modified: the same status, body, headers and parts. Only the ETag's value
    differs (the object's own), and it is announced and matched the same way."""
    disk, bucket, modified = both
    headers = shift_dates(headers, modified)
    from_disk = await ask(disk, method, path, headers)
    from_bucket = await ask(bucket, method, path, headers)
    assert comparable(from_bucket) == comparable(from_disk)
    assert from_bucket.headers.get("last-modified") == from_disk.headers.get("last-modified")
    if "etag" in from_bucket.headers:
        assert re.fullmatch(r'"[0-9a-f]{32}"', from_bucket.headers["etag"])  # SeaweedFS's: the object's MD5


async def test_etag_is_the_objects_and_changes_with_it(aws: Seaweed) -> None:
    prefix = new_prefix()
    put_all(aws, prefix, {"f.txt": b"one"})
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as client:
        first = await client.get("/download/f.txt")
        assert first.headers["etag"] == f'"{hashlib.md5(b"one").hexdigest()}"'
        put_all(aws, prefix, {"f.txt": b"two!"})
        again = await client.get("/download/f.txt", headers={"If-None-Match": first.headers["etag"]})
        assert (again.status_code, again.content) == (200, b"two!")
        resumed = await client.get("/download/f.txt", headers={"Range": "bytes=1-", "If-Range": first.headers["etag"]})
        assert (resumed.status_code, resumed.content) == (200, b"two!")  # never bytes 1- of "two!" after "one"


TRAVERSALS = [
    b"/download/../" + b"x",
    b"/download/%2e%2e/secret.txt",
    b"/download/sub/%2e%2e/%2e%2e/secret.txt",
    b"/download/..%2fsecret.txt",
    b"/download/odd//double.txt",
    b"/download/./dot.txt",
    b"/download/sub/../up.txt",
    b"/download/folder-marker/",
    b"/download/.hidden",
    b"/download/.dotdir/inner.txt",
    b"/download/nul%00.txt",
    b"/download/",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=[t.decode() for t in TRAVERSALS])
async def test_no_key_outside_the_prefix_or_unnameable_is_served(aws: Seaweed, mirrored: tuple[str, Path, int], target: bytes) -> None:
    prefix, _, _ = mirrored
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}")
    status, _, body = await asgi_request(app, target)
    assert status in (400, 404)
    assert SECRET not in body


async def test_listing_is_what_is_served_and_pages_by_cursor(aws: Seaweed, mirrored: tuple[str, Path, int]) -> None:
    """The same entries as the disk's listing (the store's order may differ: SeaweedFS lists folder by folder),
    each served; and paging by cursor gives each once, in the whole listing's order."""
    prefix, root, _ = mirrored
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as bucket, asgi_client(downloader.create_app(root)) as disk:
        whole = (await bucket.get("/api/files")).json()
        from_disk = (await disk.get("/api/files")).json()
        assert sorted(whole["files"], key=lambda f: f["path"]) == from_disk["files"]
        assert whole["next_cursor"] is None
        paths = [f["path"] for f in whole["files"]]
        for f in whole["files"]:
            got = await bucket.get(f["url"])
            assert (got.status_code, got.content) == (200, FILES[f["path"]])
        assert await pages(bucket, 2) == paths
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}", serve_hidden=True)) as hidden:
        listed = [f["path"] for f in (await hidden.get("/api/files")).json()["files"]]
        assert sorted(listed) == sorted(FILES)


async def pages(client: httpx.AsyncClient, limit: int) -> list[str]:
    """Every path of /api/files, following next_cursor `limit` at a time."""
    paged, cursor = [], ""
    while True:
        page = (await client.get("/api/files", params={"limit": limit, **({"cursor": cursor} if cursor else {})})).json()
        paged += [f["path"] for f in page["files"]]
        if not (cursor := page["next_cursor"]):
            return paged


def put_raw(seaweed: Seaweed, key: str, body: bytes) -> None:
    """An object under a key obstore won't write (a control character), by a presigned PUT."""
    url = presign_url(seaweed.endpoint, seaweed.bucket, key, access_key=seaweed.KEY, secret_key=seaweed.SECRET_KEY, region=seaweed.REGION,
                      expires_in=60, now=time.time(), method="PUT")
    assert httpx.put(url, content=body).status_code == 200


async def test_listing_pages_in_the_stores_order_past_keys_it_cant_serve(aws: Seaweed) -> None:
    """SeaweedFS lists a/... before a!...: the cursor follows the store's order (start-after), so paging one by one
    lists every file once. A key with a control character (S3 allows it; obstore's own listing fails a whole
    page on it) is skipped, and neither the listing nor /healthz fails."""
    prefix = new_prefix()
    names = ["a/b.txt", "a/z/y.txt", "a!.txt", "a-c.txt", "a.txt", "docs.pdf", "docs/x.txt", "docs-old.txt", "b.txt"]
    put_all(aws, prefix, {name: name.encode() for name in names})
    put_raw(aws, f"{prefix}/tab\there.txt", b"unservable")
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as client:
        listed = [f["path"] for f in (await client.get("/api/files")).json()["files"]]
        assert sorted(listed) == sorted(names)
        for limit in (1, 2, 3):
            assert await pages(client, limit) == listed
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/download/tab%09here.txt")).status_code == 404
        zipped = await client.get("/zip/a")
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            assert sorted(archive.namelist()) == ["b.txt", "z/y.txt"]


async def test_a_listing_page_reads_a_bounded_number_of_keys(aws: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hidden keys are skipped LIST_SCAN_KEYS at most per page: the page ends early, its cursor where the reading
    stopped, and following it lists the files beyond."""
    monkeypatch.setattr(downloader, "LIST_SCAN_KEYS", 3)
    monkeypatch.setattr(downloader, "S3_LIST_PAGE", 2)  # the store's page: two keys
    prefix = new_prefix()
    put_all(aws, prefix, {**{f".cache/{i}": b"h" for i in range(6)}, "z.txt": b"z"})
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as client:
        first = (await client.get("/api/files")).json()
        assert first["files"] == [] and first["next_cursor"]
        assert await pages(client, 10) == ["z.txt"]


async def test_zip_of_a_bucket_folder(aws: Seaweed, mirrored: tuple[str, Path, int]) -> None:
    prefix, _, _ = mirrored
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as client:
        got = await client.get("/zip/sub")
        assert got.status_code == 200 and got.headers["content-length"] == str(len(got.content))
        with zipfile.ZipFile(io.BytesIO(got.content)) as archive:
            assert {name: archive.read(name) for name in archive.namelist()} == {"inner.txt": b"inner", "deeper/a b+c.txt": b"deeper"}
        assert (await client.get("/zip/nothing-here")).status_code == 404
        assert (await client.get("/zip/.dotdir")).status_code == 404


async def test_catalog_counts_a_bucket_download_at_its_last_byte(aws: Seaweed, tmp_path: Path) -> None:
    prefix = new_prefix()
    put_all(aws, prefix, {"one-time.bin": os.urandom(3 * MIB)})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}", catalog=str(tmp_path / "c.db"), admin_token="t", chunk_size=64 * 1024)
    auth = {"Authorization": "Bearer t"}
    async with asgi_client(app) as client:
        assert (await client.post("/api/links", json={"path": "missing.bin"}, headers=auth)).status_code == 404
        link = (await client.post("/api/links", json={"path": "one-time.bin", "max_downloads": 1, "name": "given.bin"}, headers=auth)).json()
        head = await client.head(link["url"])
        assert head.headers["content-disposition"] == 'attachment; filename="given.bin"'
        part = await client.get(link["url"], headers={"Range": "bytes=0-99"})  # short of the last byte: not counted
        assert part.status_code == 206
        whole = await client.get(link["url"], headers={"User-Agent": "first"})
        assert (whole.status_code, len(whole.content)) == (200, 3 * MIB)
        again = await client.get(link["url"], headers={"User-Agent": "second"})
        assert again.status_code == 410


# ---------------------------------------------------------------------------
# Redirect mode
# ---------------------------------------------------------------------------


async def test_redirect_mode_sends_a_presigned_url_with_our_name_and_type(aws: Seaweed, tmp_path: Path) -> None:
    prefix = new_prefix()
    put_all(aws, prefix, {"dir/r\u00e9sum\u00e9 data.bin": b"x" * 1000})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}", s3_mode="redirect", s3_url_ttl=30, catalog=str(tmp_path / "c.db"), admin_token="t")
    async with asgi_client(app) as client:
        path = "/download/" + urllib.parse.quote("dir/r\u00e9sum\u00e9 data.bin")
        moved = await client.get(path)
        assert moved.status_code == 302
        assert moved.headers["cache-control"] == "private, no-store"
        location = moved.headers["location"]
        assert location.startswith(f"{aws.endpoint}/{aws.bucket}/{prefix}/dir/r%C3%A9sum%C3%A9%20data.bin?")
        assert "X-Amz-Expires=30&" in location
        ours = await client.head(path)  # HEAD stays ours: the headers a GET gets from the store
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content == b"x" * 1000
        for name in ("content-disposition", "content-type", "cache-control", "etag", "content-length"):
            assert fetched.headers[name] == ours.headers[name], name
        ranged = httpx.get(location, headers={"Range": "bytes=10-19"})
        assert (ranged.status_code, ranged.content) == (206, b"x" * 10)
        assert (await client.get(path, headers={"If-None-Match": ours.headers["etag"]})).status_code == 304  # no redirect
        # What the store would answer otherwise is ours: a Range ignored (If-Range failed; the store would splice),
        # several ranges (the store may send the whole file; our HEAD promised multipart).
        stale = await client.get(path, headers={"Range": "bytes=5-", "If-Range": '"an-older-version"'})
        assert (stale.status_code, stale.content, stale.headers["etag"]) == (200, b"x" * 1000, ours.headers["etag"])
        several = await client.get(path, headers={"Range": "bytes=0-1,5-6"})
        assert several.status_code == 206 and several.headers["content-type"].startswith("multipart/byteranges")
        assert [body for _, body in parse_byteranges(several)] == [b"xx", b"xx"]
        assert (await client.get(path, headers={"If-Match": '"other"'})).status_code == 412
        assert (await client.get(path, headers={"Range": "bytes=5000-"})).status_code == 416
        assert (await client.get("/download/missing.bin")).status_code == 404
        # A catalog link is counted when the URL is issued (for a GET that reaches the last byte).
        link = (await client.post("/api/links", json={"path": "dir/r\u00e9sum\u00e9 data.bin", "max_downloads": 1}, headers={"Authorization": "Bearer t"})).json()
        assert (await client.get(link["url"], headers={"Range": "bytes=0-9"})).status_code == 302
        assert (await client.get(link["url"])).status_code == 302
        assert (await client.get(link["url"], headers={"User-Agent": "other"})).status_code == 410


async def test_presigned_url_expires_and_a_tampered_one_is_refused(aws: Seaweed) -> None:
    prefix = new_prefix()
    put_all(aws, prefix, {"a.txt": b"short-lived", "b.txt": b"other"})
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}", s3_mode="redirect", s3_url_ttl=2)) as client:
        location = (await client.get("/download/a.txt")).headers["location"]
    assert httpx.get(location).content == b"short-lived"
    tampered = [
        location.replace("/a.txt?", "/b.txt?"),
        location.replace("attachment%3B%20filename%3D%22a.txt%22", "attachment%3B%20filename%3D%22evil.exe%22"),
        location.replace("X-Amz-Expires=2", "X-Amz-Expires=3600"),
    ]
    for url in tampered:
        assert url != location
        assert httpx.get(url).status_code == 403, url
    time.sleep(3.1)
    assert httpx.get(location).status_code == 403  # expired


async def test_redirect_binds_a_catalog_links_range_to_its_url(aws: Seaweed, tmp_path: Path) -> None:
    """Behind a catalog link, a range short of the last byte is not counted, so its URL must serve only that range:
    it is signed with the Range header. Without it, or with another, the store refuses the URL."""
    prefix = new_prefix()
    put_all(aws, prefix, {"one.bin": bytes(range(256)) * 40})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}", s3_mode="redirect", catalog=str(tmp_path / "c.db"), admin_token="t")
    async with asgi_client(app) as client:
        link = (await client.post("/api/links", json={"path": "one.bin", "max_downloads": 1}, headers={"Authorization": "Bearer t"})).json()
        for _ in range(3):
            moved = await client.get(link["url"], headers={"Range": "bytes=0-0"})
            assert moved.status_code == 302
            location = moved.headers["location"]
            assert "X-Amz-SignedHeaders=host%3Brange&" in location
            assert httpx.get(location, headers={"Range": "bytes=0-0"}).content == b"\x00"
            assert httpx.get(location).status_code == 403
            assert httpx.get(location, headers={"Range": "bytes=0-"}).status_code == 403
        # A Range in another spelling may be read otherwise by the store (AWS and SeaweedFS send the whole object
        # for these): not redirected but proxied, and answered as we read it.
        for odd in ("BYTES=0-0", "bytes = 0-0", "bytes=0-0,999999-", "bytes=0-0, 20000-20001"):
            proxied = await client.get(link["url"], headers={"Range": odd})
            assert (proxied.status_code, proxied.content) == (206, b"\x00"), odd
        assert (await client.get("/api/links", headers={"Authorization": "Bearer t"})).json()["links"][0]["downloads"] == 0
        whole = await client.get(link["url"])
        assert whole.status_code == 302 and httpx.get(whole.headers["location"]).content == bytes(range(256)) * 40
        assert (await client.get(link["url"], headers={"User-Agent": "other", "Range": "bytes=0-0"})).status_code == 410


async def test_redirect_mode_asks_authorize_before_any_answer(aws: Seaweed) -> None:
    """A 304, 412 or 416 would say the file exists, and its ETag: the hook refuses first, as in proxy mode."""
    prefix = new_prefix()
    put_all(aws, prefix, {"f.txt": b"0123456789"})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}", s3_mode="redirect", authorize=lambda request, file: False)
    async with asgi_client(app) as client:
        for headers in ({"If-None-Match": "*"}, {"If-Match": '"other"'}, {"Range": "bytes=999-"}, {}):
            for path in ("/download/f.txt", "/download/missing.txt"):
                got = await client.get(path, headers=headers)
                assert (got.status_code, "etag" in got.headers) == (403, False), (path, headers)


def test_redirect_mode_needs_keys_at_start_up(seaweed: Seaweed) -> None:
    env = {k: v for k, v in seaweed.env(DOWNLOADER_S3_MODE="redirect").items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    done = run_cli("--port", "0", **env)
    assert (done.returncode, done.stderr) == (
        2, "downloader: DOWNLOADER_S3_MODE: redirect signs URLs itself: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set\n")


async def test_paths_no_key_can_have_are_404_not_store_errors(aws: Seaweed, tmp_path: Path) -> None:
    """A control character in a path (obstore refuses such keys) is a missing file, never a 502 or a 500, and no
    upstream error is counted; a folder marker (`photos/`, as consoles make) is not listed."""
    prefix = new_prefix()
    put_all(aws, prefix, {"photos/a.jpg": b"jpg"})
    put_raw(aws, f"{prefix}/photos/", b"")
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as client:
        for path in ("/download/a%01b.txt", "/download/a%09b.txt", "/download/a%7Fb.txt", "/zip/a%01b", "/download/photos", "/download/photos/"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/api/files", params={"cursor": downloader.encode_cursor("a\x01//../b")})).status_code == 200
        assert [f["path"] for f in (await client.get("/api/files")).json()["files"]] == ["photos/a.jpg"]
        assert "downloader_upstream_errors_total{" not in (await client.get("/metrics")).text


# ---------------------------------------------------------------------------
# The store failing: 502, 504, /healthz, metrics, start-up
# ---------------------------------------------------------------------------


@pytest.fixture
def relay(aws: Seaweed, monkeypatch: pytest.MonkeyPatch) -> Iterator[Relay]:
    """The app's way to the store through a Relay (counted, and made to fail at will)."""
    relay = Relay(aws.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)
    try:
        yield relay
    finally:
        relay.close()


async def test_store_failures_are_clear_json_errors(aws: Seaweed, relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloader, "S3_TIMEOUT_S", 1.0)
    prefix = new_prefix()
    put_all(aws, prefix, {"f.txt": b"fine"})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}")
    async with asgi_client(app) as client:
        assert (await client.get("/download/f.txt")).content == b"fine"
        relay.fail("refuse")
        for path in ("/download/f.txt", "/api/files", "/zip/"):
            down = await client.get(path)
            assert (down.status_code, down.json()) == (502, {"detail": "The object store failed"}), path
        health = await client.get("/healthz")
        assert health.status_code == 503 and health.json()["detail"].startswith("the bucket can't be read: ")
        relay.fail("hang")
        began = time.monotonic()
        slow = await client.get("/download/f.txt")
        assert (slow.status_code, slow.json()) == (504, {"detail": "The object store timed out"})
        assert time.monotonic() - began < 5
        began = time.monotonic()
        probe = await client.get("/healthz")
        assert probe.status_code == 503 and "the object store did not answer within" in probe.json()["detail"]
        assert time.monotonic() - began < 3  # S3_HEALTH_TIMEOUT_S: before a probe's own timeout
        metrics = (await client.get("/metrics")).text
        assert re.search(r'downloader_upstream_errors_total\{kind="failed"\} [1-9]', metrics), metrics
        assert re.search(r'downloader_upstream_errors_total\{kind="timeout"\} [1-9]', metrics), metrics
        relay.fail("pass")
        assert (await client.get("/download/f.txt")).content == b"fine"
        assert (await client.get("/healthz")).status_code == 200


START_UP_ERRORS = [
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "the object store can't be reached (AWS_ENDPOINT_URL)"),
    ({"AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "AWS_ENDPOINT_URL must be an http:// or https:// URL, like http://127.0.0.1:8333"),
    ({"AWS_ENDPOINT_URL": "http://[::1"}, "AWS_ENDPOINT_URL must be an http:// or https:// URL, like http://127.0.0.1:8333"),
    ({"AWS_ENDPOINT_URL": "http://user:pw@127.0.0.1:9"}, "AWS_ENDPOINT_URL must be an http:// or https:// URL, like http://127.0.0.1:8333"),
    ({"AWS_ENDPOINT_URL": "http://no-such-host.invalid:8333"}, "the object store can't be reached (AWS_ENDPOINT_URL)"),
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"),
    ({"DOWNLOADER_ROOT": "s3://no-such-bucket-here"}, "no such bucket"),
]


def test_an_endpoint_in_capitals_is_read_as_both_clients_read_it(seaweed: Seaweed) -> None:
    """The listing (urllib) and the downloads (obstore, which allows http only when told) agree on HTTP://."""
    env = seaweed.env(AWS_ENDPOINT_URL=seaweed.endpoint.replace("http://", "HTTP://"))
    assert downloader.Bucket(f"s3://{seaweed.bucket}", env).endpoint == seaweed.endpoint


@pytest.mark.parametrize(("change", "reason"), START_UP_ERRORS, ids=[r for _, r in START_UP_ERRORS])
def test_a_bucket_that_cant_be_read_stops_start_up_in_one_line(seaweed: Seaweed, change: dict[str, str], reason: str) -> None:
    env = {**seaweed.env(), **change}
    done = run_cli("--port", "0", **env)
    assert done.returncode == 2
    root = env["DOWNLOADER_ROOT"]
    assert done.stderr == f"downloader: DOWNLOADER_ROOT: {root}: {reason}\n"
    assert "wrong" not in done.stderr and seaweed.SECRET_KEY not in done.stderr  # no secret echoed


# ---------------------------------------------------------------------------
# Real servers and clients
# ---------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_big(seaweed: Seaweed, prefix: str, key: str, size: int, tmp_path: Path) -> str:
    """An object of `size` bytes of numbered random blocks (helpers.write_file), uploaded from a file; its sha256."""
    from helpers import write_file

    path = tmp_path / "upload.bin"
    digest = write_file(path, size)
    obstore.put(seaweed.store(prefix), key, path, chunk_size=8 * MIB)
    path.unlink()
    return digest


@pytest.fixture
def bucket_server(seaweed: Seaweed, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Server, str]]:
    """`python downloader.py` (downloader:HTTPProtocol) on a new prefix; yields it and the prefix."""
    prefix = new_prefix()
    server = cli_server(Path("unused"), tmp_path / "server.log", **seaweed.env(prefix))  # (DOWNLOADER_ROOT from env)
    try:
        yield server, prefix
    finally:
        server.stop(show_log=failed(request))


def test_curl_wget_aria2c_and_resume_against_a_proxied_object(seaweed: Seaweed, bucket_server: tuple[Server, str], tmp_path: Path) -> None:
    server, prefix = bucket_server
    digest = put_big(seaweed, prefix, "dir/big file.bin", 40 * MIB, tmp_path)
    url = f"{server.url}/download/dir/big%20file.bin"
    curl, wget, aria2c = need("curl"), need("wget"), need("aria2c")
    whole = tmp_path / "curl.bin"
    subprocess.run([curl, "-sSf", "-o", str(whole), url], check=True, timeout=120)
    assert hashlib.sha256(whole.read_bytes()).hexdigest() == digest
    # curl -C - and wget -c continue a file cut short.
    for tool, args in ((curl, ["-sSf", "-C", "-", "-o"]), (wget, ["-q", "-c", "-O"])):
        part = tmp_path / f"part-{Path(tool).name}.bin"
        part.write_bytes(whole.read_bytes()[: 13 * MIB + 7])
        subprocess.run([tool, *args, str(part), url], check=True, timeout=120)
        assert hashlib.sha256(part.read_bytes()).hexdigest() == digest, tool
    # aria2c: eight connections, each a range of the object.
    subprocess.run([aria2c, "-q", "-x8", "-s8", "-k1M", "--allow-overwrite=true", "-d", str(tmp_path), "-o", "aria.bin", url], check=True, timeout=120)
    assert hashlib.sha256((tmp_path / "aria.bin").read_bytes()).hexdigest() == digest
    ranged = [line for line in server.log_text().splitlines() if '"status": 206' in line]
    assert len(ranged) >= 8


def test_a_one_gib_object_is_byte_exact(seaweed: Seaweed, bucket_server: tuple[Server, str], tmp_path: Path) -> None:
    server, prefix = bucket_server
    digest = put_big(seaweed, prefix, "huge.bin", 1024 * MIB, tmp_path)
    got = hashlib.sha256()
    with httpx.stream("GET", f"{server.url}/download/huge.bin", timeout=60) as response:
        assert response.headers["content-length"] == str(1024 * MIB)
        for chunk in response.iter_bytes():
            got.update(chunk)
    assert got.hexdigest() == digest


def test_an_object_replaced_mid_download_aborts_it(seaweed: Seaweed, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Paced at 4 MiB/s, 24 MiB is three windows: the object replaced after the first aborts the transfer at
    the next window's If-Match, and what was sent is all of the first version."""
    prefix = new_prefix()
    old = os.urandom(24 * MIB)
    put_all(seaweed, prefix, {"moving.bin": old})
    env = seaweed.env(prefix, DOWNLOADER_RATE_LIMIT=str(4 * MIB))
    with cli_server(Path("unused"), tmp_path / "server.log", **env) as server:
        got, replaced = bytearray(), False
        with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", f"{server.url}/download/moving.bin", timeout=30) as response:
            for chunk in response.iter_bytes():
                got += chunk
                if len(got) >= MIB and not replaced:
                    put_all(seaweed, prefix, {"moving.bin": os.urandom(24 * MIB)})
                    replaced = True
        assert MIB <= len(got) < len(old)
        assert bytes(got) == old[: len(got)]
        assert '"aborted": "the object changed while being sent"' in server.log_text()
        if failed(request):
            print(server)


def test_a_client_that_leaves_stops_the_upstream_read(seaweed: Seaweed, tmp_path: Path) -> None:
    """Through a counting Relay: once the client has gone, the bytes read from the store stop growing, far short
    of the object (a read-ahead or an unclosed GET would go on to the end of its window or object)."""
    prefix = new_prefix()
    digest = put_big(seaweed, prefix, "long.bin", 64 * MIB, tmp_path)
    assert digest
    relay = Relay(seaweed.port)
    env = seaweed.env(prefix, AWS_ENDPOINT_URL=relay.url)
    try:
        with cli_server(Path("unused"), tmp_path / "server.log", **env) as server:
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(b"GET /download/long.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                received = 0
                while received < 2 * MIB:
                    received += len(sock.recv(65536))
                time.sleep(1)  # the server blocked on a client that reads no more
            before = relay.relayed
            wait_for(lambda: '"aborted": "the client disconnected"' in server.log_text(), 10, "the abort in the access log")
            time.sleep(1)
            after = relay.relayed
            assert after - before < 4 * MIB, (before, after)
            assert after < 24 * MIB
    finally:
        relay.close()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_memory_stays_flat_with_100_slow_clients(seaweed: Seaweed, bucket_server: tuple[Server, str], tmp_path: Path) -> None:
    """100 clients on one 64 MiB object, each reading 256 KiB and then pausing: the server's memory grows by
    the buffers of a connection each (README: about 1.7 MiB, mostly the HTTP client's read buffer), not by what
    the store could send: a window buffered per client would be 800 MiB, the object 6.4 GiB."""
    server, prefix = bucket_server
    put_big(seaweed, prefix, "shared.bin", 64 * MIB, tmp_path)
    socks = []
    before = rss_kib(server.pid)
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /download/shared.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        for sock in socks:
            received = 0
            while received < 256 * 1024:
                received += len(sock.recv(65536))
        time.sleep(2)  # as long again for the store to push whatever it would
        grown_mib = (rss_kib(server.pid) - before) / 1024
        print(f"RSS grew {grown_mib:.1f} MiB with 100 slow clients")
        assert grown_mib < 300  # 3 MiB a client
    finally:
        for sock in socks:
            sock.close()


def test_sigterm_ends_a_bucket_server_cleanly(seaweed: Seaweed, bucket_server: tuple[Server, str]) -> None:
    """Exit status 0 after serving: obstore's runtime threads must not abort the process on its way out."""
    server, prefix = bucket_server
    put_all(seaweed, prefix, {"f.txt": b"f", "big.bin": os.urandom(4 * MIB)})
    for _ in range(5):
        assert httpx.get(f"{server.url}/download/f.txt").content == b"f"
    assert httpx.get(f"{server.url}/download/missing").status_code == 404
    with httpx.stream("GET", f"{server.url}/download/big.bin") as response:  # left mid-body
        next(response.iter_bytes())
    stale = httpx.head(f"{server.url}/download/big.bin").headers["etag"]
    put_all(seaweed, prefix, {"big.bin": os.urandom(4 * MIB)})
    assert httpx.get(f"{server.url}/download/big.bin", headers={"Range": "bytes=1-", "If-Range": stale}).status_code == 200
    time.sleep(2)  # idle connections in the store client's pool age
    os.killpg(server.pid, signal.SIGTERM)
    assert server.proc.wait(15) == 0, server.log_text()[-2000:]


def test_cli_sign_and_add_check_the_object(seaweed: Seaweed, tmp_path: Path) -> None:
    prefix = new_prefix()
    put_all(seaweed, prefix, {"here.txt": b"here"})
    env = seaweed.env(prefix, DOWNLOADER_SECRET="k", DOWNLOADER_CATALOG=str(tmp_path / "c.db"))
    assert run_cli("sign", "here.txt", **env).returncode == 0
    assert run_cli("add", "here.txt", **env).stdout.count("/files/") == 1
    missing = run_cli("add", "gone.txt", **env)
    assert missing.returncode == 1 and "Not Found" in missing.stderr


def test_the_readme_example_serves_a_bucket(seaweed: Seaweed, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """README, Object storage: its exports (endpoint, bucket and keys made this server's) and its command."""
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- example: s3 -->\s*```sh\n(.*?)```", readme, re.S).group(1)
    env: dict[str, str] = {}
    command: list[str] = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            env.update(word.split("=", 1) for word in words[1:])
        elif words[:2] == ["python", "downloader.py"]:
            command = words
    assert sorted(env) == ["AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_SECRET_ACCESS_KEY", "DOWNLOADER_ROOT"]
    assert env["DOWNLOADER_ROOT"] == "s3://downloads/public" and seaweed.bucket == "downloads"
    put_all(seaweed, "public", {"readme.txt": b"from the bucket"})
    env.update({k: v for k, v in seaweed.env().items() if k.startswith("AWS_")})
    port = str(free_port())
    assert command[2:] == ["--port", "8002"]
    server = Server([sys.executable, "downloader.py", "--port", port], tmp_path / "server.log", env=env, port=int(port))
    try:
        got = httpx.get(f"{server.url}/download/readme.txt")
        assert (got.status_code, got.content) == (200, b"from the bucket")
        assert [f["path"] for f in httpx.get(f"{server.url}/api/files").json()["files"]] == ["readme.txt"]
    finally:
        server.stop(show_log=failed(request))


def test_aria2c_and_curl_follow_redirect_mode(seaweed: Seaweed, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """aria2c -x8 follows each connection's 302; on a one-time catalog link every segment's URL is bound to its
    range, and the download is counted once. curl -L -OJ saves the name the 302 carried (ASCII and filename*)."""
    prefix = new_prefix()
    digest = put_big(seaweed, prefix, "big.bin", 24 * MIB, tmp_path)
    env = seaweed.env(prefix, DOWNLOADER_S3_MODE="redirect", DOWNLOADER_CATALOG=str(tmp_path / "c.db"))
    aria2c, curl = need("aria2c"), need("curl")
    with cli_server(Path("unused"), tmp_path / "server.log", **env) as server:
        for name, url in (("plain.bin", f"{server.url}/download/big.bin"), ("link.bin", None)):
            if url is None:
                added = run_cli("add", "big.bin", "--max-downloads", "1", "--name", "r\u00e9sum\u00e9.bin", "--base-url", server.url, **env)
                url = added.stdout.split()[1]
            done = subprocess.run([aria2c, "-q", "-x8", "-s8", "-k1M", "-d", str(tmp_path), "-o", name, url], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
        assert httpx.get(url).status_code == 410  # the link's one download was counted
        listed = run_cli("list", **env).stdout
        assert "\t1\t1\t" in listed, listed
        work = tmp_path / "curl"
        work.mkdir()
        subprocess.run([curl, "-sSfLOJ", f"{server.url}/download/big.bin"], cwd=work, check=True, timeout=120)
        assert [p.name for p in work.iterdir()] == ["big.bin"]
        if failed(request):
            print(server)


def test_an_empty_prefix_is_served_with_a_note(seaweed: Seaweed, tmp_path: Path) -> None:
    """A prefix with no objects may be a new one, or a typo: served, with a note on stderr."""
    with cli_server(Path("unused"), tmp_path / "server.log", **seaweed.env("nothing-here-" + new_prefix())) as server:
        assert httpx.get(f"{server.url}/api/files").json() == {"files": [], "next_cursor": None}
        assert "holds no objects (yet): is the prefix spelt right?" in server.log_text()


async def test_a_folder_behind_many_hidden_keys_is_found_and_zipped(aws: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a folder exists, and what /zip holds, read past LIST_SCAN_KEYS (it bounds /api/files pages only)."""
    monkeypatch.setattr(downloader, "LIST_SCAN_KEYS", 3)
    monkeypatch.setattr(downloader, "S3_LIST_PAGE", 2)
    prefix = new_prefix()
    put_all(aws, prefix, {**{f"d/.cache/{i}": b"h" for i in range(6)}, "d/z.txt": b"z"})
    async with asgi_client(downloader.create_app(f"s3://{aws.bucket}/{prefix}")) as client:
        zipped = await client.get("/zip/d")
        assert zipped.status_code == 200
        assert zipfile.ZipFile(io.BytesIO(zipped.content)).namelist() == ["z.txt"]


async def test_store_reads_start_when_needed(aws: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first range's GET starts before the head (the others when the body reaches them: not 100 connections
    for 100 ranges at once); a hidden or unnameable folder is 404 without a listing."""
    prefix = new_prefix()
    put_all(aws, prefix, {"f.bin": bytes(range(64)), ".git/config": b"secret", "a.txt": b"a"})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}")
    bucket = app.state.service.bucket
    opened, listed, at_start = [], [], []
    open_window, list_keys = bucket.open_window, bucket.list_keys

    async def counted_open(*args):
        opened.append(args[1:3])
        return await open_window(*args)

    async def counted_list(*args):
        listed.append(args)
        return await list_keys(*args)

    monkeypatch.setattr(bucket, "open_window", counted_open)
    monkeypatch.setattr(bucket, "list_keys", counted_list)

    async def watched(scope, receive, send):
        async def send_watched(message):
            if message["type"] == "http.response.start":
                at_start.append(len(opened))
            await send(message)
        await app(scope, receive, send_watched)

    async with asgi_client(watched) as client:
        got = await client.get("/download/f.bin", headers={"Range": "bytes=0-0,10-10,20-20,30-30"})
        assert got.status_code == 206 and len(parse_byteranges(got)) == 4
        assert (at_start, len(opened)) == ([1], 4)
        listed.clear()
        for path in ("/zip/.git", "/zip/a%01b"):
            assert (await client.get(path)).status_code == 404
        assert listed == []


async def test_without_keys_the_listing_goes_through_obstore(aws: Seaweed) -> None:
    """With no keys in the environment (an instance's role) the listing is obstore's: the same files, pages and
    folders. (SeaweedFS needs keys, so the bucket's own signing keys are dropped after it is built: obstore keeps
    the ones it was configured with, and only our own ListObjectsV2 request is off.)"""
    prefix = new_prefix()
    names = ["a/b.txt", "a/z/y.txt", "a!.txt", "a.txt", ".hidden", "d/.cache/x", "d/z.txt"]
    put_all(aws, prefix, {name: name.encode() for name in names})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}")
    async with asgi_client(app) as client:
        ours = [f["path"] for f in (await client.get("/api/files")).json()["files"]]
        app.state.service.bucket.access_key = None
        listed = [f["path"] for f in (await client.get("/api/files")).json()["files"]]
        assert listed == ours and sorted(listed) == sorted(n for n in names if not downloader.is_hidden(n.split("/")))
        for limit in (1, 2):
            assert await pages(client, limit) == listed
        zipped = await client.get("/zip/d")
        assert zipfile.ZipFile(io.BytesIO(zipped.content)).namelist() == ["z.txt"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/zip/nothing")).status_code == 404


def test_a_store_connection_cut_mid_body_is_read_again_from_where_it_stopped(seaweed: Seaweed, tmp_path: Path) -> None:
    """Through a Relay whose open connections are reset each MiB the client gets (new ones still pass): the
    client gets every byte, once, in order, and the store's failures are counted."""
    prefix = new_prefix()
    digest = put_big(seaweed, prefix, "cut.bin", 12 * MIB, tmp_path)
    relay = Relay(seaweed.port)
    env = seaweed.env(prefix, AWS_ENDPOINT_URL=relay.url, DOWNLOADER_RATE_LIMIT=str(4 * MIB))
    try:
        with cli_server(Path("unused"), tmp_path / "server.log", **env) as server:
            got, cuts = hashlib.sha256(), 0
            with httpx.stream("GET", f"{server.url}/download/cut.bin", timeout=30) as response:
                received = 0
                for chunk in response.iter_bytes():
                    got.update(chunk)
                    received += len(chunk)
                    if received >= (cuts + 1) * MIB and cuts < 8:
                        relay.fail("pass")
                        cuts += 1
            assert (received, got.hexdigest()) == (12 * MIB, digest)
            failed_reads = re.search(r'downloader_upstream_errors_total\{kind="failed"\} (\d+)', httpx.get(f"{server.url}/metrics").text)
            assert failed_reads and int(failed_reads.group(1)) >= 1, server.log_text()[-2000:]
    finally:
        relay.close()


async def test_a_proxied_object_is_paced_in_the_rate_limits_steps(aws: Seaweed) -> None:
    """At 32 KiB/s, body messages of an eighth of a second's worth (4 KiB, paced_chunk_size), not 256 KiB bursts."""
    prefix = new_prefix()
    put_all(aws, prefix, {"slow.bin": bytes(64 * 1024)})
    app = downloader.create_app(f"s3://{aws.bucket}/{prefix}", rate_limit=32 * 1024)
    began = time.monotonic()
    status, _, body, messages = await asgi_exchange(app, b"/download/slow.bin")
    assert (status, len(body)) == (200, 64 * 1024)
    assert max(len(m["body"]) for m in messages) <= 4096
    assert time.monotonic() - began >= 1.5  # 64 KiB at 32 KiB/s: about 2 s
