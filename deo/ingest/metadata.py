"""Product metadata of a Sentinel-2 scene: DN offset, processing level and acquisition time.

The offset of processing baseline 04.00+ (+1000 on every DN) is not written in the rasters. In order
of precedence it comes from the MTD XML (``RADIO_ADD_OFFSET`` for L1C, ``BOA_ADD_OFFSET`` for L2A),
from a STAC item (``earthsearch:boa_offset_applied``, ``s2:processing_baseline``), from the product
name (``_N0400_``) in a sidecar or in the path, and last from the config (``s2_offset``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from deo.bands import baseline_from_product_name, offset_for_baseline
from deo.io import storage

_ADD_OFFSET = re.compile(r"<(RADIO|BOA)_ADD_OFFSET[^>]*>\s*(-?\d+)\s*<")
_XML_BASELINE = re.compile(r"<PROCESSING_BASELINE>\s*(\d{2})\.(\d{2})\s*<")
_XML_TIME = re.compile(r"<(?:PRODUCT_START_TIME|SENSING_TIME|DATATAKE_SENSING_START)[^>]*>\s*([0-9T:.\-]+Z?)")
_NAME_TIME = re.compile(r"(?<!\d)(20\d{2})(\d{2})(\d{2})T(\d{6})(?!\d)")
_NAME_DATE = re.compile(r"(?<!\d)(20\d{2})(\d{2})(\d{2})(?:T|_)")
_PATH_DATE = re.compile(r"/(20\d{2})/(\d{1,2})/(\d{1,2})(?:/|$)")


@dataclass(frozen=True)
class ProductInfo:
    """What the metadata says about one scene."""

    offset: int
    """DN offset to subtract (0 or 1000)."""
    offset_from: str
    """Where the offset came from: ``mtd_xml``, ``stac``, ``product_name`` or ``config``."""
    level: str
    """``L1C``, ``L2A`` or ``unknown``."""
    time: datetime | None
    """Acquisition time (UTC) if known."""


def _parse_time(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _time_from_name(text: str) -> datetime | None:
    m = _NAME_TIME.search(text)
    if m:
        y, mo, d, hms = m.groups()
        return datetime(int(y), int(mo), int(d), int(hms[:2]), int(hms[2:4]), int(hms[4:]), tzinfo=UTC)
    m = _NAME_DATE.search(text)  # e.g. BigEarthNet's "20170924T93020" (hour lacks its leading zero)
    if m:
        return datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)), tzinfo=UTC)
    m = _PATH_DATE.search(text)  # AWS layout tiles/19/U/DP/2017/7/29/0
    if m:
        return datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)), tzinfo=UTC)
    return None


def read_product_info(scene_uri: str, sidecars: list[str], has_scl: bool, default_offset: int) -> ProductInfo:
    """Offset, level and time of a scene from its sidecars and names.

    Args:
        scene_uri: the scene id (its path often holds the product name).
        sidecars: MTD XML / JSON files beside the scene.
        has_scl: whether the scene has a scene classification (an L2A product).
        default_offset: ``s2_offset`` from the config, used when nothing else says.

    Raises:
        ValueError: an MTD XML lists different offsets for different bands.
    """
    offset: int | None = None
    offset_from = "config"
    time: datetime | None = None
    names = [scene_uri]
    for uri in sidecars:
        text = storage.read_text(uri)
        if uri.lower().endswith(".xml"):
            offsets = {-int(v) for _, v in _ADD_OFFSET.findall(text)}
            if len(offsets) > 1:
                raise ValueError(f"{uri}: per-band offsets {sorted(offsets)} differ; expected one value")
            if offsets and offset is None:
                offset, offset_from = offsets.pop(), "mtd_xml"
            m = _XML_BASELINE.search(text)
            if m and offset is None:
                offset = offset_for_baseline((int(m.group(1)), int(m.group(2))))
                offset_from = "mtd_xml"
            m = _XML_TIME.search(text)
            if m and time is None:
                time = _parse_time(m.group(1))
        else:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                continue
            props = doc.get("properties", doc) if isinstance(doc, dict) else {}
            if offset is None and props.get("earthsearch:boa_offset_applied") is True:
                offset, offset_from = 0, "stac"  # the publisher already subtracted it
            baseline = props.get("s2:processing_baseline")
            if offset is None and isinstance(baseline, str) and re.fullmatch(r"\d{2}\.\d{2}", baseline):
                offset = offset_for_baseline((int(baseline[:2]), int(baseline[3:])))
                offset_from = "stac"
            # BigEarthNet patch JSON: "tile_source" is the L1C product, "acquisition_date" the time
            for k in ("s2:product_uri", "productName", "id", "tile_source"):
                if isinstance(props.get(k), str):
                    names.append(props[k])
            for k in ("datetime", "timestamp", "acquisition_date"):
                if time is None and isinstance(props.get(k), str):
                    time = _parse_time(props[k])
    if offset is None:
        for name in names:
            baseline = baseline_from_product_name(name)
            if baseline is not None:
                offset, offset_from = offset_for_baseline(baseline), "product_name"
                break
    if offset is None:
        offset = default_offset
    blob = " ".join(names).upper()
    level = "L2A" if ("L2A" in blob or has_scl) else "L1C" if "L1C" in blob else "unknown"
    if time is None:
        for name in names:
            time = _time_from_name(name)
            if time is not None:
                break
    return ProductInfo(offset=int(offset), offset_from=offset_from, level=level, time=time)
