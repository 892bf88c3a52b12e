"""Object storage: one way to reach local paths, ``file://``, ``s3://`` and ``gs://``.

s3fs/gcsfs (fsspec) do the work. An S3-compatible endpoint (MinIO, moto) is taken from
``AWS_ENDPOINT_URL`` as boto does, so the same URIs work against AWS and a local server. Credentials
come from the environment, an instance role or a profile, never from config files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from deo.config import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError"}
"""botocore's and google-auth's errors for missing or unusable credentials (matched by name: neither
library is imported unless its scheme is used)."""


_GCS_HINT = "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE (and AWS_ENDPOINT_URL for MinIO "
          "or another S3-compatible store)",
    "gs": _GCS_HINT,
    "gcs": _GCS_HINT,
}


class StorageAccessError(ConfigError):
    """Object storage refused or could not be reached.

    Attributes:
        kind: ``credentials`` or ``endpoint`` (the whole store is out of reach: a run should stop), or
            ``denied`` (this object: an ingest records it against its source and goes on).
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process boundaries (Ray tasks)
        return type(self), (str(self), self.kind)


def _access_problem(e: BaseException, uri: str) -> StorageAccessError | None:
    """The error of the storage environment (not of the data) behind ``e``, else None."""
    seen: BaseException | None = e
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    while seen is not None:
        name = type(seen).__name__
        if name in _NO_CREDENTIALS:
            hint = _CREDENTIAL_HINTS.get(scheme, f"configure credentials for {scheme}://")
            return StorageAccessError(f"{uri}: no usable {scheme} credentials ({seen}); {hint}", "credentials")
        if name == "EndpointConnectionError":
            return StorageAccessError(
                f"{uri}: cannot reach the object store ({seen}); check AWS_ENDPOINT_URL and the network", "endpoint")
        if isinstance(seen, PermissionError):
            return StorageAccessError(f"{uri}: access denied ({seen})", "denied")
        seen = seen.__cause__ or seen.__context__
    return None


def reports_access_errors(fn: F) -> F:
    """Turn credential, permission and endpoint errors of ``fn(uri, ...)`` into a one-line
    :class:`StorageAccessError` naming the URI (they otherwise surface as 60-line tracebacks)."""

    @functools.wraps(fn)
    def wrapper(uri: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(uri, *args, **kwargs)
        except StorageAccessError:
            raise
        except Exception as e:
            problem = _access_problem(e, uri)
            if problem is None:
                raise
            raise problem from e

    return wrapper  # type: ignore[return-value]


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


@reports_access_errors
def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


@reports_access_errors
def read_bytes(uri: str) -> bytes:
    """Read a whole file."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    """Read a whole text file (UTF-8)."""
    return read_bytes(uri).decode("utf-8")


@reports_access_errors
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


@reports_access_errors
def list_files(uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files below ``uri`` ending in ``suffix``, as URIs of the same form, sorted.

    ``recursive=False`` lists only the folder's own files, not those of its sub-folders.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    found = fs.find(path, maxdepth=None if recursive else 1)
    remote = is_remote(strip_file_scheme(uri))
    prefix = uri.split("://", 1)[0] + "://" if remote else ""
    return sorted(prefix + p for p in found if p.endswith(suffix))


@reports_access_errors
def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file or folder if it exists."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
