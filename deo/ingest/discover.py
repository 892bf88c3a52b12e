"""Scene discovery: input URIs, folders and globs -> Sentinel-2 scenes and aerial images.

Per-band S2 files belong to one scene when they share a folder (SAFE ``R10m``/``R20m``/``R60m``
subfolders count as one) and the prefix before the band token (``T32UPC_..._B02_10m.jp2``, ``B02.tif``).
``SCL`` files join their scene as the cloud mask; ``TCI``, ``AOT``, ``WVP`` and previews are skipped.
Raster files without a band token are stacked scenes. XML and JSON files next to a scene are its
metadata sidecars (MTD XML, ``tileInfo.json``, STAC items).

Sentinel-1 files are single-polarisation rasters named by the token ``VV`` or ``VH``
(BigEarthNet-S1: ``<patch>_VV.tif``, ``<patch>_VH.tif``); the two files of a pair share a folder and
the prefix before the token.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
from dataclasses import dataclass, field

from deo.bands import band_from_filename
from deo.io import storage

RASTER_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".jp2", ".vrt")
SIDECAR_EXTENSIONS: tuple[str, ...] = (".xml", ".json")
_SCL = re.compile(r"(?<![A-Za-z0-9])SCL(?![A-Za-z0-9])", re.IGNORECASE)
_AUX = re.compile(r"(?<![A-Za-z0-9])(TCI|AOT|WVP|PVI|preview)(?![A-Za-z0-9])", re.IGNORECASE)
_RES_DIR = re.compile(r"/R\d+m$")
_POL = re.compile(r"(?<![A-Za-z0-9])(VV|VH)(?![A-Za-z0-9])", re.IGNORECASE)


@dataclass
class Source:
    """One discovered input: an S2 scene (per-band or stacked) or an aerial image."""

    kind: str
    """``s2_bands`` (one file per band), ``s2_stacked``, ``aerial`` or ``s1_pair`` (VV + VH files)."""
    uri: str
    """Scene id: the stacked/aerial file, or ``<folder>/<prefix>`` of a per-band scene."""
    files: dict[str, str] = field(default_factory=dict)
    """Per-band scenes: band name (and ``SCL``) -> file URI; ``s1_pair``: ``VV``/``VH`` -> file URI.
    Others: ``{"image": uri}``."""
    sidecars: list[str] = field(default_factory=list)
    """Metadata files beside the scene (MTD XML, tileInfo.json, STAC JSON)."""

    @property
    def key(self) -> str:
        """A short stable id of the source (used in shard file names)."""
        return hashlib.sha1(f"{self.kind}|{self.uri}".encode()).hexdigest()[:16]


@dataclass
class Skipped:
    """An input that was not ingested, with the reason (``missing`` inputs are failures)."""

    uri: str
    status: str
    reason: str


def _is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


@storage.reports_access_errors
def expand(uri: str) -> tuple[list[str], list[Skipped]]:
    """Files named by one input entry: a file, a folder (recursive) or a glob.

    Returns:
        The file URIs (sorted) and a ``failed`` record when nothing exists there.
    """
    uri = uri.rstrip("/") if not uri.endswith("://") else uri
    fs, path = storage.filesystem(uri)
    remote = storage.is_remote(storage.strip_file_scheme(uri))
    prefix = uri.split("://", 1)[0] + "://" if remote else ""
    if _is_glob(uri):
        found = sorted(globlib.glob(path, recursive=True)) if not remote else sorted(fs.glob(path))
        files = [prefix + p for p in found if not fs.isdir(p)]
    elif fs.isfile(path):
        files = [prefix + path]
    elif fs.isdir(path):
        files = [prefix + p for p in sorted(fs.find(path))]
    else:
        return [], [Skipped(uri, "failed", f"missing: no file, folder or glob match at {uri}")]
    if not files:
        return [], [Skipped(uri, "failed", f"missing: {uri} matched no files")]
    return files, []


def _ext(name: str) -> str:
    return os.path.splitext(name.lower())[1]


def _split_band(name: str, token: str) -> str:
    """The prefix of a file name before its band token (``T32_B02_10m.jp2`` -> ``T32_``)."""
    i = name.upper().find(token.upper())
    return name[:i]


def discover_s2(entries: list[str]) -> tuple[list[Source], list[Skipped]]:
    """Group S2 inputs into scenes.

    Returns:
        Scenes sorted by id, and skipped/failed inputs.
    """
    files: list[str] = []
    skipped: list[Skipped] = []
    for entry in entries:
        found, bad = expand(entry)
        files.extend(found)
        skipped.extend(bad)
    files = sorted(set(files))
    groups: dict[tuple[str, str], dict[str, str]] = {}
    stacked: list[str] = []
    sidecars: dict[str, list[str]] = {}
    for uri in files:
        folder, name = uri.rsplit("/", 1) if "/" in uri else ("", uri)
        ext = _ext(name)
        if ext in SIDECAR_EXTENSIONS:
            sidecars.setdefault(folder, []).append(uri)
            continue
        if ext not in RASTER_EXTENSIONS:
            continue
        scene_dir = _RES_DIR.sub("", folder)
        band = band_from_filename(name)
        if _AUX.search(name) or "/preview" in folder.lower():
            skipped.append(Skipped(uri, "skipped", "auxiliary raster (TCI/AOT/WVP/preview), not a band"))
        elif band is not None:
            bands = groups.setdefault((scene_dir, _split_band(name, band)), {})
            # SAFE L2A has a band at several resolutions; sorted order keeps the finest (R10m < R20m).
            bands.setdefault(band, uri)
        elif (m := _SCL.search(name)) is not None:
            groups.setdefault((scene_dir, name[: m.start()]), {}).setdefault("SCL", uri)
        else:
            stacked.append(uri)
    scenes: list[Source] = []
    for (scene_dir, prefix), bands in groups.items():
        if set(bands) == {"SCL"}:
            skipped.append(Skipped(bands["SCL"], "skipped", "SCL file without band files beside it"))
            continue
        cars = [c for d, cs in sidecars.items() if _RES_DIR.sub("", d) == scene_dir for c in cs]
        cars = [c for c in cars if not prefix or c.rsplit("/", 1)[-1].startswith(prefix) or
                _is_product_sidecar(c)]
        scenes.append(Source("s2_bands", f"{scene_dir}/{prefix}".rstrip("/_") or scene_dir,
                             dict(sorted(bands.items())), sorted(cars)))
    for uri in stacked:
        folder, name = uri.rsplit("/", 1) if "/" in uri else ("", uri)
        stem = os.path.splitext(name)[0]
        cars = [c for c in sidecars.get(folder, [])
                if c.rsplit("/", 1)[-1].startswith(stem) or _is_product_sidecar(c)]
        scenes.append(Source("s2_stacked", uri, {"image": uri}, sorted(cars)))
    scenes.sort(key=lambda s: s.uri)
    return scenes, skipped


def _is_product_sidecar(uri: str) -> bool:
    name = uri.rsplit("/", 1)[-1]
    return name.startswith("MTD_MSIL") or name == "tileInfo.json" or name == "metadata.xml"


def discover_aerial(entries: list[str]) -> tuple[list[Source], list[Skipped]]:
    """Aerial images (every raster file named by the entries), sorted."""
    out: list[Source] = []
    skipped: list[Skipped] = []
    for entry in entries:
        found, bad = expand(entry)
        skipped.extend(bad)
        for uri in found:
            if _ext(uri) in RASTER_EXTENSIONS:
                out.append(Source("aerial", uri, {"image": uri}))
    uniq = {s.uri: s for s in out}
    return [uniq[k] for k in sorted(uniq)], skipped


def discover_sar(entries: list[str]) -> tuple[list[Source], list[Skipped]]:
    """Sentinel-1 VV/VH pairs (grouped by folder and the prefix before the polarisation token), sorted.

    A raster without a ``VV``/``VH`` token is skipped with the reason; a pair that lacks one
    polarisation is still returned, and its probe fails naming the missing file.
    """
    groups: dict[str, dict[str, str]] = {}
    skipped: list[Skipped] = []
    for entry in entries:
        found, bad = expand(entry)
        skipped.extend(bad)
        for uri in found:
            if _ext(uri) not in RASTER_EXTENSIONS:
                continue
            folder, name = uri.rsplit("/", 1) if "/" in uri else ("", uri)
            m = _POL.search(os.path.splitext(name)[0])
            if m is None:
                skipped.append(Skipped(uri, "skipped", "no polarisation token VV or VH in the file name "
                                       "(expected <patch>_VV.tif and <patch>_VH.tif)"))
                continue
            scene = f"{folder}/{name[: m.start()]}".rstrip("/_") or folder
            groups.setdefault(scene, {}).setdefault(m.group(1).upper(), uri)
    return [Source("s1_pair", k, dict(sorted(groups[k].items()))) for k in sorted(groups)], skipped
