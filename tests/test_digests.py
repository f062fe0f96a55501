"""Digest fields (RFC 9530 Repr-Digest and Want-Repr-Digest; RFC 3230 Digest, as aria2 reads it): the pure
functions of section 4, table-driven. (Issue "Integrity": the hasher and the routes come on top.)"""

from __future__ import annotations

import base64
import hashlib

import pytest

from downloader import digest_headers, parse_want_digest

WANT_CASES = [
    (None, None),
    ("sha-256=1", {"sha-256": 1}),
    ("sha-256=10, sha-512=3", {"sha-256": 10, "sha-512": 3}),
    ("sha-512=3,sha-256=0", {"sha-512": 3, "sha-256": 0}),
    ("  sha-256=5  ", {"sha-256": 5}),
    ("sha-256=5;q=1", {"sha-256": 5}),  # parameters: allowed, ignored
    ("sha-256", {}),  # a Boolean, not an Integer: ignored
    ("sha-256=11", None),  # out of 0..10: the field is ignored
    ("sha-256=-1", None),
    ("sha-256=1.5", None),
    ("SHA-256=1", None),  # keys are lower case (RFC 8941 §3.1.2)
    ("sha-256=1,,sha-512=2", None),
    ("sha-256=:AAAA:", None),
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
