"""Range requests, RFC 9110 §14: parse_range on plain values, then 206/416 through the app.

The unit table holds every case of Go's TestParseRange (src/net/http/range_test.go), adapted
to our semantics: Go's errors become None (ignore the header, send 200) or a 416; like Go,
overlapping ranges are served as asked, in request order. The HTTP table is modelled
on Go's ServeFileRangeTests (src/net/http/fs_test.go), for a 10-byte file.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from downloader import MAX_RANGES, ByteRange, HTTPError, create_app, parse_range
from helpers import parse_byteranges

R = ByteRange
DATA = b"0123456789"
SIZE = len(DATA)
BIG = bytes(range(256)) * 4  # room for MAX_RANGES + 1 disjoint one-byte ranges
MTIME = 784111777  # RFC 9110 §5.6.7's example: Sun, 06 Nov 1994 08:49:37 GMT
TEXT_TYPE = "text/plain; charset=utf-8"
BIN_TYPE = "application/octet-stream"
UNSATISFIABLE = "416"


def disjoint_ranges(count: int) -> str:
    """bytes=0-0,2-2,4-4,...: `count` one-byte ranges that neither overlap nor touch."""
    return "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(count))


# =============================================================================
# parse_range(value, size): ranges to serve, None to ignore the header, or a 416
# =============================================================================

# (value, size, want): want is a list of ByteRange, None, or UNSATISFIABLE.
PARSE_RANGE_CASES = [
    # --- Go's TestParseRange, errors: ours are "ignore the header" (None) ---
    ("", 0, None),
    ("", 1000, None),
    ("foo", 0, None),
    ("bytes=", 0, None),
    ("bytes=7", 10, None),
    ("bytes= 7 ", 10, None),
    ("bytes=1-", 0, None),  # empty file: Range is ignored, as Go does
    ("bytes=5-4", 10, None),
    ("bytes=0-2,5-4", 10, None),  # one invalid element invalidates the header
    ("bytes=2-5,4-3", 10, None),
    ("bytes=--5,4--3", 10, None),
    ("bytes=A-", 10, None),
    ("bytes=A- ", 10, None),
    ("bytes=A-Z", 10, None),
    ("bytes= -Z", 10, None),
    ("bytes=5-Z", 10, None),
    ("bytes=Ran-dom, garbage", 10, None),
    ("bytes=0x01-0x02", 10, None),
    ("bytes=         ", 10, None),  # range-set = 1#range-spec: an empty set is invalid
    ("bytes= , , ,   ", 10, None),
    # --- Go's TestParseRange, ranges ---
    ("bytes=0-9", 10, [R(0, 10)]),
    ("bytes=0-", 10, [R(0, 10)]),
    ("bytes=5-", 10, [R(5, 10)]),
    ("bytes=0-20", 10, [R(0, 10)]),
    ("bytes=15-,0-5", 10, [R(0, 6)]),
    ("bytes=1-2,5-", 10, [R(1, 3), R(5, 10)]),
    ("bytes=-2 , 7-", 11, [R(9, 11), R(7, 11)]),  # as Go: overlapping, both served
    ("bytes=0-0 ,2-2, 7-", 11, [R(0, 1), R(2, 3), R(7, 11)]),
    ("bytes=-5", 10, [R(5, 10)]),
    ("bytes=-15", 10, [R(0, 10)]),
    ("bytes=0-499", 10000, [R(0, 500)]),
    ("bytes=500-999", 10000, [R(500, 1000)]),
    ("bytes=-500", 10000, [R(9500, 10000)]),
    ("bytes=9500-", 10000, [R(9500, 10000)]),
    ("bytes=0-0,-1", 10000, [R(0, 1), R(9999, 10000)]),
    ("bytes=500-600,601-999", 10000, [R(500, 601), R(601, 1000)]),  # adjacent, not overlapping
    ("bytes=500-700,601-999", 10000, [R(500, 701), R(601, 1000)]),  # as Go
    ("bytes=   1 -2   ,  4- 5, 7 - 8 , ,,", 11, [R(1, 3), R(4, 6), R(7, 9)]),  # Apache laxity
    # --- Go's TestServeFileRejectsInvalidSuffixLengths (Go answers 416 "invalid range") ---
    ("bytes=--6", 10, None),
    ("bytes=--0", 10, None),
    ("bytes=---0", 10, None),
    ("bytes=-6-", 10, None),
    ("bytes=-6", 10, [R(4, 10)]),
    ("bytes=6-", 10, [R(6, 10)]),
    # RFC 9110 §14.1.1: satisfiable needs "a suffix-range with a non-zero suffix-length".
    # Go serves an empty 206 here.
    ("bytes=-0", 10, UNSATISFIABLE),
    # --- edges of a 10-byte file ---
    ("bytes=0-0", 10, [R(0, 1)]),
    ("bytes=9-", 10, [R(9, 10)]),
    ("bytes=9-9", 10, [R(9, 10)]),
    ("bytes=-10", 10, [R(0, 10)]),
    ("bytes=-1", 10, [R(9, 10)]),
    ("bytes=5-2", 10, None),  # last-pos < first-pos: invalid (§14.1.1)
    ("bytes=5-1000", 10, [R(5, 10)]),
    ("bytes=10-", 10, UNSATISFIABLE),
    ("bytes=10-10", 10, UNSATISFIABLE),
    ("bytes=10-11", 10, UNSATISFIABLE),
    ("bytes=100-1000", 10, UNSATISFIABLE),
    ("bytes=-0,-0", 10, UNSATISFIABLE),
    ("bytes=10-,-0", 10, UNSATISFIABLE),
    ("bytes=-0,0-1", 10, [R(0, 2)]),  # unsatisfiable elements are dropped
    ("bytes=20-,7-8", 10, [R(7, 9)]),
    ("bytes=8-,20-", 10, [R(8, 10)]),
    # RFC 9110 §14.1.1: "recipients MUST anticipate potentially large decimal numerals".
    ("bytes=0-99999999999999999999999", 10, [R(0, 10)]),
    ("bytes=-99999999999999999999999", 10, [R(0, 10)]),
    ("bytes=99999999999999999999999-", 10, UNSATISFIABLE),
    # --- numbers are 1*DIGIT (§14.1.1): no signs, underscores or non-ASCII digits ---
    ("bytes=+1-2", 10, None),
    ("bytes=1-+2", 10, None),
    ("bytes=-+2", 10, None),
    ("bytes=0-0_1", 10, None),
    ("bytes=\uff11-2", 10, None),  # FULLWIDTH DIGIT ONE
    ("bytes=1.0-2", 10, None),
    ("bytes=1-2-3", 10, None),
    # --- the unit: case-insensitive (§14.1), only "bytes" ---
    ("Bytes=0-1", 10, [R(0, 2)]),
    ("BYTES=0-1", 10, [R(0, 2)]),
    ("items=0-1", 10, None),
    ("byte=0-1", 10, None),
    ("bytes 0-1", 10, None),
    ("=0-1", 10, None),
    ("0-1", 10, None),
    # --- whitespace (OWS = SP / HTAB) and empty list elements (§5.6.1) ---
    ("bytes= 0-1", 10, [R(0, 2)]),
    ("bytes=0-1 ", 10, [R(0, 2)]),
    ("bytes=\t0 - 1\t", 10, [R(0, 2)]),
    ("bytes=0-1,", 10, [R(0, 2)]),
    ("bytes=,0-1", 10, [R(0, 2)]),
    ("bytes=0-1,,5-6", 10, [R(0, 2), R(5, 7)]),
    # --- duplicates and overlaps are served as asked, in request order (as Go and nginx) ---
    ("bytes=1-2,1-2", 10, [R(1, 3), R(1, 3)]),
    ("bytes=-3,7-", 10, [R(7, 10), R(7, 10)]),
    ("bytes=0-4,3-7", 10, [R(0, 5), R(3, 8)]),
    ("bytes=3-7,0-4", 10, [R(3, 8), R(0, 5)]),
    ("bytes=6-8,0-2,7-9", 10, [R(6, 9), R(0, 3), R(7, 10)]),
    ("bytes=0-1,4-5,1-4", 10, [R(0, 2), R(4, 6), R(1, 5)]),
    # --- otherwise request order is kept (no sorting) ---
    ("bytes=7-8,0-1", 10, [R(7, 9), R(0, 2)]),
    ("bytes=-1,0-0", 10, [R(9, 10), R(0, 1)]),
    # --- Go's guard: ranges adding up to more than the file are ignored ---
    ("bytes=0-,1-,2-,3-,4-", 10, None),
    ("bytes=0-9,0-9", 10, None),
    ("bytes=-6,-6", 10, None),
    ("bytes=0-4,5-9", 10, [R(0, 5), R(5, 10)]),  # exactly the size is allowed
    # --- empty file: any Range is ignored (Go's "limit the size" clients) ---
    ("bytes=0-", 0, None),
    ("bytes=0-0", 0, None),
    ("bytes=-1", 0, None),
    ("bytes=-0", 0, None),
    ("bytes=5-", 0, None),
    # --- MAX_RANGES ---
    (disjoint_ranges(MAX_RANGES), 1024, [R(2 * i, 2 * i + 1) for i in range(MAX_RANGES)]),
    (disjoint_ranges(MAX_RANGES + 1), 1024, None),
]


def parse_range_id(case: tuple[str, int, object]) -> str:
    value, size, _ = case
    if value.startswith("bytes=0-0,2-2,4-4,"):
        value = f"{value.count(',') + 1} disjoint ranges"
    value = value or "(empty)"
    return value if size == SIZE else f"{value} (size {size})"


@pytest.mark.parametrize(
    ("value", "size", "want"), PARSE_RANGE_CASES, ids=[parse_range_id(c) for c in PARSE_RANGE_CASES]
)
def test_parse_range(value: str, size: int, want: object) -> None:
    if want == UNSATISFIABLE:
        with pytest.raises(HTTPError) as info:
            parse_range(value, size)
        assert (info.value.status, info.value.headers) == (416, {"Content-Range": f"bytes */{size}"})
    else:
        assert parse_range(value, size) == want


@pytest.mark.parametrize(
    ("byte_range", "length", "content_range"),
    [
        (R(0, 1), 1, "bytes 0-0/10"),
        (R(0, 10), 10, "bytes 0-9/10"),
        (R(3, 8), 5, "bytes 3-7/10"),
        (R(9, 10), 1, "bytes 9-9/10"),
    ],
    ids=["first-byte", "whole", "middle", "last-byte"],
)
def test_byte_range_length_and_content_range(byte_range: ByteRange, length: int, content_range: str) -> None:
    assert (byte_range.length, byte_range.content_range(SIZE)) == (length, content_range)


# =============================================================================
# Through the app: GET /download/ten.txt with Range
# =============================================================================


@pytest.fixture
def ten_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for name, content in (("ten.txt", DATA), ("empty.txt", b""), ("big.bin", BIG)):
        (root / name).write_bytes(content)
        os.utime(root / name, (MTIME, MTIME))
    return root


@pytest.fixture
async def ten_client(ten_root: Path, anyio_backend: str):
    transport = httpx.ASGITransport(app=create_app(str(ten_root)))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def assert_ranges_served(response: httpx.Response, spans: list[tuple[int, int]], data: bytes, media_type: str) -> None:
    """A 206 with exactly these [start, stop) spans of `data`, single-part or multipart."""
    size = len(data)
    assert response.status_code == 206
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["accept-ranges"] == "bytes"
    if len(spans) == 1:
        (start, stop), = spans
        assert response.headers["content-type"] == media_type
        assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
        assert response.content == data[start:stop]
    else:
        # RFC 9110 §14.6: a multipart response has no Content-Range of its own.
        assert response.headers.get("content-range") is None
        assert parse_byteranges(response) == [
            ({"content-type": media_type, "content-range": f"bytes {start}-{stop - 1}/{size}"}, data[start:stop])
            for start, stop in spans
        ]


def assert_whole_file(response: httpx.Response, data: bytes, media_type: str) -> None:
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["content-type"] == media_type
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers.get("content-range") is None


def assert_unsatisfiable(response: httpx.Response, size: int) -> None:
    """416 with Content-Range: bytes */size (RFC 9110 §15.5.17) and a JSON error body."""
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    payload = response.json()
    assert list(payload) == ["detail"]
    assert type(payload["detail"]) is str


WHOLE = None
# (Range header, want): want is a list of [start, stop) spans of ten.txt, WHOLE (200), or
# UNSATISFIABLE (416). Modelled on Go's ServeFileRangeTests.
RANGE_CASES = [
    ("bytes=0-4", [(0, 5)]),
    ("bytes=2-", [(2, 10)]),
    ("bytes=-5", [(5, 10)]),
    ("bytes=3-7", [(3, 8)]),
    ("bytes=0-0,-2", [(0, 1), (8, 10)]),
    ("bytes=0-1,5-8", [(0, 2), (5, 9)]),
    ("bytes=0-1,5-", [(0, 2), (5, 10)]),
    ("bytes=5-1000", [(5, 10)]),
    ("bytes=0-,1-,2-,3-,4-", WHOLE),  # ignore a wasteful request (sum of lengths > size)
    ("bytes=0-8", [(0, 9)]),
    ("bytes=0-9", [(0, 10)]),
    ("bytes=0-10", [(0, 10)]),
    ("bytes=9-10", [(9, 10)]),
    ("bytes=9-", [(9, 10)]),
    ("bytes=10-", UNSATISFIABLE),
    ("bytes=10-11", UNSATISFIABLE),
    ("bytes=11-11", UNSATISFIABLE),
    ("bytes=10-100", UNSATISFIABLE),
    ("bytes=11-100", UNSATISFIABLE),
    ("bytes=100-", UNSATISFIABLE),
    ("bytes=100-1000", UNSATISFIABLE),
    ("bytes=-0", UNSATISFIABLE),
    ("bytes=-0,10-", UNSATISFIABLE),
    ("bytes=-0,0-1", [(0, 2)]),
    ("bytes=15-,0-5", [(0, 6)]),
    ("bytes=0-0", [(0, 1)]),
    ("bytes=-1", [(9, 10)]),
    ("bytes=-10", [(0, 10)]),
    ("bytes=-15", [(0, 10)]),
    ("bytes=5-2", WHOLE),
    ("bytes=--6", WHOLE),
    ("bytes=-6-", WHOLE),
    ("bytes=7", WHOLE),
    ("bytes=", WHOLE),
    ("bytes=A-Z", WHOLE),
    ("bytes=0-2,5-4", WHOLE),
    ("bytes=+1-2", WHOLE),
    ("bytes= 1 - 2 , 4 - 5 ", [(1, 3), (4, 6)]),
    ("bytes=0-1,,5-6,", [(0, 2), (5, 7)]),
    ("bytes=1-2,1-2", [(1, 3), (1, 3)]),
    ("bytes=0-4,3-7", [(0, 5), (3, 8)]),
    ("bytes=6-8,0-2,7-9", [(6, 9), (0, 3), (7, 10)]),
    ("bytes=7-8,0-1", [(7, 9), (0, 2)]),
    ("bytes=-1,0-0,4-5", [(9, 10), (0, 1), (4, 6)]),
    ("items=0-1", WHOLE),
    ("Bytes=0-1", [(0, 2)]),
    ("BYTES=3-4,0-0", [(3, 5), (0, 1)]),
    ("bytes=0-9,0-9", WHOLE),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("header", "want"), RANGE_CASES, ids=[header for header, _ in RANGE_CASES])
async def test_range(ten_client: httpx.AsyncClient, header: str, want: object) -> None:
    response = await ten_client.get("/download/ten.txt", headers={"Range": header})
    if want is WHOLE:
        assert_whole_file(response, DATA, TEXT_TYPE)
    elif want == UNSATISFIABLE:
        assert_unsatisfiable(response, SIZE)
    else:
        assert_ranges_served(response, want, DATA, TEXT_TYPE)


@pytest.mark.anyio
async def test_no_range_is_whole_200(ten_client: httpx.AsyncClient) -> None:
    assert_whole_file(await ten_client.get("/download/ten.txt"), DATA, TEXT_TYPE)


def without_boundary(headers: httpx.Headers) -> dict[str, str]:
    """Headers as a dict, with a multipart boundary (which may differ per response) masked."""
    result = dict(headers)
    media_type, _, parameter = result.get("content-type", "").partition("; boundary=")
    if media_type == "multipart/byteranges":
        result["content-type"] = f"{media_type}; boundary=<{len(parameter)} chars>"
    return result


HEAD_CASES = [None, "bytes=0-4", "bytes=-3", "bytes=0-1,5-6", "bytes=0-,1-,2-,3-,4-", "items=0-1"]


@pytest.mark.anyio
@pytest.mark.parametrize("header", HEAD_CASES, ids=[h or "no-range" for h in HEAD_CASES])
async def test_head_with_range_has_get_headers_and_no_body(ten_client: httpx.AsyncClient, header: str | None) -> None:
    """RFC 9110 §9.3.2: HEAD gets the header fields GET would get, and no content."""
    headers = {"Range": header} if header else {}
    get = await ten_client.get("/download/ten.txt", headers=headers)
    head = await ten_client.head("/download/ten.txt", headers=headers)
    assert (head.status_code, head.content) == (get.status_code, b"")
    assert without_boundary(head.headers) == without_boundary(get.headers)


EMPTY_FILE_CASES = ["bytes=0-", "bytes=0-0", "bytes=-1", "bytes=-0", "bytes=5-", "bytes=0-1,3-4"]


@pytest.mark.anyio
@pytest.mark.parametrize("header", EMPTY_FILE_CASES, ids=EMPTY_FILE_CASES)
async def test_range_on_empty_file_is_200_without_content_range(ten_client: httpx.AsyncClient, header: str) -> None:
    """Go's serveContent: some clients send Range on every request; an empty file gets a 200."""
    response = await ten_client.get("/download/empty.txt", headers={"Range": header})
    assert_whole_file(response, b"", TEXT_TYPE)


@pytest.mark.anyio
async def test_max_ranges_disjoint_ranges_are_served_as_multipart(ten_client: httpx.AsyncClient) -> None:
    response = await ten_client.get("/download/big.bin", headers={"Range": disjoint_ranges(MAX_RANGES)})
    assert_ranges_served(response, [(2 * i, 2 * i + 1) for i in range(MAX_RANGES)], BIG, BIN_TYPE)


@pytest.mark.anyio
async def test_more_than_max_ranges_is_whole_200(ten_client: httpx.AsyncClient) -> None:
    response = await ten_client.get("/download/big.bin", headers={"Range": disjoint_ranges(MAX_RANGES + 1)})
    assert_whole_file(response, BIG, BIN_TYPE)


@pytest.mark.anyio
async def test_unsatisfiable_range_carries_no_validators(ten_client: httpx.AsyncClient) -> None:
    """STYLE.md §2 (Go's serveError): error_response drops ETag and Last-Modified."""
    response = await ten_client.get("/download/ten.txt", headers={"Range": "bytes=10-"})
    assert_unsatisfiable(response, SIZE)
    assert (response.headers.get("etag"), response.headers.get("last-modified")) == (None, None)
