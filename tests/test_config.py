"""Config loading: defaults <- YAML <- key=value, unknown keys and bad types rejected."""

import pytest

from deo.config import ConfigError, build_config, help_text, load_config, to_yaml
from deo.train.config import PretrainConfig


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  gamma: 0.5\n  alpha1: 0.25\ntrain:\n  max_steps: 7\n")
    cfg = load_config(PretrainConfig, ["--config", str(path), "loss.gamma=2", "teacher.layers=[1,3]"])
    assert cfg.loss.gamma == 2.0  # CLI wins over YAML
    assert cfg.loss.alpha1 == 0.25  # YAML wins over defaults
    assert cfg.loss.alpha2 == 0.5  # default kept
    assert cfg.train.max_steps == 7
    assert cfg.teacher.layers == [1, 3]


def test_unknown_key_suggests_the_closest_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.gama'.*did you mean 'loss.gamma'\?"):
        build_config(PretrainConfig, overrides=["loss.gama=1"])
    with pytest.raises(ConfigError, match=r"'trian' in command line; did you mean 'train'\?") as e:
        build_config(PretrainConfig, overrides=["trian.max_steps=1"])
    assert len(str(e.value)) < 200  # not every key of the config
    with pytest.raises(ConfigError, match=r"'loss.zzz' in command line; valid keys: loss.alpha1, "):
        build_config(PretrainConfig, overrides=["loss.zzz=1"])  # a short section: its keys
    with pytest.raises(ConfigError, match=r"'zzz' in command line; --help lists every key"):
        build_config(PretrainConfig, overrides=["zzz=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.True' in YAML"):
        build_config(PretrainConfig, {"train": {True: 1}})  # YAML 1.1 reads a key `on:` as True


def test_malformed_yaml_and_values_are_one_line_errors_naming_file_or_key(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 3\n bad: [\n")
    with pytest.raises(ConfigError, match=r"config file .*broken.yaml is not valid YAML at line 3, column 2"):
        load_config(PretrainConfig, ["--config", str(path)])
    with pytest.raises(ConfigError, match=r"views.global_scale=\[0.4,: not a valid value"):
        build_config(PretrainConfig, overrides=["views.global_scale=[0.4,"])
    with pytest.raises(ConfigError) as e:
        build_config(PretrainConfig, overrides=["train.max_steps=many"])
    assert str(e.value) == ("config key 'train.max_steps': Value 'many' of type 'str' could not be converted "
                            "to Integer (expected int)")


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"train.max_step.*bad.yaml"):
        load_config(PretrainConfig, ["--config", str(path)])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        build_config(PretrainConfig, overrides=["train.max_steps=many"])


def test_post_init_validation_is_reported():
    with pytest.raises(ConfigError, match=r"divisible by scaling.num_workers"):
        build_config(PretrainConfig, overrides=["train.batch_size=15", "scaling.num_workers=2"])


def test_bare_value_is_a_one_item_list():
    cfg = build_config(PretrainConfig, overrides=["teacher.layers=3"])
    assert cfg.teacher.layers == [3]


def test_resolved_yaml_round_trips(tmp_path):
    cfg = build_config(PretrainConfig, overrides=["loss.gamma=0.3", "run.name=x"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(PretrainConfig, ["--config", str(path)])
    assert again == cfg


def test_help_shows_the_defaults_a_run_would_get(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  head_hidden: 256\n")
    with pytest.raises(SystemExit):
        load_config(PretrainConfig, ["--help"], default_config=path)
    out = capsys.readouterr().out
    assert "model.head_hidden (int, default 256)" in out and str(path) in out
    assert "train.max_steps (int, default " in out  # keys the file leaves alone keep their defaults


def test_help_works_when_the_default_config_is_broken(tmp_path, capsys):
    """--help is what a user reaches for to fix a config: it lists the keys with the dataclass defaults
    and says on stderr why the file was left out."""
    for text, why in (("model: [unclosed\n", "not valid YAML"), ("modle:\n  head_hidden: 2\n", "unknown config key 'modle'")):
        path = tmp_path / "broken.yaml"
        path.write_text(text)
        with pytest.raises(SystemExit) as stop:
            load_config(PretrainConfig, ["--help"], default_config=path)
        assert stop.value.code == 0
        out, err = capsys.readouterr()
        assert "model.head_hidden (int, default " in out and "defaults below" not in out
        assert f"note: {path} was left out of the defaults below" in err and why in err


def test_help_lists_every_key():
    text = help_text(PretrainConfig)
    for key in ("loss.alpha1", "loss.gamma", "scaling.num_workers", "teacher.weights", "probe.every"):
        assert key in text


def test_string_overrides_stay_as_typed():
    """A str key keeps its text: YAML would read a Tune trial id like 27997_00000 as 2799700000, which
    once sent a sweep trial's run folder to trials/2799700000 while its results named 27997_00000."""
    from deo.train.config import PretrainConfig

    for raw in ("27997_00000", "1e3", "0x1f", "007", "true", "null"):
        cfg = build_config(PretrainConfig, None, [f"run.name={raw}"])
        assert cfg.run.name == raw
    assert build_config(PretrainConfig, None, ['run.name="quoted name"']).run.name == "quoted name"
    assert build_config(PretrainConfig, None, ["train.lr=1e-3"]).train.lr == 1e-3  # numbers still parse


def test_band_order_errors_name_the_key_and_the_presets():
    from deo.ingest.config import IngestConfig

    with pytest.raises(ConfigError, match=r"unknown s2_band_order 'eurosatt': expected a preset \(s2_13, eurosat"):
        build_config(IngestConfig, overrides=["s2_band_order=eurosatt"])
    with pytest.raises(ConfigError, match=r"s2_band_order \['B02', 'BXX'\]: unknown Sentinel-2 band 'BXX'"):
        build_config(IngestConfig, overrides=["s2_band_order=[B02,BXX]"])
    assert build_config(IngestConfig, overrides=["s2_band_order=[EuroSAT]"]).s2_band_order == ["EuroSAT"]


@pytest.mark.parametrize("cls_path,key", [("deo.ingest.config:IngestConfig", "s2_band_order"),
                                          ("deo.eval.config:EvalConfig", "s2_band_order"),
                                          ("deo.train.config:PretrainConfig", "probe.s2_band_order")])
def test_every_band_order_key_takes_a_preset_a_list_or_a_comma_string(cls_path, key):
    """DESIGN: s2_band_order is a list, a comma string or a preset name in every pipeline, on the command
    line and in YAML (evaluate's and the probe's were strings: a list failed late, or in YAML at once)."""
    import importlib

    from deo.bands import S2_BAND_ORDER_PRESETS, parse_band_order

    module, name = cls_path.split(":")
    cls = importlib.import_module(module).__dict__[name]

    def order(cfg):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        return parse_band_order(value)

    thirteen = list(S2_BAND_ORDER_PRESETS["s2_13"])
    section, _, leaf = key.rpartition(".")
    nest = (lambda v: {section: {leaf: v}}) if section else (lambda v: {leaf: v})
    for cli in (f"{key}=s2_13", f"{key}=[{','.join(thirteen)}]", f"{key}={','.join(thirteen)}"):
        assert order(build_config(cls, overrides=[cli])) == tuple(thirteen)
    for value in ("s2_13", thirteen, ",".join(thirteen)):
        assert order(build_config(cls, nest(value))) == tuple(thirteen)
    with pytest.raises(ConfigError, match="unknown Sentinel-2 band 'BXX'"):
        build_config(cls, overrides=[f"{key}=[B02,BXX]"])


def test_a_config_saved_by_an_older_version_shows_only_real_changes():
    """Old runs saved probe.s2_band_order as a string and teacher.layers as the tiny teacher's blocks:
    a resume or rerun reported both as changed."""
    from deo.config import config_changes
    from deo.train.driver import resolve_teacher_layers

    cfg = resolve_teacher_layers(build_config(PretrainConfig))
    assert cfg.teacher.layers == [2, 3]  # empty: the tiny teacher's own [mid, last], written out
    old = to_yaml(cfg).replace("s2_band_order:\n  - eurosat", "s2_band_order: eurosat")
    assert "s2_band_order: eurosat" in old
    assert config_changes(old, cfg) == []
    assert config_changes(old.replace("gamma: 1.0", "gamma: 0.5"), cfg) == ["loss.gamma: 0.5 -> 1.0"]
    base = resolve_teacher_layers(build_config(PretrainConfig, overrides=["teacher.name=vit_base_patch16_dinov3"]))
    assert base.teacher.layers == [8, 11]
