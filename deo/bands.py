"""Sensors and bands as data: names, native GSD, wavelengths, stacked-file orders, offsets.

The multispectral model input is always :data:`DEO_BANDS` in that order; optical is :data:`RGB_BANDS`;
optional SAR is :data:`SAR_BANDS`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    """One spectral band of a sensor."""

    name: str
    gsd: float
    """Native ground sampling distance in metres."""
    wavelength_nm: float
    """Central wavelength in nanometres (0 for non-optical bands)."""


S2_BANDS: dict[str, Band] = {
    b.name: b
    for b in (
        Band("B01", 60, 443),
        Band("B02", 10, 490),
        Band("B03", 10, 560),
        Band("B04", 10, 665),
        Band("B05", 20, 705),
        Band("B06", 20, 740),
        Band("B07", 20, 783),
        Band("B08", 10, 842),
        Band("B8A", 20, 865),
        Band("B09", 60, 945),
        Band("B10", 60, 1375),
        Band("B11", 20, 1610),
        Band("B12", 20, 2190),
    )
}
"""All 13 Sentinel-2 MSI bands."""

DEO_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
"""The 10 bands of the multispectral branch, in model order."""

S2_10M_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08")
"""Bands whose grid defines the 10 m target grid (whatever their actual pixel size)."""

S2_TRUE_COLOUR: tuple[str, ...] = ("B04", "B03", "B02")
"""Sentinel-2 bands forming an RGB true-colour image."""

S2_TRUE_COLOUR_MAX: int = 3000
"""Reflectance x 10000 mapped to 255 in the S2 true colour (0.3 reflectance; ingest's ``s2_optical_max``)."""


def true_colour_max(stats: dict) -> float:
    """The S2 true-colour stretch of a manifest's (or checkpoint's, export's) ``stats``: ingest records its
    ``s2_optical_max`` beside the optical stats; older ones used :data:`S2_TRUE_COLOUR_MAX`."""
    return float(stats.get("optical", {}).get("s2_true_colour_max", S2_TRUE_COLOUR_MAX))


NIR_PAIR_RATIO: tuple[float, float] = (0.7, 1.5)
"""Plausible B8A / B08 mean ratios. The two NIR bands (865 and 842 nm) agree closely in real scenes:
EuroSAT-MS per class 0.81 (SeaLake) to 1.19, the committed samples 1.01, BigEarthNet 1.03; EuroSAT read
with the s2_13 preset instead of eurosat gives 0.31."""


def band_order_warning(means: Sequence[float | None], order: str, bands: Sequence[str] = DEO_BANDS) -> str | None:
    """A warning when per-band means (stored units, in ``bands`` order) look read in a wrong band order.

    Stacked files carry no band names; a wrong ``s2_band_order`` preset still reads 10 plausible-looking
    bands, so the one sign is physics: B8A far from B08. Dark sets (both below 300, e.g. open water) are
    not judged. ``order``: what to name as the suspect (the key and its value).
    """
    b08, b8a = means[bands.index("B08")], means[bands.index("B8A")]
    if b08 is None or b8a is None or max(b08, b8a) < 300:
        return None
    ratio = b8a / max(b08, 1e-9)
    lo, hi = NIR_PAIR_RATIO
    if lo <= ratio <= hi:
        return None
    return (f"B8A's mean is {ratio:.2f}x B08's ({b8a:.0f} vs {b08:.0f}); these NIR bands agree within about "
            f"{lo}-{hi}x in real scenes, so the bands were probably read in a wrong order: check {order}")


RGB_BANDS: tuple[str, ...] = ("R", "G", "B")
"""The optical branch input."""

SAR_BANDS: tuple[str, ...] = ("VV", "VH")
"""Sentinel-1 backscatter in dB."""

S2_BAND_ORDER_PRESETS: dict[str, tuple[str, ...]] = {
    # ESA/SAFE order with B8A after B08 (13 bands); e.g. the s2_baselines crops.
    "s2_13": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"),
    # EuroSAT-MS GeoTIFFs: B8A last.
    "eurosat": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"),
    # L2A without B10 (12 bands), e.g. BigEarthNet stacks.
    "s2_l2a_12": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
    # Already the model's 10 bands.
    "deo": DEO_BANDS,
}
"""Known band orders of stacked Sentinel-2 files that carry no band descriptions."""

REFLECTANCE_SCALE = 10000
"""Sentinel-2 digital numbers are reflectance x 10000 (QUANTIFICATION_VALUE)."""

BASELINE_OFFSET = 1000
"""Processing baseline 04.00 (25 Jan 2022) and later add this to every DN."""

_BAND_TOKEN = re.compile(r"(?<![A-Za-z0-9])(B(?:0[1-9]|1[0-2]|8A))(?![0-9])", re.IGNORECASE)
_BASELINE = re.compile(r"_N(\d{2})(\d{2})_")


def normalise_band_name(name: str) -> str:
    """``b8a`` -> ``B8A``, ``B2`` -> ``B02``; raises ValueError for unknown names."""
    n = name.strip().upper()
    if re.fullmatch(r"B\d", n):
        n = "B0" + n[1]
    if n not in S2_BANDS:
        raise ValueError(f"unknown Sentinel-2 band {name!r}; expected one of {', '.join(S2_BANDS)}")
    return n


def parse_band_order(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A band order from a preset name, a comma string or a list of band names.

    Raises:
        ValueError: unknown preset or band name, or a band listed twice.
    """
    if isinstance(value, str):
        key = value.strip()
        if key.lower() in S2_BAND_ORDER_PRESETS:
            return S2_BAND_ORDER_PRESETS[key.lower()]
        items = [v for v in key.split(",") if v.strip()]
        if len(items) == 1:
            presets = ", ".join(S2_BAND_ORDER_PRESETS)
            raise ValueError(
                f"unknown s2_band_order {value!r}: expected a preset ({presets}) or a comma list "
                "of bands such as B01,B02,...,B8A"
            )
    else:
        items = list(value)
        if len(items) == 1:  # a preset name or a comma string, given as a one-item list
            return parse_band_order(items[0])
    try:
        order = tuple(normalise_band_name(v) for v in items)
    except ValueError as e:
        raise ValueError(f"s2_band_order {value!r}: {e}") from None
    if len(set(order)) != len(order):
        raise ValueError(f"s2_band_order {value!r} lists a band twice")
    return order


def band_from_filename(name: str) -> str | None:
    """The S2 band token in a file name (``T29RKH_B8A.jp2`` -> ``B8A``), or None."""
    base = name.rsplit("/", 1)[-1]
    m = _BAND_TOKEN.search(base)
    return m.group(1).upper() if m else None


def baseline_from_product_name(name: str) -> tuple[int, int] | None:
    """Processing baseline from a SAFE product name (``..._N0400_...`` -> (4, 0)), or None."""
    m = _BASELINE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def offset_for_baseline(baseline: tuple[int, int] | None) -> int | None:
    """The DN offset of a processing baseline: 1000 from 04.00 on, 0 before, None if unknown."""
    if baseline is None:
        return None
    return BASELINE_OFFSET if baseline >= (4, 0) else 0


def indices_of(order: tuple[str, ...], wanted: tuple[str, ...] = DEO_BANDS) -> list[int]:
    """Positions of ``wanted`` bands within ``order``.

    Raises:
        ValueError: a wanted band is missing from ``order``.
    """
    missing = [b for b in wanted if b not in order]
    if missing:
        raise ValueError(f"band order {','.join(order)} lacks {','.join(missing)}")
    return [order.index(b) for b in wanted]
