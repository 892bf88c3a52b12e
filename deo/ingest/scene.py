"""Probe a discovered source: open headers, check bands, fix the target grid and the tile layout.

A probe reads headers and one pixel block per file (a truncated file fails here, cheaply), never the
image. The plan it returns is a plain dict so it travels between Ray tasks.

Target grids: an S2 scene is tiled on the grid of its 10 m-native bands (B02 B03 B04 B08), whatever
their actual GSD; an aerial image on a north-up grid at ``optical_gsd`` in its own CRS. A Sentinel-1
VV/VH pair is never tiled on its own: its crops are warped onto the grid of the MS tiles it covers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from deo.bands import DEO_BANDS, S2_10M_BANDS, SAR_BANDS, normalise_band_name
from deo.ingest.config import IngestConfig
from deo.ingest.discover import Source
from deo.ingest.metadata import read_product_info
from deo.io.raster import RasterCache, read_error_text


class SourceError(ValueError):
    """An input that cannot be ingested; the message names the file and what was expected."""


def _check_readable(src: DatasetReader, uri: str) -> None:
    """Read the last pixel block, so truncated files fail at probe time with a clear reason."""
    try:
        src.read(1, window=Window(src.width - 1, src.height - 1, 1, 1))
    except RasterioError as e:
        raise SourceError(f"unreadable or truncated: {uri}: {read_error_text(e)}") from e


def _open(cache: RasterCache, uri: str) -> DatasetReader:
    try:
        src = cache.get(uri)
    except RasterioError as e:
        raise SourceError(f"unreadable: {uri}: {read_error_text(e)}") from e
    if src.crs is None or src.transform.is_identity:
        raise SourceError(f"not georeferenced: {uri} has no CRS or transform")
    _check_readable(src, uri)
    return src


def _descriptions_order(src: DatasetReader) -> tuple[str, ...] | None:
    """Band order from band descriptions (``B02``, ``B8A``...), or None when not all describe a band."""
    out = []
    for d in src.descriptions:
        if not d:
            return None
        try:
            out.append(normalise_band_name(d.split()[0].split(":")[0]))
        except ValueError:
            return None
    return tuple(out)


def _grid(src: DatasetReader) -> dict[str, Any]:
    return {"crs": src.crs.to_wkt(), "transform": tuple(src.transform)[:6], "width": src.width,
            "height": src.height}


def probe_s2(source: Source, cfg: IngestConfig, cache: RasterCache) -> dict[str, Any]:
    """Plan an S2 scene: where each DEO band is read from, the 10 m grid, offset, tiles.

    Raises:
        SourceError: unreadable/truncated file, missing bands, wrong band count, unknown band order.
    """
    bands: dict[str, tuple[str, int]] = {}
    nodata: dict[str, float | None] = {}
    if source.kind == "s2_bands":
        missing = [b for b in DEO_BANDS if b not in source.files]
        if missing:
            raise SourceError(
                f"missing bands {','.join(missing)} in per-band scene {source.uri}: found "
                f"{','.join(source.files)}, expected {','.join(DEO_BANDS)}"
            )
        ref_name = next(b for b in S2_10M_BANDS if b in source.files)
        for b in DEO_BANDS:
            src = _open(cache, source.files[b])
            if src.count != 1:
                raise SourceError(f"wrong band count: {source.files[b]} has {src.count} bands, expected 1")
            bands[b] = (source.files[b], 1)
            nodata[b] = src.nodata
        ref = cache.get(source.files[ref_name])
        if "SCL" in source.files:
            _open(cache, source.files["SCL"])
    else:
        uri = source.files["image"]
        ref = _open(cache, uri)
        order = _descriptions_order(ref) or cfg.s2_band_order_tuple()
        if order is None:
            raise SourceError(
                f"unknown band order: {uri} has {ref.count} bands without band descriptions; set "
                "s2_band_order to a preset (eurosat, s2_13, s2_l2a_12, deo) or a list B01,...,B8A"
            )
        if ref.count != len(order):
            raise SourceError(
                f"wrong band count: {uri} has {ref.count} bands, expected {len(order)} for band "
                f"order {','.join(order)}"
            )
        missing = [b for b in DEO_BANDS if b not in order]
        if missing:
            raise SourceError(f"missing bands {','.join(missing)} in {uri} (band order {','.join(order)})")
        if not np.issubdtype(np.dtype(ref.dtypes[0]), np.integer):
            raise SourceError(f"{uri} holds {ref.dtypes[0]}; expected integer digital numbers (uint16)")
        for b in DEO_BANDS:
            bands[b] = (uri, order.index(b) + 1)
            nodata[b] = ref.nodata
    info = read_product_info(source.uri, source.sidecars, "SCL" in source.files, cfg.s2_offset)
    grid = _grid(ref)
    gsd = float((abs(ref.transform.a) + abs(ref.transform.e)) / 2)
    px = cfg.tile.ms_px
    return {
        "kind": source.kind,
        "uri": source.uri,
        "key": source.key,
        "files": dict(source.files),
        "bands": bands,
        "nodata": nodata,
        "scl": source.files.get("SCL"),
        "grid": grid,
        "gsd": gsd,
        "bounds": tuple(ref.bounds),
        "offset": info.offset,
        "offset_from": info.offset_from,
        "level": info.level,
        "time": info.time.isoformat() if info.time else None,
        "tiles_x": grid["width"] // px,
        "tiles_y": grid["height"] // px,
        "tile_px": px,
    }


def probe_aerial(source: Source, cfg: IngestConfig, cache: RasterCache) -> dict[str, Any]:
    """Plan an aerial image: RGB bands, the grid at ``optical_gsd`` in its own CRS, tiles.

    Raises:
        SourceError: unreadable/truncated, not georeferenced, fewer than 3 bands, not uint8.
    """
    uri = source.files["image"]
    src = _open(cache, uri)
    if src.count not in (3, 4):
        raise SourceError(f"wrong band count: {uri} has {src.count} bands, expected 3 (RGB) or 4 (RGBN)")
    if src.dtypes[0] != "uint8":
        raise SourceError(f"{uri} holds {src.dtypes[0]}; expected uint8 RGB(N)")
    left, bottom, right, top = src.bounds
    gsd = cfg.optical_gsd
    width, height = math.floor((right - left) / gsd), math.floor((top - bottom) / gsd)
    grid = {"crs": src.crs.to_wkt(), "transform": (gsd, 0.0, left, 0.0, -gsd, top), "width": width,
            "height": height}
    px = cfg.tile.optical_px
    return {
        "kind": "aerial",
        "uri": uri,
        "key": source.key,
        "files": dict(source.files),
        "grid": grid,
        "native_gsd": float(abs(src.transform.a)),
        "gsd": gsd,
        "bounds": tuple(src.bounds),
        "tiles_x": width // px,
        "tiles_y": height // px,
        "tile_px": px,
        "time": None,
    }


def probe_sar(source: Source, cfg: IngestConfig, cache: RasterCache) -> dict[str, Any]:
    """Plan a Sentinel-1 pair: both polarisations readable, single-band, float dB, on one grid.

    Raises:
        SourceError: a polarisation file missing, unreadable/truncated, not georeferenced, with more
            than one band, not floating point, or the two files on different grids.
    """
    missing = [p for p in SAR_BANDS if p not in source.files]
    if missing:
        raise SourceError(f"missing polarisation {','.join(missing)} for Sentinel-1 pair {source.uri}: found "
                          f"{','.join(source.files.values())}, expected <patch>_VV and <patch>_VH files")
    srcs = {}
    for p in SAR_BANDS:
        uri = source.files[p]
        src = _open(cache, uri)
        if src.count != 1:
            raise SourceError(f"wrong band count: {uri} has {src.count} bands, expected 1 ({p})")
        if not np.issubdtype(np.dtype(src.dtypes[0]), np.floating):
            raise SourceError(f"{uri} holds {src.dtypes[0]}; expected float32 backscatter in dB")
        srcs[p] = src
    vv, vh = srcs["VV"], srcs["VH"]
    if vv.crs != vh.crs or not vv.transform.almost_equals(vh.transform) or vv.shape != vh.shape:
        raise SourceError(f"VV and VH of {source.uri} are on different grids: {vv.crs} {tuple(vv.transform)[:6]} "
                          f"{vv.shape} vs {vh.crs} {tuple(vh.transform)[:6]} {vh.shape}")
    return {
        "kind": "s1_pair",
        "uri": source.uri,
        "key": source.key,
        "files": dict(source.files),
        "nodata": {p: srcs[p].nodata for p in SAR_BANDS},
        "grid": _grid(vv),
        "gsd": float((abs(vv.transform.a) + abs(vv.transform.e)) / 2),
        "bounds": tuple(vv.bounds),
        "time": None,
    }


def sar_candidates(scene: dict[str, Any], sars: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sentinel-1 pairs whose footprint intersects the scene's, with their bounds in the scene's CRS."""
    out = []
    for s in _intersecting(scene, sars):
        out.append({"uri": s["uri"], "key": s["key"], "files": s["files"], "nodata": s["nodata"],
                    "bounds": s["bounds_in_scene"]})
    return out


def _intersecting(scene: dict[str, Any], others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    l0, b0, r0, t0 = scene["bounds"]
    out = []
    for o in others:
        left, bottom, right, top = footprint_in(o, scene["grid"]["crs"])
        if left < r0 and right > l0 and bottom < t0 and top > b0:
            out.append({**o, "bounds_in_scene": (left, bottom, right, top)})
    return out


def footprint_in(plan: dict[str, Any], crs_wkt: str) -> tuple[float, float, float, float]:
    """The plan's bounds in another CRS (densified edges, so curved reprojections stay inside)."""
    return tuple(transform_bounds(plan["grid"]["crs"], crs_wkt, *plan["bounds"], densify_pts=21))  # type: ignore[return-value]


def pair_candidates(scene: dict[str, Any], aerials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aerial images whose footprint intersects the scene's, with their bounds in the scene's CRS."""
    return [{"uri": a["uri"], "bounds": a["bounds_in_scene"], "native_gsd": a["native_gsd"]}
            for a in _intersecting(scene, aerials)]
