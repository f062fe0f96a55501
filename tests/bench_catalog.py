"""What a catalog link costs, SQLite against PostgreSQL, in one run (not collected by pytest).

    python tests/bench_catalog.py [--seconds 5] [--requests 2000]

Starts a PostgreSQL server of its own (Debian's postgresql, durable defaults: fsync and synchronous commit
on, as SQLite's WAL commits are) on a Unix socket, then for each catalog:
- claims per second: Catalog.claim of a limited link (the count and its holder) from 1 thread, and from
  CATALOG_THREADS threads at once, as a server's catalog calls run;
- through HTTP, `python downloader.py` with that catalog: the median and p99 latency of GET /files/{id}
  (a 1 KiB file; the lookup, the count and the holder before the head) against GET /download of the same
  file, one request at a time; and requests per second of each with `wrk -c32` when wrk is installed."""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import downloader  # noqa: E402
from helpers import Postgres, Server, free_port  # noqa: E402


def claims_per_second(location: str, threads: int, seconds: float) -> float:
    catalog = downloader.Catalog(location)
    link = catalog.add("one.bin", max_downloads=downloader.MAX_DOWNLOADS_CAP)
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        while time.monotonic() < stop:
            assert catalog.claim(link.id, f"holder-{i}")
            done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - began)


def latencies(port: int, path: str, count: int) -> tuple[float, float]:
    """Median and p99 in ms of `count` sequential GETs on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for _ in range(count):
        began = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        times.append(time.perf_counter() - began)
    conn.close()
    times.sort()
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000


def wrk(port: int, path: str, seconds: float) -> float | None:
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{int(seconds)}s", f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise SystemExit(f"wrk saw errors on {path}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    postgres = Postgres(durable=True)
    base = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    try:
        root = base / "root"
        root.mkdir()
        (root / "one.bin").write_bytes(os.urandom(1024))
        catalogs = {"sqlite": str(base / "catalog.db"), "postgresql": postgres.database()}
        rows = []
        for name, location in catalogs.items():
            one = claims_per_second(location, 1, args.seconds)
            many = claims_per_second(location, downloader.CATALOG_THREADS, args.seconds)
            link = downloader.Catalog(location).add("one.bin", max_downloads=downloader.MAX_DOWNLOADS_CAP)
            port = free_port()
            env = {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_CATALOG": location, "DOWNLOADER_ACCESS_LOG": "off"}
            with Server([sys.executable, "downloader.py", "--port", str(port)], base / f"{name}.log", env=env, port=port):
                plain = latencies(port, "/download/one.bin", args.requests)
                by_id = latencies(port, f"/files/{link.id}", args.requests)
                plain_rps = wrk(port, "/download/one.bin", args.seconds)
                by_id_rps = wrk(port, f"/files/{link.id}", args.seconds)
            rows.append((name, one, many, plain, by_id, plain_rps, by_id_rps))
    finally:
        postgres.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs; PostgreSQL with fsync and synchronous_commit on; SQLite in WAL mode")
    print("catalog     claims/s 1 thread  claims/s 4 threads  /download p50/p99 ms  /files p50/p99 ms  added p50 ms  /download req/s  /files req/s  ratio")
    for name, one, many, plain, by_id, plain_rps, by_id_rps in rows:
        ratio = f"{by_id_rps / plain_rps:.2f}" if plain_rps and by_id_rps else "-"
        print(
            f"{name:<11} {one:>17,.0f}  {many:>18,.0f}  {plain[0]:>9.2f} / {plain[1]:<7.2f}  {by_id[0]:>7.2f} / {by_id[1]:<7.2f}"
            f"  {by_id[0] - plain[0]:>12.2f}  {plain_rps or 0:>15,.0f}  {by_id_rps or 0:>12,.0f}  {ratio:>5}"
        )


if __name__ == "__main__":
    main()
