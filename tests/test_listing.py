"""GET /api/files and the page routes: what is listed, paging, the off switch, prefixes."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import downloader
from conftest import OLD_MTIME, UNICODE_NAME

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
    assert (listing.status_code, listing.json()) == (404, {"detail": "Not Found"})
    assert page.status_code == 404
    assert download.status_code == 200


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
