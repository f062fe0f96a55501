"""Section 4 header values: Content-Disposition (RFC 6266, RFC 8187), Content-Type,
validators, and every download header through HTTP."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import downloader
from conftest import OLD_MTIME, TEN, UNICODE_NAME

DISPOSITION = [
    ("report.pdf", 'attachment; filename="report.pdf"'),
    ("a b.txt", 'attachment; filename="a b.txt"'),
    ("semi;colon.txt", 'attachment; filename="semi;colon.txt"'),
    ('say "hi".txt', "attachment; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20%22hi%22.txt"),
    ("back\\slash.txt", "attachment; filename=\"back_slash.txt\"; filename*=UTF-8''back%5Cslash.txt"),
    ("100%.txt", "attachment; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
    ("crlf\r\nSet-Cookie: x=1", "attachment; filename=\"crlf__Set-Cookie: x=1\"; filename*=UTF-8''crlf%0D%0ASet-Cookie%3A%20x%3D1"),
    ("résumé.pdf", "attachment; filename=\"resume.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"),
    ("数据.bin", "attachment; filename=\"__.bin\"; filename*=UTF-8''%E6%95%B0%E6%8D%AE.bin"),
    ("emoji 😀.txt", "attachment; filename=\"emoji _.txt\"; filename*=UTF-8''emoji%20%F0%9F%98%80.txt"),
    ("tab\there", "attachment; filename=\"tab_here\"; filename*=UTF-8''tab%09here"),
    ("attr!#$&+-.^_`|~.txt", 'attachment; filename="attr!#$&+-.^_`|~.txt"'),
]


@pytest.mark.parametrize(("name", "header"), DISPOSITION, ids=[n for n, _ in DISPOSITION])
def test_content_disposition(name: str, header: str) -> None:
    assert downloader.content_disposition(name) == header


def test_content_disposition_inline() -> None:
    assert downloader.content_disposition("a.pdf", "inline") == 'inline; filename="a.pdf"'


def decode_filename_star(header: str) -> str | None:
    for param in header.split("; "):
        if param.startswith("filename*=UTF-8''"):
            return urllib.parse.unquote(param[len("filename*=UTF-8''"):], errors="strict")
    return None


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60))
def test_content_disposition_is_safe_and_round_trips(name: str) -> None:
    header = downloader.content_disposition(name)
    header.encode("ascii")  # printable ASCII: latin-1 safe, no CR or LF, no header injection
    assert header.isprintable()
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert '"' not in fallback and "\\" not in fallback
    star = decode_filename_star(header)
    assert (star if star is not None else fallback) == name


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60))
def test_utf8_fallback_is_safe_and_decodes_to_the_name_for_plain_names(name: str) -> None:
    header = downloader.content_disposition(name, utf8_fallback=True)
    raw = header.encode("latin-1")  # travels as bytes: the UTF-8 of the name
    assert b"\r" not in raw and b"\n" not in raw and all(b >= 0x20 for b in raw)
    fallback = raw.split(b'filename="', 1)[1].split(b'"', 1)[0].decode("utf-8")
    if name.isprintable() and not any(char in name for char in '"\\/'):
        assert fallback == name
    star = decode_filename_star(header)
    assert (star if star is not None else fallback) == name


@given(st.text(min_size=1, max_size=40) | st.sampled_from(["．．／etc／passwd", "..", "../../x", "a/b", "ａ＼ｂ", "...", "x..y"]))
def test_no_fallback_holds_a_separator_or_a_dot_dot(name: str) -> None:
    """Issue "Hardening" #10: NFKD turns `．．／etc／passwd` into `../etc/passwd`; no fallback may."""
    for utf8_fallback in (False, True):
        header = downloader.content_disposition(name, utf8_fallback=utf8_fallback)
        fallback = header.encode("latin-1").split(b'filename="', 1)[1].split(b'"', 1)[0]
        assert b"/" not in fallback and b"\\" not in fallback
        if not utf8_fallback:
            assert b".." not in fallback
        star = decode_filename_star(header)
        assert (star if star is not None else fallback.decode("utf-8")) == name  # the exact name, in filename*
    assert downloader.ascii_filename("．．／etc／passwd") == "___etc_passwd"


@pytest.mark.anyio
async def test_curl_gets_the_utf8_name_in_filename(client) -> None:
    """curl -J reads only filename= (curl/curl#1888), so curl gets UTF-8 there."""
    response = await client.get("/download/" + urllib.parse.quote(UNICODE_NAME), headers={"User-Agent": "curl/8.5.0"})
    raw = response.headers.raw
    value = dict((k.lower(), v) for k, v in raw)[b"content-disposition"]
    assert value == (
        'attachment; filename="résumé 数据.txt"; '.encode() + b"filename*=UTF-8''r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    )


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("a.txt", "text/plain; charset=utf-8"),
        ("a.TXT", "text/plain; charset=utf-8"),
        ("a.csv", "text/csv; charset=utf-8"),
        ("a.html", "text/html; charset=utf-8"),
        ("a.pdf", "application/pdf"),
        ("a.png", "image/png"),
        ("a.tar.gz", "application/gzip"),
        ("a.zip", "application/zip"),
        ("a.json", "application/json"),
        ("a.mp4", "video/mp4"),
        ("a.unknownext", "application/octet-stream"),
        ("noext", "application/octet-stream"),
    ],
)
def test_media_type_for(name: str, media_type: str) -> None:
    assert downloader.media_type_for(name, downloader.build_media_types()) == media_type


def test_make_etag_is_strong_and_changes_with_size_and_mtime() -> None:
    tag = downloader.make_etag(10, 1_000_000_000)
    assert tag.startswith('"') and tag.endswith('"')
    assert tag != downloader.make_etag(11, 1_000_000_000)
    assert tag != downloader.make_etag(10, 1_000_000_001)


def test_http_date() -> None:
    assert downloader.http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.anyio
async def test_every_download_header(client, root: Path) -> None:
    response = await client.get("/download/ten.txt", headers={"Accept-Encoding": "identity"})
    mtime_ns = (root / "ten.txt").stat().st_mtime_ns
    assert response.status_code == 200
    assert response.content == TEN
    assert dict(response.headers) == {
        "content-type": "text/plain; charset=utf-8",
        "content-length": "10",
        "content-disposition": 'attachment; filename="ten.txt"',
        "accept-ranges": "bytes",
        "last-modified": downloader.http_date(OLD_MTIME),
        "etag": downloader.make_etag(10, mtime_ns),
        "cache-control": "no-cache, no-transform",
        "x-content-type-options": "nosniff",
    }


@pytest.mark.anyio
@pytest.mark.parametrize(("accept", "guard"), [("gzip", [""]), ("gzip, deflate, br", [""]), ("br;q=1.0, identity;q=0.5", [""]), ("identity", []), ("", [])])
async def test_empty_content_encoding_when_a_coding_is_accepted(client, accept: str, guard: list[str]) -> None:
    response = await client.get("/download/ten.txt", headers={"Accept-Encoding": accept})
    assert response.headers.get_list("content-encoding") == guard
    assert response.content == TEN


@pytest.mark.parametrize(
    ("value", "wanted"),
    [("no-cache", "no-cache, no-transform"), ("public, max-age=60", "public, max-age=60, no-transform"), ("no-store, No-Transform", "no-store, No-Transform"), ("", "no-transform")],
)
def test_no_transform_is_always_there(value: str, wanted: str) -> None:
    assert downloader.no_transform(value) == wanted


@pytest.mark.anyio
async def test_head_has_the_get_headers_and_no_body(client) -> None:
    get = await client.get("/download/ten.txt")
    head = await client.head("/download/ten.txt")
    assert (head.status_code, head.content) == (200, b"")
    assert dict(head.headers) == dict(get.headers)


@pytest.mark.anyio
async def test_non_ascii_name_gets_filename_star(client) -> None:
    response = await client.get("/download/" + urllib.parse.quote(UNICODE_NAME))
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"resume __.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    )


@pytest.mark.anyio
async def test_empty_file(client) -> None:
    response = await client.get("/download/empty.txt")
    assert (response.status_code, response.content, response.headers["content-length"]) == (200, b"", "0")


@pytest.mark.anyio
async def test_cache_control_is_configurable(root: Path) -> None:
    import httpx

    app = downloader.create_app(root, cache_control="private, max-age=60")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/download/ten.txt")
    assert response.headers["cache-control"] == "private, max-age=60, no-transform"


@pytest.mark.anyio
async def test_etag_changes_when_the_file_changes(client, root: Path) -> None:
    first = (await client.get("/download/ten.txt")).headers["etag"]
    (root / "ten.txt").write_bytes(b"9876543210")
    second = (await client.get("/download/ten.txt")).headers["etag"]
    assert first != second


def test_last_modified_is_never_after_date_even_for_a_future_mtime(live_server, root: Path) -> None:
    """RFC 9110 §8.8.2.1: never a Last-Modified later than the Date. A file dated in the
    future is shown as modified now, and uvicorn's Date trails the clock by up to a second,
    so requests are made for 1.5 s to cross a second boundary before its Date catches up."""
    import email.utils
    import http.client
    import time as clock

    (root / "future.txt").write_bytes(b"from the future")
    os.utime(root / "future.txt", (4_102_444_800, 4_102_444_800))  # 2100-01-01
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
    deadline, seen = clock.monotonic() + 1.5, 0
    while clock.monotonic() < deadline:
        conn.request("HEAD", "/download/future.txt")
        response = conn.getresponse()
        response.read()
        date = email.utils.parsedate_to_datetime(response.getheader("Date"))
        modified = email.utils.parsedate_to_datetime(response.getheader("Last-Modified"))
        assert modified <= date
        seen += 1
    conn.close()
    assert seen > 10
