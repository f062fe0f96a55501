"""GET /api/files and the page routes: what is listed, paging, the off switch, prefixes."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import anyio

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

import downloader
from conftest import OLD_MTIME, UNICODE_NAME, asgi_request, raw_request
from helpers import uvicorn_server

LISTED = ["data.bin", "empty.txt", "link-in", UNICODE_NAME, "sub/inner.txt", "ten.txt"]


async def all_pages(c: httpx.AsyncClient, url: str, limit: int) -> tuple[list[dict], int]:
    items, pages, cursor = [], 0, None
    while True:
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        response = await c.get(url, params=params)
        assert response.status_code == 200
        body = response.json()
        items += body["files"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages


@pytest.mark.anyio
async def test_listing_fields(client, root: Path) -> None:
    response = await client.get("/api/files")
    assert response.headers["content-type"] == "application/json"
    files = response.json()["files"]
    assert [f["path"] for f in files] == sorted(LISTED)
    ten = next(f for f in files if f["path"] == "ten.txt")
    assert ten == {
        "name": "ten.txt", "path": "ten.txt", "size": 10, "modified": "2023-11-14T22:13:20Z",
        "content_type": "text/plain; charset=utf-8", "url": "/download/ten.txt",
        "sha256": None,  # not yet hashed: a new app's first listing (test_digests: then the hex digest)
    }
    inner = next(f for f in files if f["path"] == "sub/inner.txt")
    assert (inner["name"], inner["url"]) == ("inner.txt", "/download/sub/inner.txt")
    uni = next(f for f in files if f["name"] == UNICODE_NAME)
    assert uni["url"] == "/download/" + urllib.parse.quote(UNICODE_NAME)
    assert response.json()["next_cursor"] is None


@pytest.mark.anyio
async def test_listing_leaves_out_hidden_unsafe_and_special_entries(client) -> None:
    paths = {f["path"] for f in (await client.get("/api/files")).json()["files"]}
    for refused in (".hidden", ".dotdir/inner.txt", "link-out", "linkdir-out/secret.txt", "link-hidden", "fifo", "socket", "loop"):
        assert refused not in paths


@pytest.mark.anyio
async def test_every_listed_url_downloads(client) -> None:
    for item in (await client.get("/api/files")).json()["files"]:
        response = await client.get(item["url"])
        assert (response.status_code, len(response.content)) == (200, item["size"])


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 2, 3, 7, 1000])
async def test_paging_returns_each_file_once_in_order(root: Path, limit: int) -> None:
    for i in range(12):
        (root / "sub" / f"f{i:02}.txt").write_text(str(i))
    (root / "sub-a.txt").write_text("sorts between sub/ entries and ten.txt by string order")
    app = downloader.create_app(root)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        items, pages = await all_pages(c, "/api/files", limit)
    paths = [f["path"] for f in items]
    assert paths == sorted(LISTED + [f"sub/f{i:02}.txt" for i in range(12)] + ["sub-a.txt"])
    assert pages == max(1, -(-len(paths) // limit))


@pytest.mark.anyio
@pytest.mark.parametrize(("query", "detail"), [("limit=0", "limit must be a whole number from 1 to 1000"), ("limit=x", "limit must be a whole number from 1 to 1000"), ("limit=1001", "limit must be a whole number from 1 to 1000"), ("cursor=%FF%FE", "Malformed cursor"), ("cursor=@@@", "Malformed cursor")])
async def test_bad_paging_parameters_are_400(client, query: str, detail: str) -> None:
    response = await client.get(f"/api/files?{query}")
    assert (response.status_code, response.json()) == (400, {"detail": detail})


@pytest.mark.anyio
async def test_listing_can_be_switched_off(root: Path) -> None:
    app = downloader.create_app(root, listing=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        listing = await c.get("/api/files")
        page = await c.get("/")
        download = await c.get("/download/ten.txt")
    off = {"detail": "The listing is switched off (DOWNLOADER_LISTING=false)"}
    assert (listing.status_code, listing.json()) == (404, off)
    assert (page.status_code, page.json()) == (404, off)
    assert download.status_code == 200


@pytest.mark.anyio
async def test_zip_goes_with_the_listing(root: Path) -> None:
    """/zip names every file of a folder: where the listing is off, so is /zip, and the
    page learns whether /zip is on from its meta tag."""
    for listing, status, meta in ((True, 200, b"on"), (False, 404, None)):
        app = downloader.create_app(root, listing=listing)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            archive = await c.get("/zip/sub")
            page = await c.get("/")
        assert archive.status_code == status
        if meta is not None:
            assert b'<meta name="downloader-zip" content="' + meta + b'">' in page.content
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=downloader.create_app(root, authorize=lambda r, f: True)), base_url="http://t") as c:
        page = await c.get("/")
        archive = await c.get("/zip/sub")
    assert b'<meta name="downloader-zip" content="off">' in page.content and archive.status_code == 404


@pytest.mark.anyio
@pytest.mark.parametrize("allowed", [True, False])
async def test_authorize_guards_the_listing_too(root: Path, allowed: bool) -> None:
    """Issue "No surprises" #13: the hook is asked with file=None for the page and the listing."""
    seen = []

    def check(request, file) -> bool:
        seen.append((request.url.path, file))
        return allowed

    app = downloader.create_app(root, authorize=check)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        listing = await c.get("/api/files")
        page = await c.get("/")
    assert seen == [("/api/files", None), ("/", None)]
    if allowed:
        assert (listing.status_code, page.status_code) == (200, 200)
        assert [f["path"] for f in listing.json()["files"]] == sorted(LISTED)
    else:
        assert (listing.status_code, listing.json(), page.status_code) == (403, {"detail": "Forbidden"}, 403)


@pytest.mark.anyio
async def test_a_link_is_named_and_typed_by_its_own_name_everywhere(root: Path) -> None:
    """Issue "No surprises" #9: listing, Content-Disposition and Content-Type all use the
    name in the URL, not the target's."""
    (root / "notes.md").symlink_to(root / "data.bin")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=downloader.create_app(root)), base_url="http://t") as c:
        files = {f["path"]: f for f in (await c.get("/api/files")).json()["files"]}
        link = await c.get("/download/notes.md")
        link_in = await c.get("/download/link-in")
    assert (files["notes.md"]["name"], files["notes.md"]["content_type"]) == ("notes.md", "text/markdown; charset=utf-8")
    assert (link.headers["content-type"], link.headers["content-disposition"]) == ("text/markdown; charset=utf-8", 'attachment; filename="notes.md"')
    assert link.content == bytes(range(256))
    assert link_in.headers["content-disposition"] == 'attachment; filename="link-in"'
    assert link_in.headers["content-type"] == files["link-in"]["content_type"] == "application/octet-stream"


@pytest.mark.anyio
async def test_links_to_folders_inside_are_listed_and_served_loops_are_not_walked(root: Path) -> None:
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "deeper" / "leaf.txt").write_bytes(b"leaf")
    (root / "alias").symlink_to(root / "sub")  # a folder elsewhere inside the root
    (root / "sub" / "deeper" / "up").symlink_to(root / "sub")  # a loop back to an ancestor
    (root / "sub" / "top").symlink_to(root)  # and back to the root
    (root / "hidden-alias").symlink_to(root / ".dotdir")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=downloader.create_app(root)), base_url="http://t") as c:
        items, _ = await all_pages(c, "/api/files", 3)
        leaf = await c.get("/download/alias/deeper/leaf.txt")
        hidden = await c.get("/download/hidden-alias/inner.txt")
        archive = await c.get("/zip/alias")
    paths = [f["path"] for f in items]
    assert paths == sorted(LISTED + ["alias/deeper/leaf.txt", "alias/inner.txt", "sub/deeper/leaf.txt"])
    assert (leaf.status_code, leaf.content, hidden.status_code) == (200, b"leaf", 404)
    with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
        assert sorted(z.namelist()) == ["deeper/leaf.txt", "inner.txt"]
    assert archive.headers["content-disposition"] == 'attachment; filename="alias.zip"'


# Issue "No surprises" #5: a file is listed if and only if it is served, and its listed URL
# downloads its exact bytes. Names are made of the pieces that broke listing or serving.
NAME_PIECES = [
    "a", "Z", "0", " ", "%", "%41", "#", "?", ";", '"', "'", "\\", "&", "+", "=", ",", "~",
    "\n", "\r", "\t", "é", "e\u0301", "\u200f", "\u202e", "😀", "数", "\ufeff", ".",
]


def name_bytes() -> st.SearchStrategy[bytes]:
    text = st.lists(st.sampled_from(NAME_PIECES), min_size=1, max_size=6).map("".join).map(lambda n: n.encode("utf-8"))
    invalid = st.tuples(text, st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80"])).map(b"".join)
    long = st.sampled_from([b"L" * 255, "é".encode() * 127 + b"x", "😀".encode() * 63 + b"abc"])
    return st.one_of(text, text, text, invalid, long).filter(lambda n: n not in (b".", b".."))


def make_tree(base: Path, names: list[bytes]) -> dict[bytes, bytes]:
    """Files named `names` under base (every other one inside a folder `d%`); returns
    path (bytes, relative) -> content."""
    made: dict[bytes, bytes] = {}
    os.mkdir(os.path.join(os.fsencode(base), b"d%"))
    for i, name in enumerate(names):
        relative = os.path.join(b"d%", name) if i % 2 else name
        if relative in made:
            continue
        content = b"file %d: " % i + name
        with open(os.path.join(os.fsencode(base), relative), "wb") as f:
            f.write(content)
        made[relative] = content
    return made


def is_served_name(relative: bytes) -> bool:
    """What /download can serve: UTF-8 names, none hidden."""
    try:
        text = relative.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(part.startswith(".") for part in text.split("/"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(name_bytes(), min_size=1, max_size=8))
def test_listed_if_and_only_if_served(tmp_path: Path, names: list[bytes]) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        made = make_tree(base, names)
        app = downloader.create_app(base)

        async def check() -> None:
            status, _, body = await asgi_request(app, b"/api/files?limit=1000")
            listed = {item["path"].encode("utf-8"): item for item in json.loads(body)["files"]}
            assert set(listed) == {path for path in made if is_served_name(path)}
            for path, content in made.items():
                target = b"/download/" + urllib.parse.quote(path).encode("ascii")
                status, headers, body = await asgi_request(app, target)
                assert (path, status, body if status == 200 else content) == (path, 200 if path in listed else 404, content)
            for path, item in listed.items():
                status, headers, body = await asgi_request(app, item["url"].encode("ascii"))
                assert (status, body) == (200, made[path])
                name = path.rsplit(b"/", 1)[-1].decode("utf-8")
                assert item["name"] == name
            status, headers, body = await asgi_request(app, b"/zip/")
            assert (status, int(headers["content-length"])) == (200, len(body))
            with zipfile.ZipFile(io.BytesIO(body)) as z:
                assert {n.encode("utf-8"): z.read(n) for n in z.namelist()} == {p: made[p] for p in listed}

        anyio.run(check)
    finally:
        shutil.rmtree(base)


def test_hostile_names_listed_and_downloaded_through_uvicorn(tmp_path: Path) -> None:
    """The same rule through uvicorn's own percent-decoding, with the names that failed."""
    names = ["back\\slash %41.txt", "line\nfeed.txt", "cr\rlf.txt", "q?uery#frag;semi.txt", "é-nfc.txt", "e\u0301-nfd.txt", "\u202eevil.txt", "😀.txt", "L" * 255]
    root = tmp_path / "hostile"
    root.mkdir()
    (root / "d\\x").mkdir()
    for name in names:
        (root / name).write_bytes(name.encode() * 3)
        (root / "d\\x" / name).write_bytes(b"in folder: " + name.encode())
    with uvicorn_server(root, tmp_path / "server.log") as server:
        status, _, body = raw_request(server.port, b"/api/files?limit=1000")
        files = json.loads(body)["files"]
        assert sorted(f["path"] for f in files) == sorted(names + [f"d\\x/{n}" for n in names])
        for item in files:
            status, _, body = raw_request(server.port, item["url"].encode("ascii"))
            assert (item["path"], status, body) == (item["path"], 200, (root / item["path"]).read_bytes())
        status, headers, body = raw_request(server.port, b"/zip/d%5Cx")
        assert (status, int(headers["content-length"]), len(body)) == (200, len(body), len(body))
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            assert sorted(z.namelist()) == sorted(names)


@pytest.mark.anyio
async def test_urls_carry_the_mount_prefix(root: Path) -> None:
    host = Starlette(routes=[Mount("/files", app=downloader.create_app(root))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://t") as c:
        items, _ = await all_pages(c, "/files/api/files", 2)
        first = await c.get(items[0]["url"])
        page = await c.get("/files/")
    assert {f["url"] for f in items} >= {"/files/download/ten.txt", "/files/download/sub/inner.txt"}
    assert first.status_code == 200
    assert page.status_code == 200 and b'src="static/app.js"' in page.content


@pytest.mark.anyio
async def test_page_carries_the_blob_limit(root: Path) -> None:
    app = downloader.create_app(root, blob_limit=12345)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        page = await c.get("/")
        script = await c.get("/static/app.js")
        other = await c.get("/static/index.html")
        escape = await c.get("/static/downloads%2Fhello.txt")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<meta name="downloader-blob-limit" content="12345">' in page.content
    assert (script.status_code, script.headers["content-type"]) == (200, "text/javascript; charset=utf-8")
    assert script.content == (Path(downloader.STATIC_DIR) / "app.js").read_bytes()
    assert (other.status_code, escape.status_code) == (404, 404)


def test_walk_files_skips_subtrees_before_the_cursor(root: Path) -> None:
    real = str(root.resolve())
    assert [f.path for f in downloader.walk_files(real, after="link-in")] == [UNICODE_NAME, "sub/inner.txt", "ten.txt"]
    assert [f.path for f in downloader.walk_files(real, after="sub/inner.txt")] == ["ten.txt"]
    listed = {f.path: f for f in downloader.walk_files(real)}
    assert (listed["ten.txt"].size, listed["ten.txt"].mtime) == (10, OLD_MTIME)


def test_a_folder_swapped_for_a_link_out_mid_walk_lists_nothing_from_outside(tmp_path: Path) -> None:
    """Issue "Hardening" #4: a walk by path followed `swap` wherever it led at scandir time."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "outside-secret.txt").write_bytes(b"never listed")
    root = tmp_path / "root"
    (root / "swap").mkdir(parents=True)
    for i in range(50):
        (root / "swap" / f"inside-{i:02}.txt").write_bytes(b"in")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(root / "swap", root / ".parked")
            os.symlink(outside, root / "swap")
            os.unlink(root / "swap")
            os.rename(root / ".parked", root / "swap")

    swapper = threading.Thread(target=swap)
    swapper.start()
    seen_inside, deadline = 0, time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            paths = [f.path for f in downloader.walk_files(str(root.resolve()))]
            assert not any("outside" in path for path in paths), paths
            seen_inside += bool(paths)
    finally:
        stop.set()
        swapper.join()
    assert seen_inside > 0  # the walk did run into the folder while it was swapped back and forth


def test_a_folder_kept_sorted_sees_every_change_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sorted names of a folder are kept between pages (issue "Hardening" #7): any entry added, removed or
    renamed changes the folder's mtime, and so the listing; a folder changed in the last seconds is read anew
    (its mtime may not tick again); sizes are read afresh."""
    root = tmp_path / "kept"
    root.mkdir()
    for name in ("b.txt", "d.txt"):
        (root / name).write_bytes(b"x")
    real = str(root.resolve())
    reads = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: reads.append(path) or real_scandir(path))

    def listed(still: int | None = None) -> list[tuple[str, int]]:
        if still is not None:  # the folder last changed `still` seconds ago
            os.utime(root, (time.time() - still, time.time() - still))
        return [(f.path, f.size) for f in downloader.walk_files(real)]

    assert listed(still=60) == [("b.txt", 1), ("d.txt", 1)]
    assert (listed(), len(reads)) == ([("b.txt", 1), ("d.txt", 1)], 1)  # kept: read once
    (root / "a.txt").write_bytes(b"new")
    (root / "d.txt").rename(root / "c.txt")
    (root / "b.txt").write_bytes(b"longer now")
    assert listed() == [("a.txt", 3), ("b.txt", 10), ("c.txt", 1)]
    assert listed() == [("a.txt", 3), ("b.txt", 10), ("c.txt", 1)] and len(reads) == 3  # just changed: read anew
    (root / "a.txt").unlink()
    assert listed(still=30) == [("b.txt", 10), ("c.txt", 1)]
    assert [f.path for f in downloader.walk_files(real, after="b.txt")] == ["c.txt"] and len(reads) == 4
