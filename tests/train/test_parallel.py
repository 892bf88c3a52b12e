"""DDP and FSDP (scaling.strategy) over 2 gloo processes: same losses, same checkpoints, each resumes the other."""

import json

import pytest
import torch
import torch.multiprocessing as mp

from deo.config import build_config, read_yaml
from deo.train.config import PretrainConfig

from tests_helpers import REPO, metric_lines

ARGS = [
    "train.batch_size=8", "views.n_local=2", "model.drop_path=0", "run.log_every=1", "run.tensorboard=false",
    "train.warmup_steps=2", "train.data_order=global", "train.grad_accum=2", "run.checkpoint_every=3",
    "probe.every=0",
]


def _cfg(shards, storage, name, *extra, config="default.yaml"):
    return build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain" / config),
                        [f"data={shards}", f"run.storage={storage}", f"run.name={name}", *ARGS, *extra])


def _worker(rank, world, port, shards, storage, name, extra, config):
    import faulthandler

    import torch.distributed as dist

    from deo.train.loop import train
    from deo.train.runtime import LocalRuntime

    # a rank that dies of a signal prints where it was (pytest's own faulthandler covers only its process):
    # how the teardown abort that deo.train.loop.train's final barrier prevents was found
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _cfg(shards, storage, name, *extra, config=config)
        uri = f"{storage}/{name}"
        train(cfg, LocalRuntime(uri, device=torch.device("cpu")), uri)
    finally:
        dist.destroy_process_group()


def _run_two(shards, storage, name, *extra, config="default.yaml"):
    from conftest import free_port

    mp.start_processes(_worker, args=(2, free_port(), str(shards), str(storage), name, list(extra), config),
                       nprocs=2, join=True, start_method="spawn")


def _state(folder, step):
    from deo.train import checkpoint as ckpt

    return ckpt.load_state(str(folder / ckpt.checkpoint_name(step)))


def _assert_close(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{what}: {k}")


def test_fsdp_matches_ddp_and_each_resumes_the_other(sample_shards, tmp_path):
    _run_two(sample_shards, tmp_path, "ddp", "train.max_steps=3", "scaling.strategy=ddp")
    _run_two(sample_shards, tmp_path, "fsdp", "train.max_steps=3", "scaling.strategy=fsdp")
    ddp, fsdp = metric_lines(tmp_path / "ddp"), metric_lines(tmp_path / "fsdp")
    assert [x["step"] for x in fsdp] == [1, 2, 3]
    for one, two in zip(ddp, fsdp, strict=True):
        for term in ("loss", "compression", "coding_rate", "cls_cos", "pF_cos", "pmid_cos"):
            assert two[term] == pytest.approx(one[term], rel=1e-4, abs=1e-5), (one["step"], term)

    # checkpoints hold whole tensors keyed by name whatever the strategy: the same state
    a, b = _state(tmp_path / "ddp", 3), _state(tmp_path / "fsdp", 3)
    for part in ("student", "trainable", "ema"):
        _assert_close(a[part], b[part], part)
    assert set(b["optimizer"]["state"]) == set(a["optimizer"]["state"]) == set(a["trainable"])
    for name, moments in a["optimizer"]["state"].items():
        _assert_close(moments, b["optimizer"]["state"][name], f"optimizer {name}")
    # each rank's RNG states are kept, and the ranks draw from different streams (stochastic depth)
    assert len(a["rng_per_rank"]) == 2 and "rng" not in a  # rank 0's is rng_per_rank[0]
    assert not torch.equal(a["rng_per_rank"][0]["torch"], a["rng_per_rank"][1]["torch"])
    ema_shape = {k: v.shape for k, v in b["ema"].items()}
    whole = a["trainable"]["student.embeds.ms.proj.weight"].shape
    assert ema_shape["module.student.embeds.ms.proj.weight"] == whole

    # each run continues under the other strategy (whole states loaded into DDP replicas / FSDP shards)
    _run_two(sample_shards, tmp_path, "ddp", "train.max_steps=5", "scaling.strategy=fsdp")
    _run_two(sample_shards, tmp_path, "fsdp", "train.max_steps=5", "scaling.strategy=ddp")
    ddp, fsdp = metric_lines(tmp_path / "ddp"), metric_lines(tmp_path / "fsdp")
    assert [x["step"] for x in ddp] == [x["step"] for x in fsdp] == [1, 2, 3, 4, 5]
    for one, two in zip(ddp[3:], fsdp[3:], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5), one["step"]
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["start_step"] == 3


def test_fsdp_run_exports_the_whole_backbone(sample_shards, tmp_path):
    from deo.export import load_backbone

    _run_two(sample_shards, tmp_path, "fx", "train.max_steps=2", "scaling.strategy=fsdp", "probe.every=2",
             f"probe.dataset={REPO / 'data/samples/eurosat_probe.csv'}")
    backbone = load_backbone(str(tmp_path / "fx" / "backbone.safetensors"))
    state = _state(tmp_path / "fx", 2)["student"]
    got = backbone.student.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, msg=k)
    probe = [json.loads(x) for x in (tmp_path / "fx" / "probe.jsonl").read_text().splitlines()]
    assert probe and probe[-1]["step"] == 2 and 0 <= probe[-1]["probe/knn_avg"] <= 1


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
@pytest.mark.parametrize("config", ["xstars.yaml", "satdino.yaml"])
def test_fsdp_shards_the_heads_of_the_method_configs(config, sample_shards, tmp_path):
    """MSAD projections (X-STARS) and the GSD head with uniform views (SatDINO) train sharded as replicated."""
    for strategy in ("ddp", "fsdp"):
        _run_two(sample_shards, tmp_path, strategy, "train.max_steps=2", f"scaling.strategy={strategy}",
                 "run.export=false", config=config)
    ddp, fsdp = metric_lines(tmp_path / "ddp"), metric_lines(tmp_path / "fsdp")
    term = "msad" if config == "xstars.yaml" else "gsd"
    assert [x["step"] for x in fsdp] == [1, 2]
    for one, two in zip(ddp, fsdp, strict=True):
        for k in ("loss", "compression", "coding_rate", term):
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-5), (one["step"], k)
    # resuming restores AdamW state for the parameters that have it (an idle embedding has none)
    _run_two(sample_shards, tmp_path, "fsdp", "train.max_steps=3", "scaling.strategy=fsdp",
             "run.export=false", "run.checkpoint_every=2", config=config)
    assert [x["step"] for x in metric_lines(tmp_path / "fsdp")] == [1, 2, 3]


def test_optimizer_state_saved_by_integer_ids_loads_by_name():
    """Checkpoints written before optimizer state was keyed by name still resume."""
    from deo.train import parallel
    from deo.train.loop import build_optimizer
    from deo.train.task import DEOTrainable

    cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), ["data=x"])

    def make():
        torch.manual_seed(0)
        model = DEOTrainable(cfg, teacher_dim=0)
        return model, build_optimizer(model, cfg, torch.device("cpu"))

    model, opt = make()
    model.student.pooled(torch.randn(2, 10, 32, 32), "ms").sum().backward()
    opt.step()
    old = opt.state_dict()  # integer ids, as checkpoints held before
    assert all(isinstance(i, int) for i in old["state"])
    fresh, fresh_opt = make()
    parallel.load_optimizer_state(fresh, fresh_opt, old)
    by_name = dict(fresh.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        got = fresh_opt.state[by_name[names[id(p)]]]
        torch.testing.assert_close(got["exp_avg"], st["exp_avg"])
        torch.testing.assert_close(got["exp_avg_sq"], st["exp_avg_sq"])
