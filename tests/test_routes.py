"""Sections 8 and 9 through HTTP: errors as JSON, methods, and DownloadResponse in a host app."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import downloader
from conftest import TEN


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_get_405_with_allow(client, method: str) -> None:
    response = await client.request(method, "/download/ten.txt")
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}
    assert sorted(response.headers["allow"].split(", ")) == ["GET", "HEAD"]


@pytest.mark.anyio
async def test_unknown_route_is_json_404(client) -> None:
    response = await client.get("/nope")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    assert response.headers["content-type"] == "application/json"


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/download", "/zip", "/files", "/api/files/", "/healthz/"])
async def test_no_redirect_built_from_the_host_header(client, path: str) -> None:
    """Issue "Hardening" #10: Starlette's slash redirect was a 307 to the client's Host."""
    response = await client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert (response.status_code, response.json(), "location" in response.headers) == (404, {"detail": "Not Found"}, False)


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["/api/files", "/zip/", "/zip/sub"])
async def test_an_unreadable_root_lists_nothing_but_says_503(client, root: Path, route: str) -> None:
    """Issue "Hardening" #10: not an empty listing or an empty archive, as if the root had no files."""
    root.rename(root.with_name("gone"))
    response = await client.get(route)
    assert (response.status_code, response.json()) == (503, {"detail": "The download root is not readable"})
    assert response.headers["retry-after"] == "5"


@pytest.mark.anyio
async def test_head_of_missing_file_has_no_body(client) -> None:
    response = await client.head("/download/missing.txt")
    assert (response.status_code, response.content) == (404, b"")


def host_app(root: Path) -> Starlette:
    async def report(request):
        return downloader.DownloadResponse(root / "ten.txt", filename="report 2026.txt", disposition="inline")

    async def user_file(request):
        return downloader.DownloadResponse(request.path_params["name"], root=root)

    return Starlette(routes=[
        Route("/report", report),
        Route("/user/{name:path}", user_file),
        Mount("/files", app=downloader.create_app(root)),
    ])


@pytest.mark.anyio
async def test_download_response_from_a_host_endpoint(root: Path) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host_app(root)), base_url="http://t") as c:
        whole = await c.get("/report")
        part = await c.get("/report", headers={"Range": "bytes=2-4"})
        cached = await c.get("/report", headers={"If-None-Match": whole.headers["etag"]})
        mounted = await c.get("/files/download/ten.txt")
        escaped = await c.get("/user/..%2Fsecret.txt")
        safe = await c.get("/user/ten.txt")
    assert (whole.status_code, whole.content) == (200, TEN)
    assert whole.headers["content-disposition"] == "inline; filename=\"report 2026.txt\""
    assert (part.status_code, part.content, part.headers["content-range"]) == (206, b"234", "bytes 2-4/10")
    assert (cached.status_code, cached.content) == (304, b"")
    assert (mounted.status_code, mounted.content) == (200, TEN)
    assert (escaped.status_code, escaped.json()) == (404, {"detail": "Not Found"})
    assert (safe.status_code, safe.content) == (200, TEN)


@pytest.mark.anyio
async def test_download_response_for_a_missing_path_is_json_404(tmp_path: Path) -> None:
    async def gone(request):
        return downloader.DownloadResponse(tmp_path / "gone.bin")

    app = Starlette(routes=[Route("/gone", gone)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/gone")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def test_download_response_refuses_an_unknown_disposition(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        downloader.DownloadResponse(tmp_path, disposition="evil")
