"""Real clients against a live server: curl, wget and aria2c save exact files."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from conftest import UNICODE_NAME, need


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, timeout=120)


def test_curl_oj_saves_under_the_utf8_name(live_server, root: Path, tmp_path: Path) -> None:
    curl = need("curl")
    out = tmp_path / "curl-out"
    out.mkdir()
    url = f"{live_server.url}/download/r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    result = run([curl, "-sS", "-f", "-O", "-J", url], out)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == [UNICODE_NAME]
    assert (out / UNICODE_NAME).read_bytes() == (root / UNICODE_NAME).read_bytes()


def test_wget_content_disposition_saves_under_the_utf8_name(live_server, root: Path, tmp_path: Path) -> None:
    wget = need("wget")
    out = tmp_path / "wget-out"
    out.mkdir()
    url = f"{live_server.url}/download/r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    result = run([wget, "-q", "--content-disposition", url], out)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == [UNICODE_NAME]
    assert hashlib.sha256((out / UNICODE_NAME).read_bytes()).digest() == hashlib.sha256((root / UNICODE_NAME).read_bytes()).digest()
