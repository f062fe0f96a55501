"""downloader: serve the files under one directory as downloads, correctly and in constant memory.

A pure ASGI app on Starlette that streams each file from an open, checked descriptor and sets every
download header itself. Run `uvicorn downloader:app` (DOWNLOADER_* variables) or `python downloader.py
--root DIR`; embed it with `create_app(root, ...)` or return a `DownloadResponse` from an endpoint.

The module reads top to bottom; a section uses only the sections above it
(`grep -n '^# [0-9]*\\.' downloader.py` prints this table):

| # | Section                  | What lives there                                            |
| - | ------------------------ | ----------------------------------------------------------- |
| 1 | Limits and errors        | every named limit; HTTPError, the one exception clients see |
| 2 | Settings                 | kwargs and DOWNLOADER_* variables -> one frozen Settings    |
| 3 | Path resolution          | URL path -> an open, checked regular file under the root    |
| 4 | HTTP semantics           | RFC 9110 ranges, preconditions and header values; pure      |
| 5 | Streaming                | bytes of an fd onto ASGI `send`: pace, stalls, disconnects  |
| 6 | Object storage           | an s3:// root: keys, HEAD, If-Match GETs, listing, presigning |
| 7 | Digests                  | SHA-256 of every file, by a paced background thread; cached |
| 8 | Signed links and catalog | HMAC links; the catalog of opaque IDs (SQLite, PostgreSQL)  |
| 9 | Responses                | DownloadResponse, stream_download, /zip, error_response     |
| 10 | App and routes          | create_app, the routes, the ops middleware                  |
| 11 | Server protocol         | uvicorn's HTTP/1.1 plus zerocopysend, bounded request heads |
| 12 | CLI                     | argv -> environment -> uvicorn; subcommands; the lazy `app` |

Sections 1-8 know nothing of Starlette: they take and return str, int, bytes, os.stat_result and
the small types defined here, so their tests need no HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import calendar
import contextlib
import ctypes
import datetime
import dataclasses
import enum
import errno
import functools
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import math
import mimetypes
import mmap
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn, TextIO

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CHUNK_SIZE", "MAX_RANGES", "ByteRange", "Catalog", "DownloadResponse", "GeneratedDownload", "HTTPError", "Settings",
    "SettingsError", "content_disposition", "create_app", "error_response", "evaluate_preconditions", "main", "make_etag",
    "parse_range", "settings_from_env", "sign_url", "stream_download", "verify_link",
]


# =============================================================================
# 1. Limits and errors
# =============================================================================
# Every limit the service enforces has a name here and a row in the README. HTTPError is
# the only exception whose outcome a client sees; error_response (section 9) makes it JSON.

CHUNK_SIZE = 256 * 1024
"""The disk read and body message of the portable path (setting: chunk_size), with zero-copy also a
paced piece's cap: per-chunk costs in Python dominate a fast download (README: Performance)."""

MAX_CHUNK_SIZE = 16 * 1024 * 1024  # the largest chunk_size setting: one read this big per connection at a time
COPY_UP_TO = 64 * 1024
"""Bodies up to this size are read and sent as one message even where zero-copy is offered: one read
from the page cache costs less than handing the descriptor over (README: Performance)."""

SENDFILE_MAX_CHUNK = 2 * 1024 * 1024  # one sendfile call's most, then other connections get a turn (nginx's sendfile_max_chunk)

MAX_RANGES = 100
"""More ranges than this and the Range header is ignored (200, the whole file): RFC 9110 §14.2
lets a server ignore a Range that looks like an attack."""

MIN_STRONG_AGE_S = 1.0
"""RFC 9110 §8.8.2.2: a Last-Modified date is a strong validator only if the file was last
modified at least one second before the response's Date; until then If-Range by date fails."""

MAX_HEAD_BYTES = 16 * 1024
"""A request line and headers longer than this are refused with 431 (HTTPProtocol with httptools; h11 has
this limit of its own, answered 400; nginx allows 4 x 8 KiB): a head is buffered whole, so without a limit
one client could fill memory."""

HEAD_TIMEOUT_S = 10.0
"""A request head not complete this long after the connection opened, or after the head's first byte,
closes the connection (HTTPProtocol; a partial head gets 408 first): slowloris can't hold descriptors.
Idle keep-alive between requests is uvicorn's timeout_keep_alive."""

LINGER_S = 5.0
"""After a 431 the server reads and drops what the client still sends for up to this long before it
closes (nginx's lingering close): closing on unread data would reset the connection, and the reset can
destroy the answer before the client reads it."""

STALL_TIMEOUT_S = 60.0
"""A download that makes no progress for this long is aborted (setting: stall_timeout; progress is a send
completed or bytes acknowledged: StallTimer): uvicorn has no write timeout, so a client that stops reading
would hold a task and a descriptor forever."""

PROGRESS_POLL_S = 1.0
"""While a send has waited this long, the stall timer reads how much the client has acknowledged this often
(a quarter of stall_timeout if that is shorter; TCP_INFO, on Linux): bytes acknowledged are progress, so
only a client that reads nothing is cut."""

DEFAULT_CACHE_CONTROL = "no-cache"  # caches keep a download but revalidate it, cheaply, by its strong ETag
GRACE_S = 30.0  # after SIGTERM, the seconds in-flight downloads get to finish before they are closed (--grace)
DRAIN_S = 5.0  # past the grace period the server cancels what still runs; the app waits this long for it to log
RETRY_AFTER_S = 5  # the Retry-After of a 503 when max_active_downloads are already running
DEFAULT_BLOB_LIMIT = 200 * 1024 * 1024  # the page keeps files up to this size in memory (setting: blob_limit)
MAX_ACTIVE_ZIPS = 4  # archives one process builds at once; beyond it /zip answers 503 with Retry-After
DEFAULT_LIST_LIMIT = 100  # files per /api/files page unless `limit` asks for others, up to MAX_LIST_LIMIT
MAX_LIST_LIMIT = 1000
FOLDER_STILL_S = 2.0  # a folder is kept sorted only once unchanged this long: mtimes may tick in whole seconds
LISTING_CACHE_NAMES = 300_000  # names of recently listed folders kept sorted for paging (about 60 bytes each)
LISTING_LINK_TTL_S = 3600  # with a secret and the listing switched on, the listing's links are signed for an hour
MAX_TTL_S = 100 * 365 * 86400  # the longest lifetime a catalog or signed link may be given (a century)
MAX_EXPIRES_AT = 253402300799  # 9999-12-31T23:59:59Z: the latest expiry RFC 3339 can write
MAX_DOWNLOADS_CAP = 1_000_000_000  # the largest max_downloads a catalog link may have
CATALOG_TIMEOUT_S = 2.0
"""A catalog call that waits this long for one of the CATALOG_THREADS, for another writer's lock on the SQLite
file, or for PostgreSQL (to connect; a statement or a lock on the server; unacknowledged TCP sends), is given
up: 503 with Retry-After, and /healthz says so. Writes take milliseconds; waiting 10 s tied up threads."""
CATALOG_THREADS = 4  # catalog calls one process runs at once (SQLite has one writer): the rest of the thread pool reads files
CATALOG_ABANDON_S = 6.0
"""A catalog call still running this long (connecting and one statement each take CATALOG_TIMEOUT_S at most) is
waiting on a database server that stopped answering: the request gets its 503, the call is left to its thread."""
PG_CHECK_IDLE_S = 1.0  # a PostgreSQL connection idle longer is checked (one round trip) before reuse
HOLDERS_SWEPT_AT_ONCE = 5000  # expired link holders one sweep deletes (a full batch: the next claim sweeps again)
MIGRATION_TIMEOUT_S = 60.0  # a PostgreSQL catalog's schema migration at start-up (another replica's included) may take this long
LINK_HOLD_S = 120.0
"""After a catalog link's last download is counted, the client it went to (same address and User-Agent) may
still fetch ranges of it for this long, up to one file's worth of bytes in all: a download manager's other
segments and retries. Counted from the count, never renewed."""
S3_TIMEOUT_S = 10.0
"""An object store that takes longer than this to answer a HEAD, a listing or a GET's first bytes, or to send a
body's next chunk, has timed out: 504 before the head is sent, after it the read is asked again (S3_RETRIES)."""
S3_HEALTH_TIMEOUT_S = 2.0  # /healthz's listing of one key: a probe gets its 503 before its own timeout
S3_CONNECT_TIMEOUT_S = 3.0  # connecting to the object store (its part of S3_TIMEOUT_S)
S3_WINDOW = 8 * 1024 * 1024
"""A proxied object is read in ranged GETs of this many bytes, each with If-Match on the announced ETag: an object
replaced mid-download is seen within a window, and a slow client holds no GET open for long."""
S3_LIST_PAGE = 1000  # keys one ListObjectsV2 asks for (S3's most)
LIST_SCAN_KEYS = 10_000
"""A listing page of a bucket reads at most this many keys (ten of the store's pages) looking for files to list:
past hidden or unnameable keys it ends early, with a cursor where it stopped."""
S3_RETRIES = 2  # a window whose GET fails mid-body is asked again from where it stopped this many times, then aborted
S3_URL_TTL_S = 300
"""Redirect mode: a presigned URL works this long (setting: s3_url_ttl). Each request through us gets a fresh one; a
download that started goes on past it, but a client resuming from the presigned URL itself must come back to us."""
MAX_S3_URL_TTL_S = 7 * 86400  # SigV4's longest presigned URL
DEFAULT_HASH_RATE = 64 * 1024 * 1024
"""Bytes per second the background hasher reads at most (setting: hash_rate), in one thread per app (section 7):
about 4% of a core for SHA-256, so a tree being hashed costs requests little (README: Integrity)."""
HASH_CHUNK = 8 * 1024 * 1024
"""The hasher's read, into one buffer per file. Each read costs the event loop a few handovers of the GIL: with 1 MiB
reads, hashing at 64 MiB/s took 10-18% of the requests/s of 1 KiB files; with 8 MiB, 4-6% (tests/bench_digests.py)."""
HASH_RESCAN_S = 300.0  # the hasher walks the root again this often for new and changed files (a file requested first)
HASH_QUEUE = 10_000  # files downloaded with their digest unknown, waiting to be hashed first; more wait for the next walk
HASH_LEASE_S = 30.0
"""Of the processes sharing a digest cache (`--workers N`, replicas on one disk), one hashes a root at a time: the
holder of a lease in the cache, renewed while it works and given up when it has no more. One that died holding it
is taken over this long after its last renewal."""
DIGEST_POLL_S = 2.0  # the other processes read the holder's new digests this often at most (when a lookup misses)
DIGEST_ROWS = 1_000_000  # files the digest cache keeps at most (about 150 bytes each); beyond, those unseen longest go
MAX_FOLDER_FILES = 100_000  # more files than this in one folder and /zip and /sha256sums answer 413
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)  # of downloader_download_seconds


class HTTPError(Exception):
    """An outcome for the client: status, a fixed detail (never OS text or a path, like Go's toHTTPError), headers."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


class TransferAborted(RuntimeError):
    """The body can't be sent whole (the file shrank, a read failed). Raised mid-body so that the server
    aborts the connection: the client sees a failed transfer, never a short body that looks complete."""


class GateClosed(TransferAborted):
    """A gate (hold_last_byte) refused the rest of the body: aborted like any other transfer."""


class TransferRefused(Exception):
    """A gate refused a one-message body before any of it was sent: the response can still be an error."""


def not_found() -> HTTPError:
    return HTTPError(404, "Not Found")


# =============================================================================
# 2. Settings
# =============================================================================
# One frozen Settings per app, from create_app's keyword arguments or DOWNLOADER_* variables
# (the same names, upper-cased). A bad value stops start-up with one line naming it.

ENV_PREFIX = "DOWNLOADER_"
DEFAULT_DIGEST_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "downloader", "digests.sqlite3")
DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "downloads")

# DOWNLOADER_* variables read by the command line (section 12), not by create_app:
SERVER_VARIABLES = ("HOST", "PORT", "WORKERS", "GRACE", "PROXY_HEADERS", "FORWARDED_ALLOW_IPS")


class SettingsError(ValueError):
    """A bad setting: `name` as the user wrote it (keyword, variable or flag) and the problem; str() is the line to print."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Settings:
    """What one app serves and how. Field names are create_app's keyword arguments."""

    root: str = DEFAULT_ROOT  # a real directory path, or s3://bucket/prefix (section 6)
    chunk_size: int = CHUNK_SIZE
    cache_control: str = DEFAULT_CACHE_CONTROL
    serve_hidden: bool = False
    listing: bool | None = None  # None: on, unless a secret protects /download
    blob_limit: int = DEFAULT_BLOB_LIMIT
    secret: tuple[str, ...] = ()  # link-signing keys: the first signs, all verify
    catalog: str | None = None  # SQLite file of the ID catalog
    admin_token: str | None = None  # bearer token of /api/links; None: the admin API is off
    authorize: Callable[..., object] | None = None  # Python only: allow or deny each download
    zip_compression: bool = False  # deflate /zip entries (then no Content-Length)
    max_active_downloads: int | None = None  # per process; beyond it 503 with Retry-After
    rate_limit: int | None = None  # bytes per second per download, like nginx's limit_rate
    stall_timeout: float = STALL_TIMEOUT_S  # no progress for longer aborts the download
    access_log: str = "-"  # one JSON line per request (not /healthz, /metrics): "-" stdout, "off", or a file path
    metrics: bool = True  # GET /metrics in Prometheus format
    offload: str | None = None  # "x-accel-redirect": nginx sends the bytes
    offload_prefix: str = "/_downloader_files/"  # nginx's internal location for the root
    s3_mode: str = "proxy"  # a bucket root: "proxy" streams objects through us, "redirect" answers 302 to a presigned URL
    s3_url_ttl: int = S3_URL_TTL_S  # redirect mode: seconds a presigned URL works
    digests: bool = True  # hash the root's files in the background and announce their SHA-256 (section 7)
    digest_cache: str = DEFAULT_DIGEST_CACHE  # the SQLite file digests are kept in across restarts; "off": in memory only
    hash_rate: int = DEFAULT_HASH_RATE  # bytes per second the hasher reads at most

    @property
    def listing_on(self) -> bool:
        return self.listing if self.listing is not None else not self.secret

    @property
    def is_bucket(self) -> bool:
        return is_bucket_url(self.root)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be one of 1, 0, true, false, yes, no, on, off")


def _parse_int(text: str) -> int:
    try:
        return int(_ascii_number(text))
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_seconds(text: str) -> float:
    try:
        return float(_ascii_number(text))
    except ValueError:
        raise ValueError("must be a number of seconds") from None


def _ascii_number(text: str) -> str:
    """`text` stripped, if it spells a number in ASCII: Python's int() and float() also take "٥", "６０" and "1_0"."""
    text = text.strip()
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    return text


def _parse_keys(text: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    if not keys:  # (an unset shell variable): it would serve every file unprotected
        raise ValueError("must be a key, or a list of keys (comma-separated)")
    return keys


def is_bucket_url(text: str) -> bool:
    return text.startswith("s3://")


BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules for bucket names, in short


def _check_bucket_url(text: str) -> str:
    """s3://bucket[/prefix], the prefix without slashes at its ends and with no segment a URL can't name."""
    bucket, _, prefix = text[len("s3://"):].partition("/")
    if not BUCKET_NAME.fullmatch(bucket):
        raise ValueError(f"{text!r}: {bucket!r} is not a bucket name (3 to 63 lower-case letters, digits, dots and hyphens): s3://bucket/prefix")
    prefix = prefix.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ValueError(f"{text!r} has an empty, . or .. segment in its prefix")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _check_root(value: object) -> str:
    if isinstance(value, str) and is_bucket_url(value.strip()):
        return _check_bucket_url(value.strip())  # reached when the app is built (open_bucket)
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ValueError("must be a directory path, or s3://bucket/prefix")  # "" would mean the current directory
    real = os.path.realpath(os.fspath(value))
    if not os.path.isdir(real):
        raise ValueError(f"{os.fspath(value)!r} is not a directory")
    return real


def _check_int(low: int, high: int, unit: str) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number of {unit} from {low} to {high}")
        return value

    return check


def _check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _check_text(value: object) -> str:
    if not isinstance(value, str) or not value.isprintable() or not value.isascii():
        raise ValueError("must be printable ASCII text")
    return value.strip()


def _check_token(value: object) -> str:
    """A bearer token: an empty one would let `Authorization: Bearer` with nothing after it in."""
    token = _check_text(value)
    if not token:
        raise ValueError("must not be empty")
    return token


def _check_keys(value: object) -> tuple[str, ...]:
    keys = (value,) if isinstance(value, str) else value
    if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError("must be a key, or a list of keys (comma-separated in the environment)")
    return tuple(keys)


def _check_file_path(value: object) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ValueError("must be a file path")
    path = os.path.abspath(os.fspath(value))
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a file")
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"folder {os.path.dirname(path)!r} does not exist")
    return path


def is_postgres_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def _check_catalog(value: object) -> str:
    if isinstance(value, str) and is_postgres_url(value):
        return value  # reached when the catalog opens (Catalog)
    scheme = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*):/", value) if isinstance(value, str) else None
    if scheme:  # a URL, mistyped: never echoed, as it may hold a password
        raise ValueError(f"a URL with scheme {scheme.group(1)!r}: the catalog is a SQLite file path or a postgresql:// URL")
    path = _check_file_path(value)
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=CATALOG_TIMEOUT_S)) as db:
            db.execute("PRAGMA schema_version")
    except sqlite3.Error as exc:
        raise ValueError(f"{path!r} can't be opened as a SQLite catalog ({exc})") from None
    return path


def _check_access_log(value: object) -> str:
    if value in ("-", "off"):
        return str(value)
    path = _check_file_path(value)
    try:
        open(path, "a", encoding="utf-8").close()
    except OSError as exc:
        raise ValueError(f"{path!r} can't be opened for appending ({exc.strerror})") from None
    return path


def _check_callable(value: object) -> Callable[..., object]:
    if not callable(value):
        raise ValueError("must be a callable")
    return value


def _check_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise ValueError("must be a number of seconds above 0, at most 86400")
    return float(value)


def _check_offload(value: object) -> str:
    if value not in ("x-accel-redirect",):
        raise ValueError("must be x-accel-redirect")
    return str(value)


def _check_s3_mode(value: object) -> str:
    if value not in ("proxy", "redirect"):
        raise ValueError("must be proxy or redirect")
    return str(value)


def _check_offload_prefix(value: object) -> str:
    text = _check_text(value)
    if not text.startswith("/") or not text.endswith("/") or "//" in text:
        raise ValueError("must be a path that starts and ends with /, like /_downloader_files/")
    return text


def _check_digest_cache(value: object) -> str:
    if value == "off":
        return "off"
    path = os.path.abspath(os.fspath(value)) if isinstance(value, (str, os.PathLike)) and os.fspath(value).strip() else ""
    if not path or os.path.isdir(path):
        raise ValueError("must be a file path (its folder is made if missing), or off (digests in memory only)")
    return path


# name -> (text of a DOWNLOADER_* variable -> value, or None when Python-only; value check)
SETTING_RULES: dict[str, tuple[Callable[[str], object] | None, Callable[[object], object]]] = {
    "root": (str, _check_root),
    "chunk_size": (_parse_int, _check_int(1024, MAX_CHUNK_SIZE, "bytes")),
    "cache_control": (str, _check_text),
    "serve_hidden": (_parse_bool, _check_bool),
    "listing": (_parse_bool, _check_bool),
    "blob_limit": (_parse_int, _check_int(0, 2**53, "bytes")),
    "secret": (_parse_keys, _check_keys),
    "catalog": (str, _check_catalog),
    "admin_token": (str, _check_token),
    "authorize": (None, _check_callable),
    "zip_compression": (_parse_bool, _check_bool),
    "max_active_downloads": (_parse_int, _check_int(1, 1_000_000, "downloads")),
    "rate_limit": (_parse_int, _check_int(1024, 2**40, "bytes per second")),
    "stall_timeout": (_parse_seconds, _check_seconds),
    "access_log": (str, _check_access_log),
    "metrics": (_parse_bool, _check_bool),
    "offload": (str, _check_offload),
    "offload_prefix": (str, _check_offload_prefix),
    "s3_mode": (str, _check_s3_mode),
    "s3_url_ttl": (_parse_int, _check_int(1, MAX_S3_URL_TTL_S, "seconds")),
    "digests": (_parse_bool, _check_bool),
    "digest_cache": (str, _check_digest_cache),
    "hash_rate": (_parse_int, _check_int(1024 * 1024, 2**40, "bytes per second")),
}


def make_settings(values: Mapping[str, object], *, label: Callable[[str], str] = str) -> Settings:
    """Keyword values (None: the default) checked into Settings; errors name a setting through `label`."""
    checked: dict[str, object] = {}
    for name, value in values.items():
        if name not in SETTING_RULES:
            raise SettingsError(label(name), "unknown setting")
        if value is None:
            continue
        try:
            checked[name] = SETTING_RULES[name][1](value)
        except ValueError as exc:
            raise SettingsError(label(name), str(exc)) from None
    if "root" not in checked:
        try:
            checked["root"] = _check_root(DEFAULT_ROOT)
        except ValueError:  # downloader.py copied alone: no sample files beside it
            raise SettingsError(label("root"), f"not set, and the default {DEFAULT_ROOT!r} (the sample files) is not a directory") from None
    settings = Settings(**checked)  # type: ignore[arg-type]
    defaults = Settings()
    check_combination(settings, {name for name in checked if getattr(settings, name) != getattr(defaults, name)}, label)
    return settings


def check_combination(settings: Settings, given: set[str], label: Callable[[str], str]) -> None:
    """Settings that each pass but make no sense together (`given`: those set to other than their default): an
    error rather than a setting silently ignored."""
    if not settings.digests:
        for name in ("digest_cache", "hash_rate"):
            if name in given:
                raise SettingsError(label(name), "applies only with digests on")
    if not settings.is_bucket:
        for name in ("s3_mode", "s3_url_ttl"):
            if name in given:
                raise SettingsError(label(name), "applies only to a bucket root (root s3://bucket/prefix)")
        return
    for name in ("digest_cache", "hash_rate"):
        if name in given:
            raise SettingsError(label(name), "applies only to a directory root: objects are not hashed (README: Integrity)")
    if settings.offload:
        raise SettingsError(label("offload"), "nginx sends files from disk: a bucket root can't be offloaded (s3_mode=redirect hands bytes to the store)")
    if settings.s3_mode == "redirect" and settings.rate_limit:
        raise SettingsError(label("rate_limit"), "can't apply in s3_mode=redirect: the object store sends the bytes")
    if "s3_url_ttl" in given and settings.s3_mode != "redirect":
        raise SettingsError(label("s3_url_ttl"), "applies only with s3_mode=redirect")


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """Settings from DOWNLOADER_* variables; an unknown one is an error, lest a misspelt DOWNLOADER_SECRET serve files unprotected."""
    values: dict[str, object] = {}
    for key, text in environ.items():
        if not key.startswith(ENV_PREFIX) or key[len(ENV_PREFIX):] in SERVER_VARIABLES:
            continue
        name = key[len(ENV_PREFIX):].lower()
        from_text = SETTING_RULES.get(name, (None, None))[0]
        if from_text is None:
            raise SettingsError(key, "unknown setting")
        try:
            values[name] = from_text(text)
        except ValueError as exc:
            raise SettingsError(key, f"{exc}, got {text!r}") from None
    return make_settings(values, label=lambda name: ENV_PREFIX + name.upper())


# =============================================================================
# 3. Path resolution
# =============================================================================
# A URL path (percent-decoded once, by the server) becomes an open fd of a regular file in the
# root, or an HTTPError. Containment is checked on the descriptor actually opened, so a symlink
# swapped in serves nothing from outside; outside answers like missing (relative_under_root),
# and OS errors map to a status in one place (os_error_to_http).

OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not hang the open
    | getattr(os, "O_NOFOLLOW", 0)  # the last component was resolved: a link now is a swap
)


Identity = tuple[int, int, int, int, int]  # content_identity: device, inode, size, mtime_ns, ctime_ns


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the headers need to know about one opened file."""

    size: int
    mtime_ns: int
    name: str  # the last segment of the path asked for: a link's own name, not its target's
    path: str  # the real path opened; an object's path below the bucket's prefix
    etag: str | None = None  # the validator where the store has one (an object's ETag); else make_etag's
    identity: Identity | None = None  # a file's content_identity (a digest's key); None for objects
    sha256: bytes | None = None  # the digest of the whole file, once known (section 7)


class OpenFile(NamedTuple):
    fd: int
    info: FileInfo


def _is_utf8(name: str) -> bool:
    """False for a name holding surrogates (PEP 383: bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_url_path(path: str) -> list[str]:
    """The segments of a decoded URL path relative to the route, or HTTPError: 400 for a NUL byte (and a
    backslash where it is the OS separator); 404 for an empty path, empty segments (`a//b`) and `.` or
    `..` (a URL that names a file has one spelling), and for a name that is not UTF-8, which no URL
    names (a path from the CLI may hold one). Any other character is part of a POSIX file name."""
    if "\x00" in path or (os.sep != "/" and os.sep in path):
        raise HTTPError(400, "Malformed path")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments) or not _is_utf8(path):
        raise not_found()
    return segments


def is_hidden(segments: Iterable[str]) -> bool:
    return any(segment.startswith(".") for segment in segments)


def relative_under_root(root: str, real: str, *, serve_hidden: bool) -> str:
    """The "/"-separated path of `real` below `root` ("" for the root), both real paths: the one check every
    file served or listed passes. 404 when outside, or hidden unless `serve_hidden` (a link to a dotfile
    counts). On real paths a prefix test on whole components is exact: unlike bottle's startswith, no link escapes."""
    if real == root:
        return ""
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not real.startswith(prefix):
        raise not_found()
    parts = real[len(prefix) :].split(os.sep)
    if not serve_hidden and is_hidden(parts):
        raise not_found()
    return "/".join(parts)


def os_error_to_http(exc: OSError) -> HTTPError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return HTTPError(403, "Forbidden")
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return HTTPError(503, "Server busy", headers={"Retry-After": "1"})
    return not_found()  # ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG, EISDIR...


O_PATH = getattr(os, "O_PATH", 0)
PINNED_OPEN = bool(O_PATH) and os.path.isdir("/proc/self/fd")  # Linux: open_pinned; elsewhere open_checked

RESOLVE_CACHED = 0x20  # linux/openat2.h
SYS_OPENAT2 = 437  # one number on every architecture: openat2 came after the tables were unified


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _libc_syscall() -> Callable[..., int] | None:
    if not PINNED_OPEN:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None


_syscall = _libc_syscall()
CACHED_OPEN = _syscall is not None  # may open_handle_cached be tried? Off for good at its first ENOSYS


def open_handle_cached(path: str) -> int | None:
    """An O_PATH handle for `path` if all of it is in the kernel's lookup cache, else None. openat2 with
    RESOLVE_CACHED (Linux 5.12+) fails with EAGAIN rather than wait for the disk: the event loop may call it."""
    global CACHED_OPEN
    if not CACHED_OPEN or "\x00" in path:
        return None
    how = _OpenHow(O_PATH | os.O_CLOEXEC, 0, RESOLVE_CACHED)
    assert _syscall is not None
    fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(-100), os.fsencode(path), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.EAGAIN:
        return None  # resolving it needs I/O: a worker thread will
    if err in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
        CACHED_OPEN = False
        return None
    raise OSError(err, os.strerror(err))


def open_pinned(candidate: str, *, root: str | None, serve_hidden: bool = False, cached: bool = False) -> OpenFile | None:
    """Opens the regular file `candidate` resolves to with no window between check and open (Linux): its O_PATH
    handle opens nothing (no device, no FIFO), so its fstat and real path are checked (relative_under_root)
    before that inode is opened through it. With `cached`: from the kernel's caches only, None if that needs I/O."""
    try:
        handle = open_handle_cached(candidate) if cached else os.open(candidate, O_PATH | os.O_CLOEXEC)
    except ValueError:
        raise not_found() from None  # a NUL byte
    except OSError as exc:
        raise os_error_to_http(exc) from None
    if handle is None:
        return None
    try:
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            raise not_found()  # directories, FIFOs, sockets, devices: never opened
        real = os.readlink(f"/proc/self/fd/{handle}")
        if root is not None:
            relative_under_root(root, real, serve_hidden=serve_hidden)
        fd = os.open(f"/proc/self/fd/{handle}", OPEN_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise os_error_to_http(exc) from None
    finally:
        os.close(handle)
    return OpenFile(fd, FileInfo(st.st_size, st.st_mtime_ns, os.path.basename(candidate), real, identity=content_identity(st)))


def content_identity(st: os.stat_result) -> Identity:
    """What identifies a file's content without reading it: device, inode, size, mtime_ns and ctime_ns. A write,
    or a file put back with the same size and mtime (touch -d), changes the ctime; another file, the inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(fd: int, identity: Identity, pace: Callable[[int], bool] | None = None) -> bytes | None:
    """The SHA-256 of the open file, if its content_identity is `identity` before and after it was read; None
    if it changed meanwhile (its digest would be of neither version), or `pace`, told each read's size, said
    stop (False). Blocking."""
    if content_identity(os.fstat(fd)) != identity:
        return None
    digest, offset = hashlib.sha256(), 0
    # An mmap of its own, unmapped when done: a bytearray this big would stay in the thread's malloc arena, 8 MiB
    # of RSS for good (glibc raises its mmap threshold after the first).
    with mmap.mmap(-1, min(HASH_CHUNK, identity[2] + 1)) as buffer, memoryview(buffer) as view:
        while size := os.preadv(fd, [buffer], offset):
            digest.update(view[:size])
            offset += size
            if pace is not None and not pace(size):
                return None
    if offset != identity[2] or content_identity(os.fstat(fd)) != identity:
        return None
    return digest.digest()


def open_checked(candidate: str, *, root: str | None, serve_hidden: bool = False) -> OpenFile:
    """Without O_PATH: resolves and checks `candidate` like open_pinned, opens it, and checks that the fd is
    the file checked (same device and inode). Raises HTTPError; never leaks the fd."""
    try:
        real = os.path.realpath(candidate, strict=True)
    except (OSError, ValueError):
        raise not_found() from None
    if root is not None:
        relative_under_root(root, real, serve_hidden=serve_hidden)
    try:
        before = os.stat(real)
        if not stat.S_ISREG(before.st_mode):
            raise not_found()  # directories, FIFOs, sockets, devices: never opened
        fd = os.open(real, OPEN_FLAGS)
    except OSError as exc:
        raise os_error_to_http(exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise not_found()
        return OpenFile(fd, FileInfo(st.st_size, st.st_mtime_ns, os.path.basename(candidate), real, identity=content_identity(st)))
    except BaseException:
        os.close(fd)
        raise


def candidate_path(root: str, url_path: str, *, serve_hidden: bool) -> str:
    """The unresolved path under the root `url_path` names: split_url_path's checks; 404 if hidden (unless serve_hidden)."""
    segments = split_url_path(url_path)
    if not serve_hidden and is_hidden(segments):
        raise not_found()
    return os.path.join(root, *segments)


def open_under_root(root: str, url_path: str, *, serve_hidden: bool = False) -> OpenFile:
    """The regular file that `url_path` names under the real directory `root`, opened: 404 when it is
    missing, not a regular file, hidden (unless serve_hidden), or resolves outside the root; symlinks
    that stay inside are followed, and the file keeps the URL's name. Blocking."""
    candidate = candidate_path(root, url_path, serve_hidden=serve_hidden)
    if not PINNED_OPEN:
        return open_checked(candidate, root=root, serve_hidden=serve_hidden)
    opened = open_pinned(candidate, root=root, serve_hidden=serve_hidden)
    assert opened is not None
    return opened


def open_cached(path: str, *, root: str | None, serve_hidden: bool = False) -> OpenFile | None:
    """open_under_root (with a real `root`) or open_path from the kernel's caches alone; None if that needs I/O."""
    if not CACHED_OPEN:
        return None
    if root is not None:
        path = candidate_path(root, path, serve_hidden=serve_hidden)
    return open_pinned(path, root=root, serve_hidden=serve_hidden, cached=True)


def open_path(path: str | os.PathLike[str]) -> OpenFile:
    """A host app's own file path, opened and checked (a regular file); no root applies."""
    if not PINNED_OPEN:
        return open_checked(os.fspath(path), root=None)
    opened = open_pinned(os.fspath(path), root=None)
    assert opened is not None
    return opened


class ListedFile(NamedTuple):
    path: str  # relative to the root, "/"-separated
    size: int
    mtime: float
    etag: str | None = None  # an object's (section 6)
    identity: Identity | None = None  # a file's content_identity


DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
TARGET_FLAGS = (O_PATH or os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)) | os.O_CLOEXEC  # what a link names, opened for fstat


def _real_path(fd: int, path: str) -> str:
    """The real path of an open descriptor: on Linux of the very file it holds, elsewhere of `path`."""
    return os.readlink(f"/proc/self/fd/{fd}") if PINNED_OPEN else os.path.realpath(path, strict=True)


def _entry_stat(name: str, is_link: bool, dir_fd: int, directory: str, root: str, serve_hidden: bool) -> os.stat_result | None:
    """The stat of what a folder's entry names, a link followed when it leads inside the root and not to a hidden
    file there; else None. Read through the folder's descriptor: a link swapped in is judged by where it leads."""
    try:
        if not is_link:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)  # an entry of a checked folder
        fd = os.open(name, TARGET_FLAGS, dir_fd=dir_fd)
        try:
            relative_under_root(root, _real_path(fd, os.path.join(directory, name)), serve_hidden=serve_hidden)
            return os.fstat(fd)
        finally:
            os.close(fd)
    except (OSError, ValueError, HTTPError):
        return None


class FolderNames:
    """The sorted names of recently listed folders, so that a page of a big folder costs a bisect and a stat per
    file, not a scan and a sort (whitenoise's idea: do the work once). Keyed by the folder's device, inode and
    nanosecond mtime, which any entry added, removed or renamed changes; a folder's links are sorted by what they
    led to then, and checked again when listed. At most LISTING_CACHE_NAMES names, least recently used out first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.folders: dict[tuple[object, ...], tuple[list[str], frozenset[str]]] = {}
        self.size = 0

    def sorted(self, dir_fd: int, directory: str, root: str, serve_hidden: bool) -> tuple[list[str], frozenset[str]]:
        """The folder's servable names, each folder's with a trailing "/", in string order; and the names of links."""
        st = os.fstat(dir_fd)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, root, serve_hidden)
        with self.lock:
            if (found := self.folders.pop(key, None)) is not None:
                self.folders[key] = found  # most recently used now
                return found
            with os.scandir(dir_fd) as it:
                entries = [(e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in it]
            names, links = [], set()
            for name, is_link, is_dir in entries:
                if (not serve_hidden and name.startswith(".")) or not _is_utf8(name):
                    continue
                if is_link:
                    target = _entry_stat(name, True, dir_fd, directory, root, serve_hidden)
                    if target is None or not (stat.S_ISDIR(target.st_mode) or stat.S_ISREG(target.st_mode)):
                        continue
                    is_dir = stat.S_ISDIR(target.st_mode)
                    links.add(name)
                names.append(name + "/" if is_dir else name)  # a folder sorts as "name/": the walk is in path order
            found = sorted(names), frozenset(links)
            # Like git's racy index: a folder changed within the last seconds may change again within the same
            # mtime tick (coarse on some file systems), unseen; it is read anew until it has been still a while.
            if len(names) < LISTING_CACHE_NAMES and time.time() - st.st_mtime > FOLDER_STILL_S:
                self.folders[key] = found
                self.size += len(names) + 1  # an empty folder counts too: the number of keys is bounded
                while self.size > LISTING_CACHE_NAMES:
                    self.size -= len(self.folders.pop(next(iter(self.folders)))[0]) + 1
            return found


FOLDER_NAMES = FolderNames()


def walk_files(root: str, *, folder: str = "", after: str = "", serve_hidden: bool = False) -> Iterator[ListedFile]:
    """Every file /download serves under the real directory `root` (or its subfolder `folder`), by its /download
    path, in path order, after `after`: listed if and only if served, except names that are not UTF-8 (no URL
    names them) and links to an ancestor (an endless walk). Subtrees before `after` are skipped unread, and a
    folder's names come from FolderNames. Each folder is read through a descriptor whose real path was checked
    (Linux), so a folder swapped for a link out of the root mid-walk lists nothing from outside. Blocking."""

    def enter(dir_fd: int | None, name: str, parent: str, prefix: str, ancestors: frozenset[str]) -> Iterator[ListedFile]:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return
        try:
            real = _real_path(fd, os.path.join(parent, name))
            relative_under_root(root, real, serve_hidden=serve_hidden)
            if real in ancestors:
                return  # a link back to an ancestor, the root included
            yield from visit(fd, real, prefix, ancestors | {real})
        except (OSError, HTTPError):
            return
        finally:
            os.close(fd)

    def visit(dir_fd: int, directory: str, prefix: str, ancestors: frozenset[str]) -> Iterator[ListedFile]:
        names, links = FOLDER_NAMES.sorted(dir_fd, directory, root, serve_hidden)
        start = bisect.bisect_left(names, after[len(prefix) :].split("/", 1)[0]) if after.startswith(prefix) else 0
        for entry in itertools.islice(names, start, None):
            name, key = entry.rstrip("/"), prefix + entry
            if entry.endswith("/") and (key > after or after.startswith(key)):
                yield from enter(dir_fd, name, directory, key, ancestors)
            elif not entry.endswith("/") and key > after:
                st = _entry_stat(name, name in links, dir_fd, directory, root, serve_hidden)
                if st is not None and stat.S_ISREG(st.st_mode):
                    yield ListedFile(key, st.st_size, st.st_mtime, identity=content_identity(st))

    def start() -> Iterator[ListedFile]:
        fds = [os.open(root, DIR_FLAGS)]
        try:
            ancestors, directory = {root}, root
            for segment in folder.split("/") if folder else []:
                fds.append(os.open(segment, DIR_FLAGS, dir_fd=fds[-1]))
                directory = _real_path(fds[-1], os.path.join(directory, segment))
                relative_under_root(root, directory, serve_hidden=serve_hidden)
                ancestors.add(directory)
            yield from visit(fds[-1], directory, folder + "/" if folder else "", frozenset(ancestors))
        except (OSError, HTTPError):
            return
        finally:
            for fd in fds:
                os.close(fd)

    return start()


def resolve_folder(root: str, url_path: str, *, serve_hidden: bool = False) -> str:
    """The folder `url_path` names by open_under_root's rules, "/"-separated ("" for the root), else 404."""
    if url_path == "":
        return ""
    folder = url_path.rstrip("/")
    candidate = candidate_path(root, folder, serve_hidden=serve_hidden)
    try:
        real = os.path.realpath(candidate, strict=True)
    except (OSError, ValueError):
        raise not_found() from None
    if relative_under_root(root, real, serve_hidden=serve_hidden) == "" or not os.path.isdir(real):
        raise not_found()
    return folder


# =============================================================================
# 4. HTTP semantics
# =============================================================================
# Pure decisions and header values: RFC 9110 §14 (ranges), §13 (conditional requests,
# evaluated in the order of §13.2.2), §8.8 (validators), RFC 6266 and RFC 8187
# (Content-Disposition). Plain values in, plain values out; HTTPError for 412 and 416.


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes start .. stop-1 of a file; stop is exclusive, like range()."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


def _parse_range_spec(spec: str, size: int) -> ByteRange | None:
    """One range-spec, clamped to the file; None when unsatisfiable; ValueError when invalid."""
    first, dash, last = spec.partition("-")
    first, last = first.strip(" \t"), last.strip(" \t")
    if not dash or not (first or last) or not all(n.isascii() and n.isdigit() for n in (first, last) if n):
        raise ValueError(spec)
    if not first:  # suffix-range: the last N bytes
        suffix = int(last)
        # RFC 9110 §14.1.1: a suffix-length of 0 is unsatisfiable.
        return ByteRange(max(0, size - suffix), size) if suffix > 0 else None
    start = int(first)
    if last and int(last) < start:
        raise ValueError(spec)  # RFC 9110 §14.1.1: last-pos < first-pos is invalid
    if start >= size:
        return None
    return ByteRange(start, min(int(last) + 1, size) if last else size)


def parse_range(value: str, size: int) -> list[ByteRange] | None:
    """The ranges to send for a Range header on a file of `size` bytes, in request order (RFC 9110
    §14.3), overlaps included, like Go and nginx.

    None ignores the header (200, the whole file): an invalid header, unit or element, more than MAX_RANGES
    ranges, ranges adding up to more than the file (Go's guard against overlaps), or an empty file.
    HTTPError(416) with `Content-Range: bytes */size` when it is valid but nothing is satisfiable. Like Go
    and Apache, whitespace around elements and numbers is fine."""
    unit, eq, range_set = value.partition("=")
    if not eq or unit.strip(" \t").lower() != "bytes":
        return None
    specs = [spec for spec in (s.strip(" \t") for s in range_set.split(",")) if spec]
    if not specs or len(specs) > MAX_RANGES:
        return None
    try:
        parsed = [_parse_range_spec(spec, size) for spec in specs]
    except ValueError:
        return None
    if size == 0:
        return None
    ranges = [r for r in parsed if r is not None]
    if not ranges:
        raise HTTPError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
    if sum(r.length for r in ranges) > size:
        return None  # heavy overlap: no set may cost more than the file itself
    return ranges


def reaches_end(range_value: str | None, size: int) -> bool:
    """Would a GET with this Range header (None: the whole file) send the file's last byte?"""
    if range_value is None:
        return True
    try:
        ranges = parse_range(range_value, size)
    except HTTPError:
        return False
    return ranges is None or any(r.stop == size for r in ranges)


class Cond(enum.Enum):
    NONE = "none"
    TRUE = "true"
    FALSE = "false"


# RFC 9110 §8.8.3: entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE;
# etagc = %x21 / %x23-7E / obs-text.
_ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e\x80-\xff]*"')
_ETAG_MEMBER = re.compile(rf"[ \t,]*({_ETAG.pattern})[ \t]*")  # with the list's separators and whitespace


def scan_etags(value: str) -> list[str]:
    """The entity-tags of a list, as written (W/ and quotes kept), up to the first malformed one (Go's scanETag)."""
    tags: list[str] = []
    pos = 0
    while (match := _ETAG_MEMBER.match(value, pos)) is not None:
        tags.append(match.group(1))
        pos = match.end()
        if pos < len(value) and value[pos] != ",":
            break
    return tags


def etag_strong_match(a: str, b: str) -> bool:
    return a == b and not a.startswith("W/")


def etag_weak_match(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(\d\d):(\d\d):(\d\d)"
# RFC 9110 §5.6.7: IMF-fixdate, and the obsolete rfc850-date and asctime-date forms.
_IMF_FIXDATE = re.compile(rf"{_DAY}, (\d\d) {_MONTH} (\d{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d\d)-{_MONTH}-(\d\d) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} ([ \d]\d) {_TIME} (\d{{4}})")


def parse_http_date(value: str, *, now: float | None = None) -> int | None:
    """POSIX seconds of an HTTP-date in any of the three forms of RFC 9110 §5.6.7, or None (malformed)."""
    value = value.strip(" \t")
    if m := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _ASCTIME_DATE.fullmatch(value):
        month, day, hh, mm, ss, year = m.groups()
    elif m := _RFC850_DATE.fullmatch(value):
        day, month, yy, hh, mm, ss = m.groups()
        # RFC 9110 §5.6.7: a two-digit year more than 50 years in the future means the past.
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year_n = this_year - this_year % 100 + int(yy)
        year = str(year_n - 100 if year_n > this_year + 50 else year_n)
    else:
        return None
    fields = (int(year), _MONTHS[month], int(day), int(hh), int(mm), int(ss))
    try:  # a real calendar date: 31 Feb is no date (timegm would roll it into March)
        datetime.datetime(*fields[:5], min(fields[5], 59))
    except ValueError:
        return None
    if fields[5] > 60:
        return None
    return calendar.timegm(fields + (0, 0, 0))


def http_date(seconds: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))


def check_if_match(value: str | None, etag: str) -> Cond:
    """RFC 9110 §13.1.1: strong comparison; `*` matches any current representation."""
    if value is None:
        return Cond.NONE
    if value.strip(" \t") == "*":
        return Cond.TRUE
    return Cond.TRUE if any(etag_strong_match(tag, etag) for tag in scan_etags(value)) else Cond.FALSE


def check_if_none_match(value: str | None, etag: str) -> Cond:
    """RFC 9110 §13.1.2: weak comparison; `*` is false when the file exists (it does)."""
    if value is None:
        return Cond.NONE
    if value.strip(" \t") == "*":
        return Cond.FALSE
    return Cond.FALSE if any(etag_weak_match(tag, etag) for tag in scan_etags(value)) else Cond.TRUE


def check_if_modified_since(value: str | None, mtime: float) -> Cond:
    """RFC 9110 §13.1.3: false when not modified since the date; a bad date is ignored."""
    date = None if value is None else parse_http_date(value)
    if date is None:
        return Cond.NONE
    return Cond.FALSE if int(mtime) <= date else Cond.TRUE


def check_if_unmodified_since(value: str | None, mtime: float) -> Cond:
    """RFC 9110 §13.1.4: true when not modified since the date; a bad date is ignored."""
    date = None if value is None else parse_http_date(value)
    if date is None:
        return Cond.NONE
    return Cond.TRUE if int(mtime) <= date else Cond.FALSE


def check_if_range(value: str | None, etag: str, mtime: float, now: float) -> Cond:
    """RFC 9110 §13.1.5: the range applies only if the validator still matches: an ETag by strong
    comparison, or a date equal to Last-Modified that is strong (§8.8.2.2: at least a second old)."""
    if value is None:
        return Cond.NONE
    value = value.strip(" \t")
    if value.startswith(('"', "W/")):
        return Cond.TRUE if etag_strong_match(value, etag) else Cond.FALSE
    date = parse_http_date(value)
    if date is not None and date == int(mtime) and now - mtime >= MIN_STRONG_AGE_S:
        return Cond.TRUE
    return Cond.FALSE


def evaluate_preconditions(method: str, headers: Mapping[str, str], etag: str, mtime: float) -> int | None:
    """412, 304 or None (go on), evaluating the preconditions in the order of RFC 9110 §13.2.2.
    `headers` has lower-case names. If-Range only decides whether a Range applies (plan_response)."""
    # Steps 1 and 2: If-Match, or If-Unmodified-Since when If-Match is absent.
    cond = check_if_match(headers.get("if-match"), etag)
    if cond is Cond.NONE:
        cond = check_if_unmodified_since(headers.get("if-unmodified-since"), mtime)
    if cond is Cond.FALSE:
        return 412
    # Steps 3 and 4: If-None-Match, or If-Modified-Since (GET and HEAD only) when it is absent.
    safe = method in ("GET", "HEAD")
    cond = check_if_none_match(headers.get("if-none-match"), etag)
    if cond is Cond.FALSE:
        return 304 if safe else 412
    if cond is Cond.NONE and safe and check_if_modified_since(headers.get("if-modified-since"), mtime) is Cond.FALSE:
        return 304
    return None


STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e\x80-\xff]*"')  # RFC 9110 §8.8.3: entity-tag without W/


def make_etag(size: int, mtime_ns: int) -> str:
    """A strong ETag of the size and nanosecond mtime; no inode, so replicas of a file agree on it."""
    return f'"{mtime_ns:x}-{size:x}"'


EXTRA_MEDIA_TYPES = {
    ".gz": "application/gzip", ".tgz": "application/gzip", ".bz2": "application/x-bzip2", ".xz": "application/x-xz",
    ".zst": "application/zstd", ".7z": "application/x-7z-compressed", ".rar": "application/vnd.rar",
    ".webp": "image/webp", ".avif": "image/avif", ".webm": "video/webm", ".mkv": "video/x-matroska",
    ".flac": "audio/flac", ".opus": "audio/opus", ".md": "text/markdown", ".csv": "text/csv",
    ".iso": "application/x-iso9660-image", ".wasm": "application/wasm",
    ".js": "text/javascript", ".mjs": "text/javascript",  # RFC 9239
    ".epub": "application/epub+zip", ".apk": "application/vnd.android.package-archive",
    ".deb": "application/vnd.debian.binary-package", ".dmg": "application/x-apple-diskimage", ".msi": "application/x-msi",
}


def build_media_types() -> dict[str, str]:
    """Python's own table plus EXTRA_MEDIA_TYPES, never /etc/mime.types: every machine answers the same."""
    return {**mimetypes.MimeTypes(filenames=()).types_map[True], **EXTRA_MEDIA_TYPES}


def media_type_for(name: str, types: Mapping[str, str]) -> str:
    """Content-Type by the last extension; text gets charset=utf-8; unknown is octet-stream."""
    media_type = types.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
    return f"{media_type}; charset=utf-8" if media_type.startswith("text/") else media_type


# RFC 8187 §3.2.1: attr-char = ALPHA / DIGIT / "!" / "#" / "$" / "&" / "+" / "-" / "." /
# "^" / "_" / "`" / "|" / "~"; everything else is percent-encoded UTF-8.
_ATTR_CHAR_PUNCTUATION = "!#$&+-.^_`|~"


def ascii_filename(name: str) -> str:
    """The ASCII `filename=`: accents dropped (é -> e); other non-ASCII, controls, `"`, `%` (decoded by some) and
    separators -> `_`; so are dot-dots, which NFKD can make of other characters (`．．／` -> `../`)."""
    kept = (char for char in unicodedata.normalize("NFKD", name) if not unicodedata.combining(char))
    fallback = "".join(char if " " <= char <= "~" and char not in '"\\%/' else "_" for char in kept)
    return re.sub(r"\.\.+", lambda dots: "_" * len(dots.group()), fallback) or "download"


def utf8_filename(name: str) -> str:
    """`filename=` as UTF-8 bytes, one str character each (headers travel as latin-1); controls, `"`, `\\`, `/` become `_`."""
    safe = "".join("_" if char in '"\\/' or not char.isprintable() else char for char in name)
    return safe.encode("utf-8", "surrogatepass").decode("latin-1")


# Deviation: RFC 6266 Appendix D advises ASCII in filename=; curl -J reads nothing else, so
# curl gets the UTF-8 name there (README: Limits and deviations).
def wants_utf8_filename(user_agent: str) -> bool:
    """Does this client read only `filename=`, expecting UTF-8? curl -J ignores `filename*` (curl/curl#1888)."""
    return user_agent.startswith("curl/")


@functools.lru_cache(maxsize=4096)
def content_disposition(name: str, disposition: str = "attachment", *, utf8_fallback: bool = False) -> str:
    """RFC 6266 Content-Disposition for a file name: a quoted ASCII `filename`, plus an RFC 8187
    `filename*` with the exact name when the fallback had to change it. No name can break out of the
    header (no CR, LF or other control, no unescaped quote). With `utf8_fallback`, `filename=` carries
    the UTF-8 bytes instead (the Deviation from RFC 6266 Appendix D above wants_utf8_filename)."""
    fallback = utf8_filename(name) if utf8_fallback else ascii_filename(name)
    value = f'{disposition}; filename="{fallback}"'
    if fallback != name:
        encoded = urllib.parse.quote(name, safe=_ATTR_CHAR_PUNCTUATION, encoding="utf-8", errors="surrogatepass")
        value += f"; filename*=UTF-8''{encoded}"
    return value


class Validators(NamedTuple):
    etag: str
    last_modified: float  # POSIX seconds


def download_headers(
    *, media_type: str, disposition: str, cache_control: str, validators: Validators | None = None, accept_ranges: str | None = None
) -> list[tuple[str, str]]:
    """The headers of every download (a file, offloaded or generated): type, name, nosniff, Cache-Control
    with no-transform; Accept-Ranges and validators where given. Not Content-Length (the ranges decide)."""
    headers = [("Content-Type", media_type), ("X-Content-Type-Options", "nosniff")]
    if disposition:
        headers.append(("Content-Disposition", disposition))
    headers.append(("Cache-Control", no_transform(cache_control)))
    if accept_ranges is not None:
        headers.append(("Accept-Ranges", accept_ranges))
    if validators is not None:
        headers += [("Last-Modified", http_date(validators.last_modified)), ("ETag", validators.etag)]
    return headers


def no_transform(cache_control: str) -> str:
    """`cache_control` plus no-transform: RFC 9111 §5.2.2.6 forbids intermediaries to transform the
    content (recompress it, drop Content-Length), which would break byte ranges and resumes."""
    directives = [d.strip() for d in cache_control.split(",") if d.strip()]
    if "no-transform" not in (d.lower() for d in directives):
        directives.append("no-transform")
    return ", ".join(directives)


def coding_guard(accept_encoding: str | None) -> list[tuple[str, str]]:
    """An empty `Content-Encoding` when the client accepts a content coding: Content-Encoding = #content-coding
    (RFC 9110 §8.4) and a # list may be empty (§5.6.1), so it says no coding was applied without the reserved
    `identity` (§8.4.1). GZipMiddleware (Starlette's, Django's) then leaves bytes, Content-Length and ranges exact."""
    codings = [part.split(";")[0].strip().lower() for part in (accept_encoding or "").split(",")]
    return [("Content-Encoding", "")] if any(c and c != "identity" for c in codings) else []


SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")  # RFC 8941 §3.1.2: a Dictionary's key
SF_INTEGER = re.compile(r"-?\d{1,15}")


def parse_want_digest(value: str | None) -> dict[str, int] | None:
    """A Want-Repr-Digest or Want-Content-Digest field (RFC 9530 §4): algorithm -> preference, 0 (not acceptable)
    to 10 (most preferred), from an RFC 8941 Dictionary. None for no field, or one whose members don't parse (RFC
    8941 §4.2: the whole field is then ignored). A member that is no Integer of 0 to 10 (a bare key is Boolean
    true) states no preference: only it is ignored. Parameters are ignored; a key given twice: the last wins."""
    if value is None:
        return None
    wanted: dict[str, int] = {}
    for member in value.split(","):
        item, _, _ = member.strip(" \t").partition(";")
        key, _, number = item.partition("=")
        if not SF_KEY.fullmatch(key):
            return None
        if SF_INTEGER.fullmatch(number) and 0 <= int(number) <= 10:
            wanted[key] = int(number)
        else:
            wanted.pop(key, None)
    return wanted


def digest_headers(sha256: bytes, want: str | None) -> list[tuple[str, str]]:
    """The digest fields of a representation whose SHA-256 is `sha256`: Repr-Digest (RFC 9530, a Byte Sequence:
    `sha-256=:<base64>:`) and RFC 3230's `Digest: SHA-256=<base64>`, which aria2 checks (a mismatch fails the
    download, exit 32). Left out when Want-Repr-Digest says sha-256 is not acceptable (`sha-256=0`); other
    algorithms asked for are ignored (RFC 9530 §4: a server may send none it was asked for)."""
    wanted = parse_want_digest(want)
    if wanted is not None and wanted.get("sha-256", 1) == 0:
        return []
    encoded = base64.b64encode(sha256).decode("ascii")
    return [("Repr-Digest", f"sha-256=:{encoded}:"), ("Digest", f"SHA-256={encoded}")]


NOT_MODIFIED_HEADERS = ("Cache-Control", "Content-Location", "Date", "ETag", "Expires", "Vary", "Last-Modified")
"""RFC 9110 §15.4.5: a 304 carries these of the 200's headers (Last-Modified because the
issue of cache updates asks for it) and no representation metadata besides."""


def multipart_layout(ranges: Sequence[ByteRange], size: int, media_type: str, boundary: str) -> tuple[list[bytes | ByteRange], int]:
    """The body of a multipart/byteranges response (RFC 9110 §14.6) as literal byte pieces and file
    ranges, and its exact length, known before the first byte is sent:

        --BOUNDARY\\r\\n
        Content-Type: text/plain\\r\\n
        Content-Range: bytes 0-4/10\\r\\n
        \\r\\n
        <bytes 0-4 of the file>\\r\\n
        --BOUNDARY\\r\\n
        ... one part per range ...
        <bytes of the last range>\\r\\n
        --BOUNDARY--\\r\\n
    """
    pieces: list[bytes | ByteRange] = []
    separator = b""
    for r in ranges:
        head = f"--{boundary}\r\nContent-Type: {media_type}\r\nContent-Range: {r.content_range(size)}\r\n\r\n"
        pieces += [separator + head.encode("latin-1"), r]
        separator = b"\r\n"
    pieces.append(f"\r\n--{boundary}--\r\n".encode("latin-1"))
    length = sum(p.length if isinstance(p, ByteRange) else len(p) for p in pieces)
    return pieces, length


class Plan(NamedTuple):
    """What to answer: status, every header, and the body as pieces (bytes and file ranges) for section 5."""

    status: int
    headers: list[tuple[str, str]]
    pieces: list[bytes | ByteRange]


def plan_response(
    method: str, request_headers: Mapping[str, str], info: FileInfo, *,
    media_type: str, disposition: str, cache_control: str, now: float, boundary: str,
) -> Plan:
    """The whole answer to a GET or HEAD of a file, decided in RFC 9110 order:

    1. validators: a strong ETag and Last-Modified (never later than now) from the one fstat (or HEAD), and the
       file's digest when known (info.sha256);
    2. preconditions (§13.2.2): 412 raises, 304 returns with the §15.4.5 headers;
    3. Range (§14.2), for GET and HEAD alike, unless If-Range says the file changed:
       416 raises, None or no Range is the whole file (200);
    4. one range: 206 with Content-Range; several: 206 multipart/byteranges.
    HEAD gets exactly the GET's headers; the caller leaves out the body."""
    etag = info.etag if info.etag and STRONG_ETAG.fullmatch(info.etag) else make_etag(info.size, info.mtime_ns)
    modified = info.mtime_ns / 1e9
    # RFC 9110 §8.8.2.1: Last-Modified is never later than the response's Date. uvicorn
    # refreshes its Date once a second, so the Date may trail our clock by up to a second.
    mtime = min(modified, now - 1)
    headers = download_headers(
        media_type=media_type, disposition=disposition, cache_control=cache_control, validators=Validators(etag, mtime),
        accept_ranges="bytes",
    ) + coding_guard(request_headers.get("accept-encoding"))
    if info.sha256 is not None:  # of the whole file, on ranges and HEAD too (RFC 9530 §3); not on a 304
        headers += digest_headers(info.sha256, request_headers.get("want-repr-digest"))

    status = evaluate_preconditions(method, request_headers, etag, mtime)
    if status == 412:
        raise HTTPError(412, "Precondition Failed")
    if status == 304:
        return Plan(304, [h for h in headers if h[0] in NOT_MODIFIED_HEADERS], [])

    ranges = None
    range_value = request_headers.get("range")
    if range_value is not None and check_if_range(request_headers.get("if-range"), etag, modified, now) is not Cond.FALSE:
        ranges = parse_range(range_value, info.size)

    if ranges is None:
        whole = [ByteRange(0, info.size)] if info.size else []
        return Plan(200, headers + [("Content-Length", str(info.size))], whole)
    if len(ranges) == 1:
        (r,) = ranges
        extra = [("Content-Length", str(r.length)), ("Content-Range", r.content_range(info.size))]
        return Plan(206, headers + extra, [r])
    pieces, length = multipart_layout(ranges, info.size, media_type, boundary)
    headers = [h for h in headers if h[0] != "Content-Type"]
    headers += [("Content-Type", f"multipart/byteranges; boundary={boundary}"), ("Content-Length", str(length))]
    return Plan(206, headers, pieces)


# =============================================================================
# 5. Streaming
# =============================================================================
# One send loop for every body: the head, then each piece of the plan (a body of one chunk
# goes out with its head, in send_small); every send is awaited (that is the backpressure:
# no queue, no read-ahead). File ranges go two ways. A server that offers ASGI's
# http.response.zerocopysend (ours, section 11) is handed the checked descriptor, and the
# kernel copies file to socket. Any other server gets FileChunks: CHUNK_SIZE reads, one at a
# time (from the page cache in the event loop, else in a worker thread), and a sibling task
# listens for http.disconnect (ASGI 2.3). An OSError from send (ASGI 2.4) is a client gone,
# on both paths. A stall is no progress (StallTimer; Backoff on the zero-copy path).

ZEROCOPY = "http.response.zerocopysend"

Gate = Callable[[], bool] | Callable[[], Awaitable[bool]]
"""A body piece of no bytes, called when reached (a sync one in a worker thread); False refuses the rest
(counting downloads: hold_last_byte)."""

Piece = bytes | ByteRange | Gate | AsyncIterable[bytes]
"""A body piece: literal bytes, a range of the open file, a gate, or generated bytes."""


def hold_last_byte(pieces: Sequence[bytes | ByteRange], size: int, gate: Gate) -> list[bytes | ByteRange | Gate]:
    """`pieces` with `gate` just before the file's last byte: only a transfer that reaches it passes."""
    held: list[bytes | ByteRange | Gate] = []
    for piece in pieces:
        if isinstance(piece, ByteRange) and piece.stop == size and piece.length > 0:
            if piece.length > 1:
                held.append(ByteRange(piece.start, size - 1))
            held += [gate, ByteRange(size - 1, size)]
        else:
            held.append(piece)
    return held


RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


async def read_chunk(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` (fewer at EOF). From the page cache in the event loop when it holds them
    all: preadv with RWF_NOWAIT (Linux 4.14+) never waits for the disk, and a worker-thread hop costs more
    than the copy (README: Performance). Anything else, in a worker thread."""
    if RWF_NOWAIT:
        buffer = bytearray(size)
        try:
            if os.preadv(fd, [buffer], offset, RWF_NOWAIT) == size:
                return bytes(buffer)
        except OSError:  # BlockingIOError: not all cached; EOPNOTSUPP: a file system without it
            pass
    return await anyio.to_thread.run_sync(os.pread, fd, size, offset)


class FileChunks:
    """Async iterator over the bytes `span` of the open file `fd`, CHUNK_SIZE at a time. A short read (the
    file shrank) or a failed one raises TransferAborted; bytes appended meanwhile are never read."""

    def __init__(self, fd: int, span: ByteRange, chunk_size: int = CHUNK_SIZE) -> None:
        self._fd, self._pos, self._stop, self._chunk_size = fd, span.start, span.stop, chunk_size

    @property
    def done(self) -> bool:
        return self._pos >= self._stop

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._pos >= self._stop:
            raise StopAsyncIteration
        wanted = min(self._chunk_size, self._stop - self._pos)
        try:
            data = await read_chunk(self._fd, wanted, self._pos)
        except OSError as exc:
            raise TransferAborted("read failed") from exc
        if len(data) != wanted:
            raise TransferAborted("file shrank while being sent")
        self._pos += wanted
        return data


class ByteStream:
    """Async iterator over generated bytes, async or sync (read in a worker thread). With `size`, exactly
    that many bytes come out, or TransferAborted. aclose() closes the source (generators run their finally)."""

    _END = object()

    def __init__(self, content: AsyncIterable[bytes] | Iterable[bytes], size: int | None = None) -> None:
        self._async = content.__aiter__() if isinstance(content, AsyncIterable) else None
        self._sync = None if isinstance(content, AsyncIterable) else iter(content)
        self._size = size
        self._sent = 0

    def __aiter__(self) -> ByteStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._async is not None:
                chunk = await anext(self._async, self._END)
            else:
                chunk = await anyio.to_thread.run_sync(next, self._sync, self._END)
            if chunk is self._END:
                if self._size is not None and self._sent != self._size:
                    raise TransferAborted("generated content was shorter than its size")
                raise StopAsyncIteration
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"generated content must be bytes, got {type(chunk).__name__}")
            self._sent += len(chunk)
            if self._size is not None and self._sent > self._size:
                raise TransferAborted("generated content was longer than its size")
            if chunk:
                return bytes(chunk)

    async def aclose(self) -> None:
        source = self._async if self._async is not None else self._sync
        if hasattr(source, "aclose"):
            await source.aclose()
        elif hasattr(source, "close"):
            source.close()


# Deviation: no http.response.pathsend, though issue #8 planned it. Granian, the server that
# offers it, opens the path only after it has told the app the response is over
# (receive() -> http.disconnect), so /proc/self/fd/N of our checked descriptor would be
# closed, and N perhaps reused by another download, before granian opens it: our test
# under granian got its 404s (README: Performance). Sending the name instead would let a
# swapped file through. zerocopysend hands over the descriptor itself.


def offers_zerocopy(scope: Scope) -> bool:
    return ZEROCOPY in (scope.get("extensions") or {})


CONNECTION_SOCKET = "downloader.socket"
"""Our scope extension, {"fd": N}: HTTPProtocol names the connection's TCP socket, so that nothing is searched."""


def connection_socket(scope: Scope) -> int | None:
    """The descriptor of this request's TCP connection in this process: named by HTTPProtocol, else found
    by its two addresses (any ASGI server that runs in this process); None when none matches (a Unix
    socket, proxy headers rewriting the client's address, not Linux)."""
    named = (scope.get("extensions") or {}).get(CONNECTION_SOCKET)
    if named is not None:
        return named["fd"]  # type: ignore[no-any-return]
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return None
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                if stat.S_ISSOCK(os.fstat(int(name)).st_mode) and socket_peer(int(name), tuple(server)) == tuple(client):
                    return int(name)
    return None


@contextlib.contextmanager
def borrowed_socket(fd: int) -> Iterator[socket.socket]:
    """A socket object on a descriptor the server owns: detached afterwards, never closed (OSError: none such)."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def socket_peer(fd: int, local: tuple[Any, ...] | None = None) -> tuple[Any, ...] | None:
    """The (host, port) a TCP socket descriptor is connected to, if it is bound to `local` (when given)."""
    with borrowed_socket(fd) as sock:
        if sock.type != socket.SOCK_STREAM or (local is not None and sock.getsockname()[:2] != local):
            return None
        return sock.getpeername()[:2]


class ClientSocket:
    """This request's TCP connection, as far as the kernel tells: `acked`, the bytes the client has
    acknowledged (TCP_INFO's tcpi_bytes_acked, Linux 4.1+; None when unknown), and `give_up`. The socket is
    looked for when first needed (a download that never waits never looks), and checked to be the same
    connection each time."""

    def __init__(self, scope: Scope) -> None:
        self.scope, self.fd, self.peer, self.looked = scope, None, None, False

    def acked(self) -> int | None:
        if not hasattr(socket, "TCP_INFO"):
            return None
        return self._use(lambda sock: struct.unpack_from("Q", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128), 120)[0])

    def give_up(self) -> None:
        """After a stall: TCP_USER_TIMEOUT of one second, so the kernel resets the connection. A server's close
        waits for its buffer to drain to a client that reads nothing: it would hold the descriptor for ever.
        (Set on every connection instead, it cut slow readers: Linux counts a zero window's probes.)"""
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            self._use(lambda sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000))

    def _use(self, call: Callable[[socket.socket], Any]) -> Any:
        """call(socket) while the descriptor still stands for this connection; None otherwise, or on failure."""
        try:
            if not self.looked:
                self.looked, self.fd = True, connection_socket(self.scope)
                self.peer = None if self.fd is None else socket_peer(self.fd)
            if self.fd is None or self.peer is None or socket_peer(self.fd) != self.peer:  # closed, or reused
                self.fd = None
                return None
            with borrowed_socket(self.fd) as sock:
                return call(sock)
        except (OSError, struct.error):
            self.fd = None
            return None


class StallTimer:
    """A stall is no progress for `timeout` seconds: a send completing is progress, and so, while a send
    waits, are more bytes acknowledged by the client (where its socket can be read: ClientSocket). A server's
    send returns once its transport may write again, which the kernel allows only after half its send
    queue has drained: a client reading steadily at 1 KiB/s can take minutes for that, and must not be cut."""

    def __init__(self, timeout: float | None, client: ClientSocket | None) -> None:
        self.timeout = math.inf if timeout is None else timeout
        self.client, self.waiting, self.began = client, None, 0.0

    async def send(self, send: Send, message: Message) -> None:
        """send(message), or TimeoutError after `timeout` seconds without progress."""
        self.began = anyio.current_time()
        with anyio.CancelScope(deadline=self.began + self.timeout) as self.waiting:
            await send(message)
        scope, self.waiting = self.waiting, None
        if scope.cancelled_caught:
            if self.client is not None:
                self.client.give_up()
            raise TimeoutError

    async def watch(self) -> None:
        """Beside the sends: pushes the deadline back while a waiting send's client acknowledges bytes."""
        if self.client is None or self.timeout == math.inf:
            return
        last = 0  # acknowledged at the last look, in this send or an earlier one (the first look counts all so far)
        poll = min(PROGRESS_POLL_S, self.timeout / 4)
        while True:
            await anyio.sleep(poll)
            waiting = self.waiting
            if waiting is None or anyio.current_time() - self.began < poll:
                continue
            if (acked := self.client.acked()) is None:
                return
            if acked > last:
                waiting.deadline = anyio.current_time() + self.timeout
            last = acked


def paced_chunk_size(chunk_size: int, rate_limit: int | None) -> int:
    """A piece's size under a bandwidth limit: an eighth of a second's worth at most, for smooth pacing."""
    return chunk_size if not rate_limit else max(1024, min(chunk_size, rate_limit // 8))


def body_length(pieces: Sequence[Piece]) -> int | None:
    """The bytes of `pieces`; None when some are generated."""
    known = [len(p) if isinstance(p, bytes) else p.length if isinstance(p, ByteRange) else 0 if callable(p) else None for p in pieces]
    return None if None in known else sum(known)  # type: ignore[arg-type]


async def body_messages(pieces: Sequence[Piece], fd: int, zerocopy: bool, step: int, stall_timeout_s: float | None) -> AsyncIterator[Message | Gate]:
    """The ASGI messages of `pieces` in order, gates passed through as they are. A ByteRange is one
    zerocopysend of `fd` (`step` bytes at a time when paced), or FileChunks of `step`. The last bytes
    carry more_body False (one message less); an empty closing message only when they can't."""
    file = open(fd, "rb", buffering=0, closefd=False) if zerocopy else None  # the spec's "file descriptor object"
    more = True
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        if callable(piece):
            yield piece
        elif isinstance(piece, bytes):
            more = not final
            yield {"type": "http.response.body", "body": piece, "more_body": more}
        elif isinstance(piece, ByteRange) and zerocopy:
            for offset in range(piece.start, piece.stop, step):
                count = min(step, piece.stop - offset)
                more = not final or offset + count < piece.stop
                yield {"type": ZEROCOPY, "file": file, "offset": offset, "count": count, "more_body": more, "stall_timeout": stall_timeout_s}
        else:
            chunks = FileChunks(fd, piece, step) if isinstance(piece, ByteRange) else piece
            async for data in chunks:
                more = not final or not getattr(chunks, "done", False)
                yield {"type": "http.response.body", "body": data, "more_body": more}
    if more:
        yield {"type": "http.response.body", "body": b"", "more_body": False}


async def send_body(
    send: Send, receive: Receive, start: Message, pieces: Sequence[Piece], *, fd: int = -1, zerocopy: bool = False,
    chunk_size: int = CHUNK_SIZE, rate_limit: int | None = None, stall_timeout_s: float | None = None,
    client: ClientSocket | None = None,
) -> int:
    """The one send loop: `start`, then body_messages; returns the body bytes sent. Every send is awaited.
    With `rate_limit` (bytes per second, like nginx's limit_rate) a sleep after each message keeps the
    average at the limit. A stall (no progress for `stall_timeout_s`: StallTimer, reading `client`; with
    zerocopysend, the server's own no-progress timer) or a file that shrank raises TransferAborted, so
    that the server aborts the connection. A gate that refuses while the head is still unsent (it waits
    for a first gate) raises TransferRefused: the answer can still be an error; later, GateClosed. A
    client gone ends it quietly. Generated pieces are closed."""
    sent, began, head = 0, time.monotonic(), start
    size = body_length(pieces)
    zerocopy = zerocopy and size is not None and size > COPY_UP_TO
    # Listening for http.disconnect costs a task: worth it unless the socket takes the body at once.
    watch = not zerocopy and (bool(rate_limit) or size is None or size > chunk_size)
    step = size if zerocopy and not rate_limit else paced_chunk_size(chunk_size, rate_limit)  # zero-copy: a range a message

    if not watch and not zerocopy:
        return await send_small(send, start, pieces, fd, chunk_size)

    timer = StallTimer(stall_timeout_s, client)

    async def timed(message: Message) -> None:  # a body the socket takes at once, or zero-copy, needs no timer here
        await (timer.send(send, message) if watch else send(message))

    async def put_head() -> None:
        nonlocal head
        if head is not None:
            message, head = head, None
            await timed(message)

    async def put(message: Message) -> None:
        nonlocal sent
        await put_head()
        await timed(message)
        sent += message["count"] if message["type"] == ZEROCOPY else len(message["body"])
        if rate_limit and (ahead := sent / rate_limit - (time.monotonic() - began)) > 0:
            await anyio.sleep(ahead)
        elif watch:
            await anyio.lowlevel.checkpoint()  # the listener's turn: a send to a client gone returns at once

    async def put_all() -> BaseException | None:
        try:
            if not (pieces and callable(pieces[0])):
                await put_head()
            async with contextlib.aclosing(body_messages(pieces, fd, zerocopy, step, stall_timeout_s)) as messages:
                async for item in messages:
                    if not callable(item):
                        await put(item)
                    elif not await pass_gate(item, head is None):
                        raise (TransferRefused if head is not None else GateClosed)("the gate refused the rest of the body")
        except TimeoutError:  # (a subclass of OSError, so first)
            return TransferAborted(f"the client read nothing for {stall_timeout_s} s")
        except OSError:
            pass  # ASGI 2.4: send raises OSError once the client is gone
        except (TransferAborted, TransferRefused, HTTPError) as exc:
            return exc  # raised below, outside any task group, unwrapped
        return None

    failure = None
    try:
        if not watch:
            failure = await put_all()
        else:
            async with anyio.create_task_group() as group:
                group.start_soon(stop_on_disconnect, receive, group.cancel_scope)
                group.start_soon(timer.watch)
                failure = await put_all()
                group.cancel_scope.cancel()
    finally:
        for piece in pieces:
            if (close := getattr(piece, "aclose", None)) is not None:  # ByteStream, ObjectChunks
                await close()
    if failure is not None:
        raise failure
    return sent


async def send_small(send: Send, start: Message, pieces: Sequence[Piece], fd: int, chunk_size: int) -> int:
    """A body of one chunk at most (the socket takes it at once), read whole first and sent as one message:
    no task, no timer, no generator (1 KiB requests/s: README, Performance). A gate refuses it before its
    head: TransferRefused."""
    parts: list[bytes] = []
    for piece in pieces:
        if callable(piece):
            if not await pass_gate(piece, started=False):
                raise TransferRefused("the gate refused the body")
        elif isinstance(piece, ByteRange):
            parts += [data async for data in FileChunks(fd, piece, chunk_size)]
        else:
            parts.append(piece)  # type: ignore[arg-type]
    body = b"".join(parts)
    try:
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        return 0  # ASGI 2.4: the client is gone
    return len(body)


async def pass_gate(gate: Gate, started: bool) -> bool:
    """Awaits an async gate, runs a sync one in a worker thread. An HTTPError it raises (the catalog failed:
    503) is the answer while the head is unsent; once the body has started, the transfer is aborted
    (GateClosed) with its detail."""
    try:
        if inspect.iscoroutinefunction(gate) or inspect.iscoroutinefunction(getattr(gate, "__call__", None)):
            return bool(await gate())  # type: ignore[misc]
        passed = await anyio.to_thread.run_sync(gate)
        return bool(await passed) if inspect.isawaitable(passed) else bool(passed)
    except HTTPError as exc:
        if started:
            raise GateClosed(exc.detail.lower()) from None
        raise


async def stop_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


# =============================================================================
# 6. Object storage
# =============================================================================
# A root of s3://bucket/prefix serves a bucket's objects. A URL path names a key by section 3's rules
# (split_url_path: no "..", no empty segment; hidden segments only with serve_hidden), always below the
# prefix. obstore (Rust, async) makes the requests. Section 4 plans the answer from the object's HEAD as
# from an fstat; ObjectChunks reads each range in S3_WINDOW GETs, every one with If-Match on the ETag
# the response announced (S3-compatible servers ignore If-Range), so no download is spliced from two
# versions, and an object replaced mid-download aborts it. presign_url writes SigV4 query-signed URLs
# itself: obstore's signer can't add the response-content-disposition and -type overrides.


class ObjectChanged(TransferAborted):
    """The object no longer has the ETag the response announced (If-Match failed), or is gone."""


def store_error_to_http(exc: BaseException) -> HTTPError:
    """An object store failure as the client's answer: 404 for a missing key, 504 for one that took too long
    (S3_TIMEOUT_S), 502 for anything else (refused, unreachable, credentials); never the store's text."""
    if is_missing_object(exc):
        return not_found()
    if isinstance(exc, TimeoutError):
        return HTTPError(504, "The object store timed out")
    return HTTPError(502, "The object store failed")


def is_missing_object(exc: BaseException) -> bool:
    """obstore reports a missing key as FileNotFoundError (its requests) or its own NotFoundError."""
    from obstore.exceptions import NotFoundError

    return isinstance(exc, (FileNotFoundError, NotFoundError))


ASCII_CONTROLS = re.compile("[\x00-\x1f\x7f]")  # in a key, refused by obstore (object_store's paths)


def servable_key(path: str, serve_hidden: bool) -> bool:
    """Would /download serve the object at `path` (below the prefix)? Keys no URL names (`a//b`, `./x`, a folder
    marker `x/`, `/x`), keys with an ASCII control character (the S3 client can't fetch them) and hidden ones
    are never listed: listed if and only if served, as for files."""
    try:
        segments = split_url_path(path)
    except HTTPError:
        return False
    return not ASCII_CONTROLS.search(path) and (serve_hidden or not is_hidden(segments))


def uri_encode(text: str, safe: str = "") -> str:
    """SigV4's UriEncode: every byte but A-Z a-z 0-9 - _ . ~ (and `safe`) percent-encoded."""
    return urllib.parse.quote(text, safe="-_.~" + safe)


def presign_url(
    endpoint: str, bucket: str, key: str, *, access_key: str, secret_key: str, region: str, expires_in: int, now: float,
    session_token: str | None = None, overrides: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
    method: str = "GET",
) -> str:
    """A presigned URL (AWS Signature Version 4, query string) of a GET, or `method`, that works for `expires_in` seconds from `now`:
    path-style, endpoint/bucket/key, as obstore addresses the bucket (`bucket` "" for an endpoint that names it).
    `overrides` are signed query parameters, such as response-content-disposition (which S3 sends back as that
    header) or a ListObjectsV2's. `headers` are signed too: the URL works only with exactly these (a Range)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    parts = urllib.parse.urlsplit(endpoint)
    path = parts.path.rstrip("/") + (f"/{uri_encode(bucket)}" if bucket else "") + "/" + uri_encode(key, safe="/")
    signed = {"host": parts.netloc, **{name.lower(): " ".join(value.split()) for name, value in (headers or {}).items()}}
    names = ";".join(sorted(signed))
    params = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{access_key}/{scope}", "X-Amz-Date": stamp,
        "X-Amz-Expires": str(expires_in), "X-Amz-SignedHeaders": names, **dict(overrides or {}),
    }
    if session_token:
        params["X-Amz-Security-Token"] = session_token
    query = "&".join(f"{name}={value}" for name, value in sorted((uri_encode(k), uri_encode(v)) for k, v in params.items()))
    canonical_headers = "".join(f"{name}:{signed[name]}\n" for name in sorted(signed))
    canonical = "\n".join((method, path, query, canonical_headers, names, "UNSIGNED-PAYLOAD"))
    to_sign = "\n".join(("AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()))
    key_bytes = ("AWS4" + secret_key).encode()
    for part in (stamp[:8], region, "s3", "aws4_request"):
        key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{parts.scheme}://{parts.netloc}{path}?{query}&X-Amz-Signature={signature}"


class BucketError(Exception):
    """A bucket that can't be used: str() is one line for start-up errors and /healthz."""


class Bucket:
    """The objects under s3://bucket/prefix, through obstore. Endpoint, region and credentials come from the
    standard AWS_* variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN); without keys obstore looks further (instance roles), and only redirect mode, which
    signs URLs itself, needs them. obstore's retries are off: a failure is answered, or retried by ObjectChunks
    from where it stopped. `on_error(kind)` counts upstream failures ("failed", "timeout", "changed")."""

    def __init__(self, url: str, environ: Mapping[str, str], on_error: Callable[[str], None] | None = None) -> None:
        from obstore.store import S3Store

        self.url = url
        self.name, _, self.prefix = url[len("s3://"):].partition("/")
        self.endpoint = (environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        self.region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        if not self.endpoint:
            self.endpoint = f"https://s3.{self.region}.amazonaws.com"
        try:
            parts = urllib.parse.urlsplit(self.endpoint)
            usable = parts.scheme in ("http", "https") and parts.hostname and not (parts.username or parts.query or parts.fragment)
            _ = parts.port  # ValueError for a port that isn't one
        except ValueError:
            usable = False
        if not usable:
            raise BucketError("AWS_ENDPOINT_URL must be an http:// or https:// URL, like http://127.0.0.1:8333")
        self.endpoint = urllib.parse.urlunsplit(parts)  # (the scheme in lower case, as both clients read it)
        self.access_key = environ.get("AWS_ACCESS_KEY_ID")
        self.secret_key = environ.get("AWS_SECRET_ACCESS_KEY")
        self.session_token = environ.get("AWS_SESSION_TOKEN")
        self.on_error = on_error or (lambda kind: None)
        self.holds_objects = True  # whether check() found a key
        config: dict[str, object] = {"endpoint": self.endpoint, "region": self.region}
        if self.access_key and self.secret_key:
            config.update(access_key_id=self.access_key, secret_access_key=self.secret_key)
            if self.session_token:
                config["token"] = self.session_token
        client = {"allow_http": self.endpoint.startswith("http://"), "connect_timeout": f"{S3_CONNECT_TIMEOUT_S:g}s"}
        no_retries = {"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=S3_TIMEOUT_S),
                      "backoff": {"init_backoff": datetime.timedelta(milliseconds=100), "max_backoff": datetime.timedelta(seconds=1), "base": 2.0}}
        try:
            # Metadata and listings get S3_TIMEOUT_S (ours, anyio's, which comes first: a TimeoutError, 504; the
            # client's own, a little later, bounds the start-up check); a body's GET none (a slow client reads a
            # window for long), but its every chunk has S3_TIMEOUT_S in ObjectChunks.
            self.meta = S3Store(self.name, prefix=self.prefix or None, config=config, retry_config=no_retries,
                                client_options={**client, "timeout": f"{S3_TIMEOUT_S + 1:g}s"})
            self.bodies = S3Store(self.name, prefix=self.prefix or None, config=config, retry_config=no_retries,
                                  client_options={**client, "timeout": "1d"})
        except Exception as exc:  # obstore's configuration errors
            raise BucketError(f"can't set up the S3 client ({type(exc).__name__})") from None

    def check(self) -> None:
        """Lists one key (blocking), noting whether the prefix holds any; BucketError saying why the bucket can't be read."""
        import obstore

        try:
            if self.access_key and self.secret_key:
                self.holds_objects = bool(self.list_request("", "", 1)[0])
            else:
                self.holds_objects = next(iter(obstore.list(self.meta, chunk_size=1)), None) is not None
        except Exception as exc:
            raise BucketError(bucket_problem(exc)) from None

    async def check_async(self) -> str | None:
        """The problem /healthz reports (a listing of one key fails, or takes S3_HEALTH_TIMEOUT_S), or None."""
        try:
            with anyio.fail_after(S3_HEALTH_TIMEOUT_S):
                await self.list_keys("", "", 1)
        except TimeoutError:
            return f"the bucket can't be read: the object store did not answer within {S3_HEALTH_TIMEOUT_S:g} s"
        except HTTPError as exc:
            return f"the bucket can't be read: {bucket_problem(exc.__cause__ or exc)}"
        return None

    def failed(self, exc: BaseException) -> HTTPError:
        answer = store_error_to_http(exc)
        if answer.status != 404:
            self.on_error("timeout" if answer.status == 504 else "failed")
        return answer

    async def head(self, path: str, *, serve_hidden: bool) -> FileInfo:
        """The FileInfo of the object `path` names (its ETag as the validator); HTTPError 404, 502 or 504."""
        import obstore

        split_url_path(path)  # 400 for a NUL
        if not servable_key(path, serve_hidden):
            raise not_found()
        try:
            with anyio.fail_after(S3_TIMEOUT_S):
                meta = await obstore.head_async(self.meta, path)
        except Exception as exc:
            raise self.failed(exc) from None
        mtime_ns = int(meta["last_modified"].timestamp()) * 10**9
        return FileInfo(meta["size"], mtime_ns, path.rsplit("/", 1)[-1], path, etag=meta.get("e_tag") or None)

    async def open_window(self, info: FileInfo, start: int, stop: int, chunk_size: int) -> AsyncIterator[bytes]:
        """A GET of bytes start..stop-1 of the object `info` describes, with If-Match on its ETag (a store without
        strong ETags: If-Unmodified-Since its Last-Modified), its body as chunks of about `chunk_size`.
        ObjectChanged when the object has changed or is gone; HTTPError 502/504 when the store fails."""
        import obstore
        from obstore.exceptions import PreconditionError

        guard: dict[str, object] = {"if_match": info.etag}
        if not STRONG_ETAG.fullmatch(info.etag or ""):
            guard = {"if_unmodified_since": datetime.datetime.fromtimestamp(info.mtime_ns // 10**9, datetime.timezone.utc)}
        try:
            with anyio.fail_after(S3_TIMEOUT_S):
                result = await obstore.get_async(self.bodies, info.path, options={"range": (start, stop), **guard})
        except Exception as exc:
            if not isinstance(exc, PreconditionError) and not is_missing_object(exc):
                raise self.failed(exc) from None
            self.on_error("changed")
            raise ObjectChanged("the object changed while being sent") from None
        return result.stream(min_chunk_size=chunk_size)  # type: ignore[no-any-return]

    async def list_page(
        self, after: str, limit: int, *, folder: str = "", serve_hidden: bool, bounded: bool = True
    ) -> tuple[list[ListedFile], str | None]:
        """Up to `limit` objects /download serves (below `folder`) after the key `after`, in the store's listing
        order (S3's is UTF-8 byte order; SeaweedFS's goes folder by folder), and the key the next page starts
        after (None: no more). Keys it can't serve are skipped, LIST_SCAN_KEYS at most when `bounded`: then the
        page ends early, its cursor where the reading stopped. HTTPError 502/504 when the store fails."""
        files: list[ListedFile] = []
        position, scanned = after, 0
        while True:
            entries, more = await self.list_keys(folder + "/" if folder else "", position, S3_LIST_PAGE)
            for i, entry in enumerate(entries):
                scanned, position = scanned + 1, entry.path
                if servable_key(entry.path, serve_hidden):
                    files.append(entry)
                    if len(files) == limit:
                        return files, entry.path if more or i < len(entries) - 1 else None
            if not more or not entries:
                return files, None
            if bounded and scanned >= LIST_SCAN_KEYS:
                return files, position

    async def list_keys(self, prefix: str, start_after: str, max_keys: int) -> tuple[list[ListedFile], bool]:
        """One page of ListObjectsV2 below our prefix (and `prefix`), after the key `start_after`; whether more
        follow. Requested and read by us (list_request) where the keys are known: obstore's listing fails a whole
        page on a key it can't parse (`a//b`, a control character), which S3 allows. Without keys (an instance's
        role), through obstore. HTTPError 502/504 when the store fails."""
        import obstore

        try:
            with anyio.fail_after(S3_TIMEOUT_S):
                if self.access_key and self.secret_key:
                    return await anyio.to_thread.run_sync(self.list_request, prefix, start_after, max_keys, abandon_on_cancel=True)
                stream = obstore.list(self.meta, prefix=prefix or None, offset=start_after or None, chunk_size=max_keys)
                batch = await anext(aiter(stream), None) or []
        except Exception as exc:
            raise self.failed(exc) from exc  # (the cause: /healthz says what it was)
        listed = [ListedFile(m["path"], m["size"], m["last_modified"].timestamp(), m.get("e_tag")) for m in batch]
        return listed, len(listed) == max_keys

    def list_request(self, prefix: str, start_after: str, max_keys: int) -> tuple[list[ListedFile], bool]:
        """list_keys by a presigned ListObjectsV2 GET (keys URL-encoded: any byte survives the XML). Blocking."""
        import xml.etree.ElementTree as ElementTree

        ours = self.prefix + "/" if self.prefix else ""
        query = {"list-type": "2", "encoding-type": "url", "max-keys": str(max_keys), "prefix": ours + prefix}
        if start_after:
            query["start-after"] = ours + start_after
        url = self.presign("", 60, query, in_prefix=False)
        deadline, body = time.monotonic() + S3_TIMEOUT_S, bytearray()
        with urllib.request.urlopen(url, timeout=S3_TIMEOUT_S) as response:  # (a timeout per read: the deadline bounds them all)
            while data := response.read1(65536):
                body += data
                if time.monotonic() > deadline:
                    raise TimeoutError("the listing took too long")
        tree = ElementTree.fromstring(bytes(body))
        ns = tree.tag[: tree.tag.index("}") + 1] if tree.tag.startswith("{") else ""  # S3's XML namespace, as ElementTree writes it

        def find(node: ElementTree.Element, name: str) -> str:
            return node.findtext(ns + name, "")

        encoded = find(tree, "EncodingType") == "url"  # (a store may not encode them)
        listed = []
        for item in tree.iterfind(ns + "Contents"):
            key = find(item, "Key")
            if encoded:
                key = urllib.parse.unquote_plus(key, errors="surrogateescape")  # (form encoding: " " is "+", as botocore reads it)
            modified = datetime.datetime.fromisoformat(find(item, "LastModified").replace("Z", "+00:00")).timestamp()
            listed.append(ListedFile(key[len(ours):], int(find(item, "Size") or 0), modified, find(item, "ETag") or None))
        return listed, find(tree, "IsTruncated") == "true"

    def presign(
        self, path: str, expires_in: int, overrides: Mapping[str, str], *, headers: Mapping[str, str] | None = None, in_prefix: bool = True
    ) -> str:
        """presign_url of the object `path` (with `in_prefix` False: of `path` in the bucket) with our keys."""
        assert self.access_key and self.secret_key  # (redirect mode needs them: Service checks at start)
        key = f"{self.prefix}/{path}" if self.prefix and in_prefix else path
        return presign_url(
            self.endpoint, self.name, key, access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            expires_in=expires_in, now=time.time(), session_token=self.session_token, overrides=overrides, headers=headers,
        )


def bucket_problem(exc: BaseException) -> str:
    """One line on why a bucket can't be listed: obstore's messages run to many lines of debug output, and may
    quote the store's XML."""
    if isinstance(exc, TimeoutError) or re.search(r"timed out|kind: Timeout", str(exc)):
        return f"the object store did not answer within {S3_TIMEOUT_S:g} s"
    status = re.search(r"status code: (\d{3})", str(exc))  # obstore's; urllib's HTTPError has a code
    code = int(status.group(1)) if status else getattr(exc, "code", None) if isinstance(getattr(exc, "code", None), int) else None
    if code == 404 or is_missing_object(exc):
        return "no such bucket"
    if code in (401, 403) or type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
        return "access denied (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    if code is not None:
        return f"the object store answered {code}"
    if re.search(r"connect|dns|resolve", str(exc), re.IGNORECASE) or isinstance(exc, urllib.error.URLError):
        return "the object store can't be reached (AWS_ENDPOINT_URL)"
    return f"the object store failed ({type(exc).__name__})"


class ObjectChunks:
    """Async iterator over the bytes `span` of one version of an object (`info`: its ETag), `chunk_size` at least
    (but at the end) and `cap` at most at a time (obstore's chunks, unsplit: bigger ones cost less), in S3_WINDOW GETs (Bucket.open_window, If-Match). A GET that fails or stalls (S3_TIMEOUT_S) mid-body
    is asked again from where it stopped, S3_RETRIES times; then, or when the object changed, TransferAborted.
    close() drops the GET in flight, which closes its connection: a client gone stops the upstream read."""

    def __init__(self, bucket: Bucket, info: FileInfo, span: ByteRange, chunk_size: int = CHUNK_SIZE, cap: int | None = None) -> None:
        self.bucket, self.info, self.chunk_size, self.cap = bucket, info, chunk_size, cap
        self._pos, self._stop, self._window_stop = span.start, span.stop, span.start
        self._body: AsyncIterator[bytes] | None = None
        self._pending = memoryview(b"")  # received, not yet returned: obstore's chunks are `chunk_size` at least, `cap` at most
        self._failures = 0

    @property
    def done(self) -> bool:
        return self._pos >= self._stop

    async def open(self) -> None:
        """Starts the first window's GET: the caller can still answer its failure (HTTPError, ObjectChanged)."""
        if self._body is None and not self.done:
            self._window_stop = min(self._pos + S3_WINDOW, self._stop)
            self._body = await self.bucket.open_window(self.info, self._pos, self._window_stop, self.chunk_size)

    def __aiter__(self) -> ObjectChunks:
        return self

    async def __anext__(self) -> bytes:
        while not self.done:
            if self._pending:  # the rest of a chunk bigger than `cap`
                data, self._pending = self._pending[: self.cap], self._pending[self.cap :]
                self._pos += len(data)
                return bytes(data)
            try:
                await self.open()
                assert self._body is not None
                with anyio.fail_after(S3_TIMEOUT_S):
                    data = await anext(self._body, None)
                if data is None and self._pos < self._window_stop:
                    raise OSError("the object store's body ended early")
            except ObjectChanged:
                self.close()
                raise
            except Exception as exc:  # the store failed (HTTPError: counted by Bucket.failed) or its body broke off
                self.close()
                if not isinstance(exc, HTTPError):
                    self.bucket.on_error("timeout" if isinstance(exc, TimeoutError) else "failed")
                self._failures += 1
                if self._failures > S3_RETRIES:
                    raise TransferAborted("the object store failed mid-transfer") from None
                continue
            if data is None:  # the window is done: the next starts at the next call
                self._body = None
                continue
            if len(data) > self._window_stop - self._pos:
                self.close()
                raise TransferAborted("the object store sent more than was asked")
            self._failures = 0
            if self.cap is not None and len(data) > self.cap:  # a rate limit's steps (paced_chunk_size)
                self._pending = memoryview(data)
                continue
            self._pos += len(data)
            return bytes(data)
        raise StopAsyncIteration

    def close(self) -> None:
        self._body = None  # obstore's stream, dropped: the request is cancelled and its connection closed
        self._pending = memoryview(b"")

    async def aclose(self) -> None:
        self.close()


def object_entry(bucket: Bucket, listed: ListedFile, chunk_size: int) -> Iterator[bytes]:
    """One ZIP entry's bytes, read in the worker thread that builds the archive (ByteStream) from ObjectChunks
    on the event loop: a changed object aborts the archive as a changed file does."""
    info = FileInfo(listed.size, int(listed.mtime) * 10**9, listed.path.rsplit("/", 1)[-1], listed.path, etag=listed.etag)
    chunks = ObjectChunks(bucket, info, ByteRange(0, listed.size), chunk_size)
    try:
        while (data := anyio.from_thread.run(anext, chunks, None)) is not None:
            yield data
    finally:
        chunks.close()


# =============================================================================
# 7. Digests
# =============================================================================
# The SHA-256 of every file served, never computed on the request path: a request looks its file's
# content_identity up in a dict (Digests.lookup), and one thread per app fills the dict, reading at most
# hash_rate bytes a second, from an SQLite file that keeps digests across restarts. A file changed in any
# way (even rewritten with its size and mtime put back) has another identity: its old digest is never
# announced. Objects are not hashed (README: Integrity).

DIGEST_SCHEMA = (  # root and path as file-system bytes (os.fsencode): a name need not be UTF-8
    "CREATE TABLE IF NOT EXISTS digests (id INTEGER PRIMARY KEY AUTOINCREMENT, root BLOB NOT NULL, path BLOB NOT NULL,"
    " identity TEXT NOT NULL, sha256 BLOB NOT NULL, seen REAL NOT NULL, UNIQUE (root, path))",
    "CREATE INDEX IF NOT EXISTS digests_seen ON digests (seen)",
    "CREATE TABLE IF NOT EXISTS hashers (root BLOB PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL)",
)
DIGEST_CACHE_VERSION = 1  # the cache's PRAGMA user_version: a cache of another version (or none) is made anew


def prepare_digest_cache(db: sqlite3.Connection) -> None:
    """The digest cache's tables, dropped first if they are of another version: it is a cache, computed again.
    One writer at a time, so that two processes don't both remake it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] != DIGEST_CACHE_VERSION:
            db.execute("DROP TABLE IF EXISTS digests")
            db.execute("DROP TABLE IF EXISTS hashers")
        for statement in DIGEST_SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {DIGEST_CACHE_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def open_digest_cache(path: str) -> sqlite3.Connection:
    """The digest cache at `path` ("off": in memory), its folder made if missing, ready for use by one thread at a
    time. OSError or sqlite3.Error if it can't be."""
    if path == "off":
        db = sqlite3.connect(":memory:", check_same_thread=False)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        db = sqlite3.connect(path, timeout=CATALOG_TIMEOUT_S, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a digest lost to a power cut is computed again
    try:
        prepare_digest_cache(db)
    except BaseException:
        db.close()
        raise
    return db


TAKE_LEASE = (  # the root's lease, if free, lapsed or ours already: one statement, so two takers can't both win
    "INSERT INTO hashers (root, owner, until) VALUES (?, ?, ?) ON CONFLICT (root) DO UPDATE"
    " SET owner = excluded.owner, until = excluded.until WHERE hashers.owner = excluded.owner OR hashers.until < ?"
)
log = logging.getLogger("downloader")


def sha256sum_line(sha256: bytes, name: str) -> str:
    """One line of a SHA256SUMS file as `sha256sum -c` reads it: a name with a backslash, CR or LF is escaped,
    and the line then starts with a backslash (GNU coreutils' format)."""
    if not any(c in name for c in "\\\n\r"):
        return f"{sha256.hex()}  {name}\n"
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return f"\\{sha256.hex()}  {escaped}\n"


class Pacer:
    """Reads of `rate` bytes a second at most (None: unpaced), over one run of the hasher; time spent idle
    earns a burst of one second's worth, no more."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.began, self.done = time.monotonic(), 0

    def delay(self, size: int) -> float:
        """The seconds to wait after reading `size` bytes more."""
        if not self.rate:
            return 0.0
        self.done += size
        ahead = self.began + self.done / self.rate - time.monotonic()
        if ahead < -1.0:
            self.began -= ahead + 1.0
        return max(ahead, 0.0)


class Digests:
    """The SHA-256 of the files /download serves under the real directory `root`, by content_identity. lookup,
    in the event loop, reads memory only; a download's miss asks for its file, and a thread (one per Digests,
    alive while there is work) hashes it first, then walks the root: at start, and again HASH_RESCAN_S later
    (begun by the next lookup). Digests are kept in the SQLite file `cache` ("off": memory only), a row per
    /download path of a root, pruned to the files a walk finds and DIGEST_ROWS in all. Processes sharing the file
    take turns by a lease in it (HASH_LEASE_S): one hashes a root while it has work, the others read its rows and
    try for the lease when a lookup misses (every DIGEST_POLL_S at most). A file changed less than MIN_STRONG_AGE_S ago waits: a second change within
    the clock's tick would leave its identity as it was."""

    def __init__(self, root: str, *, cache: str = "off", rate: int | None = DEFAULT_HASH_RATE, serve_hidden: bool = False) -> None:
        self.root, self.cache, self.rate, self.serve_hidden = root, cache, rate, serve_hidden
        self.key = os.fsencode(root)  # the root in the cache's rows
        self.known: dict[Identity, bytes] = {}
        self.wanted: dict[str, None] = {}  # /download paths to hash first, in the order asked (HASH_QUEUE at most)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.running = False  # a run is under way, or about to start (under the lock)
        self.owner = secrets.token_hex(8)  # in the lease: this Digests of this process
        self.db: sqlite3.Connection | None = None  # the thread's (one run at a time)
        self.synced = 0  # the last row id of the cache read into `known`
        self.lease_until = 0.0  # time.time() the lease lapses unless renewed
        self.next_walk = 0.0  # time.monotonic() the next walk is due
        self.idle_until = 0.0  # time.monotonic() before which no run starts (another process hashes; an error)
        self.pacer = Pacer(rate)

    def lookup(self, identity: Identity | None, path: str | None = None) -> bytes | None:
        """The digest of the file with `identity`, if known; if not, and `path` (its /download path) is given, the
        file is hashed soon, before the walk's next."""
        if identity is None:
            return None
        digest = self.known.get(identity)
        if digest is None and path is not None:
            with self.lock:
                if len(self.wanted) < HASH_QUEUE:
                    self.wanted[path] = None
        if (digest is None and path is not None) or time.monotonic() >= self.next_walk:
            self.start()
        return digest

    def start(self) -> None:
        """A run in the thread, unless one is under way (or waits: idle_until)."""
        with self.lock:
            if self.running or self.stopping.is_set() or time.monotonic() < self.idle_until:
                return
            self.running = True
            self.thread = threading.Thread(target=self.run, name="downloader-hasher", daemon=True)
            self.thread.start()

    def close(self) -> None:
        """Stops the thread within one read and hands the lease on. Blocking."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(DRAIN_S)
        if self.db is not None and not (self.thread and self.thread.is_alive()):
            with contextlib.suppress(sqlite3.Error):
                self.release_lease(self.db)
                self.db.close()
            self.db = None

    def load(self) -> None:
        """The cache read into memory (before the thread's first run). Blocking."""
        with contextlib.suppress(sqlite3.Error):
            self.sync(self.connect())

    def run(self) -> None:
        """Hashes what is asked for, then walks the root when due; ends when there is nothing left to do."""
        try:
            db = self.connect()
            self.sync(db)
            self.pacer = Pacer(self.rate)
            while not self.stopping.is_set():
                if not self.take_lease(db):  # another process hashes this root: its rows are read, the lease tried, later
                    self.idle_until = time.monotonic() + DIGEST_POLL_S
                    with self.lock:
                        self.wanted.clear()
                    return
                if (path := self.next_wanted()) is not None:
                    with contextlib.suppress(HTTPError):  # gone meanwhile
                        self.hash_path(db, path, self.pace)
                elif time.monotonic() >= self.next_walk:
                    self.walk(db)
                else:
                    self.release_lease(db)  # idle: another process may hash what its clients ask for
                    with self.lock:
                        if not self.wanted:
                            self.running = False  # under the lock: a path asked for from now on starts a new run
                            return
        except Exception as exc:  # (any: a dead thread would be started again by every request)
            log.warning("downloader: hashing %s stopped (%r); it starts again in %g s at the earliest", self.root, exc, DIGEST_POLL_S)
            self.idle_until = time.monotonic() + DIGEST_POLL_S
        finally:
            with self.lock:
                if self.thread is threading.current_thread():  # not a run started since this one said it was done
                    self.running = False

    def connect(self) -> sqlite3.Connection:
        """The cache, opened once; an in-memory one if it can't be (a warning says why)."""
        if self.db is None:
            try:
                self.db = open_digest_cache(self.cache)
            except (OSError, sqlite3.Error) as exc:
                log.warning("downloader: the digest cache %s can't be used (%s): digests are kept in memory only", self.cache, exc)
                self.db = open_digest_cache("off")
        return self.db

    def sync(self, db: sqlite3.Connection) -> None:
        """Reads the root's rows added since the last sync into `known` (all of them anew once it outgrew DIGEST_ROWS)."""
        if len(self.known) > DIGEST_ROWS:
            self.known, self.synced = {}, 0
        rows = db.execute("SELECT id, identity, sha256 FROM digests WHERE id > ? AND root = ? ORDER BY id", (self.synced, self.key))
        for row_id, identity, sha256 in rows:
            self.known[tuple(map(int, identity.split(":")))] = bytes(sha256)  # type: ignore[index]
            self.synced = row_id

    def take_lease(self, db: sqlite3.Connection) -> bool:
        """Whether this Digests hashes the root: the lease taken or renewed (written when a third of it is gone)."""
        now = time.time()
        if now < self.lease_until - HASH_LEASE_S * 2 / 3:
            return True
        with db:
            taken = db.execute(TAKE_LEASE, (self.key, self.owner, now + HASH_LEASE_S, now)).rowcount > 0
        self.lease_until = now + HASH_LEASE_S if taken else 0.0
        return taken

    def release_lease(self, db: sqlite3.Connection) -> None:
        with db:
            db.execute("DELETE FROM hashers WHERE root = ? AND owner = ?", (self.key, self.owner))
        self.lease_until = 0.0

    def next_wanted(self) -> str | None:
        with self.lock:
            if not self.wanted:
                return None
            path = next(iter(self.wanted))
            del self.wanted[path]
            return path

    def pace(self, size: int) -> bool:
        """hash_file's pace in the thread: waits out hash_rate and renews the lease; False once closing or the lease is lost."""
        delay = self.pacer.delay(size)
        if delay and self.stopping.wait(delay):
            return False
        return not self.stopping.is_set() and self.take_lease(self.connect())

    def hash_path(self, db: sqlite3.Connection, path: str, pace: Callable[[int], bool] | None = None) -> bytes | None:
        """The digest of the file /download serves at `path` (HTTPError if none), hashed and stored unless known;
        None if it changed a moment ago or while it was read."""
        opened = open_under_root(self.root, path, serve_hidden=self.serve_hidden)
        identity = opened.info.identity
        assert identity is not None
        try:
            if identity in self.known or time.time() - identity[4] / 1e9 < MIN_STRONG_AGE_S:
                return self.known.get(identity)
            digest = hash_file(opened.fd, identity, pace)
        finally:
            os.close(opened.fd)
        if digest is not None:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO digests (root, path, identity, sha256, seen) VALUES (?, ?, ?, ?, ?)",
                    (self.key, os.fsencode(path), ":".join(map(str, identity)), digest, time.time()),
                )
            self.known[identity] = digest
        return digest

    def walk(self, db: sqlite3.Connection) -> None:
        """Every file /download serves hashed unless known (what is asked for meanwhile first), then the root's rows
        of files no longer there deleted, and the cache's oldest beyond DIGEST_ROWS."""
        self.next_walk = time.monotonic() + HASH_RESCAN_S
        began, seen = time.time(), []
        for listed in walk_files(self.root, serve_hidden=self.serve_hidden):
            while (path := self.next_wanted()) is not None:
                with contextlib.suppress(HTTPError):
                    self.hash_path(db, path, self.pace)
            if self.stopping.is_set() or not self.take_lease(db):
                return
            if listed.identity not in self.known:  # (a known file is not opened again)
                with contextlib.suppress(HTTPError):
                    self.hash_path(db, listed.path, self.pace)
            seen.append((time.time(), self.key, os.fsencode(listed.path)))
            if len(seen) >= 1000:
                with db:
                    db.executemany("UPDATE digests SET seen = ? WHERE root = ? AND path = ?", seen)
                seen = []
        with db:
            db.executemany("UPDATE digests SET seen = ? WHERE root = ? AND path = ?", seen)
            db.execute("DELETE FROM digests WHERE root = ? AND seen < ?", (self.key, began))
            (rows,) = db.execute("SELECT count(*) FROM digests").fetchone()
            if rows > DIGEST_ROWS:
                db.execute("DELETE FROM digests WHERE id IN (SELECT id FROM digests ORDER BY seen LIMIT ?)", (rows - DIGEST_ROWS,))


# =============================================================================
# 8. Signed links and catalog
# =============================================================================
# Two ways to hand out a protected file: stateless signed links, an HMAC-SHA256 of the exact path and
# expiry that any replica with the secret verifies (like S3 presigned URLs); and opaque IDs in a catalog
# with expiry, revocation and a limit of completed downloads: a SQLite file (WAL, shared by the workers of
# one machine), or PostgreSQL (shared by replicas). One SQL for both; each decision one statement.

LINK_DOMAIN = "downloader-link-v1"  # the first line of every signed string: a signature is valid for nothing else


def link_signature(path: str, expires: int, key: str) -> str:
    """HMAC-SHA256 of the canonical string (domain, exact decoded path, expiry), base64url."""
    message = f"{LINK_DOMAIN}\n{path}\n{expires}".encode("utf-8", "surrogatepass")
    digest = hmac.new(key.encode("utf-8"), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def sign_url(
    path: str, *, secret: str | Sequence[str], expires_in: float | None = None, expires_at: float | None = None,
    prefix: str = "", now: float | None = None,
) -> str:
    """`{prefix}/download/PATH?expires=...&signature=...` for the file at `path` (relative to the root), valid
    until `expires_at` (POSIX seconds) or for `expires_in` seconds. Of several keys, the first signs (key rotation)."""
    if (expires_in is None) == (expires_at is None):
        raise ValueError("give exactly one of expires_in and expires_at")
    key = secret if isinstance(secret, str) else secret[0]
    expires = int(expires_at if expires_at is not None else (time.time() if now is None else now) + expires_in)
    query = urllib.parse.urlencode({"expires": expires, "signature": link_signature(path, expires, key)})
    return f"{prefix}/download/{urllib.parse.quote(path)}?{query}"


def verify_link(path: str, query: Mapping[str, str], keys: Sequence[str], now: float) -> None:
    """Raises HTTPError(403) unless `query` holds an unexpired signature of `path` and its expiry by one
    of `keys`. Compared in constant time, and before the expiry: a tampered expiry is 'invalid', not 'expired'."""
    expires, signature = query.get("expires"), query.get("signature")
    if expires is None or signature is None:
        raise HTTPError(403, "This link needs a valid signature")
    if not expires.isascii() or not expires.isdigit() or len(expires) > 12 or expires != str(int(expires)):
        raise HTTPError(403, "Invalid link signature")
    given = signature.encode("ascii", "replace")
    if not any(hmac.compare_digest(given, link_signature(path, int(expires), key).encode("ascii")) for key in keys):
        raise HTTPError(403, "Invalid link signature")
    if int(expires) <= now:
        raise HTTPError(403, "This link has expired")


def parse_ttl(text: str) -> int:
    """Seconds in '90', '45s', '30m', '1h' or '7d' (ASCII digits, up to MAX_TTL_S); ValueError otherwise."""
    match = re.fullmatch(r"([0-9]{1,12})([smhd]?)", text.strip())
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_TTL_S:
        raise ValueError(f"bad duration {text!r}: use a positive number with s, m, h or d, like 1h (at most {MAX_TTL_S} s)")
    return seconds


def _number(field: str, value: object, low: float, high: float) -> float:
    """A finite JSON number from `low` to `high`; ValueError naming `field` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails too
        raise ValueError(f"{field} must be a number from {low} to {high}")
    return value


def link_options(
    *, ttl: object = None, expires_at: object = None, max_downloads: object = None, name: object = None, now: float
) -> tuple[float | None, int | None, str | None]:
    """The checked expiry, download limit and name of a new catalog link, in the one vocabulary of the CLI, the
    admin API and Catalog.add: `ttl` in seconds or a duration ("1h"), or `expires_at` in RFC 3339 (with a zone)
    or POSIX seconds; `max_downloads` a whole number; `name` a printable file name. ValueError names the field."""
    if ttl is not None and expires_at is not None:
        raise ValueError("give ttl or expires_at, not both")
    expiry = None
    if isinstance(ttl, str):
        try:
            expiry = now + parse_ttl(ttl)
        except ValueError:
            raise ValueError("ttl must be seconds or a duration such as 45s, 30m, 1h or 7d") from None
    elif ttl is not None:
        expiry = now + _number("ttl", ttl, 1, MAX_TTL_S)
    elif isinstance(expires_at, str):
        try:
            when = datetime.datetime.fromisoformat(expires_at)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise ValueError("expires_at must be an RFC 3339 time such as 2026-12-01T00:00:00Z")
        expiry = _number("expires_at", when.timestamp(), 0, MAX_EXPIRES_AT)
    elif expires_at is not None:
        expiry = _number("expires_at", expires_at, 0, MAX_EXPIRES_AT)
    if max_downloads is not None and (type(max_downloads) is not int or not 1 <= max_downloads <= MAX_DOWNLOADS_CAP):
        raise ValueError(f"max_downloads must be a whole number from 1 to {MAX_DOWNLOADS_CAP}")
    if name is not None and (not isinstance(name, str) or not name.isprintable() or "/" in name or name in ("", ".", "..")):
        raise ValueError("name must be a file name: printable, without /")
    return expiry, max_downloads, name  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Link:
    """One catalog entry: an opaque ID of a file under the root."""

    id: str
    path: str
    name: str | None
    created: float
    expires_at: float | None
    max_downloads: int | None
    downloads: int
    revoked: bool

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class CatalogError(Exception):
    """The catalog's database failed (locked, gone, unreachable, read-only): callers answer 503."""


class Catalog:
    """Opaque download IDs in a database: `add` a file, `get`, `revoke`, `list`, `claim` a completed download,
    and whether a client `holds` a used-up link. `Catalog(path)` is a SQLite file (WAL; each call opens its own
    connection, so threads and processes share it, and a call waits CATALOG_TIMEOUT_S for another writer);
    `Catalog("postgresql://...")` is a PostgresCatalog, shared by replicas. Both run the same SQL. A database
    that fails raises CatalogError; a SQLite file gone after it was opened is one, never silently made anew.

    The schema is versioned: SCHEMA[n] takes a catalog from version n to n + 1, on first use."""

    SCHEMA = (
        (  # 1: links, and the holders of used-up links (a file from before versions had links alone)
            """CREATE TABLE IF NOT EXISTS links (
                id TEXT PRIMARY KEY, path TEXT NOT NULL, name TEXT, created DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION, max_downloads INTEGER, downloads INTEGER NOT NULL DEFAULT 0,
                revoked INTEGER NOT NULL DEFAULT 0)""",
            """CREATE TABLE IF NOT EXISTS holders (
                link TEXT NOT NULL, holder TEXT NOT NULL, claimed DOUBLE PRECISION NOT NULL, budget BIGINT,
                PRIMARY KEY (link, holder))""",
        ),
    )
    COLUMNS = ["id", "path", "name", "created", "expires_at", "max_downloads", "downloads", "revoked"]
    # A completed download counts when this one statement finds the link usable: never read-then-write.
    COUNT = ("UPDATE links SET downloads = downloads + 1 WHERE id = :id AND revoked = 0"
             " AND (max_downloads IS NULL OR downloads < max_downloads)")
    RECORD = ("INSERT INTO holders (link, holder, claimed) {source} ON CONFLICT (link, holder)"
              " DO UPDATE SET claimed = excluded.claimed, budget = NULL")
    # Expired holders: housekeeping, no decision reads them.
    SWEEP = "DELETE FROM holders WHERE rowid IN (SELECT rowid FROM holders WHERE claimed < :since LIMIT :batch)"
    swept = 0.0  # when this process last swept
    HELD = ("SELECT 1 FROM holders JOIN links ON links.id = holders.link"
            " WHERE link = :id AND holder = :holder AND claimed >= :since AND revoked = 0")

    def __new__(cls, location: str | os.PathLike[str]) -> Catalog:
        if cls is Catalog and is_postgres_url(os.fspath(location)):
            cls = PostgresCatalog
        return super().__new__(cls)

    def __init__(self, location: str | os.PathLike[str]) -> None:
        """Opens the catalog, creating or migrating its tables; ValueError for a database that holds another
        `links` table, or a schema newer than this code; CatalogError when the database can't be reached."""
        self.location = os.fspath(location)
        self.shown = repr(self.location)  # in errors: a file's path (a URL's password never)
        with self._session(create=True) as run:
            run("PRAGMA journal_mode=WAL")
        self._migrate()

    # -- the database's part: SQLite here; PostgresCatalog overrides these ------------------------------

    @contextlib.contextmanager
    def _session(self, *, create: bool = False, atomic: bool = False) -> Iterator[Callable[..., Any]]:
        """A `run(sql, params={})` that returns a cursor (rows as mappings), in one transaction that holds
        the write lock when `atomic`; driver errors become CatalogError."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.location)) + ("?mode=rwc" if create else "?mode=rw")
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=CATALOG_TIMEOUT_S, isolation_level=None)) as db:
                db.row_factory = sqlite3.Row
                if atomic:
                    db.execute("BEGIN IMMEDIATE")
                with db if atomic else contextlib.nullcontext():  # commits, or rolls back on an exception
                    yield lambda sql, params={}: db.execute(sql, params)
        except sqlite3.Error as exc:
            raise CatalogError(str(exc)) from exc

    def _version(self, run: Callable[..., Any]) -> int:
        return int(run("PRAGMA user_version").fetchone()[0])

    def _set_version(self, run: Callable[..., Any], version: int) -> None:
        run(f"PRAGMA user_version = {int(version)}")

    COUNT_IN_TRANSACTION = True  # _count runs two statements

    def _count(self, run: Callable[..., Any], args: dict[str, object]) -> bool:
        """The count, then its holder (a limited link's), in the caller's transaction."""
        if run(self.COUNT, args).rowcount != 1:
            return False
        if args["holder"] is not None:
            source = "SELECT id, :holder, :now FROM links WHERE id = :id AND max_downloads IS NOT NULL"
            run(self.RECORD.format(source=source), args)
        return True

    def close(self) -> None:
        """Lets go of what the catalog keeps between calls (SQLite: nothing)."""

    def check(self) -> None:
        """CatalogError unless the catalog can be read and written now (for /healthz)."""
        with self._session(atomic=True) as run:  # takes the write lock: a locked or read-only file fails here
            run("SELECT 1 FROM links LIMIT 1").fetchone()

    # -- the catalog, in SQL both databases run ---------------------------------------------------------

    def _migrate(self) -> None:
        with self._session(atomic=True) as run:
            version = self._version(run)
            if version > len(self.SCHEMA):
                raise ValueError(f"{self.shown} has catalog schema version {version}; this downloader knows up to {len(self.SCHEMA)}")
            for statements in self.SCHEMA[version:]:
                for statement in statements:
                    run(statement)
            if version < len(self.SCHEMA):
                self._set_version(run, len(self.SCHEMA))
            columns = [column[0] for column in run("SELECT * FROM links LIMIT 0").description]
            if sorted(columns) != sorted(self.COLUMNS):
                raise ValueError(f"{self.shown} holds a links table that is not a downloader catalog")

    def add(self, path: str, *, expires_at: float | None = None, max_downloads: int | None = None, name: str | None = None) -> Link:
        """A new random ID (UUID4) for the file at `path` (relative to the root); ValueError as link_options."""
        expires_at, max_downloads, name = link_options(expires_at=expires_at, max_downloads=max_downloads, name=name, now=0)
        link = Link(str(uuid.uuid4()), path, name, time.time(), expires_at, max_downloads, 0, False)
        with self._session() as run:
            run("INSERT INTO links (id, path, name, created, expires_at, max_downloads)"
                " VALUES (:id, :path, :name, :created, :expires_at, :max_downloads)", link.as_json())
        return link

    def get(self, link_id: str) -> Link | None:
        if not is_link_id(link_id):  # `get` and `revoke` take IDs from clients; `claim` and `holds` what `get` found
            return None  # the database never sees what we could not have made (a NUL, say)
        with self._session() as run:
            row = run("SELECT * FROM links WHERE id = :id", {"id": link_id}).fetchone()
        return None if row is None else Link(**{**dict(row), "revoked": bool(row["revoked"])})

    def list(self) -> list[Link]:
        with self._session() as run:
            rows = run("SELECT * FROM links ORDER BY created, id").fetchall()
        return [Link(**{**dict(row), "revoked": bool(row["revoked"])}) for row in rows]

    def revoke(self, link_id: str) -> bool:
        """True when the ID existed (revoking twice is harmless)."""
        if not is_link_id(link_id):
            return False
        with self._session() as run:
            return run("UPDATE links SET revoked = 1 WHERE id = :id", {"id": link_id}).rowcount == 1

    def claim(self, link_id: str, holder: str | None = None, *, held: bool = False, now: float | None = None) -> bool:
        """Counts a completed download atomically: False at the limit (of two racers, one gets the last), or
        revoked. On a limited link, the `holder` it goes to (link_holder) is recorded; a request admitted by
        `holds` (`held`) is that holder's own download going on: allowed within LINK_HOLD_S, not counted again."""
        now = time.time() if now is None else now
        args = {"id": link_id, "holder": holder, "now": now, "since": now - LINK_HOLD_S}
        if held:
            with self._session() as run:
                return run(self.HELD, args).fetchone() is not None
        with self._session(atomic=self.COUNT_IN_TRANSACTION) as run:
            counted = self._count(run, args)
        if counted and holder is not None and abs(now - self.swept) >= LINK_HOLD_S:
            self.swept = now
            with contextlib.suppress(CatalogError), self._session() as run:  # the count stands whatever this does
                if run(self.SWEEP, {**args, "batch": HOLDERS_SWEPT_AT_ONCE}).rowcount == HOLDERS_SWEPT_AT_ONCE:
                    self.swept = 0.0  # more to go
        return counted

    def holds(self, link_id: str, holder: str, wanted: int, size: int, now: float | None = None) -> bool:
        """Whether `holder` got the link's last download within LINK_HOLD_S and has `wanted` bytes left of the
        one file's worth (`size`) it may fetch since; if so they are taken off."""
        now = time.time() if now is None else now
        args = {"id": link_id, "holder": holder, "wanted": wanted, "size": size, "since": now - LINK_HOLD_S}
        with self._session() as run:
            return run(
                "UPDATE holders SET budget = coalesce(budget, :size) - :wanted WHERE link = :id AND holder = :holder"
                " AND claimed >= :since AND coalesce(budget, :size) >= :wanted", args,
            ).rowcount == 1


def is_link_id(text: str) -> bool:
    """Whether `text` is an ID Catalog.add could have made (a UUID as str(uuid.uuid4()) writes it)."""
    return re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text) is not None


@functools.lru_cache(maxsize=64)
def pyformat(sql: str) -> str:
    """SQL with SQLite's :name parameters in psycopg's %(name)s style (our SQL has no other colons)."""
    return re.sub(r":(\w+)", r"%(\1)s", sql)


class PostgresCatalog(Catalog):
    """The catalog in PostgreSQL (psycopg 3), for replicas that share it. Connections are kept for reuse,
    one per thread that needs one at once (CATALOG_THREADS), in autocommit: each call is one statement
    (the migration aside). Before reuse, a connection the server has written to unasked (a restart's
    goodbye) is dropped, and one idle for PG_CHECK_IDLE_S is checked with a round trip. Server-side
    statement and lock timeouts, and TCP's, are CATALOG_TIMEOUT_S, so a call ends soon after the caller
    stops waiting; `close` cuts the connections of calls a frozen server holds, so shutdown can't hang."""

    # One statement: count, and record the holder of a limited link.
    CLAIM = ("WITH counted AS (" + Catalog.COUNT + " RETURNING id, max_downloads), recorded AS ("
             + Catalog.RECORD.format(source="SELECT id, :holder, :now FROM counted WHERE max_downloads IS NOT NULL")
             + ") SELECT count(*) AS n FROM counted")
    # Skips rows a claim holds (that order of locks would deadlock with it).
    SWEEP = ("DELETE FROM holders WHERE ctid IN (SELECT ctid FROM holders WHERE claimed < :since"
             " LIMIT :batch FOR UPDATE SKIP LOCKED)")

    def __init__(self, location: str | os.PathLike[str]) -> None:
        try:
            import psycopg
            import psycopg.conninfo
            import psycopg.pq
            import psycopg.rows
        except ImportError:
            raise ValueError("a postgresql:// catalog needs psycopg: pip install 'psycopg[binary]'") from None
        self.psycopg = psycopg
        self.location = os.fspath(location)
        try:
            params = psycopg.conninfo.conninfo_to_dict(self.location)
        except psycopg.Error:  # its message may quote the password
            raise ValueError("not a URL libpq reads: postgresql://[user[:password]@][host][:port][/dbname][?param=value&...]") from None
        timeout_ms = int(CATALOG_TIMEOUT_S * 1000)
        params.setdefault("application_name", "downloader")
        params.setdefault("connect_timeout", str(max(2, math.ceil(CATALOG_TIMEOUT_S))))  # libpq's least is 2 s
        params.setdefault("tcp_user_timeout", str(timeout_ms))  # sends a host gone never acknowledges
        params["options"] = f"{params.get('options', '')} -c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}".strip()
        self.params = params
        self.shown = f"PostgreSQL database {params.get('dbname', params.get('user', ''))!r}"
        self.idle: list[tuple[float, Any]] = []  # (when it was put back, connection), the newest last
        self.busy: set[Any] = set()
        self.lock = threading.Lock()
        self.closed = False
        self._migrate()

    def _reusable(self, conn: Any, idle_since: float) -> bool:
        readable = select.poll()
        readable.register(conn.fileno(), select.POLLIN)
        if readable.poll(0):  # an idle connection has nothing to read, unless the server left
            return False
        if time.monotonic() - idle_since > PG_CHECK_IDLE_S:
            try:
                conn.execute("")
            except self.psycopg.Error:
                return False
        return True

    def _connection(self) -> Any:
        """An idle connection that still works, or a new one; counted busy."""
        while True:
            with self.lock:
                if self.closed:
                    raise CatalogError("the catalog is closed (the app is shutting down)")
                idle_since, conn = self.idle.pop() if self.idle else (0.0, None)
                if conn is not None:
                    self.busy.add(conn)  # its check may wait on a frozen server too
            if conn is None:
                conn = self.psycopg.connect(**self.params, autocommit=True, row_factory=self.psycopg.rows.dict_row)
                with self.lock:
                    self.busy.add(conn)
                    if not self.closed:
                        return conn
                    self.busy.discard(conn)
                conn.close()
                raise CatalogError("the catalog is closed (the app is shutting down)")
            if self._reusable(conn, idle_since):
                return conn
            with self.lock:
                self.busy.discard(conn)
            conn.close()

    @contextlib.contextmanager
    def _session(self, *, create: bool = False, atomic: bool = False) -> Iterator[Callable[..., Any]]:
        try:
            conn = self._connection()
            try:
                with conn.transaction() if atomic else contextlib.nullcontext():
                    yield lambda sql, params={}: conn.execute(pyformat(sql), params)
            finally:
                with self.lock:
                    self.busy.discard(conn)
                    if not self.closed and not conn.broken and conn.info.transaction_status == self.psycopg.pq.TransactionStatus.IDLE:
                        self.idle.append((time.monotonic(), conn))  # a statement's error leaves it usable
                        conn = None
                if conn is not None:
                    conn.close()
        except self.psycopg.Error as exc:
            lines = (" ".join(line.split()) for line in str(exc).splitlines())
            raise CatalogError("; ".join(line for line in lines if line)) from exc  # libpq's run over lines

    def close(self) -> None:
        """Closes the idle connections, and cuts those a call still waits on (a frozen server's)."""
        with self.lock:
            self.closed = True
            idle, self.idle, sockets = self.idle, [], []
            for conn in self.busy:  # under the lock: their threads close them only once out of `busy`
                with contextlib.suppress(self.psycopg.Error, OSError):
                    sockets.append(os.dup(conn.fileno()))
        for _, conn in idle:
            conn.close()
        for fd in sockets:
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            with sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its thread's wait ends with an error

    def _version(self, run: Callable[..., Any]) -> int:
        migration_ms = int(MIGRATION_TIMEOUT_S * 1000)
        run(f"SET LOCAL statement_timeout = {migration_ms}")
        run(f"SET LOCAL lock_timeout = {migration_ms}")
        run("SELECT pg_advisory_xact_lock(hashtext('downloader catalog'))")  # replicas that start together
        if run("SELECT to_regclass('downloader_schema') IS NULL AS missing").fetchone()["missing"]:
            return 0
        return int(run("SELECT max(version) AS version FROM downloader_schema").fetchone()["version"] or 0)

    def _set_version(self, run: Callable[..., Any], version: int) -> None:
        run("CREATE TABLE IF NOT EXISTS downloader_schema (version INTEGER NOT NULL)")
        run("DELETE FROM downloader_schema")
        run("INSERT INTO downloader_schema (version) VALUES (:version)", {"version": version})

    COUNT_IN_TRANSACTION = False  # one statement

    def _count(self, run: Callable[..., Any], args: dict[str, object]) -> bool:
        if args["holder"] is None:
            return run(self.COUNT, args).rowcount == 1
        return run(self.CLAIM, args).fetchone()["n"] == 1

    def check(self) -> None:
        with self._session() as run:
            row = run("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' AS read_only").fetchone()
            run("SELECT 1 FROM links LIMIT 1").fetchone()
        if row["read_only"]:
            raise CatalogError("the PostgreSQL server is read-only (a standby?)")


def link_holder(address: str | None, user_agent: str) -> str | None:
    """Who a catalog download went to, as far as a server can tell: the client's address and User-Agent,
    hashed; None without an address (a Unix socket): then nobody holds a link."""
    if not address:
        return None
    return hashlib.sha256(f"{address}\n{user_agent}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def link_state(link: Link, now: float) -> str:
    """'active', 'revoked', 'expired' or 'used-up'."""
    if link.revoked:
        return "revoked"
    if link.expires_at is not None and link.expires_at <= now:
        return "expired"
    if link.max_downloads is not None and link.downloads >= link.max_downloads:
        return "used-up"
    return "active"


LINK_GONE = {
    "revoked": "This download link was revoked",
    "expired": "This download link has expired",
    "used-up": "This download link has been used up",
}


def check_link(link: Link | None, now: float) -> Link:
    """The link if it may serve now; else HTTPError: 404 unknown, 410 revoked, expired or used up."""
    if link is None:
        raise HTTPError(404, "Unknown download link")
    state = link_state(link, now)
    if state != "active":
        raise HTTPError(410, LINK_GONE[state])
    return link


# =============================================================================
# 9. Responses
# =============================================================================
# The ASGI objects a host app can return too: DownloadResponse (a file, by sections 4 and 5),
# GeneratedDownload (stream_download, /zip) and error_response (the one HTTPError -> JSON).


def request_headers(scope: Scope) -> dict[str, str]:
    """Lower-case header names -> values; repeated fields joined with ', ' (RFC 9110 §5.3)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _raw(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def with_extra(pairs: list[tuple[bytes, bytes]], extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Our ASGI header pairs, each replaced by the host's `extra` headers of the same name."""
    replaced = {name for name, _ in extra}
    return [pair for pair in pairs if pair[0] not in replaced] + extra


def disposition_for(name: str, disposition: str, requested: Mapping[str, str]) -> str:
    """The Content-Disposition of `name` for this client (see wants_utf8_filename)."""
    return content_disposition(name, disposition, utf8_fallback=wants_utf8_filename(requested.get("user-agent", "")))


VALIDATOR_HEADERS = ("etag", "last-modified")
REPRESENTATION_HEADERS = (b"content-", b"etag", b"last-modified", b"accept-ranges")


class ErrorResponse(Response):
    """JSON {"detail": ...} with the error's status and headers, never a validator (Go's serveError); no body for HEAD."""

    media_type = "application/json"

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        kept = {k: v for k, v in (headers or {}).items() if k.lower() not in VALIDATOR_HEADERS}
        super().__init__(json.dumps({"detail": detail}).encode(), status_code=status, headers=kept)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else self.body})


def error_response(exc: HTTPError) -> Response:
    """The one place an HTTPError becomes a response."""
    return ErrorResponse(exc.status, exc.detail, exc.headers)


_MEDIA_TYPES = build_media_types()


class Download(Response):
    """Starlette's Response contract: `headers` (and later changes to `.headers`) replace ours of the same name;
    `status_code` holds the status sent; `background` runs after the response, even if the client left."""

    def __init__(self, disposition: str, headers: Mapping[str, str] | None, background: BackgroundTask | None) -> None:
        if disposition not in ("attachment", "inline"):
            raise ValueError("disposition must be 'attachment' or 'inline'")
        self.disposition = disposition
        self.status_code = 200  # until the request (and the file) decide
        self.raw_headers = _raw((headers or {}).items())
        self.background = background
        self.sent_headers: list[tuple[bytes, bytes]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.respond(scope, receive, send)
        finally:
            if self.sent_headers is not None:  # from now on `headers` are those sent, as with FileResponse
                self.raw_headers = self.sent_headers
                self.__dict__.pop("_headers", None)
            if self.background is not None:
                with anyio.CancelScope(shield=True):  # a cleanup runs even when the client left
                    await self.background()

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    def start(self, status: int, headers: Iterable[tuple[str, str]]) -> Message:
        self.status_code = status
        self.sent_headers = with_extra(_raw(headers), self.raw_headers)
        return {"type": "http.response.start", "status": status, "headers": self.sent_headers}

    async def send_error(self, exc: HTTPError, scope: Scope, receive: Receive, send: Send) -> None:
        """The error as JSON, with the host's headers but those that describe a representation."""
        response = error_response(exc)
        extra = [(name, value) for name, value in self.raw_headers if not name.startswith(REPRESENTATION_HEADERS)]
        response.raw_headers = with_extra(response.raw_headers, extra)
        self.status_code, self.sent_headers = exc.status, response.raw_headers
        await response(scope, receive, send)


class DownloadResponse(Download):
    """A file download that any Starlette/FastAPI endpoint can return.

    Without `root`, `path` is the host app's path of a regular file; with `root`, a URL path under it,
    checked as /download checks it (no `..`, no hidden files unless `serve_hidden`, nothing outside).
    The file is opened when the response is sent; 404 (JSON) answers anything else. The answer is
    /download's: 200, 206 (one range, or multipart/byteranges), 304, 412 or 416 per RFC 9110; HEAD
    gets the same headers and no body. `filename` (default: the last segment of `path`) goes into
    Content-Disposition with `disposition` ("attachment" or "inline"); `media_type` defaults to one
    guessed from it; `headers`, `background` and `status_code` as in Download. `authorize`, given the
    FileInfo (None when there is no such file, so that a refused client can't tell), may raise HTTPError;
    `gate` is called before the file's last byte, False aborts (hold_last_byte). With `digests` (an app's:
    `app.state.service.digests`), a file whose digest is known carries it (Repr-Digest, Digest)."""

    def __init__(
        self, path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None, serve_hidden: bool = False,
        filename: str | None = None, media_type: str | None = None, disposition: str = "attachment",
        cache_control: str = DEFAULT_CACHE_CONTROL, chunk_size: int = CHUNK_SIZE, headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None, authorize: Callable[[FileInfo | None], Awaitable[None]] | None = None,
        gate: Gate | None = None, rate_limit: int | None = None, stall_timeout_s: float | None = None,
        offload_prefix: str | None = None, root_is_real: bool = False, digests: Digests | None = None,
    ) -> None:
        super().__init__(disposition, headers, background)
        if offload_prefix is not None and root is None:
            raise ValueError("offload_prefix needs a root: the front proxy serves paths under it")
        self.path = os.fspath(path)
        self.root = None if root is None else os.fspath(root)
        self.serve_hidden = serve_hidden
        self.filename = filename
        self.media_type = media_type
        self.cache_control = cache_control
        self.chunk_size = chunk_size
        self.authorize = authorize
        self.gate = gate
        self.rate_limit = rate_limit
        self.stall_timeout_s = stall_timeout_s
        self.offload_prefix = offload_prefix
        self.root_is_real = root_is_real  # a real path already: skip its realpath per request
        self.digests = digests

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            opened = await self.open()
        except HTTPError as exc:
            await self.send_missing(exc, scope, receive, send)
            return
        if self.offload_prefix is not None:
            os.close(opened.fd)  # the front proxy opens the file itself
            await self.send_offloaded(scope, receive, send, opened.info)
        else:
            await self.send_file(scope, receive, send, opened)

    async def open(self) -> OpenFile:
        """The file, checked and opened: in the event loop from the kernel's caches (open_cached), else in a thread."""
        if self.root is None:
            return open_cached(self.path, root=None) or await anyio.to_thread.run_sync(open_path, self.path)
        if self.root_is_real and (opened := open_cached(self.path, root=self.root, serve_hidden=self.serve_hidden)):
            return opened
        return await anyio.to_thread.run_sync(self.open_under_root)

    async def send_missing(self, exc: HTTPError, scope: Scope, receive: Receive, send: Send) -> None:
        """The error of a file that can't be had; a client the hook refuses gets that refusal for a missing file
        too (authorize(None)): no probing for which files exist."""
        if exc.status == 404 and self.authorize is not None:
            try:
                await self.authorize(None)
            except HTTPError as refusal:
                exc = refusal
        await self.send_error(exc, scope, receive, send)

    def open_under_root(self) -> OpenFile:
        assert self.root is not None
        root = self.root if self.root_is_real else os.path.realpath(self.root)
        return open_under_root(root, self.path, serve_hidden=self.serve_hidden)

    async def send_file(self, scope: Scope, receive: Receive, send: Send, opened: OpenFile) -> None:
        """send_planned from the open file; closes `opened.fd`."""
        try:
            await self.send_planned(scope, receive, send, opened.info, fd=opened.fd, zerocopy=offers_zerocopy(scope))
        finally:
            os.close(opened.fd)

    async def send_planned(
        self, scope: Scope, receive: Receive, send: Send, info: FileInfo, *, fd: int = -1, zerocopy: bool = False,
        reader: Callable[[ByteRange], Awaitable[Piece]] | None = None, authorized: bool = False,
    ) -> None:
        """Plans the answer (section 4) and streams it (section 5): the file's ranges from `fd`, or each made a
        piece by `reader` (an object's ranges: ObjectChunks) before the head is sent. authorize first, unless
        `authorized` already."""
        try:
            if self.authorize is not None and not authorized:
                await self.authorize(info)
            plan = self.plan(scope, self.with_digest(info))
            pieces: Sequence[Piece] = () if scope["method"] == "HEAD" else plan.pieces
            if self.gate is not None and pieces:
                # A body that goes out in one message is counted before its head: a refusal is still a 410.
                held = hold_last_byte(plan.pieces, info.size, self.gate)
                small = sum(p.length if isinstance(p, ByteRange) else len(p) for p in plan.pieces) <= self.chunk_size
                pieces = [self.gate, *plan.pieces] if small and self.gate in held else held
            if reader is not None:
                pieces = [await reader(p) if isinstance(p, ByteRange) else p for p in pieces]
            await send_body(
                send, receive, self.start(plan.status, plan.headers), pieces, fd=fd, zerocopy=zerocopy,
                chunk_size=self.chunk_size, rate_limit=self.rate_limit, stall_timeout_s=self.stall_timeout_s, client=ClientSocket(scope),
            )
        except HTTPError as exc:
            await self.send_error(exc, scope, receive, send)
        except TransferRefused:  # a catalog link used up by a racing download meanwhile
            await self.send_error(HTTPError(410, LINK_GONE["used-up"]), scope, receive, send)

    async def send_offloaded(self, scope: Scope, receive: Receive, send: Send, info: FileInfo) -> None:
        """Hands the bytes to nginx (X-Accel-Redirect), which adds validators, ranges and conditional requests;
        every check and the type, name and Cache-Control are ours. nginx can't tell us whether a transfer
        completed, so a catalog link counts a download when the request reaches the file's last byte."""
        assert self.root is not None and self.offload_prefix is not None
        requested = request_headers(scope)
        try:
            if self.authorize is not None:
                await self.authorize(info)
            await self.count_at_last_byte(scope, requested, info)
        except HTTPError as exc:
            await self.send_error(exc, scope, receive, send)
            return
        info = self.with_digest(info)
        root = self.root if self.root_is_real else await anyio.to_thread.run_sync(os.path.realpath, self.root)
        relative = os.path.relpath(info.path, root).replace(os.sep, "/")
        name = self.filename or info.name
        headers = [("X-Accel-Redirect", self.offload_prefix + urllib.parse.quote(relative))] + download_headers(
            media_type=self.media_type or media_type_for(name, _MEDIA_TYPES),
            disposition=disposition_for(name, self.disposition, requested), cache_control=self.cache_control,
        )
        if info.sha256 is not None:
            headers += digest_headers(info.sha256, requested.get("want-repr-digest"))
        if self.rate_limit:
            headers.append(("X-Accel-Limit-Rate", str(self.rate_limit)))
        await send(self.start(200, headers))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def with_digest(self, info: FileInfo) -> FileInfo:
        """`info` with the file's digest if known (once the client may have the file: a refused one asks for no
        hashing); else it is hashed soon."""
        if self.digests is None or info.identity is None:
            return info
        return dataclasses.replace(info, sha256=self.digests.lookup(info.identity, self.path))

    async def count_at_last_byte(self, scope: Scope, requested: Mapping[str, str], info: FileInfo) -> None:
        """Before the bytes are handed to another server (offload, a presigned URL), which can't tell us whether a
        transfer completed: a catalog link counts a download when a GET reaches the last byte (410 when used up)."""
        if self.gate is not None and scope["method"] == "GET" and reaches_end(requested.get("range"), info.size):
            if not await pass_gate(self.gate, started=False):
                raise HTTPError(410, LINK_GONE["used-up"])

    def plan(self, scope: Scope, info: FileInfo) -> Plan:
        name = self.filename or info.name
        requested = request_headers(scope)
        return plan_response(
            scope["method"], requested, info, media_type=self.media_type or media_type_for(name, _MEDIA_TYPES),
            disposition=disposition_for(name, self.disposition, requested), cache_control=self.cache_control,
            now=time.time(), boundary=secrets.token_hex(16),
        )


SINGLE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")  # one range as every store reads it alike


class ObjectResponse(DownloadResponse):
    """DownloadResponse's answer for an object of a bucket (section 6): its metadata from a HEAD, its ranges read
    by ObjectChunks, opened before the head is sent so that a failure is still a JSON error. The object replaced
    between the HEAD and the first GET: planned again, once. With `redirect_ttl`, a GET that passes every check
    (signature, catalog, authorize, preconditions) is a 302 to a presigned URL of the object that works that many
    seconds, carrying our Content-Disposition and Content-Type; HEAD and answers without a body stay ours."""

    def __init__(self, path: str, *, bucket: Bucket, redirect_ttl: int | None = None, **options: Any) -> None:
        super().__init__(path, **options)
        self.bucket = bucket
        self.redirect_ttl = redirect_ttl

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(2):
            try:
                info = await self.bucket.head(self.path, serve_hidden=self.serve_hidden)
            except HTTPError as exc:
                await self.send_missing(exc, scope, receive, send)
                return
            try:
                if self.redirect_ttl is not None and scope["method"] == "GET":
                    await self.send_redirect(scope, receive, send, info)
                else:
                    await self.send_planned(scope, receive, send, info, reader=self.reader(info))
                return
            except ObjectChanged:
                if self.sent_headers is not None:
                    raise  # mid-body: the transfer is aborted
                continue  # the first GET, before the head: the HEAD is out of date
        await self.send_error(HTTPError(503, "The object is changing", headers={"Retry-After": "1"}), scope, receive, send)

    def reader(self, info: FileInfo) -> Callable[[ByteRange], Awaitable[Piece]]:
        """ObjectChunks for each range; the first one's GET started (the others start when the body reaches them)."""
        opened = False

        async def read(span: ByteRange) -> ObjectChunks:
            nonlocal opened
            step = paced_chunk_size(self.chunk_size, self.rate_limit)
            chunks = ObjectChunks(self.bucket, info, span, step, cap=step if self.rate_limit else None)
            if not opened:
                await chunks.open()
                opened = True
            return chunks

        return read

    async def send_redirect(self, scope: Scope, receive: Receive, send: Send, info: FileInfo) -> None:
        """authorize, then the plan: 304, 412 and 416 are answered here. The whole file asked for without a Range,
        or one range written `bytes=N-M`, `bytes=N-` or `bytes=-N`, becomes a 302 to a presigned URL. What the
        store might answer otherwise is proxied: a Range we ignore (If-Range failed: the store ignores If-Range
        and would splice), several ranges (stores may send the whole file), a Range in any other spelling. Behind a gate (a catalog link) the URL is signed with the request's Range, so it
        serves that range only: one that stops short of the last byte, not counted, can't fetch the whole object."""
        requested = request_headers(scope)
        try:
            if self.authorize is not None:
                await self.authorize(info)
            plan = self.plan(scope, info)
            # (a Range in any other form may be read otherwise by the store: a URL signed with it would then serve
            # what we didn't count, such as the whole file for "BYTES=0-0" or "bytes=0-0,99999-")
            canonical = "range" not in requested or bool(SINGLE_RANGE.fullmatch(requested["range"]))
            if plan.status in (200, 206) and not (canonical and len(plan.pieces) <= 1 and (plan.status == 206 or "range" not in requested)):
                await self.send_planned(scope, receive, send, info, reader=self.reader(info), authorized=True)
                return
            if plan.status in (200, 206):
                await self.count_at_last_byte(scope, requested, info)
                bound = {"Range": requested["range"]} if self.gate is not None and "range" in requested else {}
                name = self.filename or info.name
                overrides = {  # (the ASCII filename= and RFC 8187's filename*: no UTF-8 filename= for curl, see content_disposition)
                    "response-content-disposition": content_disposition(name, self.disposition),
                    "response-content-type": self.media_type or media_type_for(name, _MEDIA_TYPES),
                    "response-cache-control": no_transform(self.cache_control),
                }
                location = self.bucket.presign(info.path, self.redirect_ttl or S3_URL_TTL_S, overrides, headers=bound)
                plan = Plan(302, [("Location", location), ("Cache-Control", "private, no-store"), ("Content-Length", "0")], [])
        except HTTPError as exc:
            await self.send_error(exc, scope, receive, send)
            return
        await send(self.start(plan.status, plan.headers))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class GeneratedDownload(Download):
    """Generated content (an async or sync iterable of bytes) with a file download's headers; with `size`,
    Content-Length (exactly `size` bytes are sent, or the transfer is aborted), else chunked. No validators
    or ranges: the bytes are made anew for every request. `headers`, `background`, `status_code` as in Download."""

    def __init__(
        self, content: AsyncIterable[bytes] | Iterable[bytes], *, filename: str, media_type: str | None = None,
        size: int | None = None, disposition: str = "attachment", cache_control: str = "no-store", headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None, rate_limit: int | None = None, stall_timeout_s: float | None = None,
    ) -> None:
        super().__init__(disposition, headers, background)
        self.content = content
        self.filename = filename
        self.media_type = media_type or media_type_for(filename, _MEDIA_TYPES)
        self.size = size
        self.cache_control = cache_control
        self.rate_limit = rate_limit
        self.stall_timeout_s = stall_timeout_s

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        requested = request_headers(scope)
        headers = download_headers(
            media_type=self.media_type, disposition=disposition_for(self.filename, self.disposition, requested),
            cache_control=self.cache_control, accept_ranges="none",
        )
        if self.size is not None:
            headers.append(("Content-Length", str(self.size)))
        headers += coding_guard(requested.get("accept-encoding"))
        # Generated content has no validator: If-Match fails unless it is "*", and
        # If-None-Match: * answers 304 (RFC 9110 §13.1.1, §13.1.2); dates can't apply.
        tags = {k: v for k, v in requested.items() if k in ("if-match", "if-none-match")}
        self.status_code = evaluate_preconditions(scope["method"], tags, etag="", mtime=0.0) or 200
        chunks = ByteStream(self.content, self.size)
        if self.status_code != 200 or scope["method"] == "HEAD":
            await chunks.aclose()  # never started: its generator's finally has nothing to do
            chunks = ByteStream((), 0)
        if self.status_code == 412:
            await self.send_error(HTTPError(412, "Precondition Failed"), scope, receive, send)
            return
        if self.status_code == 304:
            await send(self.start(304, [("Cache-Control", no_transform(self.cache_control))]))
            await send({"type": "http.response.body", "body": b""})
            return
        await send_body(send, receive, self.start(200, headers), [chunks], rate_limit=self.rate_limit, stall_timeout_s=self.stall_timeout_s,
                        client=ClientSocket(scope))


def stream_download(
    content: AsyncIterable[bytes] | Iterable[bytes], filename: str, *, media_type: str | None = None, size: int | None = None,
    disposition: str = "attachment", headers: Mapping[str, str] | None = None, background: BackgroundTask | None = None,
) -> GeneratedDownload:
    """Generated content as a download: an async or sync iterator of bytes (a sync one is read in a worker
    thread), a file name, and the media type (default: guessed from the name). With `size`, the response
    carries Content-Length. `background` runs after the response, as with any Starlette Response."""
    return GeneratedDownload(
        content, filename=filename, media_type=media_type, size=size, disposition=disposition, headers=headers, background=background
    )


# Files stored as they are even with ZIP compression on: compressing them again saves nothing.
COMPRESSED_SUFFIXES = frozenset(
    ".zip .gz .tgz .bz2 .xz .zst .7z .rar .jar .apk .whl .epub .docx .xlsx .pptx .odt .jpg .jpeg"
    " .png .gif .webp .avif .heic .mp4 .m4v .mkv .webm .mov .avi .mp3 .m4a .aac .ogg .opus .flac"
    " .woff .woff2 .pdf".split()
)


def _entry_bytes(root: str, listed: ListedFile, *, serve_hidden: bool, chunk_size: int) -> Iterator[bytes]:
    """One ZIP entry's bytes, opened when the stream reaches it; a file gone or resized since aborts."""
    path, size = listed.path, listed.size
    try:
        opened = open_under_root(root, path, serve_hidden=serve_hidden)
    except HTTPError:
        raise TransferAborted("a file of the folder disappeared") from None
    try:
        if opened.info.size != size:
            raise TransferAborted("a file of the folder changed size")
        for start in range(0, size, chunk_size):
            data = os.pread(opened.fd, min(chunk_size, size - start), start)
            if len(data) != min(chunk_size, size - start):
                raise TransferAborted("a file of the folder shrank")
            yield data
    finally:
        os.close(opened.fd)


def coalesced(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """`chunks` joined into pieces of about `size` bytes: zipstream yields a few small pieces per entry, and each
    would cost a worker-thread hop and a send (20,000 tiny files: 16.6 CPU-s before, README: ZIP of a folder)."""
    source, pending, held = iter(chunks), [], 0
    try:
        for chunk in source:
            pending.append(chunk)
            held += len(chunk)
            if held >= size:
                yield b"".join(pending)
                pending, held = [], 0
        if pending:
            yield b"".join(pending)
    finally:
        getattr(source, "close", lambda: None)()  # the entry being read closes its file


def folder_zip(settings: Settings, folder: str, files: Sequence[ListedFile], entry_bytes: Callable[[ListedFile], Iterable[bytes]]) -> GeneratedDownload:
    """The folder (checked, "" for the root) as a ZIP of its `files` (those /download serves there, at most
    MAX_FOLDER_FILES: Service.folder_files), each read by `entry_bytes` when the stream reaches it, built while sent. Entries are stored,
    so the size is known first (Content-Length); with zip_compression they are deflated (chunked), except
    COMPRESSED_SUFFIXES."""
    import zipstream

    compress = settings.zip_compression
    archive = zipstream.ZipStream(compress_type=zipstream.ZIP_DEFLATED if compress else zipstream.ZIP_STORED, sized=not compress)
    for f in files:
        stored = compress and os.path.splitext(f.path)[1].lower() in COMPRESSED_SUFFIXES
        entry = entry_bytes(f)
        arcname = f.path[len(folder) + 1 :] if folder else f.path
        archive.add(entry, arcname, size=f.size, compress_type=zipstream.ZIP_STORED if stored else None)
    name = (folder.rsplit("/", 1)[-1] if folder else settings.root.rstrip("/").rsplit("/", 1)[-1]) or "download"
    return GeneratedDownload(
        coalesced(archive, settings.chunk_size), filename=f"{name}.zip", media_type="application/zip", size=None if compress else len(archive),
        rate_limit=settings.rate_limit, stall_timeout_s=settings.stall_timeout,
    )


# =============================================================================
# 10. App and routes
# =============================================================================
# Endpoints are plain functions of a Request; what an app serves lives in one Service, found through
# request.app (the innermost app, so mounted too). create_app only assembles. Every error a client
# can cause, ours or Starlette's (404 no route, 405 with Allow), leaves as JSON by error_response.

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGE_ASSETS = ("app.js", "style.css", "screenshot.png")  # all that GET /static/{name} serves


class AnyPath(Convertor):  # type: ignore[type-arg]
    """The rest of the path, line feeds included. Starlette's `path` is `.*`, which stops at a line
    feed, and its `$` matches before a trailing one: `/download/a.txt%0A` would serve `a.txt`."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", AnyPath())


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def encode_cursor(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> str:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True).decode("utf-8")
    except ValueError:
        raise HTTPError(400, "Malformed cursor") from None


def list_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIST_LIMIT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIST_LIMIT:
        raise HTTPError(400, f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    return int(text)


def root_health(root: str) -> str | None:
    try:
        with os.scandir(root) as it:
            next(it, None)
    except OSError:
        return "the download root is not readable"
    return None if os.access(root, os.R_OK | os.X_OK) else "the download root is not readable"


def readable_root(root: str) -> str:
    """The root, or 503 as /healthz says when it can't be read: an empty listing or archive would lie."""
    if root_health(root) is not None:
        raise HTTPError(503, "The download root is not readable", headers={"Retry-After": str(RETRY_AFTER_S)})
    return root


def page_html(blob_limit: int, zip_on: bool) -> bytes | None:
    """static/index.html with the blob limit and /zip switch in its meta tags; None without static/."""
    try:
        with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
            html = f.read()
    except FileNotFoundError:
        return None
    for name, value in (("downloader-blob-limit", str(blob_limit)), ("downloader-zip", "on" if zip_on else "off")):
        html = re.sub(rf'(<meta name="{name}" content=")[^"]*(")', rf"\g<1>{value}\g<2>", html)
    return html.encode("utf-8")


def json_response(content: object, status: int = 200) -> Response:
    body = json.dumps(content, ensure_ascii=False).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json", headers={"Cache-Control": "no-store"})


def open_bucket(url: str, label: str, metrics: Metrics | None = None, *, signing: bool = False) -> Bucket:
    """The bucket at `url`, checked by listing a key; SettingsError (named `label`) saying why it can't be read,
    or (`signing`: redirect mode) that its URLs can't be signed."""
    try:
        bucket = Bucket(url, os.environ, on_error=None if metrics is None else metrics.upstream_error)
    except BucketError as exc:
        raise SettingsError(label, f"{url}: {exc}") from None
    if signing and not (bucket.access_key and bucket.secret_key):
        raise SettingsError("s3_mode", "redirect signs URLs itself: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set")
    try:
        bucket.check()
    except BucketError as exc:
        raise SettingsError(label, f"{url}: {exc}") from None
    return bucket


def open_catalog(location: str, label: str) -> Catalog:
    """The catalog at `location` (a file or a postgresql:// URL); SettingsError (named `label`) for one
    that can't be opened or reached."""
    try:
        return Catalog(location)
    except ValueError as exc:
        raise SettingsError(label, str(exc)) from None
    except CatalogError as exc:
        raise SettingsError(label, f"can't open the catalog: {exc}") from None


class Service:
    """The settings of one app, and what is built from them once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = open_catalog(settings.catalog, "catalog") if settings.catalog else None
        self.metrics = Metrics() if settings.metrics else None
        self.bucket = open_bucket(settings.root, "root", self.metrics, signing=settings.s3_mode == "redirect") if settings.is_bucket else None
        self.digests = None
        if settings.digests and not settings.is_bucket:
            self.digests = Digests(settings.root, cache=settings.digest_cache, rate=settings.hash_rate, serve_hidden=settings.serve_hidden)
        self.log = open_access_log(settings.access_log)
        # /zip has no signature or per-file hook check: it exists only where anyone may list.
        self.zip_on = settings.listing_on and not settings.secret and settings.authorize is None
        self.page = page_html(settings.blob_limit, self.zip_on)
        self.in_flight = 0  # requests inside Operations
        self.active_zips = 0
        self.catalog_threads = anyio.CapacityLimiter(CATALOG_THREADS)

    async def zip_done(self) -> None:  # in the event loop, as the count goes up there
        self.active_zips -= 1

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """At shutdown, lets the requests the server cancelled end (and log) first, then closes the
        catalog's idle connections and stops the hasher. At start-up the digest cache is read (the first requests
        have the digests of a previous run) and hashing starts; without a lifespan, both at the first download."""
        if self.digests is not None:
            await anyio.to_thread.run_sync(self.digests.load)
            self.digests.start()
        yield
        with anyio.move_on_after(DRAIN_S):
            while self.in_flight:
                await anyio.sleep(0.01)
        if self.catalog is not None:
            self.catalog.close()
        if self.digests is not None:
            await anyio.to_thread.run_sync(self.digests.close)

    def file_response(self, request: Request, path: str, **options: object) -> DownloadResponse:
        config = self.settings
        if self.bucket is not None:
            return ObjectResponse(
                path, bucket=self.bucket, redirect_ttl=config.s3_url_ttl if config.s3_mode == "redirect" else None,
                serve_hidden=config.serve_hidden, cache_control=config.cache_control, chunk_size=config.chunk_size,
                authorize=file_check(config.authorize, request), rate_limit=config.rate_limit, stall_timeout_s=config.stall_timeout,
                **options,
            )
        return DownloadResponse(
            path, root=config.root, serve_hidden=config.serve_hidden, cache_control=config.cache_control,
            chunk_size=config.chunk_size, authorize=file_check(config.authorize, request), rate_limit=config.rate_limit,
            stall_timeout_s=config.stall_timeout, offload_prefix=config.offload_prefix if config.offload else None,
            root_is_real=True, digests=self.digests,  # the root resolved once by make_settings
            **options,  # type: ignore[arg-type]
        )

    async def check_listing(self, request: Request) -> None:
        """404 with the reason where listing is off; else the authorize hook decides (file=None)."""
        if not self.settings.listing_on:
            if self.settings.secret:
                raise HTTPError(404, "The listing is off: downloads need signed links (DOWNLOADER_SECRET). DOWNLOADER_LISTING=true lists files with signed links")
            raise HTTPError(404, "The listing is switched off (DOWNLOADER_LISTING=false)")
        if self.settings.authorize is not None:
            await call_authorize(self.settings.authorize, request, None)

    async def catalog_call(self, call: Callable[..., Any], *args: object) -> Any:
        """call(*args) on the catalog in one of CATALOG_THREADS threads; 503 with Retry-After when the catalog
        fails, or no thread frees within CATALOG_TIMEOUT_S. The drivers give up within CATALOG_TIMEOUT_S too
        (SQLite's lock wait; PostgreSQL's connect, statement, lock and TCP timeouts), so a failure is never
        abandoned: a write the client was told failed can't land later. Only a database server that stops
        answering altogether is left behind, after CATALOG_ABANDON_S: the call ends in its thread, which it
        keeps till then (so such a server holds CATALOG_THREADS threads, no more)."""
        threads, borrower = self.catalog_threads, object()
        release = functools.partial(threads.release_on_behalf_of, borrower)
        lock, state = threading.Lock(), {"began": False, "ended": False, "caller_gone": False}

        def run() -> Any:
            with lock:
                if state["caller_gone"]:
                    return None  # the caller left before this began, and freed its thread
                state["began"] = True
            try:
                return call(*args)
            finally:
                with lock:
                    state["ended"] = True
                    left_behind = state["caller_gone"]
                if left_behind:  # the caller gave up on this call: its thread is freed here
                    try:
                        anyio.from_thread.run_sync(release)
                    except RuntimeError:  # its event loop has finished: nothing else touches the limiter now
                        release()

        try:
            with anyio.fail_after(CATALOG_TIMEOUT_S):
                await threads.acquire_on_behalf_of(borrower)
        except TimeoutError:
            raise catalog_unavailable() from None
        try:
            with anyio.fail_after(CATALOG_ABANDON_S):
                return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except (TimeoutError, CatalogError) as exc:
            raise catalog_unavailable() from exc
        finally:
            with lock:
                state["caller_gone"] = True
                still_running = state["began"] and not state["ended"]
            if not still_running:
                release()

    def claim_gate(self, link_id: str, holder: str | None, held: bool) -> Gate:
        """The gate of a catalog download: Catalog.claim through catalog_call (503 when the catalog fails)."""
        assert self.catalog is not None
        return functools.partial(self.catalog_call, functools.partial(self.catalog.claim, link_id, holder, held=held))

    async def holds(self, request: Request, link: Link, holder: str) -> bool:
        """Whether the client a used-up link's last download went to may have these ranges of it (Catalog.holds):
        only ranges, never the whole file anew, and no more than one file's worth in all."""
        value = request.headers.get("range")
        if value is None or self.catalog is None:
            return False
        try:
            size = (await self.file_info(link.path, serve_hidden=True)).size
            ranges = parse_range(value, size)
        except HTTPError:
            return False
        wanted = size if ranges is None else sum(r.length for r in ranges)
        return bool(await self.catalog_call(self.catalog.holds, link.id, holder, wanted, size))

    async def file_info(self, path: str, *, serve_hidden: bool | None = None) -> FileInfo:
        """What /download would serve at `path` (HTTPError if nothing): the CLI's sign and add, the admin API, holds."""
        hidden = self.settings.serve_hidden if serve_hidden is None else serve_hidden
        if self.bucket is not None:
            return await self.bucket.head(path, serve_hidden=hidden)

        def stat() -> FileInfo:
            opened = open_under_root(self.settings.root, path, serve_hidden=hidden)
            os.close(opened.fd)
            return opened.info

        return await anyio.to_thread.run_sync(stat)

    async def list_files(self, *, after: str, limit: int, folder: str = "", bounded: bool = True) -> tuple[list[ListedFile], str | None]:
        """Up to `limit` files /download serves (below `folder`), after the path `after` in listing order, and the
        path the next page starts after (None: the last page). 503 when the root can't be read, 502/504 when the
        bucket fails (Bucket.list_page: LIST_SCAN_KEYS at most when `bounded`)."""
        config = self.settings
        if self.bucket is not None:
            return await self.bucket.list_page(after, limit, folder=folder, serve_hidden=config.serve_hidden, bounded=bounded)

        def walk() -> tuple[list[ListedFile], str | None]:
            files = list(itertools.islice(walk_files(readable_root(config.root), folder=folder, after=after, serve_hidden=config.serve_hidden), limit + 1))
            return (files[:limit], files[limit - 1].path) if len(files) > limit else (files, None)

        return await anyio.to_thread.run_sync(walk)

    async def resolve_folder(self, url_path: str) -> str:
        """The folder `url_path` names ("" for the root), else 404; in a bucket, one that an object /download
        serves is in."""
        config = self.settings
        if self.bucket is None:
            return await anyio.to_thread.run_sync(lambda: resolve_folder(readable_root(config.root), url_path, serve_hidden=config.serve_hidden))
        folder = url_path.rstrip("/")
        if folder:
            split_url_path(folder)  # 400 for a NUL
            if not servable_key(folder, config.serve_hidden) or not (await self.list_files(after="", limit=1, folder=folder, bounded=False))[0]:
                raise not_found()
        return folder

    def digest_of(self, listed: ListedFile) -> bytes | None:
        """A listed file's SHA-256, None while unknown or never (a bucket's)."""
        if self.digests is None:
            return None
        return self.digests.lookup(listed.identity)  # (a listing asks for no hashing: the walk gets to it)

    async def folder_files(self, url_path: str) -> tuple[str, list[ListedFile]]:
        """The folder `url_path` names (resolve_folder) and every file /download serves in it, in path order, for
        /zip and /sha256sums: 413 beyond MAX_FOLDER_FILES, before any is read."""
        folder = await self.resolve_folder(url_path)
        files, _ = await self.list_files(after="", limit=MAX_FOLDER_FILES + 1, folder=folder, bounded=False)
        if len(files) > MAX_FOLDER_FILES:
            raise HTTPError(413, f"The folder holds more than {MAX_FOLDER_FILES} files")
        return folder, files

    def check_admin(self, request: Request) -> Catalog:
        """The catalog, once the bearer token checks out; 404 where there is no admin API."""
        if self.catalog is None or self.settings.admin_token is None:
            raise not_found()
        check_bearer(request, self.settings.admin_token)
        return self.catalog


def catalog_unavailable() -> HTTPError:
    return HTTPError(503, "The link catalog is unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def service_of(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


async def call_authorize(authorize: Callable[..., object], request: Request, info: FileInfo | None) -> None:
    """Calls the host's `authorize(request, file)`, a sync one in a worker thread (it may block). Only
    True allows; anything else is 403, failing closed. For 401, the hook raises HTTPError(401, ...)."""
    if inspect.iscoroutinefunction(authorize) or inspect.iscoroutinefunction(getattr(authorize, "__call__", None)):
        allowed = await authorize(request, info)  # type: ignore[misc]
    else:
        allowed = await anyio.to_thread.run_sync(authorize, request, info)
    if allowed is not True:
        raise HTTPError(403, "Forbidden")


def file_check(authorize: Callable[..., object] | None, request: Request) -> Callable[[FileInfo | None], Awaitable[None]] | None:
    return None if authorize is None else functools.partial(call_authorize, authorize, request)


def check_bearer(request: Request, token: str) -> None:
    """401 with WWW-Authenticate unless `Authorization: Bearer <token>` (constant-time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPError(401, "A valid bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="downloader"'})


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


async def read_link_request(request: Request, now: float) -> tuple[str, dict[str, object]]:
    """The file and the Catalog.add options of a POST /api/links body: path (required), ttl or expires_at,
    max_downloads, name (link_options); 400 naming the field."""
    try:
        body = json.loads(await request.body(), parse_constant=_no_constant)  # no NaN or Infinity
    except ValueError:
        raise HTTPError(400, "The body must be JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise HTTPError(400, "path (a string) is required")
    unknown = set(body) - {"path", "ttl", "expires_at", "max_downloads", "name"}
    if unknown:
        raise HTTPError(400, f"unknown fields: {', '.join(sorted(unknown))}")
    try:
        expires_at, max_downloads, name = link_options(**{k: v for k, v in body.items() if k != "path"}, now=now)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    return body["path"], {"expires_at": expires_at, "max_downloads": max_downloads, "name": name}


def link_json(link: Link, prefix: str) -> dict[str, object]:
    shown = link.as_json()
    shown["created"] = rfc3339(link.created)
    shown["expires_at"] = None if link.expires_at is None else rfc3339(link.expires_at)
    return {**shown, "url": f"{prefix}/files/{link.id}"}


async def download(request: Request) -> Response:
    service = service_of(request)
    path = request.path_params["path"]
    if service.settings.secret:
        verify_link(path, request.query_params, service.settings.secret, time.time())
    return service.file_response(request, path)


async def file_by_id(request: Request) -> Response:
    service = service_of(request)
    if service.catalog is None:
        raise not_found()
    link_id, now = request.path_params["id"], time.time()
    holder = link_holder(request.client.host if request.client else None, request.headers.get("user-agent", ""))
    link = await service.catalog_call(service.catalog.get, link_id)
    held = bool(link and holder and link_state(link, now) == "used-up" and await service.holds(request, link, holder))
    if not held:
        check_link(link, now)
    return service.file_response(request, link.path, filename=link.name, gate=service.claim_gate(link_id, holder, held))


async def zip_folder(request: Request) -> Response:
    service = service_of(request)
    if not service.zip_on:
        raise not_found()
    if service.active_zips >= MAX_ACTIVE_ZIPS:  # archives cost CPU per file: a few at a time
        raise HTTPError(503, "Too many archives in progress", headers={"Retry-After": str(RETRY_AFTER_S)})
    config = service.settings
    service.active_zips += 1
    try:
        folder, files = await service.folder_files(request.path_params["folder"])
        bucket = service.bucket
        if bucket is None:
            entry_bytes = functools.partial(_entry_bytes, config.root, serve_hidden=config.serve_hidden, chunk_size=config.chunk_size)
        else:
            entry_bytes = functools.partial(object_entry, bucket, chunk_size=config.chunk_size)
        archive = await anyio.to_thread.run_sync(folder_zip, config, folder, files, entry_bytes)  # a loop over up to MAX_FOLDER_FILES
    except BaseException:
        service.active_zips -= 1
        raise
    archive.background = BackgroundTask(service.zip_done)  # runs once it is sent, or the client left
    return archive


async def list_files(request: Request) -> Response:
    service = service_of(request)
    await service.check_listing(request)
    config = service.settings
    limit = list_limit(request.query_params.get("limit"))
    after = decode_cursor(request.query_params.get("cursor", ""))
    files, after_last = await service.list_files(after=after, limit=limit)
    next_cursor = None if after_last is None else encode_cursor(after_last)
    prefix = request.scope.get("root_path", "")
    now = time.time()

    def url(path: str) -> str:
        if config.secret:  # the listing was switched on explicitly: hand out signed links
            return sign_url(path, secret=config.secret, expires_in=LISTING_LINK_TTL_S, prefix=prefix, now=now)
        return f"{prefix}/download/{urllib.parse.quote(path)}"

    items = [
        {"name": f.path.rsplit("/", 1)[-1], "path": f.path, "size": f.size, "modified": rfc3339(f.mtime),
         "content_type": media_type_for(f.path, _MEDIA_TYPES), "url": url(f.path), "sha256": digest and digest.hex()}
        for f, digest in zip(files, map(service.digest_of, files))
    ]
    return json_response({"files": items, "next_cursor": next_cursor})


async def sha256sums(request: Request) -> Response:
    """SHA256SUMS of a folder: `sha256sum -c` checks the files fetched into one directory. Files whose digest is
    not yet known are left out (the walk gets to them); Digests-Pending says how many. Open where the listing is."""
    service = service_of(request)
    await service.check_listing(request)
    if service.digests is None:
        raise HTTPError(404, "No digests: objects are not hashed" if service.bucket else "Digests are switched off (DOWNLOADER_DIGESTS=false)")
    folder, files = await service.folder_files(request.path_params["folder"])

    def lines() -> list[bytes]:
        named = [(service.digest_of(f), f.path[len(folder) + 1 :] if folder else f.path) for f in files]
        return [sha256sum_line(digest, name).encode() for digest, name in named if digest is not None]

    known = await anyio.to_thread.run_sync(lines)  # up to MAX_FOLDER_FILES lookups
    return stream_download(
        coalesced(known, service.settings.chunk_size), "SHA256SUMS", media_type="text/plain; charset=utf-8",
        size=sum(map(len, known)), headers={"Digests-Pending": str(len(files) - len(known))},
    )


async def list_links(request: Request) -> Response:
    service = service_of(request)
    catalog = service.check_admin(request)
    prefix = request.scope.get("root_path", "")
    return json_response({"links": [link_json(link, prefix) for link in await service.catalog_call(catalog.list)]})


async def create_link(request: Request) -> Response:
    service = service_of(request)
    catalog = service.check_admin(request)
    path, options = await read_link_request(request, time.time())

    await service.file_info(path)
    link = await service.catalog_call(functools.partial(catalog.add, path, **options))
    return json_response(link_json(link, request.scope.get("root_path", "")), status=201)


async def revoke_link(request: Request) -> Response:
    service = service_of(request)
    catalog = service.check_admin(request)
    if not await service.catalog_call(catalog.revoke, request.path_params["id"]):
        raise HTTPError(404, "Unknown download link")
    return Response(status_code=204)


async def healthz(request: Request) -> Response:
    service = service_of(request)
    if service.bucket is not None:
        problem = await service.bucket.check_async()
    else:
        problem = await anyio.to_thread.run_sync(root_health, service.settings.root)
    if problem is None and service.catalog is not None:
        try:
            await service.catalog_call(service.catalog.check)
        except HTTPError:
            problem = "the link catalog can't be read and written"
    if problem is not None:
        return json_response({"status": "unavailable", "detail": problem}, status=503)
    return json_response({"status": "ok"})


async def metrics_text(request: Request) -> Response:
    metrics = service_of(request).metrics
    if metrics is None:
        raise not_found()
    body = await anyio.to_thread.run_sync(metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8", headers={"Cache-Control": "no-store"})


async def index(request: Request) -> Response:
    service = service_of(request)
    await service.check_listing(request)
    if service.page is None:
        raise HTTPError(404, "The download page is not installed: static/ is missing beside downloader.py")
    return Response(service.page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in PAGE_ASSETS:
        raise not_found()
    return DownloadResponse(os.path.join(STATIC_DIR, name), disposition="inline")


async def http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPError):
        return error_response(exc)
    assert isinstance(exc, StarletteHTTPException)
    return error_response(HTTPError(exc.status_code, exc.detail, exc.headers))


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(HTTPError(500, "Internal Server Error"))


ROUTES = [
    Route("/download/{path:anypath}", download, methods=["GET", "HEAD"]),
    Route("/files/{id}", file_by_id, methods=["GET", "HEAD"]),
    Route("/zip/{folder:anypath}", zip_folder, methods=["GET", "HEAD"]),
    Route("/api/files", list_files, methods=["GET", "HEAD"]),
    Route("/sha256sums/{folder:anypath}", sha256sums, methods=["GET", "HEAD"]),
    Route("/api/links", list_links, methods=["GET"]),
    Route("/api/links", create_link, methods=["POST"]),
    Route("/api/links/{id}", revoke_link, methods=["DELETE"]),
    Route("/", index, methods=["GET", "HEAD"]),
    Route("/static/{name}", asset, methods=["GET", "HEAD"]),
    Route("/healthz", healthz, methods=["GET", "HEAD"]),
    Route("/metrics", metrics_text, methods=["GET"]),
]

DOWNLOAD_ROUTES = ("/download/", "/files/", "/zip/")  # downloads: capped and measured
UNLOGGED_ROUTES = ("/healthz", "/metrics")  # probes and scrapes, every few seconds: not in the access log
JSON_LINE_BREAKS = re.compile("[\x80-\x9f\u2028\u2029]")  # json.dumps leaves C1 controls and U+2028/9 raw: escaped,
# so that no client-chosen path can break a log line for a reader that splits on them


class Metrics:
    """Prometheus metrics of downloads; with PROMETHEUS_MULTIPROC_DIR (`--workers N`) a scrape sums all workers."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("downloader_requests", "Download requests by status", ["status"], registry=self.registry)
        self.sent = prom.Counter("downloader_sent_bytes", "Body bytes handed to the server", registry=self.registry)
        self.active = prom.Gauge("downloader_active_downloads", "Downloads in progress", registry=self.registry, multiprocess_mode="livesum")
        self.duration = prom.Histogram("downloader_download_seconds", "Time from request to last byte", registry=self.registry, buckets=DURATION_BUCKETS_S)
        self.by_status: dict[int, object] = {}  # labels() looks the child up anew each time
        self.upstream = prom.Counter("downloader_upstream_errors", "Object store failures by kind: failed, timeout, changed", ["kind"], registry=self.registry)

    def count(self, status: int, sent: int, duration: float) -> None:
        child = self.by_status.get(status)
        if child is None:
            child = self.by_status[status] = self.requests.labels(str(status))
        child.inc()  # type: ignore[attr-defined]
        if sent:
            self.sent.inc(sent)
        self.duration.observe(duration)

    def upstream_error(self, kind: str) -> None:
        self.upstream.labels(kind).inc()

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return self.prom.generate_latest(self.registry)
        from prometheus_client import multiprocess

        folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        for pid in {int(m.group(1)) for name in os.listdir(folder) if (m := re.fullmatch(r"gauge_live\w+_(\d+)\.db", name))}:
            if not process_alive(pid):  # a worker killed mid-download: its downloads are not active
                multiprocess.mark_process_dead(pid, folder)
        registry = self.prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return self.prom.generate_latest(registry)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Operations:
    """ASGI middleware: a JSON access-log line per request saying how it ended; for downloads the cap (503,
    Retry-After) and metrics. It counts the bytes handed to the server (with zerocopysend, those the kernel
    took): an aborted transfer logs what was sent."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.cap = service.settings.max_active_downloads
        self.metrics = service.metrics
        self.log = service.log
        self.active = 0  # downloads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "")[len(scope.get("root_path", "")) :]
        is_download = route.startswith(DOWNLOAD_ROUTES)
        if is_download and self.cap is not None and self.active >= self.cap:
            busy = HTTPError(503, "Too many downloads in progress", headers={"Retry-After": str(RETRY_AFTER_S)})
            await error_response(busy)(scope, receive, send)
            self.record(scope, route, 503, 0, 0.0, None)
            return
        status, sent, began, aborted, complete = 0, 0, time.monotonic(), None, False

        async def counting_send(message: Message) -> None:
            nonlocal status, sent, complete
            try:
                await send(message)
            except BaseException as exc:  # our server says how much of a zerocopysend went out
                sent += getattr(exc, "sent_bytes", 0)
                raise
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            elif message["type"] == ZEROCOPY:
                sent += message["count"]
                complete = not message.get("more_body", False)

        self.active += is_download
        self.service.in_flight += 1
        if is_download and self.metrics:
            self.metrics.active.inc()
        try:
            await self.app(scope, receive, counting_send)
            if not complete:
                aborted = "the client disconnected"
        except TransferAborted as exc:
            aborted = str(exc)
            raise
        except asyncio.CancelledError:
            aborted = "the server shut down"  # past the grace period
            raise
        except Exception as exc:  # a bug: Starlette answers 500 when nothing was sent yet
            status, aborted = status or 500, f"server error: {type(exc).__name__}"
            raise
        finally:
            self.active -= is_download
            self.service.in_flight -= 1
            if is_download and self.metrics:
                self.metrics.active.dec()
            self.record(scope, route, status, sent, time.monotonic() - began, aborted)

    def record(self, scope: Scope, route: str, status: int, sent: int, duration: float, aborted: str | None) -> None:
        if self.metrics and route.startswith(DOWNLOAD_ROUTES):
            self.metrics.count(status, sent, duration)
        if self.log is None or route in UNLOGGED_ROUTES:
            return
        headers = request_headers(scope)
        client = scope.get("client")
        line = {
            "time": rfc3339(time.time()), "method": scope.get("method"),
            "path": scope.get("path"),  # as requested, any mount prefix included
            "status": status, "bytes": sent, "range": headers.get("range"), "duration_s": round(duration, 6),
            "client": f"{client[0]}:{client[1]}" if client else None, "user_agent": headers.get("user-agent"),
        }
        if aborted is not None:
            line["aborted"] = aborted
        self.log.write(JSON_LINE_BREAKS.sub(lambda c: f"\\u{ord(c.group()):04x}", json.dumps(line, ensure_ascii=False)) + "\n")
        self.log.flush()


def open_access_log(target: str) -> TextIO | None:
    if target == "off":
        return None
    if target == "-":
        return sys.stdout
    return open(target, "a", buffering=1, encoding="utf-8")


def create_app(root: str | os.PathLike[str] | None = None, **settings: object) -> Starlette:
    """The whole service as a Starlette app, mountable under any prefix.

    `root` is the directory served (default: the sample files); every other keyword is a field of
    Settings (README: Configuration). Raises SettingsError for a bad value."""
    values = dict(settings)
    if root is not None:
        values["root"] = root
    service = Service(make_settings(values))
    handlers = {HTTPError: http_error, StarletteHTTPException: http_error, Exception: server_error}
    app = Starlette(routes=ROUTES, lifespan=service.lifespan, exception_handlers=handlers)
    app.router.redirect_slashes = False  # its 307 is built from the client's Host header: /download is a 404
    app.add_middleware(Operations, service=service)
    app.state.service = service
    return app


# =============================================================================
# 11. Server protocol
# =============================================================================
# downloader:HTTPProtocol is uvicorn's HTTP/1.1 protocol (httptools, else h11) with what a
# file server needs and uvicorn lacks. It offers ASGI's http.response.zerocopysend on
# plain-text connections and sends it with os.sendfile straight onto the socket, once
# the transport's own buffer is empty. uvicorn's framing (Content-Length, chunked, h11's
# state) counts the bytes as if it had written them. A send makes progress or times out:
# no byte taken for the message's `stall_timeout` (our key; none: no limit) aborts the
# connection. HeadGuard bounds request heads in size and time, as uvicorn doesn't.

UVICORN_TESTED = ((0, 36), (0, 54))  # the uvicorn versions HTTPProtocol is tested with; before 0.36, `--http` takes no class path


class SendfileAborted(TransferAborted):
    """A zerocopysend cut short (the file shrank, the client stalled); `sent_bytes` went out first."""


class ClientGone(ConnectionError):
    """The client left during a zerocopysend (ASGI 2.4: an OSError); `sent_bytes` went out first."""


SOCKET_POLL_S = (0.001, 0.1)  # a full socket is tried again next turn, after 1 ms, then ever twice as long, up to 100 ms (Backoff)


class FileSpan:
    """Stands for `count` bytes of a file in h11's framing: h11 only asks its length (send_with_data_passthrough)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


def page_cached(fd: int, offset: int) -> bool:
    """Whether the page cache holds the byte at `offset` (preadv RWF_NOWAIT, one byte); True when unknown."""
    if not RWF_NOWAIT:
        return True
    try:
        os.preadv(fd, [bytearray(1)], offset, RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


class ZeroCopyMixin:
    """The zerocopysend of one uvicorn HTTP protocol class (set up in connection_made)."""

    transport: asyncio.Transport
    flow: Any
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")
        self.tcp_fd = -1 if sock is None else sock.fileno()  # TLS too: for the stall timer (CONNECTION_SOCKET)
        self.socket_fd = -1 if transport.get_extra_info("sslcontext") else self.tcp_fd

    def offer_zerocopy(self) -> None:
        """Called once a request's cycle exists: the scope offers the extension, the cycle's send takes it."""
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is None or getattr(cycle, "zerocopy_offered", False) or self.tcp_fd < 0:
            return
        cycle.zerocopy_offered = True
        cycle.scope.setdefault("extensions", {})[CONNECTION_SOCKET] = {"fd": self.tcp_fd}
        if self.socket_fd < 0:
            return  # TLS: the kernel can't encrypt
        cycle.scope["extensions"][ZEROCOPY] = {}
        send_other = cycle.send

        async def send(message: Message) -> None:
            if message["type"] != ZEROCOPY:
                return await send_other(message)
            if not cycle.response_started or cycle.response_complete:
                raise RuntimeError(f"Unexpected ASGI message '{ZEROCOPY}' sent, before the response started or after it completed.")
            if cycle.disconnected:
                raise ClientGone("the client is gone")
            file = message["file"]
            fd = file if isinstance(file, int) else file.fileno()
            offset = os.lseek(fd, 0, os.SEEK_CUR) if message.get("offset") is None else message["offset"]
            count = os.fstat(fd).st_size - offset if message.get("count") is None else message["count"]
            if count > 0 and cycle.scope["method"] != "HEAD":
                before, after = self.framing(cycle, count)
                if before:
                    self.transport.write(before)
                try:
                    await self.sendfile(fd, offset, count, message.get("stall_timeout"))
                except ClientGone:
                    cycle.disconnected = True  # as connection_lost will say: an app that returns now did no wrong
                    raise
                if after:
                    self.transport.write(after)
            if not message.get("more_body", False):
                await send_other({"type": "http.response.body", "body": b"", "more_body": False})

        cycle.send = send

    @staticmethod
    def framing(cycle: Any, count: int) -> tuple[bytes, bytes]:
        """The bytes around `count` body bytes, with uvicorn's own accounting of the body (Content-Length, chunked)."""
        if hasattr(cycle, "conn"):  # h11: it frames and counts, we write
            import h11

            parts = cycle.conn.send_with_data_passthrough(h11.Data(data=FileSpan(count)))
            at = next(i for i, part in enumerate(parts) if isinstance(part, FileSpan))
            return b"".join(parts[:at]), b"".join(parts[at + 1 :])
        if cycle.chunked_encoding:
            return b"%x\r\n" % count, b"\r\n"
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        cycle.expected_content_length -= count
        return b"", b""

    async def sendfile(self, fd: int, offset: int, count: int, stall_timeout: float | None) -> None:
        """`count` bytes of `fd` from `offset` onto the socket, after all the transport holds. A page not in the
        page cache is sent from a worker thread, so that the event loop never waits for the disk."""
        sent, full = 0, Backoff(stall_timeout)
        try:
            while sent < count:
                if self.transport.is_closing():  # its descriptor may be closed, and the number reused
                    raise ClientGone("the client is gone")
                if buffered := self.transport.get_write_buffer_size():  # the head, a multipart boundary: first
                    await full.wait(buffered)
                    continue
                at, size = offset + sent, min(count - sent, SENDFILE_MAX_CHUNK)
                try:
                    if page_cached(fd, at):
                        moved = os.sendfile(self.socket_fd, fd, at, size)
                    else:
                        moved = await sendfile_in_thread(self.socket_fd, fd, at, size)
                except BlockingIOError:
                    await full.wait()
                    continue
                if moved == 0:
                    raise SendfileAborted("file shrank while being sent")
                sent += moved
                full = Backoff(stall_timeout)
                if moved == SENDFILE_MAX_CHUNK:
                    await asyncio.sleep(0)  # other connections' turn
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = SendfileAborted(f"the client read nothing for {stall_timeout} s")
            elif isinstance(exc, OSError):
                exc = ClientGone("the client is gone")
            exc.sent_bytes = sent  # type: ignore[attr-defined]
            if not self.transport.is_closing():
                self.transport.abort()  # the body can't be completed: the connection goes
            raise exc from None


class Backoff:
    """Waits on a full socket, ever longer (SOCKET_POLL_S), and tells a stall from a slow client. The kernel
    says "writable" only once half its send queue has drained, which a slow reader may take minutes to do,
    and waiting for it through a dup's add_writer made libuv spin; so the socket is polled. A socket takes
    more as soon as the client acknowledges some, so progress is bytes moved: each sendfile that moves any
    starts a new Backoff, and so does the transport's buffer shrinking. Only none for `stall_timeout`
    seconds is a stall (TimeoutError)."""

    def __init__(self, stall_timeout: float | None) -> None:
        self.stall_timeout = stall_timeout
        self.delay, self.since, self.buffered = 0.0, time.monotonic(), -1  # first one turn of the loop: uvloop writes then

    async def wait(self, buffered: int = 0) -> None:
        was, self.buffered = self.buffered, buffered
        if 0 <= buffered < was:  # the transport wrote some of what it held
            self.since = time.monotonic()
        elif self.stall_timeout is not None and time.monotonic() - self.since >= self.stall_timeout:
            raise TimeoutError
        await asyncio.sleep(self.delay)
        self.delay = min(max(2 * self.delay, SOCKET_POLL_S[0]), SOCKET_POLL_S[1])


async def sendfile_in_thread(socket_fd: int, fd: int, offset: int, count: int) -> int:
    """os.sendfile in a worker thread, onto a dup of the socket: the transport may close its own meanwhile."""
    out = os.dup(socket_fd)
    try:
        return await anyio.to_thread.run_sync(os.sendfile, out, fd, offset, count)
    finally:
        os.close(out)


class HeadTooLarge(Exception):
    """Raised from httptools' callbacks once a request head passes MAX_HEAD_BYTES: the parser stops there."""


class HeadGuard:
    """Bounds the request heads of one uvicorn HTTP protocol, which has no limit of its own. Size: httptools'
    callbacks count each head's request line and fields, pipelined ones too, and past MAX_HEAD_BYTES the parse
    stops and the answer is 431 (h11 keeps its own 16 KiB limit: uvicorn's 400). Time: a head must be complete
    HEAD_TIMEOUT_S after the connection opened or after its first byte came, else the connection closes, with
    408 if part of it came (idle keep-alive is uvicorn's timeout_keep_alive). A head is complete once the
    parser has made a new request cycle."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    logger: logging.Logger

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.refused, self.refuse_after, self.in_head, self.head_size, self.head_bytes = False, False, False, 0, 0
        self.head_timer = None
        self.await_head(started=False)  # uvicorn times nothing until a first response

    def await_head(self, started: bool) -> None:
        self.head_of, self.head_started = self.cycle, started
        self.head_timer: asyncio.TimerHandle | None = self.loop.call_later(HEAD_TIMEOUT_S, self.head_timed_out)

    def head_done(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering after a 431: dropped
        if self.head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self.await_head(started=True)  # the first byte of the next head (a pipelined one came earlier)
        elif self.head_timer is not None:
            self.head_started = True
        if self.in_head:  # a field httptools keeps until its line ends: bounded by the bytes fed mid-head
            self.head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES and not self.refused:
            self.head_size = self.head_bytes
            self.send_400_response("")
        if self.head_timer is not None and self.cycle is not self.head_of:
            self.head_done()

    # httptools' callbacks (h11's protocol has none): each head's size, whatever the connection is doing
    def on_message_begin(self) -> None:
        self.in_head, self.head_size, self.head_bytes = True, 0, 0
        super().on_message_begin()  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self.count_head(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count_head(len(name) + len(value) + 4)
        super().on_header(name, value)  # type: ignore[misc]

    def count_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge  # httptools stops; uvicorn answers a parser error with send_400_response

    def send_400_response(self, msg: str) -> None:
        if self.head_size <= MAX_HEAD_BYTES:
            return super().send_400_response(msg)  # type: ignore[misc,no-any-return]
        self.logger.warning("Request head over %d bytes: 431", MAX_HEAD_BYTES)
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined behind a running response:
            self.refused, self.refuse_after = True, True  # nothing more is read; the 431 follows that response
        else:
            self.refuse(431, "Request Header Fields Too Large")

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.refuse_after:
            self.refuse(431, "Request Header Fields Too Large")

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_done()
        super().connection_lost(exc)  # type: ignore[misc]

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.cycle is not self.head_of or self.transport.is_closing():
            return  # (a head completed in the same turn)
        if self.head_started:
            self.refuse(408, "Request Timeout")
        else:
            self.transport.close()  # a connection that never sent a byte

    def refuse(self, status: int, detail: str) -> None:
        """An answer that no request reached the app for, then the connection closes; after a 431, once
        the client closes or LINGER_S have passed, dropping what it still sends meanwhile."""
        self.head_done()
        self.refused = True
        body = json.dumps({"detail": detail}).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, detail.encode())]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]  # type: ignore[attr-defined]
        self.transport.write(b"".join(head) + b"content-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (len(body), body))
        if status != 431:
            self.transport.close()  # a 408: the client has sent nothing for a while, nothing unread to reset
            return
        if self.transport.can_write_eof():  # (TLS can't: its close waits for the linger all the same)
            self.transport.write_eof()  # the client sees the answer end
        self.loop.call_later(LINGER_S, self.transport.close)


def http_protocol(parser: str = "auto") -> type:
    """downloader:HTTPProtocol for this uvicorn: its httptools protocol (`parser` "auto": h11's without
    httptools) with ZeroCopyMixin. An untested uvicorn is one line and exit 2: this leans on its internals."""
    import uvicorn

    version = tuple(int(part) for part in re.findall(r"\d+", uvicorn.__version__)[:2])
    if not UVICORN_TESTED[0] <= version <= UVICORN_TESTED[1]:
        first, last = (".".join(map(str, v)) for v in UVICORN_TESTED)
        print(f"downloader: HTTPProtocol is tested with uvicorn {first} to {last}.x, not {uvicorn.__version__}; "
              f"pip install 'uvicorn>={first},<0.{UVICORN_TESTED[1][1] + 1}'", file=sys.stderr)
        raise SystemExit(2)
    try:
        if parser == "h11":
            raise ImportError(parser)
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        hook = "on_headers_complete"
    except ImportError:  # no httptools: uvicorn's pure-Python h11 protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
        hook = "handle_events"

    def with_offer(self: Any, *args: Any) -> None:
        getattr(super(protocol, self), hook)(*args)
        self.offer_zerocopy()

    protocol = type("HTTPProtocol", (HeadGuard, ZeroCopyMixin, base), {hook: with_offer, "__module__": __name__})
    return protocol


# =============================================================================
# 12. CLI
# =============================================================================
# `python downloader.py [--root DIR] [--port P] ...`: flags become DOWNLOADER_* variables (reaching
# every worker); all is checked before the URL is announced (a problem: one line naming the flag or
# variable, exit 2), then uvicorn serves `downloader:app` on the bound socket. Also the lazily built
# `app` and `HTTPProtocol` that `uvicorn downloader:app` imports.

SERVER_FLAGS = ("root", *(name.lower() for name in SERVER_VARIABLES))  # stand for DOWNLOADER_*


def as_variable(name: str) -> str:
    """The DOWNLOADER_* variable of a create_app keyword in an error (others stay as they are)."""
    return ENV_PREFIX + name.upper() if name in SETTING_RULES else name


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, but a bad flag is one line and exit 2, like every other bad setting (not a usage screen)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"downloader: {message} (python downloader.py --help)\n")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="downloader.py", description="Serve the files under a directory as downloads.", allow_abbrev=False)
    parser.add_argument("--root", help="directory to serve, or s3://bucket/prefix (DOWNLOADER_ROOT; default: the sample files)")
    parser.add_argument("--host", help="address to listen on (DOWNLOADER_HOST; default 127.0.0.1)")
    parser.add_argument("--port", help="port to listen on, 0 for any free one (DOWNLOADER_PORT; default 8000)")
    parser.add_argument("--workers", help="worker processes (DOWNLOADER_WORKERS; default 1)")
    parser.add_argument("--grace", help=f"seconds in-flight downloads get after SIGTERM (DOWNLOADER_GRACE; default {GRACE_S:g})")
    parser.add_argument("--proxy-headers", action="store_const", const="true", help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips (DOWNLOADER_PROXY_HEADERS)")
    parser.add_argument("--forwarded-allow-ips", help="addresses of trusted proxies, comma-separated (DOWNLOADER_FORWARDED_ALLOW_IPS; default 127.0.0.1)")
    commands = parser.add_subparsers(dest="command", metavar="{sign,add,revoke,list,hash}")
    sign = commands.add_parser("sign", help="print a signed URL for a file (needs DOWNLOADER_SECRET)")
    sign.add_argument("path", help="the file, relative to the root")
    sign.add_argument("--ttl", default="1h", help="how long the link works: 90, 45s, 30m, 1h, 7d (default 1h)")
    sign.add_argument("--base-url", help="scheme://host:port[/prefix] of the server (default: from --host and --port)")
    add = commands.add_parser("add", help="register a file under a new ID (needs DOWNLOADER_CATALOG)")
    add.add_argument("path", help="the file, relative to the root")
    add.add_argument("--ttl", help="how long the ID works: 90, 45s, 30m, 1h, 7d (default: no expiry)")
    add.add_argument("--max-downloads", type=int, help="completed downloads allowed (default: no limit)")
    add.add_argument("--name", help="the name the file downloads under (default: its own)")
    add.add_argument("--base-url", help="scheme://host:port[/prefix] of the server")
    commands.add_parser("revoke", help="revoke an ID").add_argument("id")
    commands.add_parser("list", help="list the catalog's IDs")
    hashing = commands.add_parser("hash", help="hash files now into the digest cache; print SHA256SUMS lines")
    hashing.add_argument("path", nargs="?", default="", help="a file or folder, relative to the root (default: the whole root)")
    return parser.parse_args(argv)


class ServerOptions(NamedTuple):
    host: str
    port: int
    workers: int
    grace: int
    proxy_headers: bool
    forwarded_allow_ips: str


def server_options(environ: Mapping[str, str]) -> ServerOptions:

    def number(name: str, default: int, low: int, high: int) -> int:
        text = environ.get(ENV_PREFIX + name)
        if text is None:
            return default
        if not (text.strip().isascii() and text.strip().isdigit()) or not low <= int(text) <= high:  # not "²"
            raise SettingsError(ENV_PREFIX + name, f"must be a whole number from {low} to {high}, got {text!r}")
        return int(text)

    try:
        proxy_headers = _parse_bool(environ.get(ENV_PREFIX + "PROXY_HEADERS", "false"))
    except ValueError as exc:
        raise SettingsError(ENV_PREFIX + "PROXY_HEADERS", str(exc)) from None
    return ServerOptions(
        host=environ.get(ENV_PREFIX + "HOST", "127.0.0.1").strip() or "127.0.0.1", port=number("PORT", 8000, 0, 65535),
        workers=number("WORKERS", 1, 1, 256), grace=number("GRACE", int(GRACE_S), 0, 86400), proxy_headers=proxy_headers,
        forwarded_allow_ips=environ.get(ENV_PREFIX + "FORWARDED_ALLOW_IPS", "127.0.0.1"),
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, bound before anything is announced (else OSError)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """Serve, or run one subcommand; returns the exit status: 0, 1 (a subcommand failed), 2 (a bad
    setting, or the address can't be had). SIGTERM or Ctrl-C stops the server (README: Run it as a sidecar)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    flags = {}  # DOWNLOADER_* variable -> the flag that set it, to name in errors
    for name in SERVER_FLAGS:
        if getattr(args, name) is not None:
            os.environ[ENV_PREFIX + name.upper()] = str(getattr(args, name))
            flags[ENV_PREFIX + name.upper()] = "--" + name.replace("_", "-")
    try:
        settings = settings_from_env(os.environ)
        options = server_options(os.environ)
        shown = f"[{options.host}]" if ":" in options.host else options.host
        if settings.digests and not settings.is_bucket and args.command in (None, "hash"):
            check_digest_cache(settings.digest_cache)
        if args.command is not None:
            return run_command(args, settings, (args.base_url or f"http://{shown}:{options.port}").rstrip("/") if hasattr(args, "base_url") else "")
        if settings.catalog:
            open_catalog(settings.catalog, "catalog")  # its columns too, before anything is announced
        if settings.is_bucket and not open_bucket(settings.root, "root", signing=settings.s3_mode == "redirect").holds_objects:
            print(f"downloader: note: {settings.root} holds no objects (yet): is the prefix spelt right?", file=sys.stderr)
        try:
            sock = bind_socket(options.host, options.port)
        except OSError as exc:  # (socket.gaierror is one)
            variable = ENV_PREFIX + ("HOST" if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL else "PORT")
            raise SettingsError(variable, f"can't listen on {shown}:{options.port}: {exc.strerror or exc}") from None
    except SettingsError as exc:
        variable = as_variable(exc.name)
        print(f"downloader: {flags.get(variable, variable)}: {exc.problem}", file=sys.stderr)
        return 2
    except CatalogError as exc:  # a subcommand's, once the catalog had opened
        print(f"downloader: the link catalog is unavailable: {exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    where = f"http://{shown}:{port}/" if settings.listing_on else f"http://{shown}:{port}/download/PATH"
    print(f"downloader: serving {settings.root} on {where} (Ctrl-C stops)", flush=True)
    return serve(sock, options, settings)


def check_digest_cache(path: str) -> None:
    """The digest cache opened once before anything is announced: one set that can't be used is a bad setting;
    the default (under the home folder, perhaps read-only) a note, and digests are kept in memory."""
    try:
        open_digest_cache(path).close()
    except (OSError, sqlite3.Error) as exc:
        if path != DEFAULT_DIGEST_CACHE:
            raise SettingsError("digest_cache", f"{path!r} can't be used: {getattr(exc, 'strerror', None) or exc}") from None
        print(f"downloader: note: the digest cache {path} can't be used ({exc}): digests are kept in memory only", file=sys.stderr)


def serve(sock: socket.socket, options: ServerOptions, settings: Settings) -> int:
    """uvicorn on the bound socket: one process, or a supervisor of `workers`."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    metrics_dir = None
    if options.workers > 1 and settings.metrics and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="downloader-metrics-")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # where "downloader:app" is found
    config = uvicorn.Config(
        "downloader:app", host=options.host, port=sock.getsockname()[1], workers=options.workers,
        timeout_graceful_shutdown=options.grace, http="downloader:HTTPProtocol", proxy_headers=options.proxy_headers,
        forwarded_allow_ips=options.forwarded_allow_ips,
        access_log=False,  # ours is the access log (JSON, one line per request)
    )
    # uvicorn ends by re-raising the signal that stopped it: a SIGTERM would then kill the
    # process (status 143). Exit 0 instead, as for Ctrl-C: the stop was asked for.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        if options.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn re-raises the signal once it has shut down
    finally:
        sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def run_command(args: argparse.Namespace, settings: Settings, base_url: str) -> int:
    """sign, add, revoke, list or hash: the result on stdout, an error as one line on stderr."""
    if args.command == "hash":
        return hash_command(settings, args.path)
    try:
        ttl = parse_ttl(args.ttl) if getattr(args, "ttl", None) else None
    except ValueError as exc:
        raise SettingsError("--ttl", str(exc)) from None
    if args.command in ("sign", "add"):
        try:
            if settings.is_bucket:
                anyio.run(functools.partial(open_bucket(settings.root, "root").head, args.path, serve_hidden=settings.serve_hidden))
            else:
                os.close(open_under_root(settings.root, args.path, serve_hidden=settings.serve_hidden).fd)
        except HTTPError as exc:
            print(f"downloader: cannot {args.command} {args.path!r}: {exc.detail} (no file under {settings.root} by that path)", file=sys.stderr)
            return 1
    if args.command == "sign":
        if not settings.secret:
            raise SettingsError(ENV_PREFIX + "SECRET", "not set; sign needs the key the server verifies with")
        print(base_url + sign_url(args.path, secret=settings.secret, expires_in=ttl))
        return 0
    if settings.catalog is None:
        raise SettingsError(ENV_PREFIX + "CATALOG", f"not set; {args.command} needs the catalog (a file or a postgresql:// URL)")
    catalog = open_catalog(settings.catalog, ENV_PREFIX + "CATALOG")
    if args.command == "add":
        expires_at = None if ttl is None else time.time() + ttl
        try:
            link = catalog.add(args.path, expires_at=expires_at, max_downloads=args.max_downloads, name=args.name)
        except ValueError as exc:
            print(f"downloader: cannot add {args.path!r}: {exc}", file=sys.stderr)
            return 1
        print(f"{link.id} {base_url}/files/{link.id}")
        return 0
    if args.command == "revoke":
        if not catalog.revoke(args.id):
            print(f"downloader: unknown ID {args.id}", file=sys.stderr)
            return 1
        print(f"revoked {args.id}")
        return 0
    print("id\tpath\tdownloads\tmax_downloads\texpires\tstate")
    now = time.time()
    for link in catalog.list():
        expires = "-" if link.expires_at is None else rfc3339(link.expires_at)
        limit = "-" if link.max_downloads is None else str(link.max_downloads)
        print(f"{link.id}\t{link.path}\t{link.downloads}\t{limit}\t{expires}\t{link_state(link, now)}")
    return 0


def hash_command(settings: Settings, path: str) -> int:
    """`hash [PATH]`: every file at or under PATH hashed into the digest cache, unpaced (a file changed less than
    MIN_STRONG_AGE_S ago is waited for), printed as SHA256SUMS lines relative to the root."""
    if settings.is_bucket or not settings.digests:
        raise SettingsError(ENV_PREFIX + ("ROOT" if settings.is_bucket else "DIGESTS"), "hash needs digests on and a directory root")
    root, hidden = settings.root, settings.serve_hidden
    try:
        folder = resolve_folder(root, path, serve_hidden=hidden)
        paths = [listed.path for listed in walk_files(root, folder=folder, serve_hidden=hidden)]
    except HTTPError:
        paths = [path]  # a file, or nothing: then the error below
    digests = Digests(root, cache=settings.digest_cache, rate=None, serve_hidden=hidden)
    db = digests.connect()  # (no lease: a server hashing meanwhile does no harm, each digest is of what was read)
    digests.sync(db)
    status = 0
    try:
        for name in paths:
            try:
                digest = digests.hash_path(db, name)
                if digest is None:  # changed a moment ago, or while it was read
                    time.sleep(MIN_STRONG_AGE_S)
                    digest = digests.hash_path(db, name)
            except HTTPError:
                print(f"downloader: cannot hash {name!r}: no file under {root} by that path", file=sys.stderr)
                status = 1
                continue
            if digest is None:
                print(f"downloader: cannot hash {name!r}: it is being changed", file=sys.stderr)
                status = 1
            else:
                sys.stdout.write(sha256sum_line(digest, name))
    finally:
        digests.close()
    return status


class AbortNoise(logging.Filter):
    """uvicorn logs a traceback for every request that ends in an exception. A request it cancelled at
    shutdown is dropped, and an aborted transfer (stall, a file that shrank) shortened to one line: both
    are expected outcomes, and the access log says `aborted` and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TransferAborted):
            record.msg, record.args, record.exc_info = "Download aborted: %s", (exc,), None
        return not isinstance(exc, asyncio.CancelledError)


def raise_descriptor_limit() -> None:
    """The soft limit on open descriptors raised to the hard one, as nginx's worker_rlimit_nofile does: each
    connection and each file sent holds one, and a default soft limit of 1,024 is a few hundred clients."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def app_from_env() -> Starlette:
    """`uvicorn downloader:app`'s app, from DOWNLOADER_* variables; our access log, when on, replaces uvicorn's."""
    try:
        settings = settings_from_env(os.environ)
        built = create_app(**dataclasses.asdict(settings))
    except SettingsError as exc:
        print(f"downloader: {as_variable(exc.name)}: {exc.problem}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.access_log != "off":
        logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(AbortNoise())
    return built


def __getattr__(name: str) -> object:
    """`app` and `HTTPProtocol`, built when first asked for: importing the module never reads the environment."""
    if name not in ("HTTPProtocol", "app"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raise_descriptor_limit()  # a server asks for these (uvicorn downloader:app); embedders call create_app
    globals()[name] = built = http_protocol() if name == "HTTPProtocol" else app_from_env()
    return built


if __name__ == "__main__":
    sys.exit(main())
