"""Rebuild data/samples from the team's real data (../shared/data); see README.md here for each file.

    python data/samples/make_samples.py [SHARED_DATA]

Only crops, band subsets, lossless re-compression and band descriptions (EuroSAT, the N0400 stack) are
applied: pixel values are copied unchanged.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

HERE = Path(__file__).resolve().parent
DEO_FILE_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
SAFE_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
EUROSAT_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
L2A = "s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A"
L1C = "s2_l1c_tile/sentinel-s2-l1c/tiles/19/U/DP/2017/7/29/0"
N0400 = "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549"
L2A_CROP_10M = 704  # 11 x 11 tiles of 64 px
EUROSAT_PER_CLASS = 4


def crop(src_path: Path, dst_path: Path, window: Window, driver: str = "GTiff", cog: bool = False,
         descriptions: tuple[str, ...] | None = None) -> None:
    """Copy a window of every band, DEFLATE + predictor 2 (lossless), same dtype and nodata."""
    with rasterio.open(src_path) as src:
        data = src.read(window=window)
        profile = src.profile.copy()
        profile.update(
            driver=driver, width=int(window.width), height=int(window.height),
            transform=window_transform(window, src.transform), compress="deflate", predictor=2, zlevel=9,
        )
        for k in ("blockxsize", "blockysize", "tiled", "interleave"):
            profile.pop(k, None)
        if cog:
            profile.update(driver="COG", blocksize=256, overviews="NONE")  # tiled, header first
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(data)
            if descriptions:
                for i, d in enumerate(descriptions, start=1):
                    dst.set_band_description(i, d)


def describe_bands(path: Path, descriptions: tuple[str, ...]) -> None:
    """Name the bands of a copied stack in place (GDAL metadata only; pixels untouched)."""
    path.chmod(0o644)  # the source files are read-only
    with rasterio.open(path, "r+") as dst:
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)


def main(shared: Path) -> None:
    """Write every sample below data/samples."""
    for sub in ("s2", "aerial"):
        shutil.rmtree(HERE / sub, ignore_errors=True)
    # L2A 29RKH: the top-left 704 x 704 px of the 10 m grid (here 100 m pixels), COGs like sentinel-cogs.
    l2a_out = HERE / "s2/l2a_29RKH/S2A_29RKH_20200219_0_L2A"
    for band in (*DEO_FILE_BANDS, "SCL"):
        native10 = band in ("B02", "B03", "B04", "B08")
        size = L2A_CROP_10M if native10 else L2A_CROP_10M // 2
        crop(shared / L2A / f"{band}.tif", l2a_out / f"{band}.tif", Window(0, 0, size, size), cog=True)
    shutil.copy(shared / L2A / "S2A_29RKH_20200219_0_L2A.json", l2a_out)
    # L1C 19UDP: GeoTIFFs named .jp2 as in the AWS L1C bucket; a 64 x 64 crop at the swath's west edge.
    l1c_out = HERE / "s2/l1c_19UDP/tiles/19/U/DP/2017/7/29/0"
    for band in DEO_FILE_BANDS:
        crop(shared / L1C / f"{band}.jp2", l1c_out / f"{band}.jp2", Window(58, 0, 64, 64))
    shutil.copy(shared / L1C / "tileInfo.json", l1c_out)
    # Baseline 04.00 crop (+1000 DN offset) with its MTD XML; band descriptions (SAFE order) added.
    base_out = HERE / "s2/baselines"
    base_out.mkdir(parents=True)
    for suffix in (".tif", "_MTD.xml"):
        shutil.copy(shared / "s2_baselines" / f"{N0400}{suffix}", base_out)
    describe_bands(base_out / f"{N0400}.tif", SAFE_ORDER)
    # EuroSAT: the first tiles of each class, band descriptions added (the files carry none).
    for cls_dir in sorted((shared / "eurosat_ms").iterdir()):
        for tif in sorted(cls_dir.glob("*.tif"))[:EUROSAT_PER_CLASS]:
            crop(tif, HERE / "s2/eurosat" / tif.name, Window(0, 0, 64, 64), descriptions=EUROSAT_ORDER)
    # Aerial: the two NAIP subsets (two UTM zones) and one NEON tile, unchanged.
    aerial = HERE / "aerial"
    (aerial / "naip").mkdir(parents=True)
    (aerial / "neon").mkdir(parents=True)
    for name in ("m_3607717_sw_18_1_20160620_subset.tif", "m_3607824_se_17_1_20160620_subset.tif"):
        shutil.copy(shared / "naip" / name, aerial / "naip")
    shutil.copy(shared / "neon_rgb" / "HARV" / "HARV_001.tif", aerial / "neon")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
