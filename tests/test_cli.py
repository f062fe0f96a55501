"""Section 9: `python downloader.py` and `uvicorn downloader:app` as an operator runs them."""

from __future__ import annotations

import http.client
import json
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT, TEN
import pytest

from helpers import Server, clean_env, free_port, run_cli, wait_for


def test_cli_serves_root_and_prints_its_url(root: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "downloader.py", "--root", str(root), "--port", str(port)]
    with Server(command, tmp_path / "cli.log", env={"DOWNLOADER_ROOT": "/overridden/by/flag"}, port=port) as server:
        first_line = server.log_text().splitlines()[0]
        assert first_line == f"downloader: serving {root.resolve()} on http://127.0.0.1:{port}/ (Ctrl-C stops)"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/download/ten.txt")
        assert conn.getresponse().read() == TEN
        conn.close()


def test_bad_setting_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_cli("--port", str(free_port()), DOWNLOADER_CHUNK_SIZE="lots")
    assert result.returncode == 2
    assert result.stderr == "downloader: DOWNLOADER_CHUNK_SIZE: must be a whole number, got 'lots'\n"


def test_uvicorn_with_bad_setting_stops_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "downloader:app", "--port", str(free_port())],
        cwd=PROJECT, env=clean_env(DOWNLOADER_ROOT=str(tmp_path / "missing")), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert re.search(r"^downloader: DOWNLOADER_ROOT: '.*missing' is not a directory$", result.stderr, re.M)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (["--port", "99999"], {}, "--port: must be a whole number from 0 to 65535, got '99999'"),
        ([], {"DOWNLOADER_PORT": "99999"}, "DOWNLOADER_PORT: must be a whole number from 0 to 65535, got '99999'"),
        (["--workers", "0"], {}, "--workers: must be a whole number from 1 to 256, got '0'"),
        (["--port", "\u00b2"], {}, "--port: must be a whole number from 0 to 65535, got '\u00b2'"),
        (["--host", "256.1.1.1", "--port", "0"], {}, "--host: can't listen on 256.1.1.1:0: Name or service not known"),
        (["--root", ""], {}, "--root: must be a directory path, or s3://bucket/prefix"),
        ([], {"DOWNLOADER_ROOT": ""}, "DOWNLOADER_ROOT: must be a directory path, or s3://bucket/prefix"),
        ([], {"DOWNLOADER_ROOT": " "}, "DOWNLOADER_ROOT: must be a directory path, or s3://bucket/prefix"),
        ([], {"DOWNLOADER_ACCESS_LOG": "/no/such/dir/access.log"}, "DOWNLOADER_ACCESS_LOG: folder '/no/such/dir' does not exist"),
        ([], {"DOWNLOADER_ACCESS_LOG": "/tmp"}, "DOWNLOADER_ACCESS_LOG: '/tmp' is a directory, not a file"),
        ([], {"DOWNLOADER_CATALOG": "/tmp"}, "DOWNLOADER_CATALOG: '/tmp' is a directory, not a file"),
        (["--host", "192.0.2.1", "--port", "0"], {}, "--host: can't listen on 192.0.2.1:0: Cannot assign requested address"),
        (["--bogus"], {}, "unrecognized arguments: --bogus (python downloader.py --help)"),
        (["--prox"], {}, "unrecognized arguments: --prox (python downloader.py --help)"),
        (["--port"], {}, "argument --port: expected one argument (python downloader.py --help)"),
        (["--root", "s3://Bad_Bucket"], {},
         "--root: 's3://Bad_Bucket': 'Bad_Bucket' is not a bucket name (3 to 63 lower-case letters, digits, dots and hyphens): s3://bucket/prefix"),
        (["--root", "s3://bucket/a/../b"], {}, "--root: 's3://bucket/a/../b' has an empty, . or .. segment in its prefix"),
        ([], {"DOWNLOADER_S3_MODE": "sideways"}, "DOWNLOADER_S3_MODE: must be proxy or redirect"),
        ([], {"DOWNLOADER_S3_MODE": "redirect"}, "DOWNLOADER_S3_MODE: applies only to a bucket root (root s3://bucket/prefix)"),
        ([], {"DOWNLOADER_ROOT": "s3://bucket", "DOWNLOADER_S3_URL_TTL": "abc"}, "DOWNLOADER_S3_URL_TTL: must be a whole number, got 'abc'"),
    ],
    ids=["port-flag", "port-env", "workers", "port-superscript", "host", "root-flag-empty", "root-env-empty", "root-blank", "log-folder", "log-dir", "catalog-dir",
         "host-not-here", "unknown-flag", "abbreviated-flag", "flag-without-value", "bucket-name", "bucket-prefix", "s3-mode", "s3-mode-on-disk",
         "s3-url-ttl"],
)
def test_bad_start_up_is_one_line_naming_the_flag_or_variable(args: list[str], env: dict[str, str], line: str) -> None:
    """Issue "No surprises" #1, #2, #10: nothing is announced, nothing is served."""
    result = run_cli(*args, **env)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"downloader: {line}\n")


def test_a_catalog_that_is_not_sqlite_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "catalog.db").write_bytes(b"this is no database, but a text file of some length" * 100)
    result = run_cli("--port", "0", DOWNLOADER_CATALOG=str(tmp_path / "catalog.db"))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"downloader: DOWNLOADER_CATALOG: '{tmp_path / 'catalog.db'}' can't be opened as a SQLite catalog (")
    assert result.stderr.count("\n") == 1


def test_a_sqlite_file_that_is_not_a_catalog_stops_start_up(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE links (x)")
    for args in (["--port", "0"], ["list"]):
        result = run_cli(*args, DOWNLOADER_CATALOG=str(other))
        wanted = f"downloader: DOWNLOADER_CATALOG: '{other}' holds a links table that is not a downloader catalog\n"
        assert (args, result.returncode, result.stdout, result.stderr) == (args, 2, "", wanted)


def test_a_port_in_use_is_one_line_before_anything_is_announced() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"downloader: --port: can't listen on 127.0.0.1:{port}: Address already in use\n"


def test_port_0_announces_the_port_it_got(root: Path, tmp_path: Path) -> None:
    command = [sys.executable, "downloader.py", "--root", str(root), "--port", "0"]
    with Server(command, tmp_path / "cli.log", env={}, health=None) as server:
        line = server.log_text().splitlines()[0]
        port = int(re.fullmatch(r"downloader: serving \S+ on http://127\.0\.0\.1:(\d+)/ \(Ctrl-C stops\)", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/download/ten.txt")
        assert conn.getresponse().read() == TEN
        conn.close()


def test_with_listing_off_the_start_up_line_points_at_downloads(root: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "downloader.py", "--root", str(root), "--port", str(port)]
    with Server(command, tmp_path / "cli.log", env={"DOWNLOADER_SECRET": "k"}, port=port) as server:
        assert server.log_text().splitlines()[0] == f"downloader: serving {root.resolve()} on http://127.0.0.1:{port}/download/PATH (Ctrl-C stops)"


@pytest.mark.parametrize("runner", ["cli", "uvicorn"])
def test_one_access_log_in_json(root: Path, tmp_path: Path, runner: str) -> None:
    """Issue "No surprises" #14: one line per request, JSON, not uvicorn's too."""
    port = free_port()
    if runner == "cli":
        command = [sys.executable, "downloader.py", "--root", str(root), "--port", str(port)]
    else:
        command = [sys.executable, "-m", "uvicorn", "downloader:app", "--port", str(port)]
    with Server(command, tmp_path / "out.log", env={"DOWNLOADER_ROOT": str(root)}, port=port) as server:
        for path in ("/download/ten.txt", "/api/files", "/healthz"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            assert conn.getresponse().status == 200
            conn.close()

        def json_lines() -> list[dict]:
            return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]

        lines = wait_for(lambda: len(json_lines()) >= 2 and json_lines(), 10, "two JSON lines")
        assert [(line["path"], line["status"]) for line in lines] == [("/download/ten.txt", 200), ("/api/files", 200)]
        assert '"GET ' not in server.log_text()  # no uvicorn access line


def test_importing_the_module_reads_no_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import downloader; print('ok')"],
        cwd=PROJECT, env=clean_env(DOWNLOADER_CHUNK_SIZE="lots"), capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n")
