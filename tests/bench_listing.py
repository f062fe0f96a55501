"""Listing and /zip cost through the ASGI app, in this process (not collected by pytest).

    python tests/bench_listing.py [--files 200000] [--pages 20] [--zip-files 20000]

Makes FILES empty files in a temp folder, then times the first page of /api/files (the folder is read and
sorted once), pages deep in the folder by cursor, and 20 concurrent page requests, and prints the peak RSS.
Then GET /zip/ of ZIP_FILES files of 10 bytes: wall and CPU seconds (client and app, one process)."""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import downloader  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--zip-files", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        for i in range(args.files):
            (Path(base) / f"f{i:07}.txt").touch()
        time.sleep(downloader.FOLDER_STILL_S)  # a folder is kept sorted once it has been still that long
        app = downloader.create_app(base, access_log="off")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:

            async def page(cursor: str | None) -> tuple[float, str | None]:
                began = time.perf_counter()
                response = await c.get("/api/files", params={"limit": "100", **({"cursor": cursor} if cursor else {})})
                assert response.status_code == 200 and len(response.json()["files"]) == 100
                return time.perf_counter() - began, response.json()["next_cursor"]

            first, cursor = await page(None)
            deep = downloader.encode_cursor(f"f{args.files // 2:07}.txt")
            times = [(await page(deep))[0] for _ in range(args.pages)]
            began = time.perf_counter()
            await asyncio.gather(*(page(deep) for _ in range(20)))
            together = time.perf_counter() - began
    times.sort()
    print(f"{args.files:,} files in one folder, pages of 100 through the ASGI app")
    print(f"first page (reads and sorts the folder): {first * 1000:.0f} ms")
    print(f"a page in the middle, by cursor: median {times[len(times) // 2] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms")
    print(f"20 concurrent pages in the middle: {together * 1000:.0f} ms in all")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    with tempfile.TemporaryDirectory() as base:
        for i in range(args.zip_files):
            (Path(base) / f"t{i:06}.txt").write_bytes(b"x" * 10)
        app = downloader.create_app(base, access_log="off")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=600) as c:
            cpu, wall = time.process_time(), time.perf_counter()
            response = await c.get("/zip/")
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert response.status_code == 200
    print(f"GET /zip/ of {args.zip_files:,} files of 10 bytes: {len(response.content):,} bytes, {wall:.2f} s, {cpu:.2f} CPU-s")


if __name__ == "__main__":
    asyncio.run(main())
