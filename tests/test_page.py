"""The download page (static/index.html, app.js, style.css) in real headless Chromium.

Playwright's Python package drives Debian's /usr/bin/chromium (never `playwright install`)
against uvicorn serving `downloader:app` on 127.0.0.1, through a small TCP proxy in this
process. CDP Network.emulateNetworkConditions throttles downloads so progress is observable
on loopback, and its offline=True makes new requests fail during an outage. It does not break
a response already under way: Chromium 156 reads the body from the socket ahead of its
throttle and finishes it even while "offline". So the proxy paces those downloads itself
and cut() resets the live connection, which the page sees as a TypeError mid-body.

Chromium has showSaveFilePicker, and the pages keep it unless a test says otherwise: a file
up to the blob limit must download without it. Where a test rewrites a response in the
browser (page.route), its docstring says which and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from helpers import PROJECT as REPO
from helpers import MIB, Server, free_port, plant_digest, wait_for, write_file

import downloader

CHROMIUM = Path("/usr/bin/chromium")

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="Playwright is not installed (pip install playwright; the browser is Debian's chromium)",
)
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BIG_NAME = "résumé 数据.bin"
BIG_SIZE = 30 * 1024 * 1024
# Above BIG_SIZE, so the big file takes the in-page Blob path that fires Playwright's
# download event; the small-limit servers below cover the file picker and the hand-over
# to the browser.
BLOB_LIMIT = 64 * 1024 * 1024
SMALL_BLOB_LIMIT = 1024 * 1024
THROUGHPUT_BPS = 20_000_000  # 30 MiB in about 1.6 s: progress is visible, tests stay short
PROXY_BPS = 10_000_000  # pacing of downloads that get cut: the cut lands mid-body
SERVER_START_S = 20
DOWNLOAD_S = 60
DEEP = "sub/déjà vu #2"  # a nested folder whose name needs percent-encoding in a URL
LINKS = {"link-in": "deep.txt"}  # symlink -> its target, both in the root
ADMIN_TOKEN = "page-test-admin-token"
# Tests of the hand-over to the browser's downloader remove the File System Access API,
# which would otherwise take files above the blob limit.
NO_FILE_PICKER = "delete window.showSaveFilePicker; delete Window.prototype.showSaveFilePicker;"
FAKE_FILE_PICKER = """
    // showSaveFilePicker whose writable keeps the bytes and hashes them on close().
    window.__picked = {name: null, size: 0, closed: false, aborted: false, hash: null};
    window.showSaveFilePicker = async ({suggestedName}) => {
        window.__picked.name = suggestedName;
        let parts = [];
        return {name: suggestedName, createWritable: async () => ({
            async write(chunk) { parts.push(chunk); window.__picked.size += chunk.byteLength; },
            async truncate(n) { parts = []; window.__picked.size = 0; if (n !== 0) throw new Error("truncate " + n); },
            async seek(n) { if (n !== 0) throw new Error("seek " + n); },
            async close() {
                const digest = await crypto.subtle.digest("SHA-256", await new Blob(parts).arrayBuffer());
                window.__picked.hash = [...new Uint8Array(digest)].map(b => b.toString(16).padStart(2, "0")).join("");
                window.__picked.closed = true;
            },
            async abort() { window.__picked.aborted = true; },
        })};
    };
"""


# ---------------------------------------------------------------------------
# Server and browser
# ---------------------------------------------------------------------------


@contextmanager
def run_server(target: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """uvicorn serving `target` (module:app) on a free port, settings only from `env`
    (helpers.Server: its log is printed when the block fails); yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    with Server(command, log, env={"PYTHONPATH": str(REPO), **env}, port=port, health=None, timeout=SERVER_START_S) as server:
        yield server.url


class CuttableProxy:
    """A TCP proxy from a free 127.0.0.1 port to the server. Responses are paced at about
    `bps` bytes/s (0: not paced); cut() resets every open connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.bps = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self.lock:
                self.sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, paced: bool) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                if paced and self.bps:  # read each time: the browser reuses connections
                    time.sleep(len(data) / self.bps)  # pacing, not synchronisation
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """Reset every open connection (RST), as a dropped network does."""
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for s in sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked on this socket
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()
        self.cut()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The regular files the root holds, path -> content."""
    return {
        BIG_NAME: os.urandom(BIG_SIZE),
        "notes.txt": b"plain notes\n" * 100,
        "sub/a b.txt": b"0123456789",
        f"{DEEP}/inner.txt": b"inner\n",
        "changing.bin": os.urandom(8 * 1024 * 1024),
        "gone.txt": b"soon deleted\n",
        "deep.txt": b"the target of link-in\n",
    }


@pytest.fixture(scope="module")
def listed(files: dict[str, bytes]) -> dict[str, bytes]:
    """What the listing shows, path -> content: the files and the symlinks to them."""
    return {**files, **{link: files[target] for link, target in LINKS.items()}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> Path:
    root = tmp_path_factory.mktemp("root")
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    for link, target in LINKS.items():
        (root / link).symlink_to(target)
    time.sleep(downloader.MIN_STRONG_AGE_S + 0.05)  # old enough to be hashed
    return root


def all_hashed(url: str) -> str:
    """`url` once its server knows every file's digest (SHA256SUMS of the root: none pending)."""
    wait_for(lambda: httpx.get(f"{url}/sha256sums/").headers.get("digests-pending") == "0", 30, "every file hashed")
    return url


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_BLOB_LIMIT": str(BLOB_LIMIT)}
    with run_server("downloader:app", env, log) as url:
        yield all_hashed(url)


@pytest.fixture(scope="module")
def mounted_server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app mounted under /files/ in a host Starlette app, with a 1 MiB blob limit."""
    here = tmp_path_factory.mktemp("host")
    (here / "host_app.py").write_text(
        "import os\n"
        "from starlette.applications import Starlette\n"
        "from starlette.routing import Mount\n"
        "import downloader\n"
        f"service = downloader.create_app(os.environ['PAGE_TEST_ROOT'], blob_limit={SMALL_BLOB_LIMIT})\n"
        "app = Starlette(routes=[Mount('/files', app=service)])\n"
    )
    env = {"PAGE_TEST_ROOT": str(root), "PYTHONPATH": f"{here}{os.pathsep}{REPO}"}
    with run_server("host_app:app", env, here / "server.log") as url:
        yield all_hashed(url + "/files")[: -len("/files")]


@pytest.fixture(scope="module")
def gated_server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Signed links (a secret, the listing switched on), the ID catalog with its admin API,
    and a 1 MiB blob limit: a server that refuses links with 403 and 410 itself."""
    here = tmp_path_factory.mktemp("gated")
    env = {
        "DOWNLOADER_ROOT": str(root),
        "DOWNLOADER_SECRET": "page-test-signing-key",
        "DOWNLOADER_LISTING": "true",
        "DOWNLOADER_CATALOG": str(here / "links.sqlite"),
        "DOWNLOADER_ADMIN_TOKEN": ADMIN_TOKEN,
        "DOWNLOADER_BLOB_LIMIT": str(SMALL_BLOB_LIMIT),
    }
    with run_server("downloader:app", env, here / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(
    browser: sync_api.Browser,
    url: str,
    init_script: str = "",
    setup: Callable[[sync_api.Page], None] | None = None,
    **context_args: object,
) -> sync_api.Page:
    """A new context and page at url, listing loaded; init_script runs before app.js and
    setup(page) before the page loads (routes)."""
    context = browser.new_context(accept_downloads=True, **context_args)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    if setup is not None:
        setup(page)
    page.goto(url)
    page.wait_for_selector("body[data-listing]", timeout=10_000)
    assert page.get_attribute("body", "data-listing") == "ready", page.inner_text("body")
    return page


@contextmanager
def proxy_to(base: str) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(int(urllib.parse.urlsplit(base).port))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def proxy(server: str) -> Iterator[CuttableProxy]:
    with proxy_to(server) as proxy:
        yield proxy


@pytest.fixture
def page(browser: sync_api.Browser, proxy: CuttableProxy) -> Iterator[sync_api.Page]:
    page = open_page(browser, proxy.url + "/", viewport={"width": 900, "height": 660})
    yield page
    page.context.close()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def row(page: sync_api.Page, path: str) -> sync_api.Locator:
    return page.locator(f"li.file[data-path={json.dumps(path, ensure_ascii=False)}]")


def row_state(page: sync_api.Page, path: str) -> tuple[str, float | None, str]:
    """(data-state, progress value, status text) of a row, read in one round trip."""
    return tuple(
        page.evaluate(
            """path => {
                const r = [...document.querySelectorAll("li.file")].find(li => li.dataset.path === path);
                const p = r.querySelector("progress");
                return [r.dataset.state, p.hasAttribute("value") ? p.value : null,
                        r.querySelector(".status").textContent];
            }""",
            path,
        )
    )


def wait_for_state(page: sync_api.Page, path: str, state: str, timeout_s: float = DOWNLOAD_S) -> str:
    """Wait until the row reaches `state`; returns its status text."""
    status = wait_for(lambda: (row := row_state(page, path))[0] == state and [row[2]], timeout_s, f"{path} to reach data-state={state}")
    return status[0]


def network(page: sync_api.Page, *, offline: bool = False, bps: float = -1) -> None:
    """CDP Network.emulateNetworkConditions on this page: throttle to bps (-1: no limit),
    or go offline so that new requests fail."""
    cdp = getattr(page, "_test_cdp", None)
    if cdp is None:
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        page._test_cdp = cdp  # type: ignore[attr-defined]
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": offline, "latency": 0, "downloadThroughput": bps, "uploadThroughput": -1},
    )


def drop_network(page: sync_api.Page, proxy: CuttableProxy) -> None:
    """An outage: new requests fail (CDP offline) and the live connection is reset (proxy)."""
    network(page, offline=True)
    proxy.cut()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def saved_bytes(download: sync_api.Download, tmp_path: Path) -> bytes:
    target = tmp_path / "saved" / download.suggested_filename
    download.save_as(target)
    return target.read_bytes()


def download_requests(page: sync_api.Page) -> tuple[list[dict[str, str]], list[sync_api.Response]]:
    """Lists that fill with the headers of each /download/ request and each response."""
    requests: list[dict[str, str]] = []
    responses: list[sync_api.Response] = []
    page.on("request", lambda r: requests.append(r.headers) if "/download/" in r.url else None)
    page.on("response", lambda r: responses.append(r) if "/download/" in r.url else None)
    return requests, responses


def cut_at(page: sync_api.Page, proxy: CuttableProxy, path: str, percent: float) -> None:
    """Wait for `percent` progress on `path`, drop the network, wait for the page to retry."""
    wait_for(lambda: (row_state(page, path)[1] or 0) >= percent, DOWNLOAD_S, f"{percent} % progress")
    drop_network(page, proxy)
    status = wait_for_state(page, path, "retrying", timeout_s=10)
    assert status.startswith("Connection lost. Retrying in "), status


RECORD_STATUSES = """() => {
    // Every text a row's status line shows, with the page's clock, as it is set.
    window.__statuses = [];
    new MutationObserver((records) => {
        for (const r of records) {
            if (!r.target.classList?.contains("status")) continue;
            const text = [...r.addedNodes].map((n) => n.textContent).join("");
            window.__statuses.push([r.target.closest("li.file").dataset.path, text, performance.now()]);
        }
    }).observe(document.getElementById("files"), {childList: true, subtree: true});
}"""


def cut_and_resumed(page: sync_api.Page, proxy: CuttableProxy) -> tuple[sync_api.Download, str]:
    """BIG_NAME downloaded through the paced proxy, its connection cut at 20%: the download and its last status."""
    proxy.bps = PROXY_BPS
    with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
        page.get_by_role("button", name=f"Download {BIG_NAME}", exact=True).click()
        cut_at(page, proxy, BIG_NAME, 20)
        network(page)
        status = wait_for_state(page, BIG_NAME, "done")
    return info.value, status


def record_statuses(page: sync_api.Page) -> Callable[[str], list[tuple[str, float]]]:
    """Start recording status lines; the function returned gives one row's (text, ms)
    so far, a text repeated in a row kept once."""
    page.evaluate(RECORD_STATUSES)

    def statuses(path: str) -> list[tuple[str, float]]:
        seen: list[tuple[str, float]] = []
        for where, text, at in page.evaluate("window.__statuses"):
            if where == path and (not seen or seen[-1][0] != text):
                seen.append((text, at))
        return seen

    return statuses


def visible_rows(page: sync_api.Page) -> list[str]:
    return page.eval_on_selector_all("li.file", "rows => rows.filter(r => r.checkVisibility()).map(r => r.dataset.path)")


def admin(base: str, method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    """A call to the admin API of gated_server; its JSON answer ({} for none)."""
    request = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data = response.read()
    return json.loads(data) if data else {}


def zip_members(download: sync_api.Download, tmp_path: Path) -> dict[str, bytes]:
    target = tmp_path / "zips" / download.suggested_filename
    download.save_as(target)
    with zipfile.ZipFile(target) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# ---------------------------------------------------------------------------
# Pure functions of app.js, run in the browser
# ---------------------------------------------------------------------------

DISPOSITION_CASES = [
    # (header value as fetch gives it: a ByteString, file name the page must save as)
    ("attachment; filename=\"r_sum_ __.bin\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%E6%95%B0%E6%8D%AE.bin", BIG_NAME),
    ("attachment; filename*=UTF-8''%E2%82%AC%20rates.txt; filename=\"EUR rates.txt\"", "€ rates.txt"),
    ("attachment; filename*=utf-8'en'a%20b.txt", "a b.txt"),
    ("attachment; filename*=ISO-8859-1''caf%E9.txt", "café.txt"),
    # Outside the BMP: four UTF-8 bytes, one code point, two UTF-16 units.
    ("attachment; filename=\"_.txt\"; filename*=UTF-8''%F0%9F%98%80.txt", "😀.txt"),
    ("attachment; filename*=UTF-8''%F0%9F%98%80%20%E6%95%B0%F0%9F%8E%89.txt", "😀 数🎉.txt"),
    # A server that sent the UTF-8 bytes raw: fetch shows each byte as one character.
    ("attachment; filename*=UTF-8''\u00f0\u009f\u0098\u0080.txt", "😀.txt"),
    ('attachment; filename="\u00f0\u009f\u0098\u0080.txt"', "😀.txt"),
    # Quoted-pairs unescaped; the backslash then becomes "_" like any path separator.
    ('attachment; filename="a \\"quoted\\" \\\\ name.txt"', 'a "quoted" _ name.txt'),
    ('attachment; filename="semi;colon.txt"', "semi;colon.txt"),
    ("attachment; filename=plain.txt", "plain.txt"),
    ("ATTACHMENT; FILENAME=\"upper.txt\"", "upper.txt"),
    # A broken filename* falls back to filename: bad escape, bytes that are not UTF-8
    # (a cut 4-byte sequence, an encoded surrogate pair), an unknown charset.
    ("attachment; filename=\"fallback.txt\"; filename*=UTF-8''bad%ZZ.txt", "fallback.txt"),
    ("attachment; filename=\"fallback.txt\"; filename*=UTF-8''%FF%FE.txt", "fallback.txt"),
    ("attachment; filename=\"fallback.txt\"; filename*=UTF-8''%F0%9F%98.txt", "fallback.txt"),
    ("attachment; filename=\"fallback.txt\"; filename*=UTF-8''%ED%A0%BD%ED%B8%80.txt", "fallback.txt"),
    ("attachment; filename=\"fallback.txt\"; filename*=KOI8-R''%C1.txt", "fallback.txt"),
    # Path separators never reach the saved name.
    ('attachment; filename="../../etc/passwd"', ".._.._etc_passwd"),
    ("attachment", None),
    ("", None),
]


@pytest.fixture(scope="module")
def module_page(browser: sync_api.Browser, server: str) -> Iterator[sync_api.Page]:
    page = open_page(browser, server + "/")
    yield page
    page.context.close()


def call_app(page: sync_api.Page, function: str, *args: object) -> object:
    return page.evaluate(
        "async ([f, args]) => (await import(new URL('static/app.js', document.baseURI)))[f](...args)",
        [function, list(args)],
    )


@pytest.mark.parametrize(("value", "name"), DISPOSITION_CASES, ids=[c[0][:60] or "empty" for c in DISPOSITION_CASES])
def test_filename_from_content_disposition(module_page: sync_api.Page, value: str, name: str | None) -> None:
    """RFC 6266 §4.3: filename* (RFC 8187) wins over filename; quoted-pairs are unescaped."""
    assert call_app(module_page, "filenameFromContentDisposition", value) == name


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("UTF-8''%F0%9F%98%80.txt", "😀.txt"),
        ("UTF-8''%F0%9F%98%80%F0%9F%8E%89", "😀🎉"),
        ("UTF-8''\U0001f600.txt", "😀.txt"),  # from a script: a code point stands for itself
        ("UTF-8''\u00f0\u009f\u0098\u0080.txt", "😀.txt"),  # from a header: raw bytes
        ("UTF-8''\u00f0%9F\u0098%80.txt", "😀.txt"),
        ("UTF-8''%F0%9F%98.txt", None),
        ("UTF-8''%ED%A0%BD%ED%B8%80.txt", None),
        ("UTF-8''%F0%9F%98%8", None),
        ("ISO-8859-1''caf%E9", "café"),
        ("ISO-8859-1''\U0001f600", None),
        ("KOI8-R''%C1", None),
        ("no quotes", None),
    ],
    ids=repr,
)
def test_decode_ext_value_outside_the_bmp(module_page: sync_api.Page, value: str, decoded: str | None) -> None:
    """RFC 8187 §3.2: percent-encoded octets in the charset; emoji are four UTF-8 bytes."""
    assert call_app(module_page, "decodeExtValue", value) == decoded


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/download/sub/a%20b.txt", "a b.txt"),
        ("/download/r%C3%A9sum%C3%A9.bin?x=1", "résumé.bin"),
        ("/download/%E0%A4%A.txt", "%E0%A4%A.txt"),  # not decodable: kept as it is
    ],
)
def test_filename_from_url_is_last_segment_decoded(module_page: sync_api.Page, url: str, name: str) -> None:
    assert call_app(module_page, "filenameFromUrl", url) == name


@pytest.mark.parametrize(
    ("item", "job", "entry", "saved"),
    [
        # The listing's name and type win over the response's (a symlink to deep.txt).
        (
            {"name": "link-in", "path": "link-in", "content_type": "application/octet-stream", "url": "/download/link-in"},
            {"filename": "deep.txt", "contentType": "text/plain; charset=utf-8"},
            ["link-in", "", "http://h/download/link-in"],
            {"name": "link-in", "type": "application/octet-stream"},
        ),
        # No name: the URL's last segment. No URL: download/<path> under the page.
        # No type: the response's, without parameters.
        (
            {"path": "sub/a b.txt"},
            {"filename": "other.txt", "contentType": "Text/Plain; charset=utf-8"},
            ["a b.txt", "sub", "http://h/files/download/sub/a%20b.txt"],
            {"name": "a b.txt", "type": "text/plain"},
        ),
        (
            {"name": "../evil", "path": "x/y/evil", "content_type": "not a type", "url": "/download/x/y/evil?s=1"},
            {"filename": None, "contentType": ""},
            [".._evil", "x/y", "http://h/download/x/y/evil?s=1"],
            {"name": ".._evil", "type": "application/octet-stream"},
        ),
        # Nothing in the entry names it: the response's Content-Disposition does.
        (
            {"path": "", "url": "/download/"},
            {"filename": "deep.txt", "contentType": ""},
            [None, "", "http://h/download/"],
            {"name": "deep.txt", "type": "application/octet-stream"},
        ),
    ],
    ids=["listing-wins", "fallbacks", "unsafe-name", "no-name"],
)
def test_one_rule_for_name_and_type(
    module_page: sync_api.Page, item: dict[str, object], job: dict[str, object], entry: list[object], saved: dict[str, str]
) -> None:
    got = module_page.evaluate(
        """async ([item, job]) => {
            const app = await import(new URL('static/app.js', document.baseURI));
            const e = app.fileEntry(item, 'http://h/files/');
            return [[e.name, e.folder, e.url], app.saveAs(e, job)];
        }""",
        [item, job],
    )
    assert got == [entry, saved]


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("bytes 0-4/10", {"start": 0, "end": 4, "size": 10}),
        ("bytes 5-9/*", {"start": 5, "end": 9, "size": None}),
        ("bytes */10", None),
        ("bytes 5-4/10", None),
        ("bytes 5-10/10", None),
        ("items 0-4/10", None),
        (None, None),
    ],
    ids=str,
)
def test_parse_content_range(module_page: sync_api.Page, value: str | None, parsed: dict | None) -> None:
    assert call_app(module_page, "parseContentRange", value) == parsed


HELLO_B64, HELLO_HEX = "WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=", "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
REPR_DIGEST_CASES = [
    (f"sha-256=:{HELLO_B64}:", HELLO_HEX),
    (f"sha-512=:AAAA:, sha-256=:{HELLO_B64}:", HELLO_HEX),  # other algorithms ignored
    (f"sha-256=:{HELLO_B64}:;p=1", HELLO_HEX),  # parameters ignored
    (f"sha-256=:AAAA:, sha-256=:{HELLO_B64}:", HELLO_HEX),  # the last member wins
    (f"sha-256=:{HELLO_B64}:, sha-256=?1", None),
    ("sha-256=:AAAA:", None),  # not 32 bytes
    ("sha-256=:not base64!:", None),
    (f"SHA-256={HELLO_B64}", None),  # RFC 3230's Digest is not read
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("value", "digest"), REPR_DIGEST_CASES, ids=[str(v)[:40] for v, _ in REPR_DIGEST_CASES])
def test_parse_repr_digest(module_page: sync_api.Page, value: str | None, digest: str | None) -> None:
    assert call_app(module_page, "parseReprDigest", value) == digest


SHA_IN_PIECES = """async ([data, piece]) => {
    const app = await import(new URL('static/app.js', document.baseURI));
    const bytes = new Uint8Array(data), hash = new app.Sha256();
    for (let at = 0; at < bytes.length; at += piece) hash.update(bytes.subarray(at, at + piece));
    return [hash.hex(), hash.hex()];
}"""


@pytest.mark.parametrize("piece", [1, 63, 4096])
@pytest.mark.parametrize("length", [0, 3, 55, 56, 64, 119, 120, 1000, 70_000])
def test_sha256_fed_in_pieces_is_hashlibs(module_page: sync_api.Page, length: int, piece: int) -> None:
    """Every padding case (a tail of 55, 56 and 64 bytes; one or two final blocks), fed in pieces that split
    blocks anywhere; hex() twice gives the same answer."""
    data = os.urandom(length)
    assert module_page.evaluate(SHA_IN_PIECES, [list(data), piece]) == [hashlib.sha256(data).hexdigest()] * 2


@pytest.mark.parametrize(
    ("etag", "last_modified", "validator"),
    [
        ('"abc"', "Wed, 25 Nov 2026 18:00:00 GMT", '"abc"'),
        ('W/"abc"', "Wed, 25 Nov 2026 18:00:00 GMT", "Wed, 25 Nov 2026 18:00:00 GMT"),
        (None, None, None),
    ],
)
def test_if_range_validator_is_strong_etag_else_date(
    module_page: sync_api.Page, etag: str | None, last_modified: str | None, validator: str | None
) -> None:
    """RFC 9110 §13.1.5: a client must not send a weak entity-tag in If-Range."""
    assert call_app(module_page, "ifRangeValidator", etag, last_modified) == validator


@pytest.mark.parametrize(
    ("size", "has_picker", "method"),
    [
        (57, True, "blob"),  # no save dialog for a small file, picker or not
        (BLOB_LIMIT, True, "blob"),
        (BLOB_LIMIT, False, "blob"),
        (BLOB_LIMIT + 1, True, "fs"),
        (BLOB_LIMIT + 1, False, "native"),
        (None, True, "fs"),  # size unknown: never all in memory when a file can be picked
        (None, False, "blob"),
    ],
)
def test_choose_save_method(module_page: sync_api.Page, size: int | None, has_picker: bool, method: str) -> None:
    args = {"size": size, "blobLimit": BLOB_LIMIT, "hasFilePicker": has_picker}
    assert call_app(module_page, "chooseSaveMethod", args) == method


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (BIG_SIZE, "30 MiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_format_bytes(module_page: sync_api.Page, n: int, text: str) -> None:
    assert call_app(module_page, "formatBytes", n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "0.5 s"),
        (0.3, "0.3 s"),  # 0.3 * 10 is 3.0000000000000004 in floating point
        (0.04, "0.1 s"),  # rounded up: never shorter than the wait
        (1, "1 s"),
        (1.04, "1.1 s"),
        (9.99, "10 s"),
        (10.2, "11 s"),
        (65, "1 min 5 s"),
        (7322, "2 h 2 min"),
        (-1, "?"),
    ],
)
def test_format_duration(module_page: sync_api.Page, seconds: float, text: str) -> None:
    assert call_app(module_page, "formatDuration", seconds) == text


DEFAULT_DELAYS = [500, 1000, 2000, 4000, 8000]


@pytest.mark.parametrize(
    ("search", "delays"),
    [
        ("", DEFAULT_DELAYS),
        ("?retry-delays=100,200", [100, 200]),
        ("?x=1&retry-delays=0", [0]),
        ("?retry-delays=60000", [60000]),
        ("?retry-delays=60001", DEFAULT_DELAYS),
        ("?retry-delays=" + ",".join(["1"] * 11), DEFAULT_DELAYS),
        ("?retry-delays=", DEFAULT_DELAYS),
        ("?retry-delays=100,,200", DEFAULT_DELAYS),
        ("?retry-delays=+5", DEFAULT_DELAYS),
        ("?retry-delays=1e3", DEFAULT_DELAYS),
    ],
    ids=repr,
)
def test_parse_retry_delays(module_page: sync_api.Page, search: str, delays: list[int]) -> None:
    assert call_app(module_page, "parseRetryDelays", search) == delays


@pytest.mark.parametrize(
    ("path", "query", "matches"),
    [
        ("notes.txt", "", True),
        ("notes.txt", "NOTES", True),
        ("sub/a b.txt", "sub", True),  # the folder is part of what is searched
        ("sub/a b.txt", "  txt   sub ", True),  # every word, in any order
        ("sub/a b.txt", "sub notes", False),
        ("sub/déjà vu #2/inner.txt", "DÉJÀ", True),
        ("sub/de\u0301ja\u0300.txt", "déjà", True),  # decomposed accents match composed ones
        ("notes.txt", "zzz", False),
    ],
)
def test_matches_filter(module_page: sync_api.Page, path: str, query: str, matches: bool) -> None:
    assert call_app(module_page, "matchesFilter", path, query) is matches


@pytest.mark.parametrize(
    ("folder", "url"),
    [("", "zip/"), ("sub", "zip/sub"), (DEEP, "zip/sub/d%C3%A9j%C3%A0%20vu%20%232"), ("a?/b%", "zip/a%3F/b%25")],
)
def test_zip_url(module_page: sync_api.Page, folder: str, url: str) -> None:
    assert call_app(module_page, "zipUrl", folder) == url


@pytest.mark.parametrize(
    ("head", "enabled"),
    [
        ('<meta name="downloader-zip" content="on">', True),
        ('<meta name="downloader-zip" content="">', False),
        ('<meta name="downloader-zip" content="off">', False),
        ('<meta name="downloader-zip" content="ON">', False),
        ('<meta name="downloader-zip" content=" on">', False),
        ('<meta name="downloader-zip">', False),
        ("", False),
    ],
)
def test_read_zip_enabled(module_page: sync_api.Page, head: str, enabled: bool) -> None:
    """Anything but content="on" is off."""
    got = module_page.evaluate(
        """async (head) => {
            const app = await import(new URL('static/app.js', document.baseURI));
            return app.readZipEnabled(new DOMParser().parseFromString(`<head>${head}</head>`, "text/html"));
        }""",
        head,
    )
    assert got is enabled


@pytest.mark.parametrize(
    ("status", "detail", "message"),
    [
        (410, "This download link has been used up", "This download link has been used up (410)."),
        (410, "This download link was revoked.", "This download link was revoked (410)."),
        (410, "", "This download link no longer works (410)."),
        (403, "This link has expired", "This link has expired (403)."),
        (403, "", "Not allowed to download this file (403)."),
        (404, "Not Found", "File not found (404): it may have been moved or deleted."),
        (500, "Internal Server Error", "The server answered 500: Internal Server Error."),
    ],
)
def test_http_message(module_page: sync_api.Page, status: int, detail: str, message: str) -> None:
    assert call_app(module_page, "httpMessage", status, detail) == message


RUN_STATE = """async (steps) => {
    const app = await import(new URL('static/app.js', document.baseURI));
    const state = new app.DownloadState(1000);
    return steps.map(([method, ...args]) => {
        state[method](...args);
        return [state.status, app.statusMessage(state.event), state.showsProgress, app.progressFigures(state).text];
    });
}"""

HANDED = "Handed to your browser’s downloader: its download list shows the progress."
VERIFIED = "SHA-256 verified."
UNVERIFIED = "Not verified: the server sent no SHA-256 for it."
STATE_CASES = {
    "dropped-and-resumed": [
        (("started", 0), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
        (("progressed", 0, 1000, 0, True), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
        (("progressed", 400, 1000, 1000, False), ("downloading", "Downloading…", True, "40% · 400 B of 1000 B · 400 B/s · 1.5 s left")),
        (
            ("retrying", {"attempt": 1, "of": 5, "delayMs": 500, "from": 400}),
            ("retrying", "Connection lost. Retrying in 0.5 s, continuing from 400 B (attempt 1 of 5)…", True, "40% · 400 B of 1000 B"),
        ),
        (("progressed", 400, 1000, 2000, True), ("downloading", "Resumed at 400 B.", True, "40% · 400 B of 1000 B")),
        (("progressed", 1000, 1000, 2500, False), ("downloading", "Resumed at 400 B.", True, "100% · 1000 B of 1000 B · 1.2 KiB/s · 0 s left")),
        (("finished", "a.bin", True), ("done", "Downloaded “a.bin”. SHA-256 verified.", True, "100% · 1000 B")),
    ],
    "unverified-and-mismatch": [
        (("started", 0), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
        (("progressed", 1000, 1000, 0, True), ("downloading", "Downloading…", True, "100% · 1000 B of 1000 B")),
        (("finished", "a.bin", False), ("done", "Downloaded “a.bin”. Not verified: the server sent no SHA-256 for it.", True, "100% · 1000 B")),
        (("started", 0), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
        (
            ("failed", {"kind": "mismatch", "expected": "ab" * 32, "actual": "cd" * 32}),
            ("error", f"Corrupt download: its SHA-256 is {'cd' * 32}, the server’s is {'ab' * 32}. Nothing was saved; Retry downloads it again.", False, "0% · 0 B of 1000 B"),
        ),
    ],
    "dropped-at-0-bytes": [
        (("started", 0), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
        (
            ("retrying", {"attempt": 1, "of": 2, "delayMs": 500, "from": 0}),
            ("retrying", "Connection lost. Retrying in 0.5 s, continuing from 0 B (attempt 1 of 2)…", True, "0% · 0 B of 1000 B"),
        ),
        (
            ("failed", {"kind": "network", "retries": 2, "from": 0}),
            ("error", "Network error: the download failed after 2 retries. Retry continues from 0 B.", True, "0% · 0 B of 1000 B"),
        ),
        (("started", 0), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
    ],
    "network-error-kept": [
        (("started", 0), ("downloading", "Downloading…", True, "0% · 0 B of 1000 B")),
        (("progressed", 300, 1000, 0, True), ("downloading", "Downloading…", True, "30% · 300 B of 1000 B")),
        (
            ("failed", {"kind": "network", "retries": 5, "from": 300}),
            ("error", "Network error: the download failed after 5 retries. Retry continues from 300 B.", True, "30% · 300 B of 1000 B"),
        ),
        (("started", 300), ("downloading", "Resuming from 300 B…", True, "30% · 300 B of 1000 B")),
    ],
    "file-changed": [
        (("started", 300), ("downloading", "Resuming from 300 B…", True, "30% · 300 B of 1000 B")),
        (("progressed", 0, 1200, 0, True), ("downloading", "The file changed on the server: downloading it again from 0 B.", True, "0% · 0 B of 1.2 KiB")),
    ],
    "refused-cancelled-handed": [
        (
            ("failed", {"kind": "http", "status": 410, "detail": "This download link has been used up"}),
            ("error", "This download link has been used up (410).", False, "0% · 0 B of 1000 B"),
        ),
        (("failed", {"kind": "network", "retries": 5, "from": None}), ("error", "Network error: could not reach the server.", False, "0% · 0 B of 1000 B")),
        (("failed", {"kind": "failed", "message": "disk full"}), ("error", "Download failed: disk full", False, "0% · 0 B of 1000 B")),
        (("failed", {"kind": "cancelled"}), ("cancelled", "Download cancelled.", False, "0% · 0 B of 1000 B")),
        (("notStarted",), ("idle", "Download not started: no file was chosen.", False, "0% · 0 B of 1000 B")),
        (("handedOver",), ("done", f"{HANDED} The page can’t verify it there, and the server sent no SHA-256 for it.", False, "100% · 0 B")),
        (("handedOver", "ab" * 32), ("done", f"{HANDED} The page can’t verify it there: compare its SHA-256 with {'ab' * 32}.", False, "100% · 0 B")),
    ],
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_download_state(module_page: sync_api.Page, case: str) -> None:
    # After each step: status, message, whether the progress shows, the progress line.
    steps, expected = zip(*STATE_CASES[case])
    assert module_page.evaluate(RUN_STATE, [list(s) for s in steps]) == [list(e) for e in expected]


# ---------------------------------------------------------------------------
# Listing, folders, filter, layout, accessibility
# ---------------------------------------------------------------------------


def test_listing_shows_every_file_with_named_controls(page: sync_api.Page, listed: dict[str, bytes]) -> None:
    paths = page.eval_on_selector_all("li.file", "rows => rows.map(r => r.dataset.path)")
    assert sorted(paths) == sorted(listed)
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        assert row(page, path).get_attribute("data-state") == "idle"
        assert page.get_by_role("button", name=f"Download {name}", exact=True).count() == 1
        # Hidden until a download starts, so include_hidden to check its name now.
        label = f"Download progress of {name}"
        assert page.get_by_role("progressbar", name=label, exact=True, include_hidden=True).count() == 1
    assert page.locator(".status").count() == len(paths)


def test_rows_are_grouped_by_folder_and_show_names(page: sync_api.Page, listed: dict[str, bytes]) -> None:
    rows = page.eval_on_selector_all(
        "li.file",
        """rows => rows.map(r => [r.dataset.path, r.parentElement.closest("li.folder")?.dataset.folder ?? "",
                                  r.querySelector(".file-name").textContent, r.querySelector(".file-meta").textContent])""",
    )
    assert [path for path, *_ in rows] == [f"{DEEP}/inner.txt", "sub/a b.txt", *sorted(p for p in listed if "/" not in p)]
    for path, folder, name, meta in rows:
        assert (folder, name) == (path.rpartition("/")[0], path.rpartition("/")[2])
        size, date = meta.split(" · ")  # size and date, no path
        assert size == call_app(page, "formatBytes", len(listed[path])) and date, meta
    folders = page.eval_on_selector_all(
        "li.folder",
        """fs => fs.map(f => [f.dataset.folder, f.parentElement.closest("li.folder")?.dataset.folder ?? "",
                              f.querySelector(".folder-name").textContent, f.querySelector(".folder-meta").textContent])""",
    )
    assert folders == [["sub", "", "sub", "2 files · 16 B"], [DEEP, "sub", "déjà vu #2", "1 file · 6 B"]]


def test_folders_fold_and_unfold_from_the_keyboard(browser: sync_api.Browser, server: str) -> None:
    page = open_page(browser, server + "/")
    try:
        toggle = page.get_by_role("button", name="Folder sub", exact=True)
        inside = [row(page, "sub/a b.txt"), row(page, f"{DEEP}/inner.txt")]
        region = page.locator(f"#{toggle.get_attribute('aria-controls')}")
        assert region.locator("li.file").count() == 2
        page.get_by_role("searchbox", name="Filter files", exact=True).focus()
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Download all as ZIP"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Folder sub"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Download ZIP of folder sub"
        page.keyboard.press("Shift+Tab")
        assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Folder sub"
        assert toggle.get_attribute("aria-expanded") == "true" and all(r.is_visible() for r in inside)
        page.keyboard.press("Enter")
        assert toggle.get_attribute("aria-expanded") == "false"
        assert region.is_hidden() and all(r.is_hidden() for r in inside)
        assert row(page, "notes.txt").is_visible()
        page.keyboard.press("Space")
        assert toggle.get_attribute("aria-expanded") == "true" and all(r.is_visible() for r in inside)
        nested = page.get_by_role("button", name=f"Folder {DEEP}", exact=True)
        nested.focus()
        page.keyboard.press("Enter")
        assert nested.get_attribute("aria-expanded") == "false"
        assert inside[1].is_hidden() and inside[0].is_visible()
    finally:
        page.context.close()


def test_filter_box_filters_rows_as_you_type(page: sync_api.Page, listed: dict[str, bytes]) -> None:
    box = page.get_by_role("searchbox", name="Filter files", exact=True)
    summary = page.locator("#summary")
    visible_folders = lambda: page.eval_on_selector_all(  # noqa: E731
        "li.folder", "fs => fs.filter(f => f.checkVisibility()).map(f => f.dataset.folder)"
    )
    everything = visible_rows(page)
    page.get_by_role("button", name="Folder sub", exact=True).click()  # folded
    box.press_sequentially("inn")
    assert visible_rows(page) == [f"{DEEP}/inner.txt"]
    assert visible_folders() == ["sub", DEEP]
    assert page.get_by_role("button", name="Folder sub", exact=True).get_attribute("aria-expanded") == "true"
    assert summary.inner_text() == f"1 of {len(listed)} files match “inn”."
    box.fill("")
    box.press_sequentially("TXT sub")
    assert visible_rows(page) == [f"{DEEP}/inner.txt", "sub/a b.txt"]
    box.press_sequentially("z")
    assert visible_rows(page) == [] and visible_folders() == []
    assert summary.inner_text() == "No file matches “TXT subz”."
    box.fill("")
    box.press_sequentially(".txt")
    assert visible_rows(page) == [f"{DEEP}/inner.txt", "sub/a b.txt", "deep.txt", "gone.txt", "notes.txt"]
    box.fill("")
    assert visible_rows(page) == everything
    assert summary.inner_text().startswith(f"{len(listed)} files, ")


def test_blob_limit_comes_from_the_meta_tag(module_page: sync_api.Page) -> None:
    """The server writes DOWNLOADER_BLOB_LIMIT into <meta name="downloader-blob-limit">."""
    assert call_app(module_page, "readBlobLimit") == BLOB_LIMIT


def test_listing_follows_next_cursor(browser: sync_api.Browser, tmp_path: Path) -> None:
    """450 files at the page's limit=200: three pages, every file once, in server order."""
    many = tmp_path / "many"
    many.mkdir()
    names = [f"file-{i:03}.txt" for i in range(450)]
    for name in names:
        (many / name).write_text(name)
    with run_server("downloader:app", {"DOWNLOADER_ROOT": str(many)}, tmp_path / "server.log") as base:
        page = open_page(browser, base + "/")
        try:
            paths = page.eval_on_selector_all("li.file", "rows => rows.map(r => r.dataset.path)")
            listed = page.evaluate(
                "performance.getEntriesByType('resource').map(e => e.name).filter(u => u.includes('/api/files'))"
            )
        finally:
            page.context.close()
    assert paths == names
    assert len(listed) == 3 and "cursor=" not in listed[0], listed
    assert all("cursor=" in u for u in listed[1:]), listed


def test_layout_fits_phone_width_in_both_color_schemes(browser: sync_api.Browser, server: str) -> None:
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = open_page(browser, server + "/", viewport={"width": 360, "height": 740}, color_scheme=scheme)
        assert page.locator(f'li.folder[data-folder="{DEEP}"] a.zip').is_visible()  # the deepest, widest head
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{scheme}: page is {overflow}px wider than a phone screen"
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.context.close()
    assert backgrounds["light"] != backgrounds["dark"]


# ---------------------------------------------------------------------------
# Folder ZIPs
# ---------------------------------------------------------------------------


def test_zip_links_download_each_folder_when_the_server_serves_zip(
    browser: sync_api.Browser, server: str, listed: dict[str, bytes], tmp_path: Path
) -> None:
    page = open_page(browser, server + "/")
    try:
        assert page.get_attribute('meta[name="downloader-zip"]', "content") == "on"
        links = page.eval_on_selector_all(
            "a.zip", "as => as.map(a => [a.getAttribute('aria-label') ?? a.textContent, a.getAttribute('href'), a.href, a.hasAttribute('download')])"
        )
        deep_href = "zip/sub/d%C3%A9j%C3%A0%20vu%20%232"
        assert links == [
            ["Download all as ZIP", "zip/", f"{server}/zip/", True],
            ["Download ZIP of folder sub", "zip/sub", f"{server}/zip/sub", True],
            [f"Download ZIP of folder {DEEP}", deep_href, f"{server}/{deep_href}", True],
        ]
        expected = {
            "Download all as ZIP": ("/zip/", listed),
            "Download ZIP of folder sub": ("/zip/sub", {p.removeprefix("sub/"): c for p, c in listed.items() if p.startswith("sub/")}),
            f"Download ZIP of folder {DEEP}": (f"/{deep_href}", {"inner.txt": listed[f"{DEEP}/inner.txt"]}),
        }
        for label, (url, members) in expected.items():
            with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
                page.get_by_role("link", name=label, exact=True).click()
            assert info.value.url == server + url
            assert zip_members(info.value, tmp_path) == members
        assert info.value.suggested_filename == "déjà vu #2.zip"
    finally:
        page.context.close()


def test_no_zip_links_unless_the_server_says_on(browser: sync_api.Browser, gated_server: str) -> None:
    """A server with signed links does not serve /zip."""
    page = open_page(browser, gated_server + "/", init_script=NO_FILE_PICKER)
    try:
        assert page.get_attribute('meta[name="downloader-zip"]', "content") == "off"
        assert page.locator("li.folder").count() == 2
        assert page.locator(".folder a.zip").count() == 0
        assert page.locator("#zip-all").is_hidden()
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------


def test_download_shows_progress_and_saves_exact_file_under_its_name(
    page: sync_api.Page, listed: dict[str, bytes], tmp_path: Path
) -> None:
    network(page, bps=THROUGHPUT_BPS)
    values: list[float] = []
    texts: list[str] = []
    shot = tmp_path / "mid-download.png"
    with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
        page.get_by_role("button", name=f"Download {BIG_NAME}", exact=True).click()

        def finished() -> bool:
            state, value, _ = row_state(page, BIG_NAME)
            if value is not None:
                values.append(value)
            if state == "downloading" and value is not None and 30 < value < 70 and not shot.exists():
                page.screenshot(path=shot, full_page=True)
            texts.append(row(page, BIG_NAME).locator(".progress-text").inner_text())
            return state in ("done", "error")

        wait_for(finished, DOWNLOAD_S, "the download to end")
    assert wait_for_state(page, BIG_NAME, "done") == f"Downloaded “{BIG_NAME}”. {VERIFIED}"
    download = info.value
    assert download.suggested_filename == BIG_NAME
    assert sha256(saved_bytes(download, tmp_path)) == sha256(listed[BIG_NAME])
    assert any(0 < v < 100 for v in values), values
    assert values[-1] == 100
    assert values == sorted(values), "progress went backwards without a restart"
    assert any("MiB of 30 MiB" in t and "/s" in t and "left" in t for t in texts), texts[-5:]
    assert shot.exists() and shot.stat().st_size < 200_000
    if os.environ.get("UPDATE_SCREENSHOT"):  # refresh the README's picture
        shutil.copyfile(shot, REPO / "static" / "screenshot.png")


@pytest.mark.parametrize("picker", ["chromium", "fake"])
def test_small_file_downloads_without_the_save_dialog(
    browser: sync_api.Browser, server: str, listed: dict[str, bytes], tmp_path: Path, picker: str
) -> None:
    """Headless Chromium answers a save dialog with "no file was chosen"; the fake picker
    records whether it was called."""
    page = open_page(browser, server + "/", init_script=FAKE_FILE_PICKER if picker == "fake" else "")
    try:
        assert page.evaluate("typeof window.showSaveFilePicker") == "function"
        with page.expect_download(timeout=10_000) as info:
            page.get_by_role("button", name="Download notes.txt", exact=True).click()
            status = wait_for_state(page, "notes.txt", "done", timeout_s=10)
        assert status == f"Downloaded “notes.txt”. {VERIFIED}"
        assert info.value.url.startswith("blob:")
        assert saved_bytes(info.value, tmp_path) == listed["notes.txt"]
        assert page.evaluate("window.__picked?.name ?? null") is None
    finally:
        page.context.close()


RECORD_BLOB_TYPES = """() => {
    window.__blobTypes = [];
    const create = URL.createObjectURL;
    URL.createObjectURL = (blob) => (window.__blobTypes.push(blob.type), create(blob));
}"""


def test_file_is_saved_under_its_listing_name_and_type(page: sync_api.Page, listed: dict[str, bytes], tmp_path: Path) -> None:
    """link-in is a symlink to deep.txt, which the response may name instead."""
    page.evaluate(RECORD_BLOB_TYPES)
    entry = next(f for f in page.evaluate("fetch('api/files').then(r => r.json())")["files"] if f["path"] == "link-in")
    assert row(page, "link-in").locator(".file-name").inner_text() == "link-in"
    with page.expect_download(timeout=10_000) as info:
        page.get_by_role("button", name="Download link-in", exact=True).click()
        status = wait_for_state(page, "link-in", "done", timeout_s=10)
    assert status == f"Downloaded “link-in”. {VERIFIED}"
    assert info.value.suggested_filename == "link-in"
    assert saved_bytes(info.value, tmp_path) == listed["link-in"]
    assert page.evaluate("window.__blobTypes") == [entry["content_type"].split(";")[0]]


def test_dropped_connection_resumes_with_range_and_if_range(
    page: sync_api.Page, proxy: CuttableProxy, listed: dict[str, bytes], tmp_path: Path
) -> None:
    """RFC 9110 §14.2, §13.1.5: continue with Range: bytes=N- and the first response's ETag."""
    statuses = record_statuses(page)
    requests, responses = download_requests(page)
    download, _ = cut_and_resumed(page, proxy)
    assert download.suggested_filename == BIG_NAME
    assert sha256(saved_bytes(download, tmp_path)) == sha256(listed[BIG_NAME])
    assert "range" not in requests[0]
    assert responses[0].status == 200
    resumed = [h for h in requests if "range" in h]
    assert resumed, requests
    start = int(resumed[-1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert resumed[-1]["range"] == f"bytes={start}-" and 0 < start < BIG_SIZE
    assert resumed[-1]["if-range"] == responses[0].headers["etag"]
    assert responses[-1].status == 206
    assert responses[-1].headers["content-range"] == f"bytes {start}-{BIG_SIZE - 1}/{BIG_SIZE}"
    held = call_app(page, "formatBytes", start)
    seen = [text for text, _ in statuses(BIG_NAME)]
    assert seen[:2] == ["Downloading…", f"Connection lost. Retrying in 0.5 s, continuing from {held} (attempt 1 of 5)…"]
    assert seen[-2:] == [f"Resumed at {held}.", f"Downloaded “{BIG_NAME}”. {VERIFIED}"]
    assert all(f"continuing from {held} (attempt " in text for text in seen[2:-2]), seen  # more retries, if the outage outlasted the first


def test_file_changed_during_outage_restarts_from_zero(
    page: sync_api.Page, proxy: CuttableProxy, root: Path, files: dict[str, bytes], tmp_path: Path
) -> None:
    """RFC 9110 §13.1.5: If-Range with the old ETag gets a 200 for a changed file."""
    path = "changing.bin"
    statuses = record_statuses(page)
    requests, responses = download_requests(page)
    proxy.bps = PROXY_BPS / 2
    new_content = os.urandom(len(files[path]) + 1000)
    try:
        with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
            page.get_by_role("button", name=f"Download {path}", exact=True).click()
            cut_at(page, proxy, path, 10)
            (root / path).write_bytes(new_content)
            network(page)
            wait_for_state(page, path, "done")
        assert sha256(saved_bytes(info.value, tmp_path)) == sha256(new_content)
    finally:
        (root / path).write_bytes(files[path])
    assert [r.status for r in responses if r.status != 200] == []
    assert "range" in requests[-1] and "if-range" in requests[-1]
    assert [text for text, _ in statuses(path)][-2:] == [
        "The file changed on the server: downloading it again from 0 B.",
        f"Downloaded “{path}”. {UNVERIFIED}",  # changed a moment ago: not hashed yet
    ]


def test_cancel_then_retry_with_keyboard(page: sync_api.Page, listed: dict[str, bytes], tmp_path: Path) -> None:
    network(page, bps=THROUGHPUT_BPS / 4)
    page.get_by_role("button", name=f"Download {BIG_NAME}", exact=True).focus()
    page.keyboard.press("Enter")
    wait_for(lambda: (row_state(page, BIG_NAME)[1] or 0) > 1, DOWNLOAD_S, "some progress")
    focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert focused == f"Cancel download of {BIG_NAME}", "focus should move to Cancel"
    page.keyboard.press("Enter")
    assert wait_for_state(page, BIG_NAME, "cancelled", timeout_s=5) == "Download cancelled."
    assert row(page, BIG_NAME).locator(".file-progress").is_hidden()
    assert page.get_by_role("button", name=f"Retry download of {BIG_NAME}", exact=True).is_visible()
    focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert focused == f"Retry download of {BIG_NAME}", "focus should move to Retry"
    network(page)
    with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
        page.keyboard.press("Enter")
        wait_for_state(page, BIG_NAME, "done")
    assert sha256(saved_bytes(info.value, tmp_path)) == sha256(listed[BIG_NAME])


def test_missing_file_shows_404_then_retry_works(
    page: sync_api.Page, root: Path, files: dict[str, bytes], tmp_path: Path
) -> None:
    path = "gone.txt"
    (root / path).unlink()
    try:
        page.get_by_role("button", name=f"Download {path}", exact=True).click()
        status = wait_for_state(page, path, "error", timeout_s=10)
        assert status == "File not found (404): it may have been moved or deleted."
        (root / path).write_bytes(files[path])
        with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
            page.get_by_role("button", name=f"Retry download of {path}", exact=True).click()
            wait_for_state(page, path, "done", timeout_s=10)
        assert saved_bytes(info.value, tmp_path) == files[path]
    finally:
        (root / path).write_bytes(files[path])


def test_refusals_show_the_servers_detail(browser: sync_api.Browser, gated_server: str, files: dict[str, bytes]) -> None:
    """The listing is rewritten in the browser so that its rows point at links this server
    refuses: a used-up and a revoked catalog link, a tampered signature. The 410 that is
    not JSON, as a proxy in front might send, is faked by a route."""
    used_up = admin(gated_server, "POST", "/api/links", {"path": "notes.txt", "max_downloads": 1})
    with urllib.request.urlopen(gated_server + str(used_up["url"]), timeout=10) as response:
        assert response.read() == files["notes.txt"]
    revoked = admin(gated_server, "POST", "/api/links", {"path": BIG_NAME})
    admin(gated_server, "DELETE", f"/api/links/{revoked['id']}")
    catalog_urls = {"notes.txt": used_up["url"], BIG_NAME: revoked["url"]}

    def setup(page: sync_api.Page) -> None:
        def listing(route: sync_api.Route) -> None:
            response = route.fetch()
            body = response.json()
            for item in body["files"]:
                if item["path"] in catalog_urls:
                    item["url"] = catalog_urls[item["path"]]
                elif item["path"] == "sub/a b.txt":
                    item["url"] = item["url"].replace("signature=", "signature=0")
            route.fulfill(response=response, json=body)

        def not_json(route: sync_api.Route) -> None:
            route.fulfill(status=410, content_type="text/html", body="<h1>Gone</h1>")

        page.route(lambda url: "/api/files" in url, listing)
        page.route(lambda url: "/download/gone.txt" in url, not_json)

    page = open_page(browser, gated_server + "/", init_script=NO_FILE_PICKER, setup=setup)
    try:
        expected = {
            "notes.txt": "This download link has been used up (410).",
            BIG_NAME: "This download link was revoked (410).",  # above the 1 MiB limit: HEAD, then GET
            "sub/a b.txt": "Invalid link signature (403).",
            "gone.txt": "This download link no longer works (410).",
        }
        for path in expected:
            page.get_by_role("button", name=f"Download {path.rsplit('/', 1)[-1]}", exact=True).click()
        assert {path: wait_for_state(page, path, "error", timeout_s=10) for path in expected} == expected
    finally:
        page.context.close()


def test_drop_before_the_first_byte_continues_from_0_b(
    browser: sync_api.Browser, server: str, listed: dict[str, bytes], tmp_path: Path
) -> None:
    page = open_page(browser, server + "/?retry-delays=500,100")
    try:
        statuses = record_statuses(page)
        requests, _ = download_requests(page)
        network(page, offline=True)
        page.get_by_role("button", name="Download notes.txt", exact=True).click()
        wait_for_state(page, "notes.txt", "error", timeout_s=10)
        network(page)
        with page.expect_download(timeout=10_000) as info:
            page.get_by_role("button", name="Retry download of notes.txt", exact=True).click()
            wait_for_state(page, "notes.txt", "done", timeout_s=10)
        assert saved_bytes(info.value, tmp_path) == listed["notes.txt"]
        assert [text for text, _ in statuses("notes.txt")] == [
            "Downloading…",
            "Connection lost. Retrying in 0.5 s, continuing from 0 B (attempt 1 of 2)…",
            "Connection lost. Retrying in 0.1 s, continuing from 0 B (attempt 2 of 2)…",
            "Network error: the download failed after 2 retries. Retry continues from 0 B.",
            "Downloading…",
            f"Downloaded “notes.txt”. {VERIFIED}",
        ]
        assert requests and all("range" not in h for h in requests), requests
    finally:
        page.context.close()


BACKOFF_MS = [100, 200, 300, 400, 500]


def test_network_down_past_all_retries_shows_error_then_retry_resumes(
    browser: sync_api.Browser, proxy: CuttableProxy, listed: dict[str, bytes], tmp_path: Path
) -> None:
    """The waits come from ?retry-delays: 1.5 s in all instead of the default 15.5 s."""
    page = open_page(browser, proxy.url + "/?retry-delays=" + ",".join(map(str, BACKOFF_MS)))
    try:
        statuses = record_statuses(page)
        requests, _ = download_requests(page)
        proxy.bps = PROXY_BPS
        page.get_by_role("button", name=f"Download {BIG_NAME}", exact=True).click()
        cut_at(page, proxy, BIG_NAME, 10)
        status = wait_for_state(page, BIG_NAME, "error", timeout_s=10)
        network(page)
        with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
            page.get_by_role("button", name=f"Retry download of {BIG_NAME}", exact=True).click()
            wait_for_state(page, BIG_NAME, "done")
        assert sha256(saved_bytes(info.value, tmp_path)) == sha256(listed[BIG_NAME])
        start = int(requests[-1]["range"].removeprefix("bytes=").removesuffix("-"))
        assert requests[-1]["range"] == f"bytes={start}-" and 0 < start < BIG_SIZE
        held = call_app(page, "formatBytes", start)
        assert status == f"Network error: the download failed after 5 retries. Retry continues from {held}."
        seen = statuses(BIG_NAME)
        first = next(i for i, (text, _) in enumerate(seen) if text.startswith("Connection lost."))
        assert [text for text, _ in seen[first : first + 6]] == [
            *(
                f"Connection lost. Retrying in {ms / 1000:g} s, continuing from {held} (attempt {n} of 5)…"
                for n, ms in enumerate(BACKOFF_MS, 1)
            ),
            status,
        ]
        times = [at for _, at in seen[first : first + 6]]
        waits = [later - earlier for earlier, later in zip(times, times[1:])]
        assert all(waited >= ms - 1 for waited, ms in zip(waits, BACKOFF_MS)), waits  # timers round to 1 ms
        assert times[-1] - times[0] < 5_000, waits
    finally:
        page.context.close()


def test_file_picker_path_streams_above_the_blob_limit_and_resumes(
    browser: sync_api.Browser, mounted_server: str, listed: dict[str, bytes]
) -> None:
    with proxy_to(mounted_server) as proxy:
        page = open_page(browser, proxy.url + "/files/", init_script=FAKE_FILE_PICKER)
        downloads: list[sync_api.Download] = []
        page.on("download", lambda d: downloads.append(d))
        try:
            proxy.bps = PROXY_BPS
            page.get_by_role("button", name=f"Download {BIG_NAME}", exact=True).click()
            cut_at(page, proxy, BIG_NAME, 20)
            network(page)
            assert wait_for_state(page, BIG_NAME, "done") == f"Downloaded “{BIG_NAME}”. {VERIFIED}"
            picked = page.evaluate("window.__picked")
            assert picked == {
                "name": BIG_NAME,
                "size": BIG_SIZE,
                "closed": True,
                "aborted": False,
                "hash": sha256(listed[BIG_NAME]),
            }
            assert downloads == []
        finally:
            page.context.close()


def test_mounted_under_prefix_and_large_file_goes_to_browser_downloader(
    browser: sync_api.Browser, mounted_server: str, listed: dict[str, bytes], tmp_path: Path
) -> None:
    """Under /files/ every URL the page uses is relative."""
    page = open_page(browser, mounted_server + "/files/", init_script=NO_FILE_PICKER)
    try:
        assert call_app(page, "readBlobLimit") == SMALL_BLOB_LIMIT
        with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
            page.get_by_role("button", name="Download a b.txt", exact=True).click()
            wait_for_state(page, "sub/a b.txt", "done", timeout_s=10)
        assert info.value.url.startswith("blob:")
        assert info.value.suggested_filename == "a b.txt"
        assert saved_bytes(info.value, tmp_path) == listed["sub/a b.txt"]
        with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
            page.get_by_role("button", name=f"Download {BIG_NAME}", exact=True).click()
        download = info.value
        assert download.url.startswith(mounted_server + "/files/download/")
        assert download.suggested_filename == BIG_NAME
        assert sha256(saved_bytes(download, tmp_path)) == sha256(listed[BIG_NAME])
        status = wait_for_state(page, BIG_NAME, "done", timeout_s=10)
        assert status == f"{HANDED} The page can’t verify it there: compare its SHA-256 with {sha256(listed[BIG_NAME])}."
        assert row(page, BIG_NAME).locator(".file-progress").is_hidden()
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# Verifying what was saved (SHA-256 against the response's Repr-Digest)
# ---------------------------------------------------------------------------

HUGE_SIZE = 300 * MIB


@pytest.fixture(scope="module")
def digest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A 300 MiB file under a blob limit above it, a small one, and one whose digest in the cache is wrong (the
    cache gone bad, planted before the server starts); the URL once all are hashed, and each file's sha256."""
    root = tmp_path_factory.mktemp("digest-root")
    sums = {"huge.bin": write_file(root / "huge.bin", HUGE_SIZE)}
    for name in ("small.txt", "wrong.txt"):
        (root / name).write_bytes(f"the file {name}\n".encode())
        sums[name] = sha256((root / name).read_bytes())
    time.sleep(downloader.MIN_STRONG_AGE_S + 0.05)
    cache = tmp_path_factory.mktemp("digest-cache") / "digests.sqlite3"
    plant_digest(cache, root, "wrong.txt", bytes(32))
    env = {"DOWNLOADER_ROOT": str(root), "DOWNLOADER_BLOB_LIMIT": str(512 * MIB), "DOWNLOADER_DIGEST_CACHE": str(cache)}
    with run_server("downloader:app", env, tmp_path_factory.mktemp("digest-log") / "server.log") as url:
        yield all_hashed(url), sums


def test_small_and_300_mib_downloads_are_verified_as_they_arrive(
    browser: sync_api.Browser, digest_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, sums = digest_server
    page = open_page(browser, url + "/")
    try:
        for name in ("small.txt", "huge.bin"):
            with page.expect_download(timeout=DOWNLOAD_S * 1000) as info:
                page.get_by_role("button", name=f"Download {name}", exact=True).click()
                status = wait_for_state(page, name, "done")
            assert status == f"Downloaded “{name}”. {VERIFIED}"
            assert sha256(saved_bytes(info.value, tmp_path)) == sums[name]
    finally:
        page.context.close()


def test_a_digest_mismatch_is_shown_and_nothing_is_saved(browser: sync_api.Browser, digest_server: tuple[str, dict[str, str]]) -> None:
    url, sums = digest_server
    page = open_page(browser, url + "/")
    downloads: list[sync_api.Download] = []
    page.on("download", lambda d: downloads.append(d))
    try:
        page.get_by_role("button", name="Download wrong.txt", exact=True).click()
        status = wait_for_state(page, "wrong.txt", "error")
        assert status == f"Corrupt download: its SHA-256 is {sums['wrong.txt']}, the server’s is {'00' * 32}. Nothing was saved; Retry downloads it again."
        assert row(page, "wrong.txt").get_by_role("button", name="Retry download of wrong.txt").is_visible()
        page.wait_for_timeout(500)
        assert downloads == []
    finally:
        page.context.close()


# ---------------------------------------------------------------------------
# The page over a bucket (an s3:// root on SeaweedFS, conftest's `seaweed`)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket_server(seaweed, files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """downloader:app proxying a bucket prefix that holds `files` (no links: a bucket has none); its URL, and the
    ETag the store gives BIG_NAME (a multipart upload's, "<md5 of the parts' md5s>-<parts>")."""
    import obstore

    store = seaweed.store("page")
    for path, content in files.items():
        obstore.put(store, path, content)
    env = {**seaweed.env("page"), "DOWNLOADER_BLOB_LIMIT": str(BLOB_LIMIT)}
    with run_server("downloader:app", env, tmp_path_factory.mktemp("bucket") / "server.log") as url:
        yield url, obstore.head(store, BIG_NAME)["e_tag"]


def test_page_lists_a_bucket_and_resumes_a_cut_download_from_it(
    browser: sync_api.Browser, bucket_server: tuple[str, str], files: dict[str, bytes], tmp_path: Path
) -> None:
    """The same page, listing and resume over objects: the cut download continues with Range and If-Range on the
    object's ETag, and the saved file is exact."""
    url, object_etag = bucket_server
    with proxy_to(url) as proxy:
        page = open_page(browser, proxy.url + "/", viewport={"width": 900, "height": 660})
        try:
            shown = page.locator("li.file").evaluate_all("rows => rows.map(r => r.dataset.path)")
            assert sorted(shown) == sorted(files)
            requests, responses = download_requests(page)
            download, status = cut_and_resumed(page, proxy)
            assert status == f"Downloaded “{BIG_NAME}”. {UNVERIFIED}"  # objects are not hashed
            assert download.suggested_filename == BIG_NAME
            assert sha256(saved_bytes(download, tmp_path)) == sha256(files[BIG_NAME])
            etag = responses[0].headers["etag"]
            assert etag == object_etag
            resumed = [h for h in requests if "range" in h]
            assert resumed and resumed[-1]["if-range"] == etag
            assert responses[-1].status == 206
        finally:
            page.context.close()
