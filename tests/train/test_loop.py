"""The training loop without Ray: run folder, exact resume, data position, NaN guard."""

import json
import re

import pytest
import torch

from deo.config import build_config, read_yaml
from deo.train.config import ModelConfig, PretrainConfig
from deo.train.loop import train
from deo.train.runtime import LocalRuntime

from tests_helpers import REPO, metric_lines

BASE = [
    "train.batch_size=8", "views.n_local=2", "model.drop_path=0", "run.log_every=1",
    "run.tensorboard=false", "train.warmup_steps=2",
]


def tiny_cfg(shards, tmp_path, name, *extra):
    return build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), [
        f"data={shards}", f"run.storage={tmp_path}", f"run.name={name}", *BASE, *extra])


def compile_with_dynamo_only(monkeypatch, before=lambda: None):
    """train.compile without a compiler: the loop's regions are traced by Dynamo and run eagerly (fast on
    CPU). ``before`` runs each time the loop configures its models."""
    import deo.train.loop as loop

    real_configure = loop.configure_models

    def configure(student, cfg, backend="inductor", ema_student=None, teacher=None):
        before()
        real_configure(student, cfg, backend="eager", ema_student=ema_student, teacher=teacher)

    monkeypatch.setattr(loop, "configure_models", configure)


def run(cfg, tmp_path):
    uri = str(tmp_path / cfg.run.name)
    return train(cfg, LocalRuntime(uri, keep=cfg.run.keep_checkpoints, device=torch.device("cpu")), uri)


def test_run_folder_contract(sample_shards, tmp_path):
    cfg = tiny_cfg(sample_shards, tmp_path, "contract", "train.max_steps=3", "run.checkpoint_every=2")
    summary = run(cfg, tmp_path)
    folder = tmp_path / "contract"
    assert summary.steps == 3
    names = sorted(p.name for p in folder.iterdir())
    for want in ("config.yaml", "manifest.json", "metrics.jsonl", "backbone.safetensors", "summary.json"):
        assert want in names
    assert [n for n in names if n.startswith("checkpoint_")] == ["checkpoint_00000002", "checkpoint_00000003"]
    lines = metric_lines(folder)
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in ("loss", "compression", "coding_rate", "cls_cos", "pF_cos", "pmid_cos", "lr",
                "images_per_s", "data_wait", "epoch"):
        assert key in lines[0]
    assert json.loads((folder / "manifest.json").read_text())["bands"] == json.loads(
        (sample_shards / "manifest.json").read_text())["bands"]
    again = build_config(PretrainConfig, read_yaml(folder / "config.yaml"))
    assert again == cfg  # the saved config reloads to the same run
    from deo.export import read_header

    header = read_header((folder / "backbone.safetensors").read_bytes())
    assert header["source"] == str(folder / "checkpoint_00000003") and header["step"] == "3"
    from deo.io.shards import manifest_gsd

    gsd, gsd_range = manifest_gsd(json.loads((sample_shards / "manifest.json").read_text()))
    assert json.loads(header["gsd"]) == gsd and json.loads(header["gsd_range"]) == gsd_range and gsd["ms"] > 0
    state = torch.load(folder / "checkpoint_00000003" / "state.pt", weights_only=True)
    assert state["gsd"] == gsd and state["gsd_range"] == gsd_range


def test_stop_and_rerun_resumes_exactly(sample_shards, tmp_path):
    straight = run(tiny_cfg(sample_shards, tmp_path, "straight", "train.max_steps=6",
                            "run.checkpoint_every=3"), tmp_path)
    run(tiny_cfg(sample_shards, tmp_path, "resumed", "train.max_steps=6", "run.checkpoint_every=3",
                 "run.export=false"), tmp_path)
    # simulate a stop after step 3: drop the later checkpoint and leave metrics of steps 4-6 behind,
    # as a crash between checkpoint 3 and 6 would (metrics.jsonl is rewritten at checkpoints only)
    folder = tmp_path / "resumed"
    import shutil

    shutil.rmtree(folder / "checkpoint_00000006")
    (folder / "summary.json").unlink()
    resumed = run(tiny_cfg(sample_shards, tmp_path, "resumed", "train.max_steps=6",
                           "run.checkpoint_every=3"), tmp_path)
    assert resumed.start_step == 3
    steps = [r["step"] for r in metric_lines(folder)]
    assert steps == [1, 2, 3, 4, 5, 6]  # none repeated, none skipped
    a, b = metric_lines(tmp_path / "straight"), metric_lines(folder)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5)
    assert straight.final_losses["loss"] == pytest.approx(resumed.final_losses["loss"], rel=1e-4)
    # stopped after the last checkpoint, before summary.json: the rerun trains nothing and still
    # reports the run's final losses and rate (it wrote empty losses and 0 images/s)
    (folder / "summary.json").unlink()
    again = run(tiny_cfg(sample_shards, tmp_path, "resumed", "train.max_steps=6", "run.checkpoint_every=3"),
                tmp_path)
    assert again.start_step == again.steps == 6 and again.images_per_s > 0
    assert again.final_losses == resumed.final_losses
    assert json.loads((folder / "summary.json").read_text())["final_losses"] == resumed.final_losses


def test_a_resume_under_another_config_says_what_changed_and_keeps_both(sample_shards, tmp_path, capsys):
    first = tiny_cfg(sample_shards, tmp_path, "changed", "train.max_steps=2", "run.checkpoint_every=2")
    run(first, tmp_path)
    capsys.readouterr()
    longer = tiny_cfg(sample_shards, tmp_path, "changed", "train.max_steps=3", "run.checkpoint_every=2",
                      "loss.gamma=0.5")
    assert run(longer, tmp_path).start_step == 2
    out = capsys.readouterr().out
    assert "the config differs from the run's at step 2" in out
    assert "loss.gamma: 1.0 -> 0.5" in out and "train.max_steps: 2 -> 3" in out
    folder = tmp_path / "changed"
    assert build_config(PretrainConfig, read_yaml(folder / "config.yaml")) == longer
    assert build_config(PretrainConfig, read_yaml(folder / "config.until_step_00000002.yaml")) == first
    # a change of the parameter layout cannot resume: the driver names it before any worker starts
    # (a resume with model.head_out changed failed on every worker with a state-dict size mismatch)
    from deo.config import ConfigError
    from deo.train.driver import check_resumable

    check_resumable(str(folder), longer)
    for change, named in (("model.head_out=64", "model.head_out: 128 -> 64"),
                          ("loss.alpha1=0", "loss.alpha1 > 0: True -> False")):
        other = tiny_cfg(sample_shards, tmp_path, "changed", "train.max_steps=4", change)
        with pytest.raises(ConfigError, match=f"cannot resume under this config \\({re.escape(named)}"):
            check_resumable(str(folder), other)


def test_a_nan_loss_stops_training_naming_the_term(sample_shards, tmp_path, monkeypatch):
    from deo.losses import coding_rate

    def nan_forward(self, s, t):
        v = torch.tensor(float("nan"), requires_grad=True)
        return v, {"coding_rate": v.detach()}

    monkeypatch.setattr(coding_rate.CodingRateLoss, "forward", nan_forward)
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cfg = tiny_cfg(sample_shards, tmp_path, "nan", "train.max_steps=2", "run.tensorboard=true")
    with pytest.raises(FloatingPointError, match=r"not finite in steps 1\.\.1: coding_rate=nan"):
        run(cfg, tmp_path)
    assert not list((tmp_path / "nan").glob("checkpoint_*"))
    assert not list((tmp_path / "tmp").iterdir())  # the failed attempt's TensorBoard folder is gone


def test_in_loop_probe_writes_probe_jsonl(sample_shards, tmp_path):
    cfg = tiny_cfg(sample_shards, tmp_path, "probe", "train.max_steps=4", "probe.every=2",
                   f"probe.dataset={REPO}/data/samples/eurosat_probe.csv", "run.export=false")
    run(cfg, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "probe" / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert 0.0 <= r["probe/knn_avg"] <= 1.0
        assert any(k.startswith("probe/knn_k") for k in r)


def test_a_nan_gradient_with_finite_losses_never_reaches_a_checkpoint(sample_shards, tmp_path, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poisoning_clip(params, *args, **kwargs):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's gradient turns NaN; its losses were finite
            params[0].grad.fill_(float("nan"))
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoning_clip)
    cfg = tiny_cfg(sample_shards, tmp_path, "nangrad", "train.max_steps=4", "run.checkpoint_every=2",
                   "run.log_every=4")
    with pytest.raises(FloatingPointError, match="weights are not finite after step 2"):
        run(cfg, tmp_path)
    assert not list((tmp_path / "nangrad").glob("checkpoint_*"))


def test_compiled_run_saves_its_compiled_code_and_a_resume_loads_it(sample_shards, tmp_path, monkeypatch,
                                                                     capsys):
    """The loop's wiring of train.compile_cache (tests/train/test_compile_cache.py covers real bundles):
    rank 0 saves a bundle after its first step, and the resumed run loads it before compiling."""

    class Info:
        def __init__(self, keys):
            self.artifacts = {"inductor": list(keys)}

    compiled_keys: list[str] = []
    loaded: list[bytes] = []

    def save():  # what this process "compiled": one key per configured student
        return (b"bundle:" + ",".join(compiled_keys).encode(), Info(compiled_keys)) if compiled_keys else None

    def load(data):
        loaded.append(data)
        return Info(data.decode().removeprefix("bundle:").split(","))

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    compile_with_dynamo_only(monkeypatch, before=lambda: compiled_keys.append("graphs"))
    cfg = tiny_cfg(sample_shards, tmp_path, "compiled", "train.max_steps=2", "run.checkpoint_every=2",
                   "train.compile=true")
    run(cfg, tmp_path)
    bundles = sorted((tmp_path / "compiled" / "compile_cache").glob("*/*.bin"))
    assert len(bundles) == 1 and bundles[0].read_bytes() == b"bundle:graphs" and not loaded
    assert "compile cache: saved" in capsys.readouterr().out

    resumed = run(tiny_cfg(sample_shards, tmp_path, "compiled", "train.max_steps=4", "run.checkpoint_every=2",
                           "train.compile=true"), tmp_path)
    assert resumed.start_step == 2 and loaded == [b"bundle:graphs"]
    out = capsys.readouterr().out
    assert "compile cache: loaded 1 bundle(s)" in out and "compile cache: saved" not in out  # nothing new
    assert len(list((tmp_path / "compiled" / "compile_cache").glob("*/*.bin"))) == 1


def test_cuda_graph_mode_marks_the_beginning_of_every_step(sample_shards, tmp_path, monkeypatch):
    """train.compile_mode=reduce-overhead: each optimizer step starts with cudagraph_mark_step_begin, so
    CUDA-graph trees may reuse the previous step's graph memory (compiled here by Dynamo alone, on CPU)."""

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    compile_with_dynamo_only(monkeypatch)
    cfg = tiny_cfg(sample_shards, tmp_path, "graphs", "train.max_steps=3", "run.checkpoint_every=3",
                   "train.compile=true", "train.compile_mode=reduce-overhead", "train.compile_cache=" + str(tmp_path / "cc"))
    assert run(cfg, tmp_path).steps == 3
    assert len(marks) == 3
    marks.clear()
    run(tiny_cfg(sample_shards, tmp_path, "plain", "train.max_steps=2", "train.compile=true"), tmp_path)
    assert not marks  # the default mode records no graphs


def test_each_rank_gets_its_own_rng_back_and_other_world_sizes_reseed(monkeypatch):
    """Stochastic depth draws from the global torch RNG: ranks must not share one stream (they did: every
    rank seeded the same and resumed rank 0's state), and a resume at the same world size is exact."""
    from deo import dist
    from deo.train import checkpoint as ckpt

    states = []
    for rank in (0, 1):
        torch.manual_seed(ckpt.rank_seed(0, rank))
        states.append(ckpt.rng_state())
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    saved = {"rng_per_rank": states}
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        torch.manual_seed(123)
        ckpt.restore_rng(saved, seed=0, step=7)
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
    # 3 workers resuming a 2-worker run (or a checkpoint with rank 0's state only): distinct, reseeded
    drawn = []
    for rank in (0, 1, 2):
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(dist, "get_world_size", lambda: 3)
        ckpt.restore_rng(saved, seed=0, step=7)
        drawn.append(torch.rand(4))
    assert len({tuple(d.tolist()) for d in drawn}) == 3


def test_pruning_keeps_the_newest_checkpoints_and_ignores_ray_files(tmp_path):
    """A run Ray Train started holds checkpoint_manager_snapshot.json: it took one of the kept slots."""
    from deo.train import checkpoint as ckpt

    run_uri = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")
    runtime = LocalRuntime(run_uri, keep=2, device=torch.device("cpu"))
    for step in (250, 300, 350):
        runtime.save({"step": step}, {}, step)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ckpt.checkpoint_name(300), ckpt.checkpoint_name(350), "checkpoint_manager_snapshot.json"]


def test_norms_and_biases_are_not_decayed():
    from deo.train.loop import build_optimizer
    from deo.train.task import DEOTrainable

    cfg = PretrainConfig(model=ModelConfig(head_hidden=64))
    trainable = DEOTrainable(cfg, teacher_dim=64)
    opt = build_optimizer(trainable, cfg, torch.device("cpu"))
    group = {id(p): g["apply_wd"] for g in opt.param_groups for p in g["params"]}
    for name, p in trainable.named_parameters():
        assert group[id(p)] == (p.ndim >= 2 and not name.endswith(".bias")), name
    assert any(n.endswith("norm.weight") or ".norm" in n for n, p in trainable.named_parameters() if p.ndim == 1)
