"""Command-line overrides: values holding '=', Hydra-style '+key=value', empty values, keys below a value."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from deo.config import ConfigError, build_config, nested, option
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


@dataclass
class _Inputs:
    folder: str = option("")
    files: list[str] = option([], replaces=("folder",))


@dataclass
class _Job:
    labelled: str = option("", replaces=("train", "test"))
    train: str = option("", replaces=("labelled",))
    test: str = option("", replaces=("labelled",))
    inputs: _Inputs = nested(_Inputs)

    def __post_init__(self):
        if self.labelled and self.train:
            raise ValueError("give either labelled or train + test, not both")


def test_a_command_line_key_replaces_its_alternatives_from_the_config_file():
    """The default evaluate config names a dataset; ``train_set=`` ``test_set=`` on the command line (the
    documented form) clashed with it. An alternative given on the command line drops the file's."""
    yaml_data = {"labelled": "data/samples/x.csv", "inputs": {"folder": "f/"}}
    cfg = build_config(_Job, yaml_data, ["train=a.csv", "test=b.csv", "inputs.files=[x.tif]"])
    assert (cfg.labelled, cfg.train, cfg.test) == ("", "a.csv", "b.csv")
    assert cfg.inputs.folder == "" and cfg.inputs.files == ["x.tif"]  # in a section too
    assert build_config(_Job, yaml_data, []).labelled == "data/samples/x.csv"  # nothing replaced it
    assert yaml_data == {"labelled": "data/samples/x.csv", "inputs": {"folder": "f/"}}  # the caller's dict kept
    # both on the command line: nothing is dropped, and the class's own check refuses the pair
    with pytest.raises(ConfigError, match="give either labelled or train"):
        build_config(_Job, yaml_data, ["labelled=c.csv", "train=a.csv", "test=b.csv"])
    # in the file both, on the command line one: the command line's wins, the file's alternatives go
    cfg = build_config(_Job, {"train": "a.csv", "test": "b.csv"}, ["labelled=c.csv"])
    assert (cfg.labelled, cfg.train, cfg.test) == ("c.csv", "", "")


def test_evaluate_takes_train_and_test_sets_in_place_of_the_default_dataset():
    from deo.config import load_config
    from deo.eval.config import EvalConfig

    from tests_helpers import REPO

    default = REPO / "configs/eval/default.yaml"
    cfg = load_config(EvalConfig, ["train_set=tr.csv", "test_set=te.csv"], default)
    assert (cfg.dataset, cfg.train_set, cfg.test_set) == ("", "tr.csv", "te.csv")
    assert load_config(EvalConfig, [], default).dataset == "data/samples/eurosat_probe.csv"
    with pytest.raises(ConfigError, match="train_set and test_set go together"):
        load_config(EvalConfig, ["test_set=te.csv"], default)
