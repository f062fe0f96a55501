"""Fuzzing (hypothesis) of what a client controls, against the ASGI app and a live server:
request paths over random trees with symlinks in and out of the root, the headers of ranges
and conditional requests, signed-link queries and listing cursors. The properties: never a
5xx, and never a byte or a name from outside the root or from a hidden file (each of those
holds MARK in its name and its content). The admin API is fuzzed in test_links."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import downloader
from conftest import asgi_request, raw_request
from helpers import uvicorn_server

MARK = "OUTSIDE-7d1c"
"""In the name and the content of every file outside the root and every hidden one: seen in an answer, it leaked."""

NAMES = st.sampled_from(["a.txt", "b c.bin", "é.txt", "数据", "x%41", "q?.txt", "h#", "d", "sub", "ｆｕｌｌ"])
KINDS = st.sampled_from(["file", "dir", "hidden", "link-in", "link-in-dir", "link-out", "link-out-dir", "broken", "loop"])
TREES = st.lists(st.tuples(KINDS, NAMES, st.integers(0, 3)), min_size=1, max_size=10)

HOSTILE_SEGMENTS = st.sampled_from([
    "..", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%5c", "..%2f", "..%5c", "%00", "%c0%ae%c0%ae", "%c0%af", "%e2%80%ae",
    "", ".", "./", "//", "\\", "％２ｅ％２ｅ", "．．", "%252e%252e", ";", "%3b", "~", "*", "%0a", "%0d%0a", "?", "#",
])


def build_tree(base: Path, entries: list[tuple[str, str, int]]) -> tuple[Path, list[str]]:
    """base/root with the entries (in nested folders by depth), base/outside-MARK holding marked files;
    returns the root and the relative names made."""
    root, outside = base / "root", base / f"outside-{MARK}"
    root.mkdir()
    outside.mkdir()
    (outside / f"{MARK}.txt").write_text(MARK)
    (base / f"{MARK}.txt").write_text(MARK)
    made: list[str] = []
    for i, (kind, name, depth) in enumerate(entries):
        folder = root.joinpath(*[f"d{level}" for level in range(depth)])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f".{MARK}{i}" if kind == "hidden" else f"{i}{name}")
        if kind in ("file", "hidden"):
            path.write_text(MARK if kind == "hidden" else f"inside {i}")
        elif kind == "dir":
            path.mkdir()
            (path / "in.txt").write_text("inside")
        elif kind == "link-in":
            (root / f"target{i}").write_text("inside target")
            path.symlink_to(root / f"target{i}")
        elif kind == "link-in-dir":
            path.symlink_to(root)
        elif kind == "link-out":
            path.symlink_to(base / f"{MARK}.txt")
        elif kind == "link-out-dir":
            path.symlink_to(outside)
        elif kind == "broken":
            path.symlink_to(base / "nowhere")
        else:
            path.symlink_to(path)
        made.append(path.relative_to(root).as_posix())
    return root, made


def target_of(made: list[str], pick: int, segments: list[str], prefix: str) -> bytes:
    """A request target: a made name (quoted, or not) with hostile segments before, inside or after it."""
    name = made[pick % len(made)]
    parts = [urllib.parse.quote(part) for part in name.split("/")]
    at = pick % (len(parts) + 1)
    path = "/".join(parts[:at] + segments + parts[at:])
    return urllib.parse.quote(prefix + path, safe=ASCII_KEPT).encode("ascii")  # a target is ASCII: the rest %-escaped


ASCII_KEPT = "".join(chr(c) for c in range(33, 127))


def assert_nothing_leaked(status: int, body: bytes, what: bytes) -> None:
    assert status < 500, (what, status, body[:200])
    assert MARK.encode() not in body, (what, status, body[:300])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=TREES, picks=st.lists(st.tuples(st.integers(0, 50), st.lists(HOSTILE_SEGMENTS, max_size=3)), min_size=1, max_size=6),
       prefix=st.sampled_from(["/download/", "/zip/", "/files/", "/api/files/", "/"]))
def test_paths_over_random_trees_never_leak_and_never_fail(tmp_path: Path, entries, picks, prefix: str) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        root, made = build_tree(base, entries)
        app = downloader.create_app(root, access_log="off")

        async def check() -> None:
            for target in [b"/api/files?limit=1000", b"/zip/"] + [target_of(made, pick, segments, prefix) for pick, segments in picks]:
                status, _, body = await asgi_request(app, target)
                assert_nothing_leaked(status, body, target)

        anyio.run(check)
    finally:
        shutil.rmtree(base)


RANGES = st.one_of(
    st.text(max_size=40),
    st.builds(lambda unit, specs: f"{unit}={','.join(specs)}", st.sampled_from(["bytes", "Bytes", "items", ""]),
              st.lists(st.sampled_from(["0-", "-1", "5-2", "0-0", "-0", "9-", "10-", "3-4", " 1 - 2 ", "-", "a-b", "1-2-3",
                                        "99999999999999999999-", "0-99999999999999999999", ""]), min_size=1, max_size=5)),
)
VALIDATORS = st.one_of(st.text(max_size=30), st.sampled_from(['"x"', "*", 'W/"x"', "Wed, 21 Oct 2015 07:28:00 GMT", "0", ""]))


@pytest.fixture(scope="module")
def ten_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ten")
    (root / "ten.txt").write_bytes(bytes(range(10)))
    os.utime(root / "ten.txt", (1_700_000_000, 1_700_000_000))
    return root


@settings(max_examples=300, deadline=None)
@given(range_=RANGES, if_range=st.none() | VALIDATORS, if_none_match=st.none() | VALIDATORS, if_match=st.none() | VALIDATORS,
       if_modified_since=st.none() | VALIDATORS, method=st.sampled_from(["GET", "HEAD"]))
def test_range_and_conditional_headers_never_fail_and_206_is_exact(ten_root: Path, range_, if_range, if_none_match, if_match, if_modified_since, method) -> None:
    content = bytes(range(10))
    headers = [(b"range", range_), (b"if-range", if_range), (b"if-none-match", if_none_match), (b"if-match", if_match),
               (b"if-modified-since", if_modified_since)]
    encoded = [(name, value.encode("utf-8", "surrogatepass")) for name, value in headers if value is not None]
    status, got, body = anyio.run(asgi_request, downloader.create_app(ten_root, access_log="off"), b"/download/ten.txt", method, encoded)
    assert status in (200, 206, 304, 412, 416), (headers, status, body)
    if method == "GET" and status == 200:
        assert body == content
    if method == "GET" and status == 206 and "content-range" in got:
        first, last = map(int, got["content-range"].removeprefix("bytes ").split("/")[0].split("-"))
        assert body == content[first : last + 1]


@settings(max_examples=200, deadline=None)
@given(query=st.dictionaries(st.sampled_from(["expires", "signature", "x", "expires ", "Signature"]), st.text(max_size=50), max_size=4),
       raw=st.text(max_size=60))
def test_signed_link_queries_never_fail_and_never_serve_unsigned(ten_root: Path, query: dict, raw: str) -> None:
    app = downloader.create_app(ten_root, access_log="off", secret="fuzz-key")
    for target in (b"/download/ten.txt?" + urllib.parse.urlencode(query).encode(), b"/download/ten.txt?" + raw.encode("utf-8", "surrogatepass")):
        status, _, body = anyio.run(asgi_request, app, target)
        assert status in (403, 404), (target, status, body)


@settings(max_examples=200, deadline=None)
@given(cursor=st.text(max_size=60) | st.binary(max_size=40).map(lambda b: b.hex()), limit=st.text(max_size=12))
def test_listing_cursors_and_limits_never_fail(ten_root: Path, cursor: str, limit: str) -> None:
    target = b"/api/files?" + urllib.parse.urlencode({"cursor": cursor, "limit": limit}).encode()
    status, _, body = anyio.run(asgi_request, downloader.create_app(ten_root, access_log="off"), target)
    assert status in (200, 400), (target, status, body)
    assert status == 400 or json.loads(body)["files"][0]["path"] == "ten.txt" or json.loads(body)["files"] == []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("fuzz")
    root, _ = build_tree(base, [("file", "a.txt", 0), ("link-out", "o", 1), ("link-out-dir", "od", 0), ("hidden", "h", 1),
                                ("dir", "d", 2), ("link-in", "i", 1)])
    with uvicorn_server(root, base / "server.log", args=["--http", "downloader:HTTPProtocol"]) as server:
        yield server


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(HOSTILE_SEGMENTS | st.text(max_size=8).map(urllib.parse.quote), min_size=1, max_size=5),
       prefix=st.sampled_from([b"/download/", b"/zip/", b"/api/files?cursor=", b"/"]), method=st.sampled_from([b"GET", b"HEAD"]))
def test_a_live_server_answers_hostile_targets_without_a_5xx_or_a_leak(fuzz_server, segments: list[str], prefix: bytes, method: bytes) -> None:
    target = prefix + "/".join(segments).encode("utf-8", "surrogateescape")
    target = target.replace(b" ", b"%20")  # a raw space ends the request target: not what is fuzzed here
    status, _, body = raw_request(fuzz_server.port, target, method)
    assert_nothing_leaked(status, body, target)
