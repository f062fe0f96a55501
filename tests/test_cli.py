"""Section 9: `python downloader.py` and `uvicorn downloader:app` as an operator runs them."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT, TEN
from helpers import Server, clean_env, free_port, run_cli


def test_cli_serves_root_and_prints_its_url(root: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "downloader.py", "--root", str(root), "--port", str(port)]
    with Server(command, tmp_path / "cli.log", env={"DOWNLOADER_ROOT": "/overridden/by/flag"}, port=port) as server:
        first_line = server.log_text().splitlines()[0]
        assert first_line == f"downloader: serving {root.resolve()} on http://127.0.0.1:{port}/"
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


def test_bad_port_flag_is_refused() -> None:
    result = run_cli("--port", "70000")
    assert (result.returncode, result.stderr) == (2, "downloader: DOWNLOADER_PORT: must be a whole number from 0 to 65535, got '70000'\n")


def test_importing_the_module_reads_no_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import downloader; print('ok')"],
        cwd=PROJECT, env=clean_env(DOWNLOADER_CHUNK_SIZE="lots"), capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n")
