"""Real clients against a live server: curl, wget and aria2c save exact files."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from conftest import UNICODE_NAME, need
from helpers import uvicorn_server


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


def big_file(root: Path, mib: int = 40) -> str:
    """root/big.bin of `mib` MiB of random bytes; returns its sha256."""
    data = __import__("os").urandom(mib * 1024 * 1024)
    (root / "big.bin").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_curl_resumes_a_partial_download(live_server, root: Path, tmp_path: Path) -> None:
    curl = need("curl")
    wanted = big_file(root)
    target = tmp_path / "big.bin"
    target.write_bytes((root / "big.bin").read_bytes()[: 13 * 1024 * 1024 + 7])
    result = run([curl, "-sS", "-f", "-C", "-", "-o", str(target), "-w", "%{http_code} %{size_download}", f"{live_server.url}/download/big.bin"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"206 {40 * 1024 * 1024 - (13 * 1024 * 1024 + 7)}"
    assert sha256_of(target) == wanted


def test_curl_resume_of_a_complete_file_is_416_and_keeps_it(live_server, root: Path, tmp_path: Path) -> None:
    curl = need("curl")
    wanted = big_file(root, 2)
    target = tmp_path / "big.bin"
    target.write_bytes((root / "big.bin").read_bytes())
    result = run([curl, "-sS", "-C", "-", "-o", str(target), "-w", "%{http_code}", f"{live_server.url}/download/big.bin"], tmp_path)
    assert (result.returncode, result.stdout) == (0, b"416")
    assert sha256_of(target) == wanted


def access_lines(log: Path) -> list[dict]:
    """The server's JSON access-log lines."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_wget_completes_a_truncated_file(live_server, root: Path, tmp_path: Path) -> None:
    wget = need("wget")
    wanted = big_file(root)
    target = tmp_path / "big.bin"
    target.write_bytes((root / "big.bin").read_bytes()[: 21 * 1024 * 1024])
    result = run([wget, "-q", "-c", "-O", str(target), f"{live_server.url}/download/big.bin"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert sha256_of(target) == wanted
    [line] = access_lines(live_server.log)
    assert (line["path"], line["status"], line["range"]) == ("/download/big.bin", 206, f"bytes={21 * 1024 * 1024}-")


def test_aria2c_splits_over_8_connections(root: Path, tmp_path: Path) -> None:
    """Each connection is held to 2 MiB/s, so aria2c really opens all eight before the
    first one could finish the file alone."""
    aria2c = need("aria2c")
    wanted = big_file(root, 24)
    with uvicorn_server(root, tmp_path / "server.log", env={"DOWNLOADER_RATE_LIMIT": str(2 * 1024 * 1024)}) as server:
        result = run(
            [aria2c, "-q", "-x", "8", "-s", "8", "-k", "1M", "--file-allocation=none", "-d", str(tmp_path), "-o", "got.bin", f"{server.url}/download/big.bin"],
            tmp_path,
        )
    assert result.returncode == 0, result.stderr + result.stdout
    assert sha256_of(tmp_path / "got.bin") == wanted
    # aria2c's first connection is a plain GET (200); it then opens seven more with Range.
    lines = access_lines(server.log)
    assert {line["status"] for line in lines} == {200, 206} and {line["path"] for line in lines} == {"/download/big.bin"}
    assert len({line["client"] for line in lines}) >= 8


def test_aria2c_saves_under_the_utf8_name(live_server, root: Path, tmp_path: Path) -> None:
    aria2c = need("aria2c")
    url = f"{live_server.url}/download/r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.txt"
    out = tmp_path / "aria-out"
    result = run([aria2c, "-q", "--content-disposition-default-utf8=true", "-d", str(out), url], tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert [p.name for p in out.iterdir()] == [UNICODE_NAME]
