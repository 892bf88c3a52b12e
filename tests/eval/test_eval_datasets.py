"""Labelled sets read from real EuroSAT-MS and BigEarthNet files, checked against direct rasterio reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch

from deo.eval.datasets import (
    detect_modality,
    load_images,
    load_labelled_set,
    read_item,
    s2_true_colour,
)

EUROSAT_COUNTS = {"AnnualCrop": 24, "Forest": 24, "HerbaceousVegetation": 24, "Highway": 20, "Industrial": 20,
                  "Pasture": 16, "PermanentCrop": 20, "Residential": 24, "River": 20, "SeaLake": 24}


def test_eurosat_folders_and_band_mapping(shared_data):
    ds = load_labelled_set(str(shared_data / "eurosat_ms"))
    assert ds.counts() == EUROSAT_COUNTS and not ds.multi_label
    item = ds.items[30]
    assert ds.classes[ds.labels[30]] in item
    with rasterio.open(item) as src:
        ref = src.read()[[1, 2, 3, 4, 5, 6, 7, 12, 10, 11]].astype(np.float32)  # B8A is last in EuroSAT
    got = read_item(item, "ms", ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"))
    np.testing.assert_array_equal(got, ref)
    assert detect_modality(item) == "ms"
    x = load_images(ds.subset([0, 30]), "ms", "eurosat", image_size=32)
    assert x.shape == (2, 10, 32, 32)
    with pytest.raises(ValueError, match="13 bands but s2_band_order lists 10"):
        read_item(item, "ms", ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"))
    rgb = s2_true_colour(torch.from_numpy(ref)[None])
    np.testing.assert_allclose(rgb[0, 0].numpy(), np.clip(np.round(ref[2] * 255 / 3000), 0, 255))


def test_bigearthnet_multilabel_csv_of_band_folders(shared_data, tmp_path):
    root = shared_data / "bigearthnet" / "BigEarthNet-S2-Example"
    rows = ["path,labels"]
    for patch in sorted(root.iterdir()):
        labels = json.loads(next(patch.glob("*_labels_metadata.json")).read_text())["labels"]
        rows.append(f"{patch},\"{';'.join(labels)}\"")
    (tmp_path / "ben.csv").write_text("\n".join(rows) + "\n")
    ds = load_labelled_set(str(tmp_path / "ben.csv"))
    assert ds.multi_label and ds.labels.shape == (6, len(ds.classes))
    assert ds.labels.sum(1).tolist() == [len(r.split(",", 1)[1].strip('"').split(";")) for r in rows[1:]]
    x = read_item(ds.items[0], "ms", ())
    assert x.shape == (10, 120, 120)  # 20 m bands resampled onto the 10 m grid
    b02 = next(p for p in (root / ds.items[0].rsplit("/", 1)[-1]).iterdir() if p.name.endswith("_B02.tif"))
    with rasterio.open(b02) as src:
        np.testing.assert_array_equal(x[0], src.read(1).astype(np.float32))


def test_missing_set_and_bad_list(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_labelled_set(str(tmp_path / "nope"))
    (tmp_path / "l.csv").write_text("file,y\na.tif,x\n")
    with pytest.raises(ValueError, match="expected 'path' and 'labels'"):
        load_labelled_set(str(tmp_path / "l.csv"))
