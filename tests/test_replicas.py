"""Scale out (README: Scale out): three replicas (`python downloader.py`, run as the README's
scale-out example says) share one root and one PostgreSQL catalog behind a real nginx, the
README's upstream block. Download limits hold across replicas, a revocation on one is seen by
all, a replica killed mid-run loses no count, and PostgreSQL stopped mid-run is an answer."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

import downloader
from conftest import TEN, make_root, need
from downloader import Catalog
from helpers import MIB, PROJECT, Postgres, Server, free_port, wait_for, write_file

SECRET = "replica-secret-5d1"
TOKEN = "replica-admin-9e0"
GONE = {"detail": "This download link has been used up"}
REVOKED = {"detail": "This download link was revoked"}
CATALOG_DOWN = {"detail": "The link catalog is unavailable"}


def readme_block(name: str) -> str:
    readme = (PROJECT / "README.md").read_text(encoding="utf-8")
    return re.search(rf"<!-- example: {name} -->\s*```\w+\n(.*?)```", readme, re.S).group(1)


def replica_command(root: Path, catalog: str, port: int, secret: bool) -> tuple[list[str], dict[str, str]]:
    """The README's scale-out example, on this machine: its exports as the environment, its command
    with a free port on 127.0.0.1; nginx on 127.0.0.1 is the trusted proxy."""
    env: dict[str, str] = {}
    command: list[str] = []
    for line in readme_block("scale-out").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            env.update(word.split("=", 1) for word in words[1:])
        elif words[:2] == ["python", "downloader.py"]:
            command = words
    replaced = {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_CATALOG": catalog, "DOWNLOADER_ADMIN_TOKEN": TOKEN, "DOWNLOADER_SECRET": SECRET}
    assert sorted(env) == sorted(replaced), f"the README's scale-out example sets {sorted(env)}"
    env.update(replaced)
    if not secret:
        del env["DOWNLOADER_SECRET"]
    for old, new in (("0.0.0.0", "127.0.0.1"), ("8001", str(port)), ("10.0.0.2", "127.0.0.1")):
        assert command.count(old) == 1, f"the README's scale-out command no longer has {old!r}"
        command[command.index(old)] = new
    return [sys.executable, *command[1:]], env


def nginx_upstream_config(base: Path, ports: list[int]) -> tuple[str, int]:
    """The README's upstream block pointed at the replicas, inside a minimal top-level config
    that writes only under `base`; and nginx's port."""
    block = readme_block("nginx-upstream")
    for i, port in enumerate(ports):
        old = f"server 10.0.0.{11 + i}:8001 "
        assert block.count(old) == 1, f"the README's upstream block no longer has {old!r}"
        block = block.replace(old, f"server 127.0.0.1:{port} ")
    listen = free_port()
    assert block.count("listen 8080;") == 1
    block = block.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    temp = "\n".join(f"    {kind}_temp_path {base}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = (
        f"{user}daemon off;\nworker_processes 1;\npid {base}/nginx.pid;\nerror_log {base}/error.log;\n"
        f"events {{}}\nhttp {{\n    default_type application/octet-stream;\n    access_log off;\n{temp}\n{block}}}\n"
    )
    return config, listen


class Cluster:
    """Three replicas on one root and one catalog, and nginx in front (`url`); each replica's
    access log is a file, to tell which served what."""

    def __init__(self, root: Path, catalog: str, base: Path, *, secret: bool = False, **env: str) -> None:
        self.base = base
        self.replicas: list[Server] = []
        self.nginx: Server | None = None
        try:
            for i in range(3):
                port = free_port()
                command, replica_env = replica_command(root, catalog, port, secret)
                replica_env.update(DOWNLOADER_ACCESS_LOG=str(base / f"access{i}.log"), **env)
                self.replicas.append(Server(command, base / f"replica{i}.log", env=replica_env, port=port))
            nginx = need("nginx")
            (base / "nginx").mkdir()
            config, listen = nginx_upstream_config(base / "nginx", [r.port for r in self.replicas])
            (base / "nginx" / "nginx.conf").write_text(config)
            command = [nginx, "-p", str(base / "nginx"), "-e", str(base / "nginx" / "error.log"), "-c", str(base / "nginx" / "nginx.conf")]
            self.nginx = Server(command, base / "nginx" / "error.log", port=listen, health=None, timeout=15)
        except BaseException:
            self.stop(show_logs=True)
            raise
        self.url = self.nginx.url

    def served(self, path: str) -> list[int]:
        """How many requests for `path` each replica logged."""
        counts = []
        for i in range(3):
            log = self.base / f"access{i}.log"
            lines = log.read_text().splitlines() if log.exists() else []
            counts.append(sum(json.loads(line)["path"] == path for line in lines))
        return counts

    def stop(self, show_logs: bool = False) -> None:
        for server in [self.nginx, *self.replicas]:
            if server is not None:
                server.stop(show_log=show_logs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The shared root, with big.bin (4 MiB) beside the usual small files; and big.bin's sha256."""
    root = make_root(tmp_path_factory.mktemp("replicas"))
    return root, write_file(root / "big.bin", 4 * MIB + 321)


@pytest.fixture(scope="module")
def cluster(files: tuple[Path, str], postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    """Replicas with a secret (signed /download) on a catalog of their own; the catalog's URL. Each
    download is paced to 8 MiB/s, so that big.bin takes half a second and racers overlap."""
    catalog = postgres.database()
    started = Cluster(files[0], catalog, tmp_path_factory.mktemp("cluster"), secret=True, DOWNLOADER_RATE_LIMIT=str(8 * MIB))
    try:
        yield started, catalog
    finally:
        started.stop()


class Result(NamedTuple):
    status: int
    size: int
    sha256: str
    detail: object


def fetch(url: str, user_agent: str, headers: dict[str, str] | None = None) -> Result:
    """One GET read to its end or until the server cuts it short."""
    parts = httpx.URL(url)
    conn = http.client.HTTPConnection(parts.host, parts.port, timeout=60)
    try:
        conn.request("GET", parts.raw_path.decode(), headers={"User-Agent": user_agent, **(headers or {})})
        response = conn.getresponse()
        body = b""
        with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
            while chunk := response.read(256 * 1024):
                body += chunk
        detail = json.loads(body) if response.getheader("content-type") == "application/json" else None
        return Result(response.status, len(body), hashlib.sha256(body).hexdigest(), detail)
    finally:
        conn.close()


def admin(url: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)


# =============================================================================
# Limits, revocations and what agrees across replicas
# =============================================================================


def test_fifty_clients_racing_across_replicas_for_a_three_download_link_get_three_copies(files: tuple[Path, str], cluster: tuple[Cluster, str]) -> None:
    (_, want), (nodes, catalog) = files, cluster
    link = Catalog(catalog).add("big.bin", max_downloads=3)
    start = threading.Barrier(50)

    def racer(i: int) -> Result:
        start.wait()
        return fetch(f"{nodes.url}/files/{link.id}", f"client-{i}")

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(racer, range(50)))
    complete = [r for r in results if (r.status, r.size) == (200, 4 * MIB + 321)]
    cut = [r for r in results if r.status == 200 and r.size < 4 * MIB + 321]  # aborted at the last byte: over the limit
    assert [r.sha256 for r in complete] == [want] * 3
    assert all((r.status, r.detail) == (410, GONE) for r in results if r not in complete + cut)
    assert len(cut) >= 25, f"only {len(cut)} racers reached the last byte after the limit: no race"
    assert Catalog(catalog).get(link.id).downloads == 3
    served = nodes.served(f"/files/{link.id}")
    assert sum(served) == 50 and min(served) > 0, f"nginx spread the 50 requests as {served}"


def test_a_download_manager_on_a_one_time_link_counts_once_across_replicas(files: tuple[Path, str], cluster: tuple[Cluster, str], tmp_path: Path) -> None:
    """aria2c's eight segments land on all three replicas; the one with the last byte counts, the
    others are its holder's own download (recorded in PostgreSQL), and no second client gets it."""
    aria2c = need("aria2c")
    (_, want), (nodes, catalog) = files, cluster
    link = Catalog(catalog).add("big.bin", max_downloads=1)
    url = f"{nodes.url}/files/{link.id}"
    command = [aria2c, "-x8", "-s8", "-k1M", "--allow-overwrite=true", "--auto-file-renaming=false", "-d", str(tmp_path), "--console-log-level=warn"]
    first = subprocess.run([*command, "-o", "first.bin", url], capture_output=True, text=True, timeout=60)
    second = subprocess.run([*command, "-o", "second.bin", url], capture_output=True, text=True, timeout=60)
    curl = fetch(url, "curl/8")
    assert first.returncode == 0, first.stdout + first.stderr
    assert hashlib.sha256((tmp_path / "first.bin").read_bytes()).hexdigest() == want
    assert second.returncode != 0
    assert (curl.status, curl.detail) == (410, GONE)
    assert Catalog(catalog).get(link.id).downloads == 1
    assert min(nodes.served(f"/files/{link.id}")) > 0


def test_a_revocation_on_one_replica_is_refused_by_the_others_at_once(cluster: tuple[Cluster, str]) -> None:
    nodes, _ = cluster
    one, two, three = (r.url for r in nodes.replicas)
    created = admin(one, "POST", "/api/links", {"path": "ten.txt"})
    assert created.status_code == 201
    path = f"/files/{created.json()['id']}"
    before = [httpx.get(base + path) for base in (two, three, nodes.url)]
    assert admin(one, "DELETE", f"/api/links/{created.json()['id']}").status_code == 204
    after = [httpx.get(base + path) for base in (two, three, nodes.url)]  # no pause: nothing is cached
    listed = [link for link in admin(three, "GET", "/api/links").json()["links"] if link["id"] == created.json()["id"]]
    assert [(r.status_code, r.content) for r in before] == [(200, TEN)] * 3
    assert [(r.status_code, r.json()) for r in after] == [(410, REVOKED)] * 3
    assert [link["revoked"] for link in listed] == [True]


def test_replicas_agree_on_validators_and_verify_each_others_signatures(cluster: tuple[Cluster, str]) -> None:
    nodes, catalog = cluster
    signed = downloader.sign_url("big.bin", secret=SECRET, expires_in=600)
    link = Catalog(catalog).add("big.bin")
    heads = [httpx.head(r.url + signed) for r in nodes.replicas]
    by_id = [httpx.head(f"{r.url}/files/{link.id}") for r in nodes.replicas]
    resumed = [httpx.get(r.url + signed, headers={"Range": "bytes=100-199", "If-Range": heads[0].headers["etag"]}) for r in nodes.replicas]
    tampered = [httpx.get(r.url + signed.replace("big.bin", "ten.txt")) for r in nodes.replicas]
    assert [r.status_code for r in heads + by_id] == [200] * 6
    assert len({(r.headers["etag"], r.headers["last-modified"], r.headers["content-length"]) for r in heads + by_id}) == 1
    assert [(r.status_code, r.headers["content-range"]) for r in resumed] == [(206, f"bytes 100-199/{4 * MIB + 321}")] * 3
    assert len({r.content for r in resumed}) == 1
    assert [(r.status_code, r.json()) for r in tampered] == [(403, {"detail": "Invalid link signature"})] * 3


# =============================================================================
# Failures: a replica killed, PostgreSQL stopped
# =============================================================================


def test_a_replica_killed_mid_run_loses_no_count(files: tuple[Path, str], postgres: Postgres, tmp_path: Path) -> None:
    """Four clients download a 100-use link again and again through nginx, each transfer paced to
    about half a second; one replica is killed (SIGKILL) mid-run. Its transfers in flight are cut
    short and not counted; every later request goes to the two left, and every complete copy is
    counted, no more."""
    (root, want), catalog = files, postgres.database()
    nodes = Cluster(root, catalog, tmp_path, DOWNLOADER_RATE_LIMIT=str(8 * MIB))
    try:
        link = Catalog(catalog).add("big.bin", max_downloads=100)
        results: list[tuple[float, Result]] = []
        stop = time.monotonic() + 6

        def client(i: int) -> None:
            while time.monotonic() < stop:
                began = time.monotonic()
                results.append((began, fetch(f"{nodes.url}/files/{link.id}", f"client-{i}")))

        workers = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(2.5)
        victim = nodes.replicas[1]
        os.killpg(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        for worker in workers:
            worker.join(60)
        counted = Catalog(catalog).get(link.id).downloads
    finally:
        nodes.stop()
    complete = [r for _, r in results if r.status == 200 and r.sha256 == want]
    cut = [r for _, r in results if r not in complete]
    later = [r for began, r in results if began > killed + 0.1]
    assert counted == len(complete) > 0
    assert all(r.status == 200 and r.size < 4 * MIB + 321 for r in cut), cut
    assert len(cut) <= 4, f"{len(cut)} transfers cut: only those in flight on the killed replica may be"
    assert later and all(r in complete for r in later), "a request after the kill failed"


def test_postgresql_stopped_mid_run_is_an_answer_and_its_return_needs_no_restart(files: tuple[Path, str], tmp_path: Path) -> None:
    (root, want) = files
    server = Postgres()
    try:
        catalog = server.database()
        nodes = Cluster(root, catalog, tmp_path, DOWNLOADER_RATE_LIMIT=str(4 * MIB))
        try:
            link = Catalog(catalog).add("big.bin", max_downloads=10)
            url = f"{nodes.url}/files/{link.id}"
            assert fetch(url, "before").sha256 == want  # a second at 4 MiB/s
            in_flight: list[Result] = []
            reader = threading.Thread(target=lambda: in_flight.append(fetch(url, "in flight")))
            reader.start()
            time.sleep(0.3)
            server.stop()
            began = time.monotonic()
            refused = [httpx.get(f"{r.url}/files/{link.id}", timeout=10) for r in nodes.replicas]
            created = admin(nodes.url, "POST", "/api/links", {"path": "ten.txt"})
            took = time.monotonic() - began
            health = [httpx.get(f"{r.url}/healthz", timeout=10) for r in nodes.replicas]
            plain = httpx.get(f"{nodes.url}/download/ten.txt", timeout=10)
            reader.join(30)
            server.start()
            recovered = wait_for(lambda: all(httpx.get(f"{r.url}/healthz").status_code == 200 for r in nodes.replicas), 10, "every replica's /healthz back to 200")
            after = [fetch(f"{r.url}/files/{link.id}", "after") for r in nodes.replicas]
        finally:
            nodes.stop(show_logs=False)
        counted = Catalog(catalog).get(link.id).downloads
    finally:
        server.close()
    for response in [*refused, created]:
        assert (response.status_code, response.json(), response.headers["retry-after"]) == (503, CATALOG_DOWN, "5")
    assert took < 3, f"four 503s took {took:.1f} s"
    assert [(r.status_code, r.json()) for r in health] == [(503, {"status": "unavailable", "detail": "the link catalog can't be read and written"})] * 3
    assert (plain.status_code, plain.content) == (200, TEN)
    assert in_flight[0].status == 200 and in_flight[0].size == 4 * MIB + 321 - 1  # its count failed: one byte short
    assert recovered
    assert [r.sha256 for r in after] == [want] * 3
    assert counted == 1 + 3  # before, and one on each replica after; never the one cut short
