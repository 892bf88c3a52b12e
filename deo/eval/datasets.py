"""Labelled image sets for evaluation: EuroSAT-style class folders or a Parquet/CSV list of labels.

Two layouts are read:

- a folder of class subfolders, each holding GeoTIFFs (EuroSAT-MS: 13-band stacks; aerial RGB tiles);
  the class is the subfolder name (single-label);
- a ``.csv`` or ``.parquet`` file with a ``path`` column (a stacked raster, or a folder of per-band
  files such as a BigEarthNet patch; relative paths resolve against the list's folder) and a
  ``labels`` (or ``label``) column: one class name per row (single-label), or several separated by
  ``;`` or ``|``, or a list column in Parquet (multi-label, multi-hot targets).

Multispectral rasters become the 10 DEO bands: stacked files through ``s2_band_order`` (their band
count must match it), per-band folders through the band token in each file name, resampled
bilinearly onto the grid of the finest band. Values stay in stored units (reflectance x 10000, uint8
for RGB), as in the shards, so the checkpoint's normalisation stats apply unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deo.bands import (
    DEO_BANDS,
    S2_TRUE_COLOUR_MAX,
    band_from_filename,
    indices_of,
    parse_band_order,
)
from deo.io import storage
from deo.io.raster import open_raster

RASTER_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".jp2")
MODALITIES: tuple[str, ...] = ("auto", "ms", "optical")


@dataclass
class LabelledSet:
    """Items and labels of an evaluation set.

    Attributes:
        source: the URI it was read from.
        items: one raster (or per-band folder) URI per sample.
        labels: (N,) class indices, or (N, C) 0/1 multi-hot for multi-label sets.
        classes: class names, index order.
    """

    source: str
    items: list[str]
    labels: np.ndarray
    classes: list[str]

    @property
    def multi_label(self) -> bool:
        """Whether ``labels`` is multi-hot."""
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: np.ndarray | list[int]) -> LabelledSet:
        """The samples at ``idx`` (classes unchanged)."""
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledSet(self.source, [self.items[i] for i in idx], self.labels[idx], self.classes)

    def counts(self) -> dict[str, int]:
        """Samples per class (positives per class for multi-label sets)."""
        per = self.labels.sum(0) if self.multi_label else np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, per, strict=True)}


def _is_raster(name: str) -> bool:
    return name.lower().endswith(RASTER_SUFFIXES)


def _from_class_folders(uri: str) -> LabelledSet:
    fs, root = storage.filesystem(uri)
    prefix = uri.split("://", 1)[0] + "://" if storage.is_remote(storage.strip_file_scheme(uri)) else ""
    classes = sorted(
        p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p)
    )
    items: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        files = sorted(f for f in fs.find(root.rstrip("/") + "/" + name) if _is_raster(f))
        items += [prefix + f for f in files]
        labels += [c] * len(files)
    if not items:
        raise ValueError(
            f"no labelled rasters under {uri}: expected class subfolders holding {RASTER_SUFFIXES} files "
            "(EuroSAT layout), or a .csv/.parquet list of path,labels"
        )
    return LabelledSet(uri, items, np.asarray(labels, dtype=np.int64), classes)


def _split_labels(value: object) -> list[str]:
    if isinstance(value, list | tuple | np.ndarray):
        return [str(v).strip() for v in value]
    text = str(value)
    for sep in (";", "|"):
        if sep in text:
            return [v.strip() for v in text.split(sep) if v.strip()]
    return [text.strip()] if text.strip() else []


def _from_list(uri: str) -> LabelledSet:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    table = pq.read_table(io.BytesIO(data)) if uri.lower().endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    cols = table.column_names
    label_col = "labels" if "labels" in cols else "label" if "label" in cols else None
    if "path" not in cols or label_col is None:
        raise ValueError(f"{uri} has columns {cols}; expected 'path' and 'labels' (or 'label')")
    paths = [str(p) for p in table.column("path").to_pylist()]
    raw = [_split_labels(v) for v in table.column(label_col).to_pylist()]
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    items = [p if ("://" in p or p.startswith("/")) else storage.join(base, p) for p in paths]
    classes = sorted({c for row in raw for c in row})
    multi = label_col == "labels" and (
        any(len(r) != 1 for r in raw) or str(table.schema.field(label_col).type).startswith(("list", "large_list"))
    )
    index = {c: i for i, c in enumerate(classes)}
    if multi:
        labels = np.zeros((len(raw), len(classes)), dtype=np.int64)
        for i, row in enumerate(raw):
            labels[i, [index[c] for c in row]] = 1
    else:
        if any(len(r) != 1 for r in raw):
            raise ValueError(f"{uri}: column 'label' must hold exactly one class per row")
        labels = np.asarray([index[r[0]] for r in raw], dtype=np.int64)
    return LabelledSet(uri, items, labels, classes)


def load_labelled_set(uri: str) -> LabelledSet:
    """Read a labelled set (class folders, or a .csv/.parquet list).

    Raises:
        ValueError: the location holds neither layout.
        FileNotFoundError: ``uri`` does not exist.
    """
    if not storage.exists(uri):
        raise FileNotFoundError(f"evaluation set {uri} not found")
    if uri.lower().endswith((".csv", ".parquet")):
        return _from_list(uri)
    return _from_class_folders(uri)


def _band_files(folder: str) -> dict[str, str]:
    return {b: f for f in storage.list_files(folder) if _is_raster(f) and (b := band_from_filename(f))}


def detect_modality(item: str) -> str:
    """``optical`` for uint8 rasters of 3 or 4 bands (RGB, RGBN), else ``ms``."""
    if not _is_raster(item):
        return "ms"
    with open_raster(item) as src:
        return "optical" if src.dtypes[0] == "uint8" and src.count in (3, 4) else "ms"


def read_item(item: str, modality: str, band_order: tuple[str, ...]) -> np.ndarray:
    """One sample in model channel order and stored units.

    Args:
        item: a stacked raster, or a folder of per-band files (band token in each name).
        modality: ``ms`` (the 10 DEO bands) or ``optical`` (the first three bands, RGB).
        band_order: band names of a stacked multispectral file, in file order.

    Returns:
        (10, H, W) or (3, H, W) float32 array.

    Raises:
        ValueError: band count or band names do not fit.
    """
    if modality == "optical":
        with open_raster(item) as src:
            if src.count < 3:
                raise ValueError(f"{item}: optical input needs >= 3 bands (RGB), found {src.count}")
            return src.read([1, 2, 3]).astype(np.float32)
    if modality != "ms":
        raise ValueError(f"modality must be 'ms' or 'optical', got {modality!r}")
    if not _is_raster(item):
        files = _band_files(item)
        missing = [b for b in DEO_BANDS if b not in files]
        if missing:
            raise ValueError(f"{item}: per-band files lack {','.join(missing)} (found {','.join(sorted(files))})")
        from rasterio.enums import Resampling

        sources = [open_raster(files[b]) for b in DEO_BANDS]
        try:
            h = max(s.height for s in sources)
            w = max(s.width for s in sources)
            bands = [s.read(1, out_shape=(h, w), resampling=Resampling.bilinear) for s in sources]
        finally:
            for s in sources:
                s.close()
        return np.stack(bands).astype(np.float32)
    with open_raster(item) as src:
        if src.count != len(band_order):
            raise ValueError(
                f"{item} has {src.count} bands but s2_band_order lists {len(band_order)} "
                f"({','.join(band_order)}); pass the file's band order"
            )
        idx = indices_of(band_order, DEO_BANDS)
        return src.read([i + 1 for i in idx]).astype(np.float32)


def load_images(
    ds: LabelledSet,
    modality: str,
    s2_band_order: str | list[str] | tuple[str, ...] = "eurosat",
    image_size: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Read every sample of ``ds`` into one tensor.

    Args:
        ds: the set.
        modality: ``ms`` or ``optical``.
        s2_band_order: order of stacked multispectral files (preset, comma string or list).
        image_size: resize every sample to this side (bilinear, antialiased); 0 keeps the native size,
            which must then be the same for all samples.
        progress: called as ``progress(done, total)``.

    Returns:
        (N, C, S, S) float32 in stored units.
    """
    order = parse_band_order(s2_band_order)
    out: list[torch.Tensor] = []
    for i, item in enumerate(ds.items):
        x = torch.from_numpy(read_item(item, modality, order))[None]
        if image_size and x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        if out and x.shape != out[0].shape:
            raise ValueError(
                f"{item} is {tuple(x.shape[-2:])} px but {ds.items[0]} is {tuple(out[0].shape[-2:])}; "
                "set image_size to resize samples to one size"
            )
        out.append(x)
        if progress:
            progress(i + 1, len(ds))
    return torch.cat(out)


def s2_true_colour(ms: torch.Tensor, max_value: float = S2_TRUE_COLOUR_MAX) -> torch.Tensor:
    """RGB (B04, B03, B02) of DEO-ordered tiles in uint8 units, for the optical branch and figures.

    Args:
        ms: (N, 10, H, W) reflectance x 10000.
        max_value: reflectance x 10000 mapped to 255 (:func:`deo.bands.true_colour_max` of the run's stats).

    Returns:
        (N, 3, H, W) float32 in [0, 255] (whole numbers).
    """
    rgb = ms[:, [DEO_BANDS.index(b) for b in ("B04", "B03", "B02")]]
    return (rgb.float() * (255.0 / max_value)).clamp(0, 255).round()
