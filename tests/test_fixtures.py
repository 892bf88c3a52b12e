"""The test infrastructure itself: the S3 endpoint is reachable the way users reach AWS."""

import pyarrow.fs as pafs
import rasterio

from deo.io import storage


def test_s3_endpoint_through_s3fs_pyarrow_and_gdal(s3_server, s3_bucket, shared_data):
    src = shared_data / "s2_baselines"
    uri = s3_server.upload_dir(src, s3_bucket + "/baselines")
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(uri, ".tif")]
    assert "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549.tif" in names
    fs, path = storage.pyarrow_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path))
    assert any(i.path.endswith("_MTD.xml") for i in infos)
    name = "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549.tif"
    with rasterio.open(f"{uri}/{name}") as remote, rasterio.open(src / name) as local:
        assert (remote.read() == local.read()).all()
