"""Command-line overrides: values holding '=', and Hydra-style '+key=value'."""

from __future__ import annotations

from deo.config import build_config
from deo.ingest.config import IngestConfig
from deo.train.config import PretrainConfig


def test_an_override_value_may_contain_equals_signs():
    cfg = build_config(IngestConfig, overrides=["output=s3://bucket/run=3/shards", "s2=[s3://b/k=v/x.tif]"])
    assert cfg.output == "s3://bucket/run=3/shards"
    assert list(cfg.s2) == ["s3://b/k=v/x.tif"]
    sweep = build_config(PretrainConfig, overrides=["run.name=lr=1e-4"])
    assert sweep.run.name == "lr=1e-4"


def test_a_leading_plus_is_accepted_as_in_hydra():
    cfg = build_config(PretrainConfig, overrides=["+train.max_steps=7", " +run.name=x"])
    assert cfg.train.max_steps == 7 and cfg.run.name == "x"
