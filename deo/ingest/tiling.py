"""Windows -> tiles: read one window of a planned source, resample, mask, filter, pair, build rows.

A window is ``tile.window_tiles`` x ``tile.window_tiles`` tiles of one source; it is the unit of
reading, so a worker holds one window (10 bands x window pixels) at a time whatever the scene size.

MS values: ``ms = clip(DN - offset, 1, 65535)`` on valid pixels, 0 elsewhere. A pixel is invalid when
any band is 0 (Sentinel-2's no-data DN, e.g. outside the swath) or equals the file's declared nodata,
or when SCL says "no data" (class 0). Clouds are SCL classes 3 (cloud shadow), 8, 9 (cloud medium and
high probability) and 10 (thin cirrus). Bands on another grid than the 10 m bands (20 m bands, or any
CRS) are resampled bilinearly through a WarpedVRT: bilinear keeps the radiometry of smooth fields
without the overshoot of cubic kernels, and matches what sen2cor and most S2 stacks use.

SAR (``sar`` inputs): an MS tile whose footprint a Sentinel-1 VV+VH pair covers gets both
polarisations warped onto the tile's own grid (any CRS, bilinear in dB, as the MS 20 m bands). The
``sar`` column has no nodata value, so a crop is attached only when every pixel of it is valid (inside
the pair, finite, not the files' declared nodata); otherwise the row's ``sar`` is null.

S2 true colour (``s2_optical``): ``uint8 = clip(round(ms[B04, B03, B02] * 255 / s2_optical_max), 0,
255)``, a linear stretch of reflectance 0..``s2_optical_max``/10000 with no gamma.

Statistics describe what training reads: the rows with an MS tile. The optical ones count each such
row's optical tile, or, where it has none, the S2 true colour training fills in (on the MS tile's
valid pixels, at its size); aerial-only rows are not counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.warp import reproject
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from deo.bands import DEO_BANDS, S2_TRUE_COLOUR, SAR_BANDS
from deo.ingest.config import IngestConfig
from deo.ingest.stats import BandStats
from deo.io.raster import RasterCache, read_error_text, same_grid

CLOUD_CLASSES: tuple[int, ...] = (3, 8, 9, 10)
"""SCL classes counted as cloud: cloud shadow, cloud medium/high probability, thin cirrus."""
SCL_NODATA = 0
TRUE_COLOUR_IDX: list[int] = [DEO_BANDS.index(b) for b in S2_TRUE_COLOUR]


def sample_id(source: str, col: int, row: int, size: int, sensor: str) -> str:
    """Deterministic id of a tile: hash of (source, window in pixels of the target grid, sensor)."""
    return hashlib.sha256(f"{sensor}|{source}|{col}|{row}|{size}".encode()).hexdigest()[:32]


def windows_of(plan: dict[str, Any], window_tiles: int) -> list[tuple[int, int]]:
    """(window column, window row) indexes covering every whole tile of the plan, row-major."""
    nx = -(-plan["tiles_x"] // window_tiles)
    ny = -(-plan["tiles_y"] // window_tiles)
    return [(wx, wy) for wy in range(ny) for wx in range(nx)]


class WindowReadError(RuntimeError):
    """Reading a window of one file failed; the message names the file."""


class TileMaker:
    """Turns windows of planned sources into shard rows; holds open datasets and warped views.

    Args:
        cfg: the ingest config.
        cache: open datasets of this worker (reused across windows of a scene).
    """

    def __init__(self, cfg: IngestConfig, cache: RasterCache) -> None:
        self.cfg = cfg
        self.cache = cache
        self._vrts: dict[tuple[str, str, str], WarpedVRT] = {}
        self.ms_stats = BandStats(len(DEO_BANDS))
        self.optical_stats = BandStats(3)
        self.sar_stats = BandStats(len(SAR_BANDS))

    def close(self) -> None:
        """Close the warped views (the datasets belong to the cache)."""
        for v in self._vrts.values():
            v.close()
        self._vrts.clear()

    def _vrt(self, uri: str, grid: dict[str, Any], key: str, resampling: Resampling,
             src_nodata: float | None) -> WarpedVRT:
        k = (uri, key, resampling.name)
        if k not in self._vrts:
            if len(self._vrts) > 64:
                self.close()
            kw: dict[str, Any] = dict(
                crs=CRS.from_wkt(grid["crs"]), transform=Affine(*grid["transform"]),
                width=grid["width"], height=grid["height"], resampling=resampling, nodata=0,
            )
            if src_nodata is not None:
                kw["src_nodata"] = src_nodata
            self._vrts[k] = WarpedVRT(self.cache.get(uri), **kw)
        return self._vrts[k]

    def _read(self, uri: str, indexes: list[int], grid: dict[str, Any], key: str, window: Window,
              resampling: Resampling, src_nodata: float | None) -> tuple[np.ndarray, bool]:
        """Read bands of ``uri`` on ``window`` of ``grid``; returns (data, read directly?).

        Raises:
            WindowReadError: the read failed, naming ``uri`` (a scene has a file per band).
        """
        try:
            src: DatasetReader = self.cache.get(uri)
            if same_grid(src, Affine(*grid["transform"]), CRS.from_wkt(grid["crs"])):
                return src.read(indexes, window=window), True
            return self._vrt(uri, grid, key, resampling, src_nodata).read(indexes, window=window), False
        except Exception as e:  # noqa: BLE001 - re-raised with the file's name
            raise WindowReadError(f"{uri}: {type(e).__name__}: {read_error_text(e)}") from e

    # ---------------------------------------------------------------- Sentinel-2
    def s2_window(self, plan: dict[str, Any], wx: int, wy: int, pairs: list[dict[str, Any]],
                  sars: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Rows of one window of an S2 scene and the rejects by reason.

        Statistics are added only once the whole window succeeded, so they always describe exactly
        the rows that are written.

        Args:
            plan: the scene's plan (:func:`deo.ingest.scene.probe_s2`).
            wx: window column.
            wy: window row.
            pairs: aerial images overlapping the scene (:func:`deo.ingest.scene.pair_candidates`).
            sars: Sentinel-1 pairs overlapping the scene (:func:`deo.ingest.scene.sar_candidates`).

        Returns:
            Row dicts of the shard schema (rows with SAR also carry ``_sar_key``, the pair's source
            key), and {"nodata": n, "cloud": n}.
        """
        cfg, px, wt = self.cfg, plan["tile_px"], self.cfg.tile.window_tiles
        tx0, ty0 = wx * wt, wy * wt
        ntx, nty = min(wt, plan["tiles_x"] - tx0), min(wt, plan["tiles_y"] - ty0)
        window = Window(tx0 * px, ty0 * px, ntx * px, nty * px)
        grid, key = plan["grid"], plan["key"]
        data = np.zeros((len(DEO_BANDS), nty * px, ntx * px), dtype=np.uint16)
        valid = np.ones((nty * px, ntx * px), dtype=bool)
        by_file: dict[str, list[int]] = {}
        for i, b in enumerate(DEO_BANDS):
            by_file.setdefault(plan["bands"][b][0], []).append(i)
        for uri, idx in by_file.items():
            indexes = [plan["bands"][DEO_BANDS[i]][1] for i in idx]
            declared = plan["nodata"][DEO_BANDS[idx[0]]]
            arr, direct = self._read(uri, indexes, grid, key, window, Resampling.bilinear,
                                     declared if declared is not None else 0)
            data[idx] = arr
            if direct and declared is not None and declared != 0:
                valid &= ~(arr == declared).any(axis=0)
        valid &= ~(data == 0).any(axis=0)
        cloud = np.zeros_like(valid)
        if plan["scl"]:
            scl, _ = self._read(plan["scl"], [1], grid, key, window, Resampling.nearest, None)
            valid &= scl[0] != SCL_NODATA
            cloud = np.isin(scl[0], CLOUD_CLASSES)
        ms = np.clip(data.astype(np.int32) - plan["offset"], 1, 65535).astype(np.uint16)
        ms[:, ~valid] = 0
        time = datetime.fromisoformat(plan["time"]) if plan["time"] else None
        transform = Affine(*grid["transform"])
        crs = CRS.from_wkt(grid["crs"])
        crs_str = crs.to_string()
        rows: list[dict[str, Any]] = []
        rejects = {"nodata": 0, "cloud": 0}
        ms_stats, opt_stats, sar_stats = BandStats(len(DEO_BANDS)), BandStats(3), BandStats(len(SAR_BANDS))
        for j in range(nty):
            for i in range(ntx):
                sl = (slice(j * px, (j + 1) * px), slice(i * px, (i + 1) * px))
                tvalid = valid[sl]
                if 1.0 - tvalid.mean() > cfg.max_nodata:
                    rejects["nodata"] += 1
                    continue
                if cloud[sl].mean() > cfg.max_cloud:
                    rejects["cloud"] += 1
                    continue
                col, row = (tx0 + i) * px, (ty0 + j) * px
                tile = ms[:, sl[0], sl[1]]
                ttrans = transform @ Affine.translation(col, row)
                bounds = (ttrans.c, ttrans.f + px * ttrans.e, ttrans.c + px * ttrans.a, ttrans.f)
                optical, source_optical = self._optical_for(tile, ttrans, crs, bounds, pairs, plan["uri"])
                sar, sar_key = self._sar_for(ttrans, crs, bounds, sars or [], px)
                ms_stats.update(tile, tvalid)
                if optical is not None:
                    opt_stats.update(optical)
                else:  # training fills in the S2 true colour
                    opt_stats.update(self._true_colour(tile), tvalid)
                if sar is not None:
                    sar_stats.update(sar)
                lon, lat = _centre_lonlat(crs, bounds)
                rows.append({
                    "sample_id": sample_id(plan["uri"], col, row, px, "s2"),
                    "ms": tile,
                    "optical": optical,
                    "ms_gsd": plan["gsd"],
                    "optical_gsd": plan["gsd"] * px / cfg.tile.optical_px if optical is not None else None,
                    "crs": crs_str,
                    "bounds": list(bounds),
                    "lon": lon,
                    "lat": lat,
                    "time": time,
                    "source_ms": plan["uri"],
                    "source_optical": source_optical,
                    "sar": sar,
                    "_sar_key": sar_key,
                })
        self.ms_stats.merge(ms_stats)
        self.optical_stats.merge(opt_stats)
        self.sar_stats.merge(sar_stats)
        return rows, rejects

    def _sar_for(self, ttrans: Affine, crs: CRS, bounds: tuple[float, ...], sars: list[dict[str, Any]],
                 px: int) -> tuple[np.ndarray | None, str | None]:
        """VV, VH float32 (2, px, px) in dB on the tile's grid from the first pair covering it, or None."""
        left, bottom, right, top = bounds
        for s in sars:
            sl, sb, sr, st = s["bounds"]
            if not (sl <= left and sb <= bottom and sr >= right and st >= top):
                continue
            out = np.empty((len(SAR_BANDS), px, px), dtype=np.float32)
            ok = np.ones((px, px), dtype=bool)
            for k, pol in enumerate(SAR_BANDS):
                src: DatasetReader = self.cache.get(s["files"][pol])
                window = _aligned_window(src, ttrans, crs, px)
                if window is not None:  # the pair is on the MS grid (BigEarthNet): read, no resampling
                    out[k] = src.read(1, window=window)
                    ok &= src.read_masks(1, window=window) > 0
                    continue
                kw: dict[str, Any] = dict(crs=crs, transform=ttrans, width=px, height=px,
                                          resampling=Resampling.bilinear, nodata=np.nan)
                if s["nodata"][pol] is not None:
                    kw["src_nodata"] = s["nodata"][pol]
                with WarpedVRT(src, **kw) as vrt:
                    out[k] = vrt.read(1)
                    ok &= vrt.read_masks(1) > 0
            ok &= np.isfinite(out).all(axis=0)
            if ok.all():
                return out, s["key"]
        return None, None

    def _optical_for(self, tile: np.ndarray, ttrans: Affine, crs: CRS, bounds: tuple[float, ...],
                     pairs: list[dict[str, Any]], scene_uri: str) -> tuple[np.ndarray | None, str | None]:
        """The optical crop of an MS tile: a covering aerial image, else the S2 true colour (or None)."""
        opx = self.cfg.tile.optical_px
        if self.cfg.pair:
            left, bottom, right, top = bounds
            for a in pairs:
                al, ab, ar, at = a["bounds"]
                if not (al <= left and ab <= bottom and ar >= right and at >= top):
                    continue
                rgb, ok = self.aerial_crop(a, crs, bounds, opx)
                if ok.mean() >= 1.0 - self.cfg.max_nodata:
                    return rgb, a["uri"]
        if not self.cfg.s2_optical:
            return None, None
        rgb = self._true_colour(tile)
        if opx != tile.shape[-1]:
            rgb = _resize(rgb, ttrans, crs, opx)
        return rgb, scene_uri

    def _true_colour(self, tile: np.ndarray) -> np.ndarray:
        """(3, S, S) uint8 S2 true colour of a (10, S, S) MS tile."""
        tc = tile[TRUE_COLOUR_IDX].astype(np.float32) * (255.0 / self.cfg.s2_optical_max)
        return np.clip(np.rint(tc), 0, 255).astype(np.uint8)

    def aerial_crop(self, pair: dict[str, Any], crs: CRS, bounds: tuple[float, ...], size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """An aerial image warped onto a ``size`` x ``size`` grid over ``bounds`` in ``crs``.

        Downsampling averages (avoids aliasing of 0.1-1 m pixels); upsampling is bilinear.

        Returns:
            RGB uint8 (3, size, size) and the valid-pixel mask (size, size).
        """
        left, bottom, right, top = bounds
        gsd = (right - left) / size
        grid = {"crs": crs.to_wkt(), "transform": (gsd, 0.0, left, 0.0, -(top - bottom) / size, top),
                "width": size, "height": size}
        src = self.cache.get(pair["uri"])
        resampling = Resampling.average if pair["native_gsd"] < gsd else Resampling.bilinear
        with WarpedVRT(src, crs=crs, transform=Affine(*grid["transform"]), width=size, height=size,
                       resampling=resampling) as vrt:
            rgb = vrt.read([1, 2, 3])
            mask = vrt.read_masks([1, 2, 3]).min(axis=0) > 0
        return rgb, mask

    # ---------------------------------------------------------------- aerial
    def aerial_window(self, plan: dict[str, Any], wx: int, wy: int
                      ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Rows (optical only) of one window of an aerial image and the rejects by reason."""
        cfg, px, wt = self.cfg, plan["tile_px"], self.cfg.tile.window_tiles
        tx0, ty0 = wx * wt, wy * wt
        ntx, nty = min(wt, plan["tiles_x"] - tx0), min(wt, plan["tiles_y"] - ty0)
        window = Window(tx0 * px, ty0 * px, ntx * px, nty * px)
        grid = plan["grid"]
        resampling = Resampling.average if plan["native_gsd"] < plan["gsd"] else Resampling.bilinear
        vrt = self._vrt(plan["uri"], grid, plan["key"], resampling, None)
        rgb = vrt.read([1, 2, 3], window=window)
        valid = vrt.read_masks([1, 2, 3], window=window).min(axis=0) > 0
        transform = Affine(*grid["transform"])
        crs = CRS.from_wkt(grid["crs"])
        rows: list[dict[str, Any]] = []
        rejects = {"nodata": 0, "cloud": 0}
        for j in range(nty):
            for i in range(ntx):
                sl = (slice(j * px, (j + 1) * px), slice(i * px, (i + 1) * px))
                if 1.0 - valid[sl].mean() > cfg.max_nodata:
                    rejects["nodata"] += 1
                    continue
                col, row = (tx0 + i) * px, (ty0 + j) * px
                ttrans = transform @ Affine.translation(col, row)
                bounds = (ttrans.c, ttrans.f + px * ttrans.e, ttrans.c + px * ttrans.a, ttrans.f)
                tile = np.ascontiguousarray(rgb[:, sl[0], sl[1]])
                lon, lat = _centre_lonlat(crs, bounds)
                rows.append({
                    "sample_id": sample_id(plan["uri"], col, row, px, "aerial"),
                    "ms": None, "optical": tile, "ms_gsd": None, "optical_gsd": plan["gsd"],
                    "crs": crs.to_string(), "bounds": list(bounds), "lon": lon, "lat": lat,
                    "time": None, "source_ms": None, "source_optical": plan["uri"],
                })
        return rows, rejects

    def window_rows(self, plan: dict[str, Any], wx: int, wy: int, pairs: list[dict[str, Any]],
                    sars: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Rows of one window of any planned source."""
        if plan["kind"] == "aerial":
            return self.aerial_window(plan, wx, wy)
        return self.s2_window(plan, wx, wy, pairs, sars)


def iter_windows(maker: TileMaker, plan: dict[str, Any], pairs: list[dict[str, Any]],
                 sars: list[dict[str, Any]] | None = None
                 ) -> Iterator[tuple[list[dict[str, Any]], dict[str, int]]]:
    """Every window of a plan, in order (used by tests and the plain loop)."""
    for wx, wy in windows_of(plan, maker.cfg.tile.window_tiles):
        yield maker.window_rows(plan, wx, wy, pairs, sars)


def _aligned_window(src: DatasetReader, ttrans: Affine, crs: CRS, px: int) -> Window | None:
    """The window of ``src`` that is exactly the ``px`` x ``px`` tile at ``ttrans``, or None if the grids differ."""
    st = src.transform
    if src.crs != crs or not np.allclose([st.a, st.b, st.d, st.e], [ttrans.a, ttrans.b, ttrans.d, ttrans.e]):
        return None
    col, row = (ttrans.c - st.c) / st.a, (ttrans.f - st.f) / st.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    col, row = round(col), round(row)
    if col < 0 or row < 0 or col + px > src.width or row + px > src.height:
        return None
    return Window(col, row, px, px)


def _centre_lonlat(crs: CRS, bounds: tuple[float, ...]) -> tuple[float, float]:
    x, y = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
    lon, lat = warp_transform(crs, "EPSG:4326", [x], [y])
    return float(lon[0]), float(lat[0])


def _resize(rgb: np.ndarray, ttrans: Affine, crs: CRS, size: int) -> np.ndarray:
    """Resample a (3, S, S) tile to (3, size, size) over the same footprint (bilinear)."""
    s = rgb.shape[-1]
    out = np.zeros((3, size, size), dtype=np.uint8)
    reproject(rgb, out, src_transform=ttrans, src_crs=crs,
              dst_transform=ttrans @ Affine.scale(s / size), dst_crs=crs, resampling=Resampling.bilinear)
    return out
