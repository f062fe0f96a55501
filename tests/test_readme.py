"""The README's examples, each run as written (issue "No surprises" #6, #15): every fenced
code block is marked `<!-- example: NAME -->` and run by a test here or in the test file
named in EXAMPLES, or is one of the first screen's two commands (CI runs the test command;
the run command starts the service these tests start)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import downloader
from conftest import need
from helpers import PROJECT, Server, cli_server, free_port, wait_for

SAMPLES = PROJECT / "static" / "downloads"
BLOCK_RE = re.compile(r"^(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)^```$", re.S | re.M)

EXAMPLES = {
    "curl": "test_readme", "sign-cli": "test_readme", "sign-python": "test_readme",
    "catalog-cli": "test_readme", "catalog-python": "test_readme", "authorize": "test_readme",
    "sidecar": "test_readme", "systemd": "test_readme",
    "starlette": "test_embed", "fastapi": "test_embed", "nginx": "test_ops",
    "scale-out": "test_replicas", "nginx-upstream": "test_replicas", "s3": "test_s3", "integrity": "test_readme",
}


def readme_blocks() -> list[tuple[str | None, str, str]]:
    """(marker, language, code) of every fenced block with a language."""
    text = (PROJECT / "README.md").read_text(encoding="utf-8")
    return [(m["marker"], m["lang"], m["code"]) for m in BLOCK_RE.finditer(text)]


def example(name: str) -> str:
    [code] = [code for marker, _, code in readme_blocks() if marker == f"example: {name}"]
    return code


def shell(script: str, cwd: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """bash -e on `script` in `cwd`, `python` being this interpreter (the README's active venv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DOWNLOADER_")}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)


def test_every_code_block_is_an_example_a_test_runs() -> None:
    markers = [marker for marker, _, _ in readme_blocks()]
    assert markers[:2] == ["run-command", "test-command"]  # the first screen
    names = [m.removeprefix("example: ") for m in markers[2:] if m and m.startswith("example: ")]
    assert len(names) == len(markers) - 2, f"a README block without an example marker: {markers}"
    assert sorted(names) == sorted(EXAMPLES)


def copy_samples(root: Path) -> Path:
    """A copy of the sample files at `root`."""
    root.mkdir()
    for sample in SAMPLES.rglob("*"):
        if sample.is_file():
            (root / sample.relative_to(SAMPLES)).parent.mkdir(parents=True, exist_ok=True)
            (root / sample.relative_to(SAMPLES)).write_bytes(sample.read_bytes())
    return root


def test_routes_curl_examples(tmp_path: Path) -> None:
    need("curl")
    root = copy_samples(tmp_path / "samples")
    work = tmp_path / "work"
    work.mkdir()
    with cli_server(root, tmp_path / "server.log") as server:
        result = shell(example("curl").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"), work, tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("hello.txt", "résumé 数据.txt", "gradient.png"):
        assert (work / name).read_bytes() == (SAMPLES / name).read_bytes()
    hello = (SAMPLES / "hello.txt").read_bytes()
    assert result.stdout.startswith(hello[:10].decode())
    assert "HTTP/1.1 304 Not Modified" in result.stdout
    assert "Content-Range: bytes 0-4/57" in result.stdout  # a part of the multipart answer


def test_integrity_examples(tmp_path: Path) -> None:
    """In a folder holding the sample files: the digest fields, SHA256SUMS checked by sha256sum -c, and `hash`."""
    need("curl"), need("sha256sum")
    root, work = copy_samples(tmp_path / "samples"), copy_samples(tmp_path / "work")
    time.sleep(downloader.MIN_STRONG_AGE_S + 0.05)  # old enough to be hashed
    settings = {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_DIGEST_CACHE": str(tmp_path / "digests.sqlite3")}
    with cli_server(root, tmp_path / "server.log", **settings) as server:
        wait_for(lambda: httpx.get(f"{server.url}/sha256sums/").headers["digests-pending"] == "0", 15, "the samples hashed")
        script = example("integrity").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        result = shell(script.replace("python downloader.py", f"python {PROJECT / 'downloader.py'}"), work, tmp_path, **settings)
    assert result.returncode == 0, result.stderr
    samples = sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.rglob("*") if p.is_file())
    hello = base64.b64encode(hashlib.sha256((SAMPLES / "hello.txt").read_bytes()).digest()).decode()
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"repr-digest: sha-256=:{hello}:", f"digest: SHA-256={hello}"]
    assert lines[2:-len(samples)] == [f"{name}: OK" for name in samples]
    assert lines[-len(samples):] == [f"{hashlib.sha256((SAMPLES / name).read_bytes()).hexdigest()}  {name}" for name in samples]


def test_sign_examples(tmp_path: Path) -> None:
    result = shell(example("sign-cli"), PROJECT, tmp_path)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:8000/download/reports/2026-q2\.csv\?expires=\d+&signature=[\w-]+", url)
    namespace: dict = {}
    exec(example("sign-python"), namespace)
    with cli_server(SAMPLES, tmp_path / "server.log", DOWNLOADER_SECRET="change-me") as server:
        for signed in (url.removeprefix("http://127.0.0.1:8000"), namespace["url"]):
            response = httpx.get(f"{server.url}{signed}")
            assert (response.status_code, response.content) == (200, (SAMPLES / "reports" / "2026-q2.csv").read_bytes())


def test_catalog_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("curl")
    home = tmp_path / "home"
    home.mkdir()
    catalog = home / "downloader-catalog.db"
    script = example("catalog-cli").replace("revoke ID ", 'revoke "$(python downloader.py list | awk \'NR==2 {print $1}\')" ')
    with cli_server(SAMPLES, tmp_path / "server.log", DOWNLOADER_CATALOG=str(catalog), DOWNLOADER_ADMIN_TOKEN="t0ken") as server:
        result = shell(script.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"), PROJECT, tmp_path, HOME=str(home), DOWNLOADER_ADMIN_TOKEN="t0ken")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    link_id, url = lines[0].split()
    assert url == f"http://127.0.0.1:8000/files/{link_id}"
    assert lines[1] == "id\tpath\tdownloads\tmax_downloads\texpires\tstate"
    assert lines[2].startswith(f"{link_id}\treports/2026-q2.csv\t0\t1\t") and lines[2].endswith("\tactive")
    assert lines[3] == f"revoked {link_id}"
    assert '"path": "hello.txt"' in lines[4] and '"expires_at": "' in lines[4]
    links = downloader.Catalog(catalog).list()
    assert [(link.path, link.revoked) for link in links] == [("reports/2026-q2.csv", True), ("hello.txt", False)]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(example("catalog-python"), namespace)
    assert downloader.Catalog(tmp_path / "downloader-catalog.db").get(namespace["link"].id).max_downloads == 3


@pytest.mark.anyio
async def test_authorize_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT)
    namespace: dict = {"__name__": "readme_authorize"}
    exec(example("authorize"), namespace)
    hello = (SAMPLES / "hello.txt").read_bytes()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=namespace["app"]), base_url="http://t") as c:
        anonymous = await c.get("/files/download/hello.txt")
        bearer = await c.get("/files/download/hello.txt", headers={"Authorization": "Bearer s3cr3t-token"})
        wrong = await c.get("/files/download/hello.txt", headers={"Authorization": "Bearer nope"})
        listing = await c.get("/files/api/files")
    assert (anonymous.status_code, anonymous.json(), anonymous.headers["www-authenticate"]) == (401, {"detail": "Log in to download"}, "Bearer")
    assert (bearer.status_code, bearer.content) == (200, hello)
    assert wrong.status_code == 401
    assert listing.status_code == 401  # the hook guards the listing too


def test_sidecar_and_systemd_commands_serve(tmp_path: Path) -> None:
    root = tmp_path / "srv-files"
    root.mkdir()
    (root / "a.txt").write_bytes(b"served")
    sidecar = example("sidecar").strip()
    unit = dict(line.split("=", 1) for line in example("systemd").splitlines() if "=" in line)
    assert unit["WorkingDirectory"] == "/opt/downloader" and unit["Environment"] == "DOWNLOADER_ROOT=/srv/files"
    grace = int(re.search(r"--grace (\d+)", unit["ExecStart"]).group(1))
    assert int(unit["TimeoutStopSec"]) > grace  # systemd must not kill it during the grace period
    exec_start = unit["ExecStart"].replace("/opt/downloader/.venv/bin/python", "python")
    for i, command in enumerate((sidecar.replace("/srv/files", str(root)), exec_start)):
        port = free_port()
        args = command.replace("--port 8000", f"--port {port}").split()
        assert args[:2] == ["python", "downloader.py"]
        env = {"DOWNLOADER_ROOT": str(root)}
        with Server([sys.executable, *args[1:]], tmp_path / f"server-{i}.log", env=env, port=port, workers=4) as server:
            response = httpx.get(f"{server.url}/download/a.txt", headers={"X-Forwarded-For": "203.0.113.9"})
            assert (response.status_code, response.content) == (200, b"served")
