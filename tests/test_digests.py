"""Integrity: the digest fields (RFC 9530 Repr-Digest and Want-Repr-Digest; RFC 3230 Digest, as aria2 reads it),
table-driven; the hasher and its cache (section 7); the fields on every kind of answer, /api/files' sha256 and
/sha256sums through the ASGI app; `hash` on the command line; and real clients (sha256sum -c, curl, aria2c)
against a live server."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import downloader
from conftest import need
from downloader import digest_headers, parse_want_digest, sha256sum_line
from helpers import MIB, cli_server, plant_digest, run_cli, uvicorn_server, wait_for, write_file

WANT_CASES = [
    (None, None),
    ("sha-256=1", {"sha-256": 1}),
    ("sha-256=10, sha-512=3", {"sha-256": 10, "sha-512": 3}),
    ("sha-512=3,sha-256=0", {"sha-512": 3, "sha-256": 0}),
    ("  sha-256=5  ", {"sha-256": 5}),
    ("sha-256=5;q=1", {"sha-256": 5}),  # parameters: allowed, ignored
    ("sha-256;a=1, sha-256=0", {"sha-256": 0}),  # a bare key with parameters, then an Integer
    ("sha-256=0, sha-256", {}),  # the last wins: a Boolean, no preference
    ("sha-256", {}),  # a Boolean, not an Integer: no preference
    ("sha-256=0, unixsum=11", {"sha-256": 0}),  # one member out of 0..10: only it is ignored
    ("sha-256=11", {}),
    ("sha-256=-1", {}),
    ("sha-256=1.5", {}),
    ("sha-256=?0", {}),
    ("sha-256=:AAAA:", {}),
    ("SHA-256=1", None),  # keys are lower case (RFC 8941 §3.1.2): the field doesn't parse
    ("sha-256=1,,sha-512=2", None),
    ("", None),
]


@pytest.mark.parametrize(("value", "want"), WANT_CASES, ids=[repr(v) for v, _ in WANT_CASES])
def test_parse_want_digest(value: str | None, want: dict[str, int] | None) -> None:
    assert parse_want_digest(value) == want


DIGEST = hashlib.sha256(b"hello\n").digest()
B64 = base64.b64encode(DIGEST).decode()
BOTH = [("Repr-Digest", f"sha-256=:{B64}:"), ("Digest", f"SHA-256={B64}")]
HEADER_CASES = [
    (None, BOTH),
    ("sha-256=1", BOTH),
    ("sha-512=10", BOTH),  # only others asked for: sha-256 is what we have (RFC 9530 §4 lets us send it)
    ("sha-512=10, sha-256=0", []),  # sha-256 refused
    ("sha-256=0", []),
    ("garbage!", BOTH),  # a field that doesn't parse is ignored
    ("sha-256=0, unixsum=11", []),  # a bad member elsewhere doesn't undo the refusal
]


@pytest.mark.parametrize(("want", "headers"), HEADER_CASES, ids=[repr(w) for w, _ in HEADER_CASES])
def test_digest_headers(want: str | None, headers: list[tuple[str, str]]) -> None:
    assert digest_headers(DIGEST, want) == headers


def test_repr_digest_is_the_sha256sum_of_the_bytes() -> None:
    """The same digest as `sha256sum` prints, in base64 (RFC 8941 Byte Sequence)."""
    (_, value), _ = digest_headers(DIGEST, None)
    assert base64.b64decode(value.removeprefix("sha-256=:").removesuffix(":")).hex() == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_hash_file_is_sha256sum_and_the_identity_it_was_taken_for(tmp_path) -> None:
    import os
    import time

    from downloader import content_identity, hash_file

    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (3 * 1024 * 1024 + 5))
    fd = os.open(path, os.O_RDONLY)
    try:
        identity = content_identity(os.fstat(fd))
        assert hash_file(fd, identity) == hashlib.sha256(path.read_bytes()).digest()
        # Rewritten with the same size, its mtime put back: the ctime moves, so the identity is another.
        before = os.stat(path)
        time.sleep(0.01)
        with open(path, "r+b") as f:
            f.write(b"y")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert content_identity(after) != identity
        assert hash_file(fd, identity) is None  # never the old digest for the new bytes
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Helpers: files old enough to hash, a planted digest, waiting for one
# ---------------------------------------------------------------------------


def settle() -> None:
    """Waits out MIN_STRONG_AGE_S: files changed just now are hashed only once their ctime is that old."""
    time.sleep(downloader.MIN_STRONG_AGE_S + 0.05)


def repr_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


async def known(client: httpx.AsyncClient, url: str, timeout: float = 10.0) -> httpx.Response:
    """HEAD `url` until its answer carries Repr-Digest (the hasher got to it); that answer."""
    deadline = time.monotonic() + timeout
    while "repr-digest" not in (response := await client.head(url)).headers:
        assert time.monotonic() < deadline, f"no digest for {url} after {timeout} s"
        time.sleep(0.02)
    return response


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A root with a few files, old enough to be hashed."""
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "big.bin").write_bytes(os.urandom(3 * MIB + 17))
    (root / "sub" / "b.txt").write_bytes(b"b" * 1000)
    (root / "sub" / "deeper" / "c d.txt").write_bytes(b"")
    (root / ".hidden").write_bytes(b"not served")
    settle()
    return root


def app_client(root: Path, **settings: object) -> httpx.AsyncClient:
    app = downloader.create_app(root, **{"digest_cache": "off", **settings})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# ---------------------------------------------------------------------------
# The fields on every answer
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_digest_fields_exact_on_whole_range_multirange_and_head(files: Path) -> None:
    data = (files / "big.bin").read_bytes()
    both = {"repr-digest": repr_digest(data), "digest": f"SHA-256={base64.b64encode(hashlib.sha256(data).digest()).decode()}"}
    async with app_client(files) as client:
        head = await known(client, "/download/big.bin")
        answers = {
            "HEAD": head,
            "GET": await client.get("/download/big.bin"),
            "one range": await client.get("/download/big.bin", headers={"Range": "bytes=100-199"}),
            "suffix": await client.get("/download/big.bin", headers={"Range": "bytes=-5"}),
            "several ranges": await client.get("/download/big.bin", headers={"Range": "bytes=0-0,-1"}),
            "HEAD range": await client.head("/download/big.bin", headers={"Range": "bytes=5-"}),
        }
    assert {name: (r.status_code, r.headers.get("repr-digest"), r.headers.get("digest")) for name, r in answers.items()} == {
        name: (status, both["repr-digest"], both["digest"])
        for name, status in [("HEAD", 200), ("GET", 200), ("one range", 206), ("suffix", 206), ("several ranges", 206), ("HEAD range", 206)]
    }  # the digest of the whole file, also on ranges (RFC 9530 §3)
    assert answers["GET"].content == data and answers["one range"].content == data[100:200]
    assert answers["several ranges"].headers["content-type"].startswith("multipart/byteranges")


@pytest.mark.anyio
async def test_no_digest_until_known_nor_on_304_412_416(files: Path) -> None:
    async with app_client(files) as client:
        first = await client.get("/download/a.txt")  # looked up, missed: asked for, not waited for
        assert (first.status_code, first.content, "repr-digest" in first.headers, "digest" in first.headers) == (200, b"hello\n", False, False)
        etag = (await known(client, "/download/a.txt")).headers["etag"]
        answers = {
            "304": await client.get("/download/a.txt", headers={"If-None-Match": etag}),
            "412": await client.get("/download/a.txt", headers={"If-Match": '"other"'}),
            "416": await client.get("/download/a.txt", headers={"Range": "bytes=50-"}),
            "missing": await client.get("/download/nope.txt"),
        }
    assert {name: (r.status_code, "repr-digest" in r.headers, "digest" in r.headers) for name, r in answers.items()} == {
        "304": (304, False, False), "412": (412, False, False), "416": (416, False, False), "missing": (404, False, False),
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("want", "sent"),
    [("sha-256=0", False), ("sha-512=9, sha-256=0", False), ("sha-512=9", True), ("sha-256=10", True), ("sha-256=99", True), ("unix-sum=5", True)],
)
async def test_want_repr_digest_refusing_sha256_leaves_both_fields_out(files: Path, want: str, sent: bool) -> None:
    async with app_client(files) as client:
        await known(client, "/download/a.txt")
        response = await client.get("/download/a.txt", headers={"Want-Repr-Digest": want})
    assert (response.status_code, "repr-digest" in response.headers, "digest" in response.headers) == (200, sent, sent)
    if sent:
        assert response.headers["repr-digest"] == repr_digest(b"hello\n")


@pytest.mark.anyio
@pytest.mark.parametrize("change", ["rewritten, size and mtime put back", "replaced by rename"])
async def test_a_file_changed_after_hashing_never_gets_its_old_digest(files: Path, change: str) -> None:
    path = files / "sub" / "b.txt"
    async with app_client(files) as client:
        old = (await known(client, "/download/sub/b.txt")).headers["repr-digest"]
        before = os.stat(path)
        if change == "replaced by rename":
            (files / "new.tmp").write_bytes(b"c" * 1000)
            os.utime(files / "new.tmp", ns=(before.st_atime_ns, before.st_mtime_ns))
            os.rename(files / "new.tmp", path)
        else:
            with open(path, "r+b") as f:
                f.write(b"c" * 1000)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # the same to a size+mtime key
        seen = [(await client.get("/download/sub/b.txt")).headers.get("repr-digest") for _ in range(5)]
        settle()
        new = (await known(client, "/download/sub/b.txt")).headers["repr-digest"]
    assert old == repr_digest(b"b" * 1000) and new == repr_digest(b"c" * 1000)
    assert old not in seen


@pytest.mark.anyio
async def test_a_file_changed_a_moment_ago_waits_to_be_hashed(files: Path) -> None:
    """Within MIN_STRONG_AGE_S of its last change a file is not hashed, though asked for: a second write in the
    clock's tick could leave its identity as it is. (Hashing it takes milliseconds: without the rule it would be.)"""
    async with app_client(files) as client:
        (files / "fresh.txt").write_bytes(b"fresh")
        changed = time.monotonic()
        early = [(await client.get("/download/fresh.txt")).headers.get("repr-digest")]
        time.sleep(0.3)
        early.append((await client.get("/download/fresh.txt")).headers.get("repr-digest"))
        assert time.monotonic() - changed < downloader.MIN_STRONG_AGE_S
        settle()
        late = (await known(client, "/download/fresh.txt")).headers["repr-digest"]
    assert early == [None, None] and late == repr_digest(b"fresh")


def test_the_hasher_reads_at_hash_rate(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_file(root / "eight.bin", 8 * MIB)
    settle()
    digests = downloader.Digests(str(root), rate=4 * MIB)
    try:
        began = time.monotonic()
        digests.hash_path(digests.connect(), "eight.bin", digests.pace)
        took = time.monotonic() - began
    finally:
        digests.close()
    assert took >= 1.5  # 8 MiB at 4 MiB/s: 2 s (the first read of 8 MiB, then the wait it costs)


@pytest.mark.anyio
async def test_digests_off_sends_none(files: Path) -> None:
    async with app_client(files, digest_cache=None, digests=False) as client:
        responses = [await client.get("/download/a.txt") for _ in range(3)]
        time.sleep(0.2)
        responses.append(await client.get("/download/a.txt"))
        listed = (await client.get("/api/files")).json()["files"]
        sums = await client.get("/sha256sums/")
    assert [r.headers.get("repr-digest") for r in responses] == [None] * 4
    assert {f["path"]: f["sha256"] for f in listed} == {"a.txt": None, "big.bin": None, "sub/b.txt": None, "sub/deeper/c d.txt": None}
    assert (sums.status_code, sums.json()) == (404, {"detail": "Digests are switched off (DOWNLOADER_DIGESTS=false)"})


# ---------------------------------------------------------------------------
# /api/files and /sha256sums
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_api_files_sha256_is_null_until_known_then_hex(files: Path) -> None:
    async with app_client(files) as client:
        first = {f["path"]: f["sha256"] for f in (await client.get("/api/files")).json()["files"]}
        wait = time.monotonic() + 10
        while None in (listed := {f["path"]: f["sha256"] for f in (await client.get("/api/files")).json()["files"]}).values():
            assert time.monotonic() < wait, listed
            time.sleep(0.02)
    assert first == dict.fromkeys(listed, None)  # nothing hashed before the first listing: it asked for all
    assert listed == {p: hashlib.sha256((files / p).read_bytes()).hexdigest() for p in ["a.txt", "big.bin", "sub/b.txt", "sub/deeper/c d.txt"]}


@pytest.mark.anyio
async def test_sha256sums_lists_known_digests_relative_to_the_folder_and_counts_the_pending(files: Path) -> None:
    async with app_client(files) as client:
        await known(client, "/download/sub/b.txt")
        await known(client, "/download/sub/deeper/c%20d.txt")
        (files / "sub" / "new.txt").write_bytes(b"new")
        partial = await client.get("/sha256sums/sub")  # new.txt is hashed once MIN_STRONG_AGE_S old: pending
        (files / "sub" / "new.txt").unlink()
        whole = await client.get("/sha256sums/sub")
        head = await client.head("/sha256sums/sub")
        root = await client.get("/sha256sums/")
        errors = {
            "no folder": await client.get("/sha256sums/nope"),
            "a file": await client.get("/sha256sums/a.txt"),
            "outside": await client.get("/sha256sums/..%2F"),
        }
    b, c = hashlib.sha256(b"b" * 1000).hexdigest(), hashlib.sha256(b"").hexdigest()
    assert (partial.status_code, partial.text, partial.headers["digests-pending"]) == (200, f"{b}  b.txt\n{c}  deeper/c d.txt\n", "1")
    assert (whole.text, whole.headers["digests-pending"]) == (f"{b}  b.txt\n{c}  deeper/c d.txt\n", "0")
    assert whole.headers["content-type"] == "text/plain; charset=utf-8"
    assert whole.headers["content-disposition"] == 'attachment; filename="SHA256SUMS"'
    assert whole.headers["content-length"] == str(len(whole.content))
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", whole.headers["content-length"])
    assert root.status_code == 200 and root.text.endswith(f"{b}  sub/b.txt\n{c}  sub/deeper/c d.txt\n")
    assert {name: r.status_code for name, r in errors.items()} == {"no folder": 404, "a file": 404, "outside": 404}


@pytest.mark.anyio
async def test_sha256sums_is_open_only_where_the_listing_is(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with app_client(files, secret="k" * 32) as client:
        assert (await client.get("/sha256sums/")).status_code == 404
    async with app_client(files, listing=False) as client:
        assert (await client.get("/sha256sums/")).status_code == 404
    monkeypatch.setattr(downloader, "MAX_FOLDER_FILES", 2)
    async with app_client(files) as client:
        response = await client.get("/sha256sums/")
    assert (response.status_code, response.json()) == (413, {"detail": "The folder holds more than 2 files"})


SUM_LINES = [
    ("a.txt", "{h}  a.txt\n"),
    ("sub/with space.txt", "{h}  sub/with space.txt\n"),
    ("back\\slash", "\\{h}  back\\\\slash\n"),
    ("new\nline", "\\{h}  new\\nline\n"),
    ("carriage\rreturn", "\\{h}  carriage\\rreturn\n"),
]


@pytest.mark.parametrize(("name", "line"), SUM_LINES, ids=[n for n, _ in SUM_LINES])
def test_sha256sum_line(name: str, line: str) -> None:
    assert sha256sum_line(DIGEST, name) == line.format(h=DIGEST.hex())


def test_sha256sum_c_reads_our_lines_for_awkward_names(tmp_path: Path) -> None:
    """GNU sha256sum -c checks every name, backslash, line break and all, as we write it."""
    sha256sum = need("sha256sum")
    names = ["plain.txt", "sp ace.txt", "back\\slash.txt", "new\nline.txt", "carriage\rreturn.txt", "résumé 数据.txt"]
    lines = []
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(f"file {i}".encode())
        lines.append(sha256sum_line(hashlib.sha256(f"file {i}".encode()).digest(), name))
    (tmp_path / "SHA256SUMS").write_text("".join(lines))
    result = subprocess.run([sha256sum, "-c", "--strict", "SHA256SUMS"], cwd=tmp_path, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / names[3]).write_bytes(b"tampered")
    assert subprocess.run([sha256sum, "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, timeout=30).returncode == 1


# ---------------------------------------------------------------------------
# The cache: restarts, processes sharing it, pruning; the hasher's pace
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_digests_come_from_the_cache_after_a_restart(files: Path, tmp_path: Path) -> None:
    """A planted digest (the cache gone wrong) is what a new app announces at once: read from the cache at
    start-up, not hashed again, for a file whose identity is unchanged; a changed file gets none of it."""
    cache = tmp_path / "cache" / "digests.sqlite3"
    cache.parent.mkdir()
    planted = hashlib.sha256(b"not the content").digest()
    plant_digest(cache, files, "a.txt", planted)
    plant_digest(cache, files, "sub/b.txt", planted)
    (files / "sub" / "b.txt").write_bytes(b"b" * 1000)  # the same bytes again: a new ctime, so not the planted digest
    app = downloader.create_app(files, digest_cache=str(cache))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            a = await client.get("/download/a.txt")
            b = await client.get("/download/sub/b.txt")
    assert a.headers["repr-digest"] == f"sha-256=:{base64.b64encode(planted).decode()}:"
    assert "repr-digest" not in b.headers


def test_one_process_hashes_a_root_at_a_time(files: Path, tmp_path: Path) -> None:
    """Digests sharing a cache file take turns by its lease: the first holds it, a second can't take it; once
    the first closes (or its lease lapses) the second can."""
    cache = str(tmp_path / "d.sqlite3")
    first, second, third = (downloader.Digests(str(files), cache=cache) for _ in range(3))
    try:
        assert first.take_lease(first.connect()) is True
        assert second.take_lease(second.connect()) is False
        assert first.take_lease(first.connect()) is True  # renewed
        first.close()
        assert second.take_lease(second.connect()) is True
        with second.connect() as db:
            db.execute("UPDATE hashers SET until = 0")  # as if its process had died HASH_LEASE_S ago
        assert third.take_lease(third.connect()) is True
    finally:
        for digests in (first, second, third):
            digests.close()


def test_the_lease_is_given_up_once_the_work_is_done(files: Path, tmp_path: Path) -> None:
    """A run hashes what was asked for and walks the root, then hands the lease back: another process may take it
    at once for what its own clients ask for."""
    cache = str(tmp_path / "d.sqlite3")
    digests, other = (downloader.Digests(os.path.realpath(files), cache=cache) for _ in range(2))
    try:
        assert digests.lookup((0, 0, 0, 0, 0), "a.txt") is None  # a miss: a run starts
        wait_for(lambda: len(digests.known) == 4 and not digests.running, 10, "the run to hash the root and end")
        assert sqlite3.connect(cache).execute("SELECT count(*) FROM hashers").fetchone() == (0,)
        assert other.take_lease(other.connect()) is True
    finally:
        digests.close()
        other.close()


def test_workers_share_the_cache_one_hashing_the_others_reading(files: Path, tmp_path: Path) -> None:
    """Two worker processes on one cache file: every answer, whichever worker gives it, carries the digest once
    one has hashed the file (the lease holder; the other reads the cache's rows)."""
    cache = tmp_path / "d.sqlite3"
    with cli_server(files, tmp_path / "server.log", "--workers", "2", workers=2, DOWNLOADER_DIGEST_CACHE=str(cache)) as server:
        want = repr_digest((files / "big.bin").read_bytes())

        def every_answer_has_it() -> bool:
            with httpx.Client() as client:  # a new connection each time: either worker may answer
                return all(client.head(f"{server.url}/download/big.bin", headers={"Connection": "close"}).headers.get("repr-digest") == want for _ in range(20))

        wait_for(every_answer_has_it, 20, "both workers to announce the digest")
    assert sqlite3.connect(cache).execute("SELECT count(*) FROM digests").fetchone() == (4,)


def test_a_walk_hashes_every_served_file_and_prunes_the_gone(files: Path, tmp_path: Path) -> None:
    cache = tmp_path / "d.sqlite3"
    digests = downloader.Digests(os.path.realpath(files), cache=str(cache))

    def rows() -> dict[str, bytes]:
        return {os.fsdecode(path): sha256 for path, sha256 in sqlite3.connect(cache).execute("SELECT path, sha256 FROM digests")}

    try:
        digests.walk(digests.connect())
        served = ["a.txt", "big.bin", "sub/b.txt", "sub/deeper/c d.txt"]
        assert rows() == {p: hashlib.sha256((files / p).read_bytes()).digest() for p in served}  # not .hidden
        (files / "big.bin").unlink()
        digests.walk(digests.connect())
        assert sorted(rows()) == [p for p in served if p != "big.bin"]
    finally:
        digests.close()


def test_a_cache_of_another_version_is_made_anew(files: Path, tmp_path: Path) -> None:
    """A cache file from another version (here: other tables, no user_version) is dropped and made again, not an
    error at every run."""
    cache = tmp_path / "d.sqlite3"
    with sqlite3.connect(cache) as db:
        db.execute("CREATE TABLE digests (path TEXT PRIMARY KEY, identity TEXT, sha256 BLOB, seen REAL)")
        db.execute("INSERT INTO digests VALUES ('a.txt', '1:2:3:4:5', x'00', 0)")
    digests = downloader.Digests(os.path.realpath(files), cache=str(cache))
    try:
        digests.walk(digests.connect())
    finally:
        digests.close()
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA user_version").fetchone() == (downloader.DIGEST_CACHE_VERSION,)
    assert db.execute("SELECT count(*) FROM digests").fetchone() == (4,)


def test_a_name_that_is_not_utf8_is_hashed_and_kept(tmp_path: Path) -> None:
    """A name /download can't serve (not UTF-8) is not listed, but a root whose own path isn't UTF-8 is hashed:
    rows hold file-system bytes."""
    root = tmp_path / os.fsdecode(b"r\xe9pertoire")
    root.mkdir()
    (root / "a.txt").write_bytes(b"a")
    settle()
    cache = tmp_path / "d.sqlite3"
    digests = downloader.Digests(str(root), cache=str(cache))
    try:
        digests.walk(digests.connect())
    finally:
        digests.close()
    assert sqlite3.connect(cache).execute("SELECT root, path, sha256 FROM digests").fetchall() == [
        (os.fsencode(str(root)), b"a.txt", hashlib.sha256(b"a").digest())
    ]


def test_pacer_holds_reads_to_the_rate() -> None:
    pacer = downloader.Pacer(10 * MIB)
    assert pacer.delay(5 * MIB) == pytest.approx(0.5, abs=0.05)
    assert pacer.delay(5 * MIB) == pytest.approx(1.0, abs=0.05)
    assert downloader.Pacer(None).delay(10**12) == 0.0
    idle = downloader.Pacer(10 * MIB)
    idle.began -= 60  # a minute idle earns one second's burst, not sixty
    assert idle.delay(MIB) == 0.0
    assert idle.delay(20 * MIB) == pytest.approx(1.0, abs=0.05)  # 2 s of reads, 1 s of them the burst


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"hash_rate": 1000}, "hash_rate: must be a whole number of bytes per second from 1048576 to 1099511627776"),
        ({"digests": False, "hash_rate": 2 * MIB}, "hash_rate: applies only with digests on"),
        ({"digests": False, "digest_cache": "/tmp/x.sqlite3"}, "digest_cache: applies only with digests on"),
        ({"digest_cache": "/"}, "digest_cache: must be a file path (its folder is made if missing), or off (digests in memory only)"),
        ({"digest_cache": ""}, "digest_cache: must be a file path (its folder is made if missing), or off (digests in memory only)"),
        ({"root": "s3://bucket/prefix", "hash_rate": 2 * MIB}, "hash_rate: applies only to a directory root: objects are not hashed (README: Integrity)"),
    ],
)
def test_digest_settings_are_checked(settings: dict[str, object], problem: str) -> None:
    with pytest.raises(downloader.SettingsError) as caught:
        downloader.make_settings(settings)
    assert str(caught.value) == problem


# ---------------------------------------------------------------------------
# The command line; real clients
# ---------------------------------------------------------------------------


def test_hash_command_prints_sha256sums_and_fills_the_cache(files: Path, tmp_path: Path) -> None:
    cache = tmp_path / "d.sqlite3"
    result = run_cli("hash", DOWNLOADER_ROOT=str(files), DOWNLOADER_DIGEST_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    (tmp_path / "SHA256SUMS").write_text(result.stdout)
    check = subprocess.run([need("sha256sum"), "-c", "--strict", str(tmp_path / "SHA256SUMS")], cwd=files, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(result.stdout.splitlines()) == 4
    assert sqlite3.connect(cache).execute("SELECT count(*) FROM digests").fetchone() == (4,)
    one = run_cli("hash", "sub", DOWNLOADER_ROOT=str(files), DOWNLOADER_DIGEST_CACHE=str(cache))
    assert one.stdout == f"{hashlib.sha256(b'b' * 1000).hexdigest()}  sub/b.txt\n{hashlib.sha256(b'').hexdigest()}  sub/deeper/c d.txt\n"
    single = run_cli("hash", "a.txt", DOWNLOADER_ROOT=str(files), DOWNLOADER_DIGEST_CACHE=str(cache))
    assert single.stdout == hashlib.sha256(b"hello\n").hexdigest() + "  a.txt\n"
    missing = run_cli("hash", "nope.txt", DOWNLOADER_ROOT=str(files), DOWNLOADER_DIGEST_CACHE=str(cache))
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == f"downloader: cannot hash 'nope.txt': no file under {os.path.realpath(files)} by that path\n"


@pytest.mark.parametrize(("cache", "problem"), [
    ("/proc/nope/d.sqlite3", "'/proc/nope/d.sqlite3' can't be used: No such file or directory"),
    ("{tmp}/not-a-database", "'{tmp}/not-a-database' can't be used: file is not a database"),
])
def test_a_digest_cache_that_cant_be_used_stops_start_up(files: Path, tmp_path: Path, cache: str, problem: str) -> None:
    (tmp_path / "not-a-database").write_text("plain text, not SQLite\n")
    cache, problem = cache.format(tmp=tmp_path), problem.format(tmp=tmp_path)
    for args in (["--port", "0"], ["hash"]):
        result = run_cli(*args, DOWNLOADER_ROOT=str(files), DOWNLOADER_DIGEST_CACHE=cache)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"downloader: DOWNLOADER_DIGEST_CACHE: {problem}\n")


def test_the_default_digest_cache_unusable_is_a_note_and_digests_stay_in_memory(files: Path, tmp_path: Path) -> None:
    """A read-only home must not keep the server from starting: the default cache falls back to memory."""
    with cli_server(files, tmp_path / "server.log", XDG_CACHE_HOME="/proc/nope") as server:
        wait_for(lambda: "repr-digest" in httpx.head(f"{server.url}/download/a.txt").headers, 10, "a digest, from memory")
        log = (tmp_path / "server.log").read_text()
    assert "downloader: note: the digest cache /proc/nope/downloader/digests.sqlite3 can't be used" in log


def test_sha256sum_c_passes_on_files_fetched_with_curl(files: Path, tmp_path: Path) -> None:
    curl, sha256sum = need("curl"), need("sha256sum")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    with uvicorn_server(files, tmp_path / "server.log") as server:
        def complete() -> bool:
            got = httpx.get(f"{server.url}/sha256sums/")
            return got.headers["digests-pending"] == "0" and got.text

        sums = wait_for(complete, 15, "every file hashed")
        (out / "SHA256SUMS").write_text(sums)
        for path in ["a.txt", "big.bin", "sub/b.txt"]:
            result = subprocess.run([curl, "-sS", "-f", "-o", path, f"{server.url}/download/{path}"], cwd=out, capture_output=True, timeout=60)
            assert result.returncode == 0, result.stderr
        (out / "sub" / "deeper").mkdir()
        (out / "sub" / "deeper" / "c d.txt").write_bytes(httpx.get(f"{server.url}/download/sub/deeper/c%20d.txt").content)
    check = subprocess.run([sha256sum, "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.decode().count(": OK") == 4


@pytest.mark.parametrize("connections", [1, 4])
def test_aria2c_checks_the_digest_header(tmp_path: Path, connections: int) -> None:
    """aria2c verifies `Digest: SHA-256=` and fails a download whose bytes don't match with its checksum error
    (exit 32). The wrong digest is planted in the cache; the right one comes from the hasher."""
    aria2c = need("aria2c")
    root = tmp_path / "root"
    root.mkdir()
    write_file(root / "right.bin", 6 * MIB)
    write_file(root / "wrong.bin", 6 * MIB)
    settle()
    cache = tmp_path / "d.sqlite3"
    plant_digest(cache, root, "wrong.bin", hashlib.sha256(b"something else").digest())
    with uvicorn_server(root, tmp_path / "server.log", env={"DOWNLOADER_DIGEST_CACHE": str(cache)}) as server:
        wait_for(lambda: "digest" in httpx.head(f"{server.url}/download/right.bin").headers, 15, "right.bin hashed")
        assert httpx.head(f"{server.url}/download/wrong.bin").headers["digest"] == f"SHA-256={base64.b64encode(hashlib.sha256(b'something else').digest()).decode()}"
        results = {
            name: subprocess.run(
                [aria2c, "-q", "-x", str(connections), "-s", str(connections), "-k", "1M", "--file-allocation=none", "-d", str(tmp_path / "out"),
                 "-o", name, f"{server.url}/download/{name}"],
                capture_output=True, timeout=120,
            )
            for name in ["right.bin", "wrong.bin"]
        }
    assert {name: r.returncode for name, r in results.items()} == {"right.bin": 0, "wrong.bin": 32}, {n: r.stdout + r.stderr for n, r in results.items()}
    assert (tmp_path / "out" / "right.bin").read_bytes() == (root / "right.bin").read_bytes()
