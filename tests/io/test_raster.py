"""Raster helpers: GDAL reaches the S3 endpoint of AWS_ENDPOINT_URL; windowed reads on another grid."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from deo.io.raster import RasterCache, gdal_s3_env, read_on_grid

B05 = "s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A/B05.tif"
B02 = "s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A/B02.tif"


def test_gdal_env_from_aws_endpoint_url(monkeypatch):
    monkeypatch.delenv("AWS_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert gdal_s3_env() == {"AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example:443")
    assert gdal_s3_env()["AWS_HTTPS"] == "YES"


def test_window_of_20m_band_on_10m_grid_equals_whole_reprojection(shared_data, s3_server, s3_bucket):
    uri = s3_server.upload_dir(shared_data / B05.rsplit("/", 1)[0], s3_bucket + "/l2a")
    with rasterio.open(shared_data / B02) as ref, rasterio.open(shared_data / B05) as src:
        whole = np.zeros((ref.height, ref.width), np.uint16)
        reproject(src.read(1), whole, src_transform=src.transform, src_crs=src.crs, dst_transform=ref.transform,
                  dst_crs=ref.crs, resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
        grid = (ref.transform, ref.crs, ref.width, ref.height)
    cache = RasterCache(max_open=1)
    window = Window(300, 500, 96, 64)
    for path in (str(shared_data / B05), uri + "/B05.tif"):
        got = read_on_grid(cache.get(path), [1], *grid, window=window, src_nodata=0)
        assert got.shape == (1, 64, 96)
        assert np.abs(got[0].astype(int) - whole[500:564, 300:396].astype(int)).max() <= 1
    direct = read_on_grid(cache.get(uri + "/B02.tif"), [1], *grid, window=window)
    with rasterio.open(shared_data / B02) as ref:
        np.testing.assert_array_equal(direct, ref.read([1], window=window))
    cache.close()
