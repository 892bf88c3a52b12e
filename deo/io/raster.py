"""Raster reading with rasterio: local paths, ``file://``, ``s3://`` (also S3-compatible endpoints), ``gs://``.

GDAL picks the format from the file's content, not its extension (the AWS L1C ``B02.jp2`` fixtures are
GeoTIFFs). GDAL ignores ``AWS_ENDPOINT_URL``; :func:`gdal_s3_env` derives GDAL's own keys from it so one
environment reaches AWS, MinIO or moto from s3fs, pyarrow and rasterio alike.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any
from urllib.parse import urlparse

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from deo.io.storage import strip_file_scheme

# GDAL's block cache defaults to 5% of RAM per process; with one worker per core that dominates a
# worker's memory on large scenes. Windows are read once, so a small cache loses nothing.
os.environ.setdefault("GDAL_CACHEMAX", "128")

STORAGE_ENV_KEYS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_S3_ENDPOINT",
    "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING",
    "AWS_NO_SIGN_REQUEST",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
"""Environment keys that decide how object storage is reached (forwarded to Ray workers)."""


def gdal_s3_env() -> dict[str, str]:
    """GDAL config options for the S3 endpoint named by ``AWS_ENDPOINT_URL`` (empty for AWS itself)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint or os.environ.get("AWS_S3_ENDPOINT"):
        return {}
    parsed = urlparse(endpoint)
    return {
        "AWS_S3_ENDPOINT": parsed.netloc,
        "AWS_HTTPS": "YES" if parsed.scheme == "https" else "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def storage_env() -> dict[str, str]:
    """The storage-related environment of this process, to recreate it in worker processes."""
    env = {k: os.environ[k] for k in STORAGE_ENV_KEYS if k in os.environ}
    env.update(gdal_s3_env())
    return env


def apply_storage_env(env: dict[str, str]) -> None:
    """Set ``env`` (from :func:`storage_env` in the driver) in this worker process."""
    os.environ.update(env)


def gdal_path(uri: str) -> str:
    """The path rasterio/GDAL opens for ``uri`` (``file://`` stripped; s3:// and gs:// kept)."""
    return strip_file_scheme(uri)


def read_error_text(e: BaseException) -> str:
    """``str(e)`` with GDAL's own reason: rasterio's "Read failed. See previous exception for details."
    keeps it as the exception's cause (e.g. "TIFFReadEncodedStrip() failed" of a truncated file)."""
    cause = e.__cause__ or e.__context__
    return f"{e} ({cause})" if cause is not None and str(cause) not in str(e) else str(e)


def open_raster(uri: str) -> DatasetReader:
    """Open a raster for reading (the caller closes it).

    Raises:
        rasterio.errors.RasterioIOError: missing, unreadable or not a raster.
    """
    os.environ.update(gdal_s3_env())
    return rasterio.open(gdal_path(uri))


class RasterCache:
    """A small LRU of open datasets, so windows of one scene reuse file handles (and COG headers).

    One instance per worker process; closing it closes every dataset.
    """

    def __init__(self, max_open: int = 32) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, DatasetReader] = OrderedDict()

    def get(self, uri: str) -> DatasetReader:
        """The open dataset for ``uri``, opening it if needed."""
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri]
        ds = open_raster(uri)
        self._open[uri] = ds
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return ds

    def close(self) -> None:
        """Close every cached dataset."""
        for ds in self._open.values():
            ds.close()
        self._open.clear()


def same_grid(src: DatasetReader, transform: Any, crs: Any, tol: float = 1e-6) -> bool:
    """Whether ``src`` has exactly the pixel grid ``transform`` in ``crs`` (no resampling needed)."""
    return bool(src.crs == crs and src.transform.almost_equals(transform, precision=tol))


def read_on_grid(
    src: DatasetReader,
    bands: list[int],
    transform: Any,
    crs: Any,
    width: int,
    height: int,
    window: Window,
    resampling: Resampling = Resampling.bilinear,
    src_nodata: float | None = None,
    dst_nodata: float = 0,
) -> np.ndarray:
    """Read ``window`` of a target grid from ``src``, resampling when its grid differs.

    A band already on the target grid is read directly; otherwise a WarpedVRT onto the target grid
    (``transform``, ``crs``, ``width`` x ``height``) resamples only the source pixels the window needs,
    so memory stays proportional to the window, never to the scene.

    Args:
        src: open dataset.
        bands: 1-based band indexes to read.
        transform: affine transform of the target grid.
        crs: CRS of the target grid.
        width: target grid width in pixels.
        height: target grid height in pixels.
        window: window of the target grid to read.
        resampling: resampling used when grids differ.
        src_nodata: nodata value of the source (None: the file's own, if any).
        dst_nodata: value written where the source has no data.

    Returns:
        (len(bands), window.height, window.width) array of the source dtype.
    """
    if same_grid(src, transform, crs) and src.width >= width and src.height >= height:
        return src.read(bands, window=window, boundless=False)
    kw: dict[str, Any] = dict(
        crs=crs, transform=transform, width=width, height=height, resampling=resampling,
        nodata=dst_nodata,
    )
    nodata = src.nodata if src_nodata is None else src_nodata
    if nodata is not None:
        kw["src_nodata"] = nodata
    with WarpedVRT(src, **kw) as vrt:
        return vrt.read(bands, window=window)


def read_mask_on_grid(
    src: DatasetReader,
    transform: Any,
    crs: Any,
    width: int,
    height: int,
    window: Window,
) -> np.ndarray:
    """Where ``src`` has data on ``window`` of the target grid (any band masked -> False).

    Returns:
        (window.height, window.width) bool array.
    """
    kw: dict[str, Any] = dict(crs=crs, transform=transform, width=width, height=height,
                              resampling=Resampling.nearest)
    with WarpedVRT(src, **kw) as vrt:
        masks = vrt.read_masks(window=window)
    return np.asarray(masks.min(axis=0) > 0)
