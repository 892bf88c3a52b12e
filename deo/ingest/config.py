"""Typed config of ``pipelines/ingest.py`` (keys listed in DESIGN.md are a contract).

GSD choice: ``tile.ms_px`` pixels of the 10 m grid make an MS tile. When a tile gets an optical crop
(a co-located aerial image, or the S2 true colour), that crop covers exactly the MS tile's footprint,
because views are cut with the same geometry from both modalities; its GSD is therefore
``ms_px * ms_gsd / optical_px`` and is recorded per row in ``optical_gsd``. The key ``optical_gsd``
sets the GSD of aerial images tiled on their own (rows without MS): 0.5 m by default, between NAIP
(1 m) and NEON (0.1 m), so the sample aerial images give whole tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from deo.bands import S2_TRUE_COLOUR_MAX, parse_band_order
from deo.config import nested, option

S2_SAMPLES = "data/samples/s2"
AERIAL_SAMPLES = "data/samples/aerial"


@dataclass
class TileConfig:
    """Tile sizes in pixels."""

    ms_px: int = option(64, help="MS tile side in pixels of the 10 m grid (the tiny model crops 64/32 px)")
    optical_px: int = option(64, help="optical tile side in pixels")
    window_tiles: int = option(4, help="tiles per window side: each read covers window_tiles^2 tiles")

    def __post_init__(self) -> None:
        for k in ("ms_px", "optical_px", "window_tiles"):
            if getattr(self, k) < 1:
                raise ValueError(f"tile.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class IngestConfig:
    """Sentinel-2 and aerial imagery -> Parquet shards + manifest.json."""

    s2: list[str] = option(
        [S2_SAMPLES],
        help="Sentinel-2 inputs: files, folders (searched recursively) or globs; local, file://, s3://, gs://",
    )
    aerial: list[str] = option([AERIAL_SAMPLES], help="aerial RGB(N) GeoTIFF inputs: files, folders or globs")
    sar: list[str] = option(
        [], help="Sentinel-1 inputs: single-polarisation GeoTIFFs named by VV/VH (BigEarthNet-S1 "
        "<patch>_VV.tif, <patch>_VH.tif), float32 backscatter in dB; files, folders or globs. Each MS tile "
        "wholly covered by a VV+VH pair gets a `sar` crop on its grid (empty: no `sar` column)",
    )
    s2_band_order: list[str] = option(
        [], help="band order of stacked S2 files without band descriptions: a preset "
        "(s2_13, eurosat, s2_l2a_12, deo), a list [B01,...,B8A] or a comma string B01,...,B8A "
        "(empty: stacked files must describe their bands)",
    )
    s2_offset: int = option(
        0, help="DN offset removed from products whose metadata gives no processing baseline "
        "(1000 for baseline 04.00+ data without MTD XML or product name)",
    )
    s2_optical: bool = option(True, help="write the S2 true colour (B04 B03 B02) as optical when no aerial covers a tile")
    s2_optical_max: int = option(S2_TRUE_COLOUR_MAX, help="reflectance x 10000 mapped to 255 in the S2 true colour (linear, clipped)")
    output: str = option("runs/shards/samples", help="output folder or URI for Parquet shards and manifest.json")
    tile: TileConfig = nested(TileConfig)
    optical_gsd: float = option(0.5, help="metres per pixel of aerial tiles without MS (see module docstring)")
    pair: bool = option(True, help="put a co-located aerial crop into the optical column of MS tiles it covers")
    max_nodata: float = option(0.1, help="reject tiles with a larger fraction of nodata pixels")
    max_cloud: float = option(0.3, help="reject tiles with a larger cloud fraction (SCL classes 3, 8, 9, 10)")
    strict: bool = option(False, help="exit non-zero when any input failed")
    rows_per_file: int = option(512, help="most tiles per Parquet shard file")
    use_ray: bool = option(True, help="run on Ray Data (false: a plain single-process loop)")
    summary: str = option("", help="where to write the summary JSON (empty: <output>/summary.json)")
    ray_resources: dict[str, float] = option(
        {}, help="custom Ray resources each ingest task requests, e.g. {deo_ingest: 1} so tasks run on "
        "the CPU ingestion pool of cluster/*.yaml (docs/cluster.md); empty on a laptop. Checked against "
        "the cluster's resources before the run unless an autoscaler can add nodes",
    )

    def __post_init__(self) -> None:
        if self.s2_band_order:
            self.s2_band_order_tuple()  # raises ValueError for unknown presets or bands
        if self.optical_gsd <= 0:
            raise ValueError(f"optical_gsd must be > 0 metres, got {self.optical_gsd}")
        for k in ("max_nodata", "max_cloud"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be a fraction in [0, 1], got {v}")
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        if not self.output:
            raise ValueError("output must name a folder or URI")
        if self.s2_offset < 0:
            raise ValueError(f"s2_offset must be >= 0 (e.g. 1000), got {self.s2_offset}")
        for k, v in self.ray_resources.items():
            if k in ("CPU", "GPU", "memory", "object_store_memory") or not k:
                raise ValueError(f"ray_resources.{k}: expected a custom resource name such as deo_ingest "
                                 "(CPU, GPU and memory are not custom resources)")
            if not float(v) > 0:
                raise ValueError(f"ray_resources.{k} must be > 0, got {v}")
        if self.ray_resources and not self.use_ray:
            raise ValueError(f"ray_resources={self.ray_resources} needs use_ray=true (got use_ray=false)")

    def s2_band_order_tuple(self) -> tuple[str, ...] | None:
        """``s2_band_order`` parsed (None when empty)."""
        return parse_band_order(self.s2_band_order) if self.s2_band_order else None
