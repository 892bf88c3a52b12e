"""X-STARS / SatDINO / ablation configs: complete over the tiny default, and each runs end to end."""

import math

import pytest
import torch

from deo.config import build_config, load_config, read_yaml
from deo.train.config import PretrainConfig
from deo.train.loop import train
from deo.train.runtime import LocalRuntime

from tests_helpers import REPO, metric_lines

pytestmark = pytest.mark.filterwarnings("ignore:teacher.weights is empty")

PRETRAIN = REPO / "configs" / "pretrain"
OPTION_CONFIGS = sorted([PRETRAIN / "xstars.yaml", PRETRAIN / "satdino.yaml",
                         *(PRETRAIN / "ablations").glob("*.yaml")])
FAST = ["train.batch_size=8", "views.n_local=2", "model.drop_path=0", "run.log_every=1",
        "run.tensorboard=false", "train.warmup_steps=1"]



def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _run(path, shards, tmp_path, *extra):
    name = path.stem
    cfg = build_config(PretrainConfig, read_yaml(path), [
        f"data={shards}", f"run.storage={tmp_path}", f"run.name={name}", *FAST, *extra])
    uri = str(tmp_path / name)
    train(cfg, LocalRuntime(uri, keep=1, device=torch.device("cpu")), uri)
    return cfg, metric_lines(tmp_path / name)


def _expected_terms(cfg):
    """The loss terms a config switches on, from its weights (a zero weight skips the term)."""
    loss = cfg.loss
    on = {"compression": True, "coding_rate": loss.gamma > 0, "cls_cos": loss.alpha1 > 0,
          "pF_cos": loss.alpha2 > 0, "pmid_cos": loss.alpha3 > 0, "msad": loss.msad_lambda > 0,
          "gsd": loss.gsd_weight > 0}
    return {k for k, v in on.items() if v}


def test_option_configs_are_complete_over_the_tiny_default():
    assert len(OPTION_CONFIGS) >= 8
    default = dict(_leaves(read_yaml(PRETRAIN / "default.yaml")))
    names = set()
    for path in OPTION_CONFIGS:
        cfg = load_config(PretrainConfig, ["--config", str(path)])  # the CLI's own loader
        for key, value in default.items():
            if key != "run.name":
                assert _get(cfg, key) == value, (path.name, key)
        names.add(cfg.run.name)
    assert len(names) == len(OPTION_CONFIGS)  # runs of different options never resume each other
    xs = load_config(PretrainConfig, ["--config", str(PRETRAIN / "xstars.yaml")])
    assert (xs.loss.msad_lambda, xs.loss.msad_tau, xs.loss.msad_smoothing) == (0.1, 0.1, 0.3)
    sd = load_config(PretrainConfig, ["--config", str(PRETRAIN / "satdino.yaml")])
    assert sd.views.uniform_local and sd.views.local_scale == [0.05, 0.5] and sd.loss.gsd_weight == 0.1
    # every term is switched off by at least one config and on by at least one
    all_terms = {"compression", "coding_rate", "cls_cos", "pF_cos", "pmid_cos", "msad", "gsd"}
    sets = [_expected_terms(load_config(PretrainConfig, ["--config", str(p)])) for p in OPTION_CONFIGS]
    assert set().union(*sets) == all_terms
    assert {t for t in all_terms if all(t in s for s in sets)} == {"compression"}


@pytest.mark.parametrize("config", ["xstars.yaml", "satdino.yaml"])
def test_method_config_runs_and_logs_its_terms(config, sample_shards, tmp_path):
    cfg, lines = _run(PRETRAIN / config, sample_shards, tmp_path, "train.max_steps=3")
    assert [r["step"] for r in lines] == [1, 2, 3]
    term = "msad" if config == "xstars.yaml" else "gsd"
    for r in lines:
        assert set(r) >= {term, "compression", "coding_rate", "loss"}
        assert not set(r) & {"cls_cos", "pF_cos", "pmid_cos"}  # no DINOv3 distillation in these recipes
        assert math.isfinite(r[term]) and r[term] > 0
        # the total is the objective of DESIGN Method with the config's weights
        w = cfg.loss.msad_lambda if term == "msad" else cfg.loss.gsd_weight
        want = -r["compression"] - cfg.loss.gamma * r["coding_rate"] + w * r[term]
        assert r["loss"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    if term == "msad":  # symmetric CE with smoothing 0.3 over 8 pairs: at least the targets' entropy
        y = [0.7] + [0.3 / 7] * 7
        assert lines[0]["msad"] >= -sum(p * math.log(p) for p in y) - 1e-4


@pytest.mark.parametrize("path", [p for p in OPTION_CONFIGS if p.parent.name == "ablations"],
                         ids=lambda p: p.stem)
def test_each_ablation_logs_exactly_its_terms(path, sample_shards, tmp_path):
    cfg, lines = _run(path, sample_shards, tmp_path, "train.max_steps=1", "run.export=false")
    want = _expected_terms(cfg)
    got = set(lines[0]) & {"compression", "coding_rate", "cls_cos", "pF_cos", "pmid_cos", "msad", "gsd"}
    assert got == want
    assert all(math.isfinite(lines[0][k]) for k in want)


def test_xstars_ms_sar_runs_on_real_bigearthnet_pairs(bigearthnet_sar_shards, tmp_path):
    import json

    from deo.export import read_export

    cfg, lines = _run(PRETRAIN / "xstars.yaml", bigearthnet_sar_shards, tmp_path, "train.max_steps=2",
                      "model.sar=true")
    assert [r["step"] for r in lines] == [1, 2]
    assert all(math.isfinite(r["msad"]) and r["msad"] > 0 for r in lines)
    _, meta = read_export(str(tmp_path / "xstars" / "backbone.safetensors"))
    assert meta["bands"]["sar"] == ["VV", "VH"]
    manifest = json.loads((bigearthnet_sar_shards / "manifest.json").read_text())
    assert meta["stats"]["sar"] == manifest["stats"]["sar"]


def test_sar_rows_only_and_gradient_through_the_sar_embedding(bigearthnet_sar_shards, sample_shards):
    from deo.data.loader import ShardIndex, ShardLoader, fill_true_colour
    from deo.data.multicrop import MultiCrop
    from deo.data.sampling import lane_streams
    from deo.io.shards import ShardDataset
    from deo.train.task import DEOTask

    ds = ShardDataset.open(str(bigearthnet_sar_shards))
    index = ShardIndex.build(ds.uri, ds.files, with_sar=True)
    assert index.num_rows == len(ds) - 1  # the row without SAR is not trained on
    assert ShardIndex.build(ds.uri, ds.files).num_rows == len(ds)
    plain = ShardDataset.open(str(sample_shards))
    with pytest.raises(ValueError, match="model.sar needs a `sar` column"):
        ShardIndex.build(plain.uri, plain.files, with_sar=True)

    cfg = build_config(PretrainConfig, read_yaml(PRETRAIN / "xstars.yaml"), [*FAST, "model.sar=true"])
    lane = lane_streams(index.units, 0, 0, 8, 1, [], 8, "global")[0]
    batch = next(iter(ShardLoader(index, lane, 8, 1)))
    assert batch["sar"].shape == (8, 2, 60, 60) and batch["sar"].dtype == torch.float32
    ids = batch.pop("sample_id")
    assert "no-sar" not in ids
    opt = fill_true_colour(batch["ms"], batch["optical"], batch["has_optical"])
    views = MultiCrop(cfg.views, ds.stats)(batch["ms"], opt, ids, 0, batch["ms_gsd"], sar=batch["sar"])
    assert views["sar_global"].shape == (2, 8, 2, 64, 64)
    torch.manual_seed(0)
    task = DEOTask(cfg)
    out = task(views, 0)
    out["loss"].backward()
    student = task.trainable.student
    for p in (student.embeds["sar"].proj.weight, task.trainable.psi_a.weight, task.trainable.psi_b.weight,
              student.embeds["ms"].proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert student.embeds["optical"].proj.weight.grad is None  # SAR is MSAD's partner, not optical


def test_compile_mode_reaches_every_region_and_marks_cuda_graph_steps(monkeypatch):
    """train.compile_mode is checked and handed to each region's torch.compile (tests/train/test_loop.py
    checks that a CUDA-graph mode marks every step)."""
    from deo.models.student import build_student
    from deo.train.loop import compiled_regions, configure_models

    base = read_yaml(REPO / "configs/pretrain/default.yaml")
    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        build_config(PretrainConfig, base, ["train.compile_mode=fast"])
    cfg = build_config(PretrainConfig, base, ["train.compile=true", "train.compile_mode=reduce-overhead"])
    assert cfg.train.compile_cuda_graphs
    assert not build_config(PretrainConfig, base, ["train.compile=true"]).train.compile_cuda_graphs
    assert not build_config(PretrainConfig, base, ["train.compile_mode=reduce-overhead"]).train.compile_cuda_graphs
    with pytest.raises(ValueError, match="needs train.grad_accum=1"):
        build_config(PretrainConfig, base, ["train.compile=true", "train.compile_mode=max-autotune",
                                            "train.grad_accum=2"])

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    student = build_student(cfg.model)
    configure_models(student, cfg)
    assert len(calls) == len(compiled_regions(student)) == 10 + 3  # tiny Swin: blocks and patch mergings
    assert all(kw == {"backend": "inductor", "dynamic": False, "mode": "reduce-overhead"} for _, kw in calls)
    calls.clear()
    configure_models(student, cfg, backend="eager")  # another backend: no mode (torch.compile refuses both)
    assert all("mode" not in kw for _, kw in calls)
