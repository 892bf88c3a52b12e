"""deo/train/step.py: the step a CUDA graph records equals the eager step, and never syncs with the host.

The CUDA graph itself is recorded and replayed only on a GPU (the ``gpu`` test at the end); on CPU
the recorded function (``TrainStep.graph_body``) runs eagerly and is compared with the eager step.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from deo.config import build_config  # noqa: E402
from deo.data.multicrop import MultiCrop  # noqa: E402
from deo.io.shards import ShardDataset  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402
from deo.train.loop import build_optimizer  # noqa: E402
from deo.train.step import WARMUP_STEPS, TrainStep  # noqa: E402
from deo.train.task import DEOTask  # noqa: E402

from step_bench import shard_batches  # noqa: E402

TINY = ["model.head_hidden=64", "views.n_local=2", "train.batch_size=4"]

# ops that make the host wait for the device (or read a device value) on CUDA
SYNCING_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "equal", "is_nonzero",
               "_unique", "_unique2", "unique_dim", "unique_consecutive", "_linalg_check_errors"}


class HostSyncDetector(TorchDispatchMode):
    """Record every op that would read a device value back on the host, or copy a host tensor to the
    device (from pageable memory: a blocking copy, which also fails a capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else [])
            if t is not None)
        to_device = name == "_to_copy" and args[0].device.type == "cpu" and \
            torch.device(kwargs.get("device") or "cpu").type != "cpu"
        copy_in = name == "copy_" and args[1].device.type == "cpu" and args[0].device.type != "cpu"
        if name in SYNCING_OPS or bool_index or to_device or copy_in:
            self.syncs.append(f"{func} {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}")
        return func(*args, **kwargs)


def _build(cfg: PretrainConfig, stats: dict, device: str = "cpu") -> TrainStep:
    """The loop's step, with the fused AdamW of a GPU run (the CPU's default AdamW reads its step count)."""
    torch.manual_seed(cfg.train.seed)
    dev = torch.device(device)
    task = DEOTask(cfg, device=dev, check_finite=False)
    optimizer = build_optimizer(task.trainable, cfg, dev, fused=True)
    return TrainStep(task, MultiCrop(cfg.views, stats, seed=cfg.train.seed), optimizer, cfg, dev)


RANDOM_TILE_STATS = {"ms": {"mean": [1500.0] * 10, "std": [1000.0] * 10},
                     "optical": {"mean": [110.0] * 3, "std": [50.0] * 3}}


def _random_batch(seed: int, b: int = 4, tile: int = 64) -> dict[str, torch.Tensor]:
    """A loader batch of random tiles (one row without an optical tile)."""
    g = torch.Generator().manual_seed(seed)
    return {"ms": torch.randint(0, 10000, (b, 10, tile, tile), generator=g).to(torch.uint16),
            "optical": torch.randint(0, 256, (b, 3, tile, tile), generator=g).to(torch.uint8),
            "has_optical": torch.arange(b) != 1, "ms_gsd": torch.full((b,), 10.0)}


SCHEDULES = [(1e-3, 1.0, 0.99), (5e-4, 20.0, 0.9), (2e-3, 10.0, 0.95)]
"""(lr, weight decay, momentum) of three steps: every value changes, as the real schedules do, and the
decay is large enough to be a good share of each step's change."""


def _relative_difference(got: list[torch.Tensor], want: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """|got - want| / |want - before| over all tensors: how far apart two runs are, per unit of training."""
    apart = sum(float((g - w).square().sum()) for g, w in zip(got, want, strict=True))
    moved = sum(float((w - b).square().sum()) for w, b in zip(want, before, strict=True))
    return (apart / moved) ** 0.5


def test_recorded_step_run_eagerly_equals_the_eager_step(sample_shards):
    """graph_body (what train.cuda_graph records) trains exactly as the eager step over three steps whose
    lr, weight decay and momentum all change, reading them only from its input tensor."""
    cfg = build_config(PretrainConfig, overrides=TINY)
    stats = ShardDataset.open(str(sample_shards)).stats
    batches = shard_batches(str(sample_shards), 4, len(SCHEDULES))
    eager, graphed = _build(cfg, stats), _build(cfg, stats)
    for i, ((batch, ids), schedule) in enumerate(zip(batches, SCHEDULES, strict=True)):
        torch.manual_seed(i)  # the same stochastic-depth draws in both
        want = eager(batch, ids, 0, i, schedule)
        torch.manual_seed(i)
        got = graphed.graph_body(graphed.graph_inputs(batch, ids, 0, schedule))
        assert set(got) == set(want)
        # Step 0 runs both on the same parameters: equal outputs. Later steps run on parameters that
        # differ by rounding (the recorded step decays by a float32 lr x wd, AdamW by a float64 one),
        # which training amplifies, most in the coding rate's logdet: measured 7e-6 here at step 2,
        # more on other CPUs. Whether both train alike is the parameter check below.
        tol = {"rtol": 1e-6, "atol": 1e-7} if i == 0 else {"rtol": 1e-3, "atol": 1e-4}
        for k in want:
            torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, i=i, k=k: f"step {i}: {k}: {m}")
    # what the comparison catches: the same steps with a weight decay frozen at its first value
    frozen = _build(cfg, stats)
    for i, ((batch, ids), schedule) in enumerate(zip(batches, SCHEDULES, strict=True)):
        torch.manual_seed(i)
        frozen.graph_body(frozen.graph_inputs(batch, ids, 0, (schedule[0], SCHEDULES[0][1], schedule[2])))
    initial = _build(cfg, stats)
    for part in ("trainable", "ema"):
        want, got, wrong, before = ([p.detach() for p in getattr(s.task, part).parameters()]
                                    for s in (eager, graphed, frozen, initial))
        # rounding alone (measured 3e-5; AdamW's division by sqrt(v) amplifies it for near-zero gradients)
        assert _relative_difference(got, want, before) < 1e-3, part
        assert _relative_difference(wrong, want, before) > 0.1, part  # measured 0.2-0.26
    # the optimizer's groups look as before the step (a checkpoint records floats, not device tensors)
    assert all(isinstance(g["lr"], float) and not g.get("capturable") for g in graphed.optimizer.param_groups)
    assert all(g["apply_wd"] or g["weight_decay"] == 0.0 for g in graphed.optimizer.param_groups)


def test_accumulated_step_trains_as_one_step_over_the_whole_batch(sample_shards):
    """train.grad_accum=2 takes the gradient of grad_accum=1 on the same batch: every term is a mean over
    the batch except the coding rate, whose covariance spans the whole batch (DESIGN: R over the GLOBAL
    batch) through the first pass. No stochastic depth: its masks are drawn per micro-batch, so they
    differ between the two."""
    stats = ShardDataset.open(str(sample_shards)).stats
    (batch, ids), = shard_batches(str(sample_shards), 8, 1)
    losses, grads = {}, {}
    for accum in (1, 2):
        step = _build(build_config(PretrainConfig, overrides=[*TINY, "model.drop_path=0", "train.batch_size=8",
                                                              f"train.grad_accum={accum}"]), stats)
        step_optimizer = step.optimizer.step

        def record_gradients(*args, step=step, step_optimizer=step_optimizer, accum=accum, **kwargs):
            grads[accum] = [p.grad.clone() for p in step.task.trainable.parameters() if p.grad is not None]
            return step_optimizer(*args, **kwargs)

        step.optimizer.step = record_gradients
        losses[accum] = step(batch, ids, 0, 0, SCHEDULES[0])
    for k in losses[1]:
        torch.testing.assert_close(losses[2][k], losses[1][k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    apart = sum(float((a - b).square().sum()) for a, b in zip(grads[2], grads[1], strict=True))
    norm = sum(float(b.square().sum()) for b in grads[1])
    # measured 1.4e-5; R per micro-batch (the code before the first pass) gives 0.028
    assert (apart / norm) ** 0.5 < 1e-3


def _check_micro_batch_masks(batch: dict[str, torch.Tensor], ids: list[str], stats: dict, device: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each micro-batch's second pass repeats its first pass's masks; no micro-batch reuses another's."""
    from deo.models.swin_window import StochasticDepth

    cfg = build_config(PretrainConfig, overrides=[*TINY, "model.drop_path=0.5", "train.batch_size=8",
                                                  "train.grad_accum=2"])
    step = _build(cfg, stats, device)
    step.task.train()
    batch = {k: v.to(device) for k, v in batch.items()}
    micro_views = [step.augment(batch["ms"][p], batch["optical"][p], ids[p], 0, batch["ms_gsd"][p])
                   for p in (slice(0, 4), slice(4, 8))]
    drawn: list[torch.Tensor] = []
    scale = StochasticDepth._scale

    def recorded_scale(self, x):
        drawn.append(scale(self, x))
        return drawn[-1]

    monkeypatch.setattr(StochasticDepth, "_scale", recorded_scale)
    shares = step.task.share_micro_batches(micro_views)
    first, g = list(drawn), len(drawn) // 2  # the first pass: one MS global forward per micro-batch
    r, second = [], []
    for views, share in zip(micro_views, shares, strict=True):
        drawn.clear()
        r.append(float(step.task(views, 0, share)["coding_rate"]))
        second.append(list(drawn))
    for m in range(2):
        assert all(torch.equal(a, b) for a, b in zip(second[m][:g], first[m * g:(m + 1) * g], strict=True))
    # micro-batch 0's next draws (its local views, the same shape here) are not micro-batch 1's global
    # masks, which restoring one generator state per micro-batch would repeat
    assert not all(torch.equal(a, b) for a, b in zip(second[0][g:2 * g], second[1][:g], strict=True))
    assert r[0] == pytest.approx(r[1], rel=1e-5)


def test_micro_batches_replay_their_own_stochastic_depth(sample_shards, monkeypatch):
    """With stochastic depth, each micro-batch's second pass draws the masks its first pass drew (so its Z
    is the one the other micro-batches counted, and every micro-step's R is the whole batch's), and no
    micro-batch reuses another's masks."""
    (batch, ids), = shard_batches(str(sample_shards), 8, 1)
    _check_micro_batch_masks(batch, ids, ShardDataset.open(str(sample_shards)).stats, "cpu", monkeypatch)


@pytest.mark.gpu
def test_micro_batches_replay_their_own_stochastic_depth_on_cuda(monkeypatch):
    """The same on a GPU, where the masks come from the device's generator (random tiles: the GPU machine
    has no rasterio to ingest the samples with)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _check_micro_batch_masks(_random_batch(0, b=8), [f"s{i}" for i in range(8)], RANDOM_TILE_STATS, "cuda",
                             monkeypatch)


def test_recorded_step_never_reads_a_device_value_on_the_host(sample_shards):
    """Inside a CUDA graph a host sync fails the capture; on the host it is a stall per step."""
    cfg = build_config(PretrainConfig, overrides=TINY)
    stats = ShardDataset.open(str(sample_shards)).stats
    (batch, ids), = shard_batches(str(sample_shards), 4, 1)
    step = _build(cfg, stats)
    inputs = step.graph_inputs(batch, ids, 0, SCHEDULES[0])
    with HostSyncDetector() as seen:
        step.graph_body(inputs)
    assert seen.syncs == []
    with HostSyncDetector() as seen:  # the detector sees what the step would do wrong
        float(inputs["schedule"][0] * 2)
        torch.zeros(3)[torch.ones(3, dtype=torch.bool)]
    assert len(seen.syncs) == 2


def test_recorded_forward_runs_on_cuda_tensors_without_a_gpu(monkeypatch):
    """The CUDA code paths of the recorded forward (augmentation, teachers, student, losses) on fake CUDA
    tensors, after one warm-up forward as in training: no tensor is copied from the host mid-step (a
    blocking copy, which fails a capture) and no value is read back. (Autocast and the autograd engine
    need a real GPU: backward and update are checked on CPU above, bf16 by the gpu test.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import deo.data.multicrop

    monkeypatch.setattr(deo.data.multicrop, "_ON_DEVICE", {})  # its fake constants stay in this test
    cfg = build_config(PretrainConfig, overrides=[*TINY, "train.precision=fp32"])  # autocast needs a GPU
    step = _build(cfg, RANDOM_TILE_STATS)
    host_inputs = step.graph_inputs(_random_batch(seed=0), [f"s{i}" for i in range(4)], 0, SCHEDULES[0])
    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        step.task.to(cuda)  # what TrainStep's owner and __init__ do before the first step
        step.augment.to(cuda)
        step.device = cuda
        inputs = {k: v.to(cuda) for k, v in host_inputs.items()}
        with HostSyncDetector() as first:  # the warm-up builds what later steps reuse (DINOv3's RoPE table)
            step.graph_forward(inputs)
        with HostSyncDetector() as seen:
            losses = step.graph_forward(inputs)
        assert seen.syncs == []
        assert {k: (v.device.type, v.shape) for k, v in losses.items()} == {
            k: ("cuda", torch.Size([])) for k in ("loss", "compression", "coding_rate", "cls_cos", "pF_cos",
                                                  "pmid_cos")}
        assert losses["loss"].requires_grad
    # the detector sees host copies: the RoPE table is built on the host once (timm), then kept on the device
    assert any("_to_copy" in s for s in first.syncs)


def test_recorded_step_leaves_parameters_without_a_gradient_alone(sample_shards):
    """AdamW decays only what it updates: with no optical term the optical embedding gets no gradient,
    and the recorded step's own decay must skip it too."""
    cfg = build_config(PretrainConfig, overrides=[*TINY, "loss.alpha1=0", "loss.alpha2=0", "loss.alpha3=0"])
    stats = ShardDataset.open(str(sample_shards)).stats
    step = _build(cfg, stats)
    idle = step.task.trainable.student.embeds["optical"].proj.weight
    before = idle.detach().clone()
    for (batch, ids), schedule in zip(shard_batches(str(sample_shards), 4, 2), SCHEDULES[:2], strict=True):
        step.graph_body(step.graph_inputs(batch, ids, 0, schedule))
    assert torch.equal(idle, before)
    # and 1 - momentum is computed before rounding to float32 (0.99999 would lose 3 digits)
    inputs = step.graph_inputs(batch, ids, 0, (1e-6, 0.2, 0.99999))
    assert float(inputs["schedule"][2]) == pytest.approx(1e-5, rel=1e-6)
    assert float(inputs["schedule"][1]) == pytest.approx(2e-7, rel=1e-6)


def test_cuda_graph_options_are_checked():
    for bad, why in (("train.grad_accum=2", "grad_accum"), ("train.precision=fp16", "fp16"),
                     ("train.activation_checkpointing=true", "activation_checkpointing"),
                     ("train.compile_mode=reduce-overhead", "CUDA graphs inside")):
        with pytest.raises(ValueError, match=why):
            build_config(PretrainConfig, overrides=["train.cuda_graph=true", "train.compile=true", bad])
    cfg = build_config(PretrainConfig, overrides=[*TINY, "train.cuda_graph=true"])
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        _build(cfg, RANDOM_TILE_STATS)
    # the teachers' second stream: not beside FSDP's own streams over several workers
    with pytest.raises(ValueError, match="overlap_teachers=true does not combine with scaling.strategy=fsdp"):
        build_config(PretrainConfig, overrides=["train.overlap_teachers=true", "scaling.strategy=fsdp",
                                                "scaling.num_workers=2", "train.batch_size=8"])
    with pytest.raises(ValueError, match="overlap_teachers=true does not combine with train.compile_mode"):
        build_config(PretrainConfig, overrides=["train.overlap_teachers=true", "train.compile=true",
                                                "train.compile_mode=reduce-overhead"])
    for ok in (["scaling.strategy=ddp", "scaling.num_workers=2", "train.batch_size=8"], ["scaling.strategy=fsdp"]):
        assert build_config(PretrainConfig, overrides=["train.overlap_teachers=true", *ok]).train.overlap_teachers


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tolerance,overlap", [("fp32", 1e-3, False), ("bf16", 2e-2, False),
                                                         ("fp32", 1e-3, True), ("bf16", 2e-2, True)])
def test_replayed_cuda_graph_trains_as_the_eager_step(precision, tolerance, overlap):
    """train.cuda_graph on a GPU: eager warm-up, one recording, then replays that see each step's batch
    and schedule, and train as the eager step does, where a decay frozen at its first value does not (no
    stochastic depth: both draw from one generator, in different orders). With ``overlap`` the graphed
    steps run the teachers on a second stream (train.overlap_teachers: a forked branch of the graph)
    and still train as the eager step on one stream. Random tiles: the GPU machine has no rasterio to
    ingest the samples with."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    over = [*TINY, "model.drop_path=0", f"train.precision={precision}"]
    n = WARMUP_STEPS + 3
    batches = [(_random_batch(seed=i), [f"s{i}.{j}" for j in range(4)]) for i in range(n)]
    stats = RANDOM_TILE_STATS
    schedules = [(1e-3 * (1 + i % 3), (1.0, 20.0, 10.0)[i % 3], 0.99 - 0.01 * i) for i in range(n)]
    eager = _build(build_config(PretrainConfig, overrides=over), stats, "cuda")
    graph_over = [*over, "train.cuda_graph=true", f"train.overlap_teachers={str(overlap).lower()}"]
    graphed, frozen = (_build(build_config(PretrainConfig, overrides=graph_over), stats, "cuda") for _ in range(2))
    assert (graphed.task.teacher_stream.stream is not None) == overlap
    for i, ((batch, ids), schedule) in enumerate(zip(batches, schedules, strict=True)):
        pinned = {k: v.pin_memory() for k, v in batch.items()}
        want = {k: v.clone() for k, v in eager(pinned, ids, 0, i, schedule).items()}
        got = {k: v.clone() for k, v in graphed(pinned, ids, 0, i, schedule).items()}
        frozen(pinned, ids, 0, i, (schedule[0], schedules[0][1], schedule[2]))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=10 * tolerance, atol=tolerance, msg=f"step {i}: {k}")
    assert graphed.graph is not None and graphed.graph.graph is not None
    initial = _build(build_config(PretrainConfig, overrides=over), stats, "cuda")
    for part in ("trainable", "ema"):
        want, got, wrong, before = ([p.detach().float() for p in getattr(s.task, part).parameters()]
                                    for s in (eager, graphed, frozen, initial))
        assert _relative_difference(got, want, before) < tolerance, part
        assert _relative_difference(wrong, want, before) > 0.1, part
