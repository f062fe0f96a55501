"""Conditional requests, RFC 9110 §13: the check_if_* decisions on plain values, their
composition in evaluate_preconditions (§13.2.2), then 304/412/If-Range through the app.

Cases are modelled on Go's TestServeContent named cases and Test_scanETag
(src/net/http/fs_test.go). Dates use RFC 9110 §5.6.7's own example instant in all three
HTTP-date forms.
"""

from __future__ import annotations

import email.utils
import os
import time
from pathlib import Path

import httpx
import pytest

import downloader
from downloader import (
    Cond,
    check_if_match,
    check_if_modified_since,
    check_if_none_match,
    check_if_range,
    check_if_unmodified_since,
    create_app,
    evaluate_preconditions,
    make_etag,
)

NONE, TRUE, FALSE = Cond.NONE, Cond.TRUE, Cond.FALSE
ETAG = '"xyzzy"'
MTIME = 784111777
IMF = "Sun, 06 Nov 1994 08:49:37 GMT"  # == Last-Modified of MTIME
RFC850 = "Sunday, 06-Nov-94 08:49:37 GMT"
ASCTIME = "Sun Nov  6 08:49:37 1994"
LATER = "Sun, 06 Nov 1994 08:49:38 GMT"
EARLIER = "Sun, 06 Nov 1994 08:49:36 GMT"
DAY_BEFORE_RFC850 = "Saturday, 05-Nov-94 08:49:37 GMT"
DAY_BEFORE_ASCTIME = "Sat Nov  5 08:49:37 1994"
TWO_DATES = f"{IMF}, {IMF}"  # §13.1.3/§13.1.4: "more than one member" means ignore
DATA = b"0123456789"
TEXT_TYPE = "text/plain; charset=utf-8"
# The default cache_control "no-cache", plus the no-transform the app always adds.
CACHE_CONTROL = "no-cache, no-transform"


def case_id(value: str | None) -> str:
    if value is None:
        return "absent"
    return value or "(empty)"


# =============================================================================
# check_if_match: strong comparison, "*" true (RFC 9110 §13.1.1)
# =============================================================================

IF_MATCH_CASES = [
    (None, NONE),
    (ETAG, TRUE),
    (f'"other", {ETAG}', TRUE),  # Go: ifmatch_matches
    (f'"other",{ETAG}', TRUE),
    (f"  {ETAG}  ", TRUE),
    (f"{ETAG},", TRUE),  # §5.6.1.2: empty list elements are ignored
    (f",{ETAG}", TRUE),
    (f'"a", , {ETAG}', TRUE),
    (f'W/"other", {ETAG}', TRUE),
    ("*", TRUE),  # Go: ifmatch_star
    (" * ", TRUE),
    ('"other"', FALSE),  # Go: ifmatch_failed
    ('"a", "b"', FALSE),
    (f"W/{ETAG}", FALSE),  # Go: ifmatch_fails_on_weak_etag; weak tags never match strongly
    ('"XYZZY"', FALSE),  # opaque-tags compare octet by octet
    ("xyzzy", FALSE),  # not an entity-tag: nothing listed matches
    ('"xyzzy', FALSE),  # Go Test_scanETag: unterminated
    (f"w/{ETAG}", FALSE),  # Go Test_scanETag: "W/" is case-sensitive
    ('"xy zzy"', FALSE),  # Go Test_scanETag: SP is not an etagc
]


@pytest.mark.parametrize(("value", "want"), IF_MATCH_CASES, ids=[case_id(v) for v, _ in IF_MATCH_CASES])
def test_check_if_match(value: str | None, want: Cond) -> None:
    assert check_if_match(value, ETAG) is want


# =============================================================================
# check_if_none_match: weak comparison, "*" false for an existing file (§13.1.2)
# =============================================================================

IF_NONE_MATCH_CASES = [
    (None, ETAG, NONE),
    (ETAG, ETAG, FALSE),  # Go: not_modified_etag
    (f"W/{ETAG}", ETAG, FALSE),  # weak comparison ignores W/
    (f'"baz", W/{ETAG}', ETAG, FALSE),  # Go: not_modified_etag_no_seek
    (f'"a",{ETAG}', ETAG, FALSE),
    (f'"a", , {ETAG} ,', ETAG, FALSE),
    (f"  {ETAG}  ", ETAG, FALSE),
    ("*", ETAG, FALSE),
    (" * ", ETAG, FALSE),
    ('"a,b"', '"a,b"', FALSE),  # a comma is an etagc: it does not split a quoted tag
    ('"XYZZY"', ETAG, TRUE),  # Go: if_none_match_mismatch
    ('"a", "b"', ETAG, TRUE),
    (",", ETAG, TRUE),  # Go: if_none_match_malformed
    ("xyzzy", ETAG, TRUE),
    ('"xyzzy', ETAG, TRUE),
    (f"w/{ETAG}", ETAG, TRUE),
]


@pytest.mark.parametrize(
    ("value", "etag", "want"), IF_NONE_MATCH_CASES, ids=[case_id(v) for v, _, _ in IF_NONE_MATCH_CASES]
)
def test_check_if_none_match(value: str | None, etag: str, want: Cond) -> None:
    assert check_if_none_match(value, etag) is want


# =============================================================================
# check_if_modified_since / check_if_unmodified_since (§13.1.3, §13.1.4)
# =============================================================================

# (value, mtime, If-Modified-Since result, If-Unmodified-Since result)
DATE_CASES = [
    (None, MTIME, NONE, NONE),
    (IMF, MTIME, FALSE, TRUE),  # Go: not_modified_modtime / if_unmodified_since_true
    (RFC850, MTIME, FALSE, TRUE),
    (ASCTIME, MTIME, FALSE, TRUE),
    (LATER, MTIME, FALSE, TRUE),
    (EARLIER, MTIME, TRUE, FALSE),  # Go: if_unmodified_since_false
    (DAY_BEFORE_RFC850, MTIME, TRUE, FALSE),
    (DAY_BEFORE_ASCTIME, MTIME, TRUE, FALSE),
    # Last-Modified has whole seconds, so a sub-second mtime compares by its second (as Go).
    (IMF, MTIME + 0.75, FALSE, TRUE),
    (EARLIER, MTIME + 0.75, TRUE, FALSE),
    # "A recipient MUST ignore ... if the received field value is not a valid HTTP-date,
    # or if the field value has more than one member."
    ("yesterday", MTIME, NONE, NONE),
    ("", MTIME, NONE, NONE),
    ("1994-11-06T08:49:37Z", MTIME, NONE, NONE),
    (TWO_DATES, MTIME, NONE, NONE),
    ("Sun, 06 Nov 1994 25:49:37 GMT", MTIME, NONE, NONE),
    ("Sun, 32 Nov 1994 08:49:37 GMT", MTIME, NONE, NONE),
    ("Sun, 06 Foo 1994 08:49:37 GMT", MTIME, NONE, NONE),
    ("Sun, 06 Nov 1994 08:49:37", MTIME, NONE, NONE),  # IMF-fixdate ends in "GMT"
    ("Sun, 6 Nov 1994 08:49:37 GMT", MTIME, NONE, NONE),  # day = 2DIGIT
]
DATE_IDS = [case_id(v) + ("" if m == MTIME else " (sub-second mtime)") for v, m, _, _ in DATE_CASES]


@pytest.mark.parametrize(("value", "mtime", "want", "_"), DATE_CASES, ids=DATE_IDS)
def test_check_if_modified_since(value: str | None, mtime: float, want: Cond, _: Cond) -> None:
    assert check_if_modified_since(value, mtime) is want


@pytest.mark.parametrize(("value", "mtime", "_", "want"), DATE_CASES, ids=DATE_IDS)
def test_check_if_unmodified_since(value: str | None, mtime: float, _: Cond, want: Cond) -> None:
    assert check_if_unmodified_since(value, mtime) is want


# =============================================================================
# check_if_range (§13.1.5): strong ETag match, or a date equal to Last-Modified that is a
# strong validator (§8.8.2.2: the file changed at least one second before now)
# =============================================================================

LONG_AGO = MTIME + 3600
IF_RANGE_CASES = [
    ("absent", None, MTIME, LONG_AGO, NONE),
    ("etag", ETAG, MTIME, LONG_AGO, TRUE),  # Go: range_match
    ("etag-padded", f" {ETAG} ", MTIME, LONG_AGO, TRUE),
    ("weak-etag", f"W/{ETAG}", MTIME, LONG_AGO, FALSE),  # Go: range_match_weak_etag
    ("other-etag", '"other"', MTIME, LONG_AGO, FALSE),  # Go: range_no_match
    ("etag-other-case", '"XYZZY"', MTIME, LONG_AGO, FALSE),
    ("date-equal", IMF, MTIME, LONG_AGO, TRUE),  # Go: range_with_modtime
    ("date-later", LATER, MTIME, LONG_AGO, FALSE),  # Go: range_with_modtime_mismatch
    ("date-earlier", EARLIER, MTIME, LONG_AGO, FALSE),
    ("date-equal-sub-second-mtime", IMF, MTIME + 0.25, LONG_AGO, TRUE),  # Go: range_with_modtime_nanos
    ("date-equal-modified-now", IMF, MTIME, MTIME, FALSE),
    ("date-equal-modified-0.5s-ago", IMF, MTIME, MTIME + 0.5, FALSE),
    ("date-equal-modified-1s-ago", IMF, MTIME, MTIME + 1, TRUE),
    ("garbage", "garbage", MTIME, LONG_AGO, FALSE),
    ("star", "*", MTIME, LONG_AGO, FALSE),
]


@pytest.mark.parametrize(
    ("value", "mtime", "now", "want"), [c[1:] for c in IF_RANGE_CASES], ids=[c[0] for c in IF_RANGE_CASES]
)
def test_check_if_range(value: str | None, mtime: float, now: float, want: Cond) -> None:
    assert check_if_range(value, ETAG, mtime, now) is want


# =============================================================================
# evaluate_preconditions: RFC 9110 §13.2.2 order
# =============================================================================

PRECONDITION_CASES = [
    ("no_preconditions", "GET", {}, None),
    ("ifmatch_matches", "GET", {"if-match": f'"Z", {ETAG}'}, None),
    ("ifmatch_star", "GET", {"if-match": "*"}, None),
    ("ifmatch_failed", "GET", {"if-match": '"other"'}, 412),
    ("ifmatch_failed_head", "HEAD", {"if-match": '"other"'}, 412),
    ("ifmatch_fails_on_weak_etag", "GET", {"if-match": f"W/{ETAG}"}, 412),
    ("if_unmodified_since_true", "GET", {"if-unmodified-since": IMF}, None),
    ("if_unmodified_since_false", "GET", {"if-unmodified-since": EARLIER}, 412),
    ("if_unmodified_since_invalid_ignored", "GET", {"if-unmodified-since": "garbage"}, None),
    # §13.1.4: "A recipient MUST ignore If-Unmodified-Since if the request contains an If-Match"
    ("if_match_wins_over_ius", "GET", {"if-match": ETAG, "if-unmodified-since": EARLIER}, None),
    ("if_match_fails_despite_ius", "GET", {"if-match": '"other"', "if-unmodified-since": LATER}, 412),
    ("not_modified_etag", "GET", {"if-none-match": ETAG}, 304),
    ("not_modified_etag_head", "HEAD", {"if-none-match": ETAG}, 304),
    ("not_modified_weak_etag", "GET", {"if-none-match": f"W/{ETAG}"}, 304),
    ("not_modified_star", "GET", {"if-none-match": "*"}, 304),
    ("inm_false_on_post_is_412", "POST", {"if-none-match": ETAG}, 412),
    ("if_none_match_mismatch", "GET", {"if-none-match": '"Foo"'}, None),
    ("not_modified_modtime", "GET", {"if-modified-since": IMF}, 304),
    ("not_modified_modtime_head", "HEAD", {"if-modified-since": IMF}, 304),
    ("not_modified_later_date", "GET", {"if-modified-since": LATER}, 304),
    ("not_modified_rfc850", "GET", {"if-modified-since": RFC850}, 304),
    ("not_modified_asctime", "GET", {"if-modified-since": ASCTIME}, 304),
    ("modified_since_earlier", "GET", {"if-modified-since": EARLIER}, None),
    ("ims_invalid_ignored", "GET", {"if-modified-since": "garbage"}, None),
    ("ims_ignored_for_post", "POST", {"if-modified-since": IMF}, None),
    # §13.1.3: "A recipient MUST ignore If-Modified-Since if the request contains an
    # If-None-Match header field"
    ("inm_mismatch_wins_over_ims", "GET", {"if-none-match": '"other"', "if-modified-since": IMF}, None),
    ("inm_match_wins_over_ims", "GET", {"if-none-match": ETAG, "if-modified-since": EARLIER}, 304),
    # Steps 1-2 come before steps 3-4.
    ("if_match_before_inm", "GET", {"if-match": '"other"', "if-none-match": ETAG}, 412),
    ("ius_before_inm", "GET", {"if-unmodified-since": EARLIER, "if-none-match": ETAG}, 412),
    ("ius_before_ims", "GET", {"if-unmodified-since": EARLIER, "if-modified-since": IMF}, 412),
    ("if_match_then_inm", "GET", {"if-match": ETAG, "if-none-match": ETAG}, 304),
    ("if_match_then_ims", "GET", {"if-match": ETAG, "if-modified-since": IMF}, 304),
    ("ius_then_ims", "GET", {"if-unmodified-since": IMF, "if-modified-since": IMF}, 304),
    ("if_range_is_not_a_precondition", "GET", {"if-range": '"other"'}, None),
]


@pytest.mark.parametrize(
    ("method", "headers", "want"), [c[1:] for c in PRECONDITION_CASES], ids=[c[0] for c in PRECONDITION_CASES]
)
def test_evaluate_preconditions(method: str, headers: dict[str, str], want: int | None) -> None:
    assert evaluate_preconditions(method, headers, ETAG, MTIME) == want


def test_make_etag_is_strong_and_changes_with_size_and_mtime() -> None:
    tags = {make_etag(10, MTIME * 10**9), make_etag(11, MTIME * 10**9), make_etag(10, MTIME * 10**9 + 1)}
    assert len(tags) == 3
    for tag in tags:
        assert (tag[0], tag[-1], check_if_match(tag, tag)) == ('"', '"', TRUE)


# =============================================================================
# Through the app: /download/ten.txt, last modified at MTIME
# =============================================================================


@pytest.fixture
def ten_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ten.txt").write_bytes(DATA)
    os.utime(root / "ten.txt", (MTIME, MTIME))
    (root / "half.txt").write_bytes(DATA)  # modified half a second after MTIME
    half_ns = MTIME * 10**9 + 500_000_000
    os.utime(root / "half.txt", ns=(half_ns, half_ns))
    return root


@pytest.fixture
async def ten_client(ten_root: Path, anyio_backend: str):
    transport = httpx.ASGITransport(app=create_app(str(ten_root)))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def current_etag(client: httpx.AsyncClient, name: str = "ten.txt") -> str:
    response = await client.get(f"/download/{name}")
    assert response.status_code == 200
    return response.headers["etag"]


def with_etag(headers: dict[str, str], etag: str) -> dict[str, str]:
    """Replace the placeholder <etag> in header values with the file's ETag."""
    return {name: value.replace("<etag>", etag) for name, value in headers.items()}


def headers_id(headers: dict[str, str]) -> str:
    return " + ".join(f"{name}: {value}" for name, value in headers.items())


@pytest.mark.anyio
async def test_get_sends_validators(ten_client: httpx.AsyncClient) -> None:
    response = await ten_client.get("/download/ten.txt")
    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["etag"] == make_etag(len(DATA), MTIME * 10**9)
    assert response.headers["last-modified"] == IMF
    assert response.headers["cache-control"] == CACHE_CONTROL


NOT_MODIFIED_CASES = [
    {"If-None-Match": "<etag>"},
    {"If-None-Match": "W/<etag>"},
    {"If-None-Match": '"other", <etag>'},
    {"If-None-Match": "*"},
    {"If-Modified-Since": IMF},
    {"If-Modified-Since": LATER},
    {"If-Modified-Since": RFC850},
    {"If-Modified-Since": ASCTIME},
    {"If-None-Match": "<etag>", "If-Modified-Since": EARLIER},
    {"If-Match": "<etag>", "If-None-Match": "<etag>"},
    {"If-Unmodified-Since": IMF, "If-Modified-Since": IMF},
    {"If-None-Match": "<etag>", "Range": "bytes=0-4"},
    {"If-Modified-Since": IMF, "Range": "bytes=0-4"},
    {"If-None-Match": "<etag>", "Range": "bytes=20-"},  # 304 before 416
    {"If-None-Match": "<etag>", "If-Range": "<etag>", "Range": "bytes=0-4"},
]


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("headers", NOT_MODIFIED_CASES, ids=[headers_id(h) for h in NOT_MODIFIED_CASES])
async def test_not_modified(ten_client: httpx.AsyncClient, method: str, headers: dict[str, str]) -> None:
    """RFC 9110 §15.4.5: a 304 has no content and carries ETag and Cache-Control (and here
    Last-Modified), but not the representation metadata of a 200."""
    etag = await current_etag(ten_client)
    response = await ten_client.request(method, "/download/ten.txt", headers=with_etag(headers, etag))
    assert (response.status_code, response.content) == (304, b"")
    assert response.headers["etag"] == etag
    assert response.headers["last-modified"] == IMF
    assert response.headers["cache-control"] == CACHE_CONTROL
    for name in ("content-length", "content-type", "content-disposition", "content-range"):
        assert (name, response.headers.get(name)) == (name, None)


PRECONDITION_FAILED_CASES = [
    {"If-Match": '"other"'},
    {"If-Match": "W/<etag>"},
    {"If-Match": '"other"', "If-Unmodified-Since": LATER},
    {"If-Unmodified-Since": EARLIER},
    {"If-Unmodified-Since": DAY_BEFORE_RFC850},
    {"If-Unmodified-Since": EARLIER, "If-None-Match": "<etag>"},  # 412 before 304
    {"If-Match": '"other"', "Range": "bytes=0-4"},
    {"If-Match": '"other"', "Range": "bytes=20-"},  # 412 before 416
    {"If-Match": '"other"', "If-Range": "<etag>", "Range": "bytes=0-4"},
]


@pytest.mark.anyio
@pytest.mark.parametrize("headers", PRECONDITION_FAILED_CASES, ids=[headers_id(h) for h in PRECONDITION_FAILED_CASES])
async def test_precondition_failed_is_json_412(ten_client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    etag = await current_etag(ten_client)
    response = await ten_client.get("/download/ten.txt", headers=with_etag(headers, etag))
    assert response.status_code == 412
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers.get("content-range") is None
    payload = response.json()
    assert list(payload) == ["detail"]
    assert type(payload["detail"]) is str


@pytest.mark.anyio
async def test_precondition_failed_carries_no_validators(ten_client: httpx.AsyncClient) -> None:
    """STYLE.md §2 (Go's serveError): error_response drops ETag and Last-Modified."""
    response = await ten_client.get("/download/ten.txt", headers={"If-Match": '"other"'})
    assert response.status_code == 412
    assert (response.headers.get("etag"), response.headers.get("last-modified")) == (None, None)


WHOLE = None
UNSATISFIABLE = "416"
# (request headers, want): WHOLE (200 with all of ten.txt), one [start, stop) span (206),
# or UNSATISFIABLE (416).
PROCEED_CASES = [
    ({"If-Match": "<etag>"}, WHOLE),
    ({"If-Match": '"other", <etag>'}, WHOLE),
    ({"If-Match": "*"}, WHOLE),
    ({"If-Unmodified-Since": IMF}, WHOLE),
    ({"If-Unmodified-Since": LATER}, WHOLE),
    ({"If-Unmodified-Since": "garbage"}, WHOLE),
    ({"If-Match": "<etag>", "If-Unmodified-Since": EARLIER}, WHOLE),  # If-Match wins
    ({"If-None-Match": '"other"'}, WHOLE),
    ({"If-None-Match": '"other"', "If-Modified-Since": IMF}, WHOLE),  # If-None-Match wins
    ({"If-Modified-Since": EARLIER}, WHOLE),
    ({"If-Modified-Since": "garbage"}, WHOLE),
    ({"If-Match": "<etag>", "Range": "bytes=0-4"}, (0, 5)),
    ({"If-Unmodified-Since": IMF, "Range": "bytes=0-4"}, (0, 5)),
    ({"If-Modified-Since": EARLIER, "Range": "bytes=2-"}, (2, 10)),
    ({"If-None-Match": '"other"', "Range": "bytes=-3"}, (7, 10)),
    # If-Range (§13.1.5): the Range applies only while the validator still matches.
    ({"If-Range": "<etag>", "Range": "bytes=0-4"}, (0, 5)),
    ({"If-Range": "W/<etag>", "Range": "bytes=0-4"}, WHOLE),
    ({"If-Range": '"other"', "Range": "bytes=0-4"}, WHOLE),
    ({"If-Range": IMF, "Range": "bytes=0-4"}, (0, 5)),
    ({"If-Range": LATER, "Range": "bytes=0-4"}, WHOLE),
    ({"If-Range": EARLIER, "Range": "bytes=0-4"}, WHOLE),
    ({"If-Range": "garbage", "Range": "bytes=0-4"}, WHOLE),
    ({"If-Range": "<etag>"}, WHOLE),  # without Range, If-Range is ignored
    ({"If-Range": '"other"', "Range": "bytes=20-"}, WHOLE),  # Range ignored, so no 416
    ({"If-Range": "<etag>", "Range": "bytes=20-"}, UNSATISFIABLE),
    ({"If-Match": "<etag>", "If-Range": '"other"', "Range": "bytes=0-4"}, WHOLE),
    ({"If-None-Match": '"other"', "If-Range": "<etag>", "Range": "bytes=3-4"}, (3, 5)),
    ({"If-Modified-Since": EARLIER, "If-Range": IMF, "Range": "bytes=3-4"}, (3, 5)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("headers", "want"), PROCEED_CASES, ids=[headers_id(h) for h, _ in PROCEED_CASES])
async def test_conditional_get(ten_client: httpx.AsyncClient, headers: dict[str, str], want: object) -> None:
    etag = await current_etag(ten_client)
    response = await ten_client.get("/download/ten.txt", headers=with_etag(headers, etag))
    assert response.headers["content-length"] == str(len(response.content))
    if want is WHOLE:
        assert response.status_code == 200
        assert response.content == DATA
        assert response.headers.get("content-range") is None
    elif want == UNSATISFIABLE:
        assert response.status_code == 416
        assert response.headers["content-range"] == f"bytes */{len(DATA)}"
        assert list(response.json()) == ["detail"]
    else:
        start, stop = want
        assert response.status_code == 206
        assert response.content == DATA[start:stop]
        assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"
    if response.status_code in (200, 206):
        assert (response.headers["etag"], response.headers["last-modified"]) == (etag, IMF)
        assert response.headers["content-type"] == TEXT_TYPE


# A file modified half a second after MTIME: Last-Modified shows MTIME's second, and the
# comparisons must use that second, not the exact mtime (Go: range_with_modtime_nanos).
SUB_SECOND_CASES = [
    ({"If-Modified-Since": IMF}, 304, b""),
    ({"If-Unmodified-Since": IMF}, 200, DATA),
    ({"If-Range": IMF, "Range": "bytes=0-4"}, 206, DATA[0:5]),
    ({"If-Modified-Since": EARLIER}, 200, DATA),
    ({"If-Unmodified-Since": EARLIER}, 412, None),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status", "body"), SUB_SECOND_CASES, ids=[headers_id(h) for h, _, _ in SUB_SECOND_CASES]
)
async def test_sub_second_mtime_compares_by_last_modified_second(
    ten_client: httpx.AsyncClient, headers: dict[str, str], status: int, body: bytes | None
) -> None:
    response = await ten_client.get("/download/half.txt", headers=headers)
    assert response.status_code == status
    if body is None:
        assert list(response.json()) == ["detail"]
    else:
        assert response.content == body
        assert response.headers["last-modified"] == IMF


@pytest.mark.anyio
async def test_future_mtime_last_modified_is_not_after_now(ten_root: Path, ten_client: httpx.AsyncClient) -> None:
    """RFC 9110 §8.8.2.1: "An origin server with a clock MUST NOT generate a Last-Modified
    date that is later than the server's time of message origination (Date)." A file
    whose mtime is in the future gets the response time instead."""
    future = int(time.time()) + 86400
    (ten_root / "future.txt").write_bytes(DATA)
    os.utime(ten_root / "future.txt", (future, future))
    response = await ten_client.get("/download/future.txt")
    after = time.time()
    assert response.status_code == 200
    last_modified = email.utils.parsedate_to_datetime(response.headers["last-modified"])
    assert last_modified.timestamp() <= after


@pytest.mark.anyio
async def test_if_range_with_future_mtime_date_is_ignored(ten_root: Path, ten_client: httpx.AsyncClient) -> None:
    """§13.1.5 / §8.8.2.2: a date that is not at least a second old is not a strong
    validator, so If-Range by that date sends the whole file."""
    future = int(time.time()) + 86400
    (ten_root / "future.txt").write_bytes(DATA)
    os.utime(ten_root / "future.txt", (future, future))
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(future))
    response = await ten_client.get("/download/future.txt", headers={"If-Range": date, "Range": "bytes=0-4"})
    assert (response.status_code, response.content, response.headers.get("content-range")) == (200, DATA, None)


MISSING_FILE_CASES = [
    {"If-Match": '"other"'},
    {"If-Match": "*"},
    {"If-Unmodified-Since": EARLIER},
    {"If-None-Match": "*"},
    {"If-Modified-Since": LATER},
]


@pytest.mark.anyio
@pytest.mark.parametrize("headers", MISSING_FILE_CASES, ids=[headers_id(h) for h in MISSING_FILE_CASES])
async def test_preconditions_are_ignored_for_a_missing_file(
    ten_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """RFC 9110 §13.2.1: "A server MUST ignore all received preconditions if its response to
    the same request without those conditions ... would have been a status code other than
    a 2xx (Successful) or 412 (Precondition Failed)." """
    response = await ten_client.get("/download/missing.txt", headers=headers)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["detail"]


# After ten.txt is rewritten (new size and mtime), validators from before must not match.
CHANGED_FILE_CASES = [
    ({"If-None-Match": "<etag>"}, 200, b"changed!!!!"),
    ({"If-Modified-Since": IMF}, 200, b"changed!!!!"),
    ({"If-Match": "<etag>"}, 412, None),
    ({"If-Unmodified-Since": IMF}, 412, None),
    ({"If-Range": "<etag>", "Range": "bytes=0-4"}, 200, b"changed!!!!"),
    ({"If-Range": IMF, "Range": "bytes=0-4"}, 200, b"changed!!!!"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status", "body"), CHANGED_FILE_CASES, ids=[headers_id(h) for h, _, _ in CHANGED_FILE_CASES]
)
async def test_old_validators_fail_after_the_file_changes(
    ten_root: Path, ten_client: httpx.AsyncClient, headers: dict[str, str], status: int, body: bytes | None
) -> None:
    old_etag = await current_etag(ten_client)
    (ten_root / "ten.txt").write_bytes(b"changed!!!!")
    os.utime(ten_root / "ten.txt", (MTIME + 10, MTIME + 10))
    response = await ten_client.get("/download/ten.txt", headers=with_etag(headers, old_etag))
    assert response.status_code == status
    if body is None:
        assert list(response.json()) == ["detail"]
    else:
        assert response.content == body
        assert response.headers["etag"] == make_etag(len(body), (MTIME + 10) * 10**9)
        assert response.headers.get("content-range") is None


@pytest.mark.parametrize("value", ["Thu, 31 Feb 2020 03:04:05 GMT", "Sun, 30 Feb 2020 03:04:05 GMT", "Fri, 31 Apr 2020 00:00:00 GMT", "Mon, 01 Jan 2020 24:00:00 GMT"])
def test_impossible_dates_are_not_dates(value: str) -> None:
    """RFC 9110 §13.1.3: a recipient MUST ignore a value that is not a valid HTTP-date."""
    assert downloader.parse_http_date(value) is None
    assert downloader.check_if_modified_since(value, MTIME) is downloader.Cond.NONE


def test_leap_second_is_a_date() -> None:
    assert downloader.parse_http_date("Wed, 31 Dec 2008 23:59:60 GMT") == 1230768000


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status"),
    [({"If-Match": '"x"'}, 412), ({"If-Match": "*"}, 200), ({"If-None-Match": "*"}, 304), ({"If-None-Match": '"x"'}, 200), ({"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}, 200)],
    ids=["if-match-tag", "if-match-star", "if-none-match-star", "if-none-match-tag", "ims-ignored"],
)
async def test_generated_downloads_have_no_validator_to_match(ten_root: Path, headers: dict[str, str], status: int) -> None:
    """/zip makes its bytes anew: no ETag, so If-Match of a tag fails and If-None-Match: * holds."""
    import httpx

    app = downloader.create_app(ten_root)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/zip/", headers=headers)
    assert response.status_code == status
    if status == 412:
        assert response.json() == {"detail": "Precondition Failed"}
    if status == 304:
        assert (response.content, response.headers.get("content-length")) == (b"", None)


@pytest.mark.anyio
@pytest.mark.parametrize(("headers", "status"), [({"If-Match": '"x"'}, 412), ({"If-None-Match": "*"}, 304)])
async def test_generated_content_refused_by_a_precondition_is_never_pulled(headers: dict[str, str], status: int) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Route

    pulled: list[int] = []
    closed: list[bool] = []

    class Rows:
        def __aiter__(self):
            return self

        async def __anext__(self) -> bytes:
            pulled.append(1)
            return b"row\n"

        async def aclose(self) -> None:
            closed.append(True)

    async def export(request):
        return downloader.stream_download(Rows(), "rows.csv")

    app = Starlette(routes=[Route("/rows.csv", export)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/rows.csv", headers=headers)
    assert (response.status_code, pulled, closed) == (status, [], [True])
