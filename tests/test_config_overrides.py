"""Command-line overrides: values holding '=', Hydra-style '+key=value', empty values, keys below a value."""

from __future__ import annotations

import re

import pytest

from deo.config import ConfigError, build_config
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


def test_an_empty_value_is_an_empty_string_list_or_mapping_and_refused_elsewhere():
    """``key=`` (nothing after '='): ``aerial=`` means no aerial sources, not one source named ''."""
    cfg = build_config(IngestConfig, overrides=["aerial=", "sar= ", "ray_resources=", "summary="])
    assert cfg.aerial == [] and cfg.sar == [] and cfg.ray_resources == {} and cfg.summary == ""
    for override, expected in (("train.lr=", "expected float"), ("train.compile=", "expected bool"),
                               ("train.max_steps=", "expected int")):
        with pytest.raises(ConfigError, match=f"{re.escape(override)} gives no value: {expected}"):
            build_config(PretrainConfig, overrides=[override])


def test_a_key_below_a_single_value_names_it():
    """``data`` is the shards' URI: ``data.shards=...`` is refused as a key, not as a 'DictConfig'."""
    with pytest.raises(ConfigError, match=r"unknown config key 'data.shards' in command line: 'data' is a "
                                          r"single value \(str\), not a section"):
        build_config(PretrainConfig, overrides=["data.shards=s3://b/x"])
    with pytest.raises(ConfigError, match=r"'train.lr.peak' in y.yaml: 'train.lr' is a single value"):
        build_config(PretrainConfig, {"train": {"lr": {"peak": 1}}}, source="y.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.shards' in command line: 'data' is a "
                                          r"single value \(str\), not a section"):  # it crashed with a TypeError
        build_config(PretrainConfig, overrides=["data=s3://b/y", "data.shards=s3://b/x"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.shards' in command line: 'data' is a "
                                          r"single value"):  # the other order kept data=y, dropping the typo
        build_config(PretrainConfig, overrides=["data.shards=s3://b/x", "data=s3://b/y"])
    with pytest.raises(ConfigError, match=r"unknown config key 'foo' in command line"):
        build_config(PretrainConfig, overrides=["foo=1", "foo.bar=2"])
    with pytest.raises(ConfigError, match=r"'train' in command line is a section; expected a mapping"):
        build_config(PretrainConfig, overrides=["train=3", "train.max_steps=1"])
    cfg = build_config(PretrainConfig, overrides=["scaling.worker_resources={accel: 1}"])
    assert cfg.scaling.worker_resources == {"accel": 1}  # a mapping-typed key still takes a mapping


def test_a_mapping_given_whole_replaces_the_yamls_and_an_entry_edits_one():
    """OmegaConf merges mappings: `scaling.worker_resources=` left reference.yaml-style {deo_train: 1} in place."""
    yaml = {"scaling": {"worker_resources": {"deo_train": 1}}}
    assert build_config(PretrainConfig, yaml, ["scaling.worker_resources="]).scaling.worker_resources == {}
    got = build_config(PretrainConfig, yaml, ["scaling.worker_resources={deo_gpu: 2}"]).scaling.worker_resources
    assert got == {"deo_gpu": 2}
    got = build_config(PretrainConfig, yaml, ["scaling.worker_resources.deo_gpu=2"]).scaling.worker_resources
    assert got == {"deo_train": 1, "deo_gpu": 2}
    assert build_config(PretrainConfig, yaml).scaling.worker_resources == {"deo_train": 1}
