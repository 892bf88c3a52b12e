"""Object storage: one way to reach local paths, ``file://``, ``s3://`` and ``gs://``.

s3fs/gcsfs (fsspec) do the work. An S3-compatible endpoint (MinIO, moto) is taken from
``AWS_ENDPOINT_URL`` as boto does, so the same URIs work against AWS and a local server. Credentials
come from the environment, an instance role or a profile, never from config files.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local scheme (``s3://``, ``gs://``...)."""
    return "://" in uri and not uri.startswith("file://")


def strip_file_scheme(uri: str) -> str:
    """``file:///a/b`` -> ``/a/b``; other URIs unchanged."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri``: the S3 endpoint from ``AWS_ENDPOINT_URL`` when set."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    uri = strip_file_scheme(uri)
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri)
    protocol = uri.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, **storage_options(uri))
    return fs, uri.split("://", 1)[1]


def pyarrow_filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem for ``uri`` (fsspec wrapped) and the path inside it."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(strip_file_scheme(uri)):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and URIs)."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def read_bytes(uri: str) -> bytes:
    """Read a whole file."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    """Read a whole text file (UTF-8)."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, creating parent folders on local disks.

    Object stores replace the object atomically; local files are written to a temp name and renamed,
    so a reader never sees half a file.
    """
    fs, path = filesystem(uri)
    if not is_remote(strip_file_scheme(uri)):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    """Write a whole text file (UTF-8)."""
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below ``uri`` (recursive) ending in ``suffix``, as URIs of the same form, sorted."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    found = fs.find(path)
    remote = is_remote(strip_file_scheme(uri))
    prefix = uri.split("://", 1)[0] + "://" if remote else ""
    return sorted(prefix + p for p in found if p.endswith(suffix))


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file or folder if it exists."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
