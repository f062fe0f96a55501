"""What serving from a bucket costs, against the same bytes from disk, in one run (not collected by pytest).

    python tests/bench_s3.py [--size-mib 1024] [--runs 3] [--seconds 5]

Starts a SeaweedFS of its own (helpers.Seaweed) and puts one object, the same bytes as a file on disk. Then:
- throughput: `curl -o /dev/null` of the whole object, `--runs` times each, from
  - disk: `python downloader.py` on the directory (zero-copy, downloader:HTTPProtocol),
  - proxy: `python downloader.py` on s3://bucket (every byte through Python, If-Match windows),
  - store: SeaweedFS itself, a presigned URL (the store's own speed, the proxy's ceiling),
  with the server process's CPU seconds per GiB (utime + stime from /proc, ours only; the store's apart);
- requests per second (`wrk -c32`, when installed) of a 1 KiB download from disk, a 1 KiB object proxied,
  and redirect mode's 302 to a presigned URL (the policy in Python, no byte through it).
Alternating runs, medians; the figures to compare are the ratios in the same run."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import obstore  # noqa: E402

import downloader  # noqa: E402
from bench_catalog import wrk  # noqa: E402
from helpers import MIB, Seaweed, Server, free_port, write_file  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def fetch(url: str, size: int, pid: int | None) -> tuple[float, float | None]:
    """MiB/s of one curl of `url`, and CPU-s per GiB of process `pid` meanwhile."""
    cpu = cpu_seconds(pid) if pid else 0.0
    began = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", url], capture_output=True, text=True, check=True).stdout
    took = time.perf_counter() - began
    got, status = out.split()
    if (int(got), status) != (size, "200"):
        raise SystemExit(f"{url}: {status}, {got} bytes of {size}")
    per_gib = (cpu_seconds(pid) - cpu) * 1024 * MIB / size if pid else None
    return size / MIB / took, per_gib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    size = args.size_mib * MIB
    base = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    seaweed = Seaweed()
    servers: list[Server] = []
    try:
        root = base / "root"
        root.mkdir()
        write_file(root / "big.bin", size)
        (root / "one.bin").write_bytes(os.urandom(1024))
        store = seaweed.store()
        obstore.put(store, "big.bin", root / "big.bin", chunk_size=8 * MIB)
        obstore.put(store, "one.bin", (root / "one.bin").read_bytes())

        def start(name: str, env: dict[str, str]) -> Server:
            port = free_port()
            server = Server([sys.executable, "downloader.py", "--port", str(port)], base / f"{name}.log",
                            env={"DOWNLOADER_ACCESS_LOG": "off", **env}, port=port)
            servers.append(server)
            return server

        disk = start("disk", {"DOWNLOADER_ROOT": str(root)})
        proxy = start("proxy", seaweed.env())
        redirect = start("redirect", seaweed.env(DOWNLOADER_S3_MODE="redirect"))
        bucket = downloader.Bucket(f"s3://{seaweed.bucket}", seaweed.env())
        sources = {
            "disk": (f"{disk.url}/download/big.bin", disk.pid),
            "proxy": (f"{proxy.url}/download/big.bin", proxy.pid),
            "store": (None, None),
        }
        results: dict[str, list[tuple[float, float | None]]] = {name: [] for name in sources}
        for _ in range(args.runs):
            for name, (url, pid) in sources.items():
                url = url or bucket.presign("big.bin", 600, {})
                results[name].append(fetch(url, size, pid))
        rps = {
            "disk 1 KiB": wrk(disk.port, "/download/one.bin", args.seconds),
            "proxy 1 KiB": wrk(proxy.port, "/download/one.bin", args.seconds),
            "redirect 302": wrk(redirect.port, "/download/one.bin", args.seconds),
        }
    finally:
        for server in servers:
            server.stop()
        seaweed.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs; one {args.size_mib} MiB object, {args.runs} alternating runs (min / median / max)")
    disk_speed = statistics.median(speed for speed, _ in results["disk"])
    print("source   MiB/s (min / median / max)        x disk   CPU-s per GiB (ours)")
    for name, runs in results.items():
        speeds = sorted(speed for speed, _ in runs)
        cpus = [cpu for _, cpu in runs if cpu is not None]
        cpu = f"{statistics.median(cpus):.2f}" if cpus else "- (the store's own)"
        print(f"{name:<8} {speeds[0]:>7,.0f} / {statistics.median(speeds):>7,.0f} / {speeds[-1]:>7,.0f}   {statistics.median(speeds) / disk_speed:>8.2f}   {cpu}")
    base_rps = rps["disk 1 KiB"]
    print("requests/s with wrk -c32" + ("" if base_rps else ": wrk is not installed"))
    for name, value in rps.items():
        if value:
            print(f"  {name:<13} {value:>8,.0f}   x disk {value / base_rps:.2f}")


if __name__ == "__main__":
    main()
