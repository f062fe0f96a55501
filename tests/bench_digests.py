"""What the background hasher costs requests (not collected by pytest).

    python tests/bench_digests.py [--tree-mib 2048] [--rates 64,256] [--rounds 3] [--seconds 4]

Makes a root holding a 1 KiB file and a tree of TREE_MIB MiB (files of 256 MiB), then, for each hash_rate
(MiB/s) and each round: starts `python downloader.py` with a new digest cache, so that it hashes the whole tree,
measures requests/s of the 1 KiB download with `wrk -c32` while it hashes ("busy"), waits until /sha256sums says
nothing is pending, and measures again ("after"); then the same on a server with digests off ("off": the baseline,
measured as soon after its start, and as long after, so that a server's age is no difference). Prints each
round, the ratios busy/after (one process: the issue's "within 10% of idle"), busy/off and after/off, and how
long the tree took. The server runs on one core, its hasher included, and wrk on another: the hasher's CPU is
taken from the requests' in full. The tree is in the page cache (just written): the hasher's CPU, not the disk's."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import downloader  # noqa: E402
from bench_catalog import wrk  # noqa: E402
from helpers import MIB, Server, free_port, write_file  # noqa: E402


def pending(url: str) -> int:
    return int(httpx.get(f"{url}/sha256sums/", timeout=30).headers["digests-pending"])


PINNED = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


def start(env: dict[str, str], base: Path) -> Server:
    """`python downloader.py`, on one core (hasher and event loop alike) where there are two; wrk gets another."""
    port = free_port()
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if PINNED else []
    return Server([*pin, sys.executable, "downloader.py", "--port", str(port)], base / "server.log", env=env, port=port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree-mib", type=int, default=2048)
    parser.add_argument("--rates", default="64,256", help="hash_rate values to try, MiB/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    if PINNED:  # this process, and so wrk, off the server's core
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[1:])
    base = Path(tempfile.mkdtemp(prefix="bench-digests-"))
    try:
        root = base / "root"
        (root / "tree").mkdir(parents=True)
        (root / "one.bin").write_bytes(os.urandom(1024))
        for i in range(0, args.tree_mib, 256):
            write_file(root / "tree" / f"part{i // 256:03}.bin", min(256, args.tree_mib - i) * MIB)
        time.sleep(downloader.MIN_STRONG_AGE_S + 0.05)
        print(f"1 KiB downloads, wrk -t1 -c32 {args.seconds:g} s, while the hasher reads a {args.tree_mib} MiB tree, and after")
        print("| hash_rate | round | busy req/s | after | off, early | off, late | busy / after | busy / off | after / off | tree hashed in |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for rate in (int(r) for r in args.rates.split(",")):
            ratios: list[tuple[float, float, float]] = []
            for round_ in range(1, args.rounds + 1):
                env = {
                    "DOWNLOADER_ROOT": str(root), "DOWNLOADER_ACCESS_LOG": "off", "DOWNLOADER_HASH_RATE": str(rate * MIB),
                    "DOWNLOADER_DIGEST_CACHE": str(base / f"cache-{rate}-{round_}.sqlite3"),
                }
                with start(env, base) as server:
                    began = time.monotonic()
                    busy = wrk(server.port, "/download/one.bin", args.seconds)
                    if pending(server.url) == 0:
                        raise SystemExit("the tree was hashed before wrk finished: use a bigger --tree-mib or a lower rate")
                    while pending(server.url):
                        time.sleep(0.2)
                    took = time.monotonic() - began
                    after = wrk(server.port, "/download/one.bin", args.seconds)
                with start({"DOWNLOADER_ROOT": str(root), "DOWNLOADER_ACCESS_LOG": "off", "DOWNLOADER_DIGESTS": "false"}, base) as server:
                    began = time.monotonic()
                    early = wrk(server.port, "/download/one.bin", args.seconds)
                    time.sleep(max(0.0, took - (time.monotonic() - began)))
                    late = wrk(server.port, "/download/one.bin", args.seconds)
                if None in (busy, after, early, late):
                    raise SystemExit("wrk is not installed")
                ratios.append((busy / after, busy / early, after / late))
                print(f"| {rate} MiB/s | {round_} | {busy:,.0f} | {after:,.0f} | {early:,.0f} | {late:,.0f} | {busy / after:.2f} | {busy / early:.2f} | {after / late:.2f} | {took:.1f} s |")
            medians = " | ".join(f"{statistics.median(r[i] for r in ratios):.2f}" for i in range(3))
            print(f"| {rate} MiB/s | median | | | | | {medians} | |")

    finally:
        shutil.rmtree(base, ignore_errors=True)  # the tree: gigabytes

if __name__ == "__main__":
    main()
