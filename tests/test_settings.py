"""Section 2: settings from keyword arguments and DOWNLOADER_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

import downloader


def test_defaults_serve_the_sample_files() -> None:
    settings = downloader.settings_from_env({})
    assert settings.root == str((Path(downloader.__file__).parent / "static" / "downloads").resolve())
    assert (settings.chunk_size, settings.cache_control, settings.serve_hidden) == (downloader.CHUNK_SIZE, "no-cache", False)


def test_env_values_are_parsed(tmp_path: Path) -> None:
    settings = downloader.settings_from_env({
        "DOWNLOADER_ROOT": str(tmp_path),
        "DOWNLOADER_CHUNK_SIZE": "65536",
        "DOWNLOADER_CACHE_CONTROL": "public, max-age=60",
        "DOWNLOADER_SERVE_HIDDEN": "yes",
        "DOWNLOADER_PORT": "9000",  # the CLI's, ignored here
        "OTHER": "x",
    })
    assert settings == downloader.Settings(str(tmp_path.resolve()), 65536, "public, max-age=60", True)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DOWNLOADER_CHUNK_SIZE": "big"}, "DOWNLOADER_CHUNK_SIZE: must be a whole number, got 'big'"),
        ({"DOWNLOADER_CHUNK_SIZE": "10"}, "DOWNLOADER_CHUNK_SIZE: must be a whole number of bytes from 1024 to 16777216"),
        ({"DOWNLOADER_SERVE_HIDDEN": "maybe"}, "DOWNLOADER_SERVE_HIDDEN: must be one of 1, 0, true, false, yes, no, on, off, got 'maybe'"),
        ({"DOWNLOADER_ROOT": "/no/such/dir"}, "DOWNLOADER_ROOT: '/no/such/dir' is not a directory"),
        ({"DOWNLOADER_CACHE_CONTROL": "a\r\nb"}, "DOWNLOADER_CACHE_CONTROL: must be printable ASCII text"),
        ({"DOWNLOADER_SECRETT": "x"}, "DOWNLOADER_SECRETT: unknown setting"),
        ({"DOWNLOADER_STALL_TIMEOUT": "soon"}, "DOWNLOADER_STALL_TIMEOUT: must be a number of seconds, got 'soon'"),
        ({"DOWNLOADER_STALL_TIMEOUT": "0"}, "DOWNLOADER_STALL_TIMEOUT: must be a number of seconds above 0, at most 86400"),
        ({"DOWNLOADER_RATE_LIMIT": "10"}, "DOWNLOADER_RATE_LIMIT: must be a whole number of bytes per second from 1024 to 1099511627776"),
        ({"DOWNLOADER_OFFLOAD": "sendfile"}, "DOWNLOADER_OFFLOAD: must be x-accel-redirect"),
        ({"DOWNLOADER_OFFLOAD_PREFIX": "internal"}, "DOWNLOADER_OFFLOAD_PREFIX: must be a path that starts and ends with /, like /_downloader_files/"),
        ({"DOWNLOADER_CATALOG": "/no/such/dir/c.db"}, "DOWNLOADER_CATALOG: folder '/no/such/dir' does not exist"),
        ({"DOWNLOADER_CATALOG": "/"}, "DOWNLOADER_CATALOG: '/' is a directory, not a file"),
        ({"DOWNLOADER_ROOT": ""}, "DOWNLOADER_ROOT: must be a directory path, or s3://bucket/prefix"),
        ({"DOWNLOADER_ACCESS_LOG": ""}, "DOWNLOADER_ACCESS_LOG: must be a file path"),
        ({"DOWNLOADER_ACCESS_LOG": "/"}, "DOWNLOADER_ACCESS_LOG: '/' is a directory, not a file"),
        ({"DOWNLOADER_ACCESS_LOG": "/no/such/dir/a.log"}, "DOWNLOADER_ACCESS_LOG: folder '/no/such/dir' does not exist"),
        ({"DOWNLOADER_ADMIN_TOKEN": ""}, "DOWNLOADER_ADMIN_TOKEN: must not be empty"),  # else "Bearer" with nothing gets in
        ({"DOWNLOADER_ADMIN_TOKEN": "  "}, "DOWNLOADER_ADMIN_TOKEN: must not be empty"),
        ({"DOWNLOADER_SECRET": ""}, "DOWNLOADER_SECRET: must be a key, or a list of keys (comma-separated), got ''"),
        ({"DOWNLOADER_SECRET": " , "}, "DOWNLOADER_SECRET: must be a key, or a list of keys (comma-separated), got ' , '"),
        ({"DOWNLOADER_CHUNK_SIZE": "１０２４０"}, "DOWNLOADER_CHUNK_SIZE: must be a whole number, got '１０２４０'"),
        ({"DOWNLOADER_CHUNK_SIZE": "1_048_576"}, "DOWNLOADER_CHUNK_SIZE: must be a whole number, got '1_048_576'"),
        ({"DOWNLOADER_RATE_LIMIT": "٢٠٤٨"}, "DOWNLOADER_RATE_LIMIT: must be a whole number, got '٢٠٤٨'"),
        ({"DOWNLOADER_STALL_TIMEOUT": "６０"}, "DOWNLOADER_STALL_TIMEOUT: must be a number of seconds, got '６０'"),
    ],
)
def test_bad_env_value_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(downloader.SettingsError) as caught:
        downloader.settings_from_env(environ)
    assert str(caught.value) == message


def test_bad_keyword_names_the_keyword(tmp_path: Path) -> None:
    with pytest.raises(downloader.SettingsError) as caught:
        downloader.create_app(tmp_path, chunk_size=True)
    assert str(caught.value) == "chunk_size: must be a whole number of bytes from 1024 to 16777216"
    with pytest.raises(downloader.SettingsError) as caught:
        downloader.create_app(tmp_path, colour="blue")
    assert str(caught.value) == "colour: unknown setting"
