"""bench/step_bench.py: the phase clock, the shard rows it reads, and that its step is the task's step."""

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from deo.config import build_config  # noqa: E402
from deo.data.loader import fill_true_colour  # noqa: E402
from deo.data.multicrop import MultiCrop  # noqa: E402
from deo.io.shards import ShardDataset  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402
from deo.train.task import DEOTask  # noqa: E402

from step_bench import PHASES, PhaseClock, TrainStep, shard_batches, summarise  # noqa: E402


def test_phase_clock_charges_intervals_to_the_closing_label():
    clock = PhaseClock(torch.device("cpu"))
    for _ in range(2):
        clock.mark("start")
        time.sleep(0.02)
        clock.mark("augment")
        time.sleep(0.04)
        clock.mark("backward")
        time.sleep(0.02)
        clock.mark("augment")
    steps = clock.steps()
    assert len(steps) == 2
    assert steps[0]["augment"] == pytest.approx(40, abs=15)
    assert steps[0]["backward"] == pytest.approx(40, abs=15)
    assert steps[1]["total"] == pytest.approx(steps[1]["augment"] + steps[1]["backward"])
    # the gap to the next step's start belongs to the previous step
    assert steps[0]["total"] == pytest.approx(steps[0]["augment"] + steps[0]["backward"] + steps[0]["between"])
    s = summarise([{"total": 10.0, "augment": 4.0, "backward": 6.0}, {"total": 30.0, "augment": 10.0,
                                                                       "backward": 20.0}], batch_size=8)
    assert s["samples_per_s"] == pytest.approx(8 * 1000 / 20.0)
    assert s["split_ms_median"] == {"augment": 7.0, "backward": 13.0}


def test_shard_batches_are_the_rows_with_ms(sample_shards):
    table = pq.read_table(ShardDataset.open(str(sample_shards)).files[0].replace("file://", ""))
    with_ms = [sid for sid, ok in zip(table.column("sample_id").to_pylist(), table.column("ms").is_valid()
                                      .to_pylist(), strict=True) if ok]
    batches = shard_batches(str(sample_shards), 4, 2)
    ids = [i.split(":")[0] for _, b in batches for i in b]
    assert ids == with_ms[:8]
    batch = batches[1][0]
    assert batch["ms"].dtype == torch.uint16 and batch["optical"].dtype == torch.uint8
    assert (batch["ms"].to(torch.int32).reshape(4, -1).amax(1) > 0).all()


def test_train_step_computes_the_task_loss_and_times_every_phase(sample_shards):
    cfg = build_config(PretrainConfig, overrides=["model.head_hidden=64", "views.n_local=2"])
    stats = ShardDataset.open(str(sample_shards)).stats
    (batch, ids), (batch2, ids2) = shard_batches(str(sample_shards), 4, 2)
    runner = TrainStep(cfg, torch.device("cpu"), stats)
    out = runner(batch, ids, 0)

    # independent: a fresh task from the same seed on the same views, no instrumentation
    torch.manual_seed(cfg.train.seed)
    task = DEOTask(cfg)
    task.train()
    views = MultiCrop(cfg.views, stats, seed=cfg.train.seed)(
        batch["ms"], fill_true_colour(batch["ms"], batch["optical"], batch["has_optical"]), ids, 0,
        batch["ms_gsd"])
    ref = task(views, 0)
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k].detach(), rtol=1e-5, atol=1e-6)

    runner.clock.clear()
    runner(batch2, ids2, 1)
    # it trained: lr is 0 at step 0 (warm-up), so parameters move at step 1, and the EMA follows
    for mod, ref_mod in ((runner.task.trainable, task.trainable), (runner.task.ema, task.ema)):
        assert any(not torch.equal(a, b) for a, b in zip(mod.parameters(), ref_mod.parameters(), strict=True))
    (step,) = runner.clock.steps()
    assert set(PHASES) <= set(step)
    assert step["total"] == pytest.approx(sum(v for k, v in step.items() if k != "total"))
    assert all(step[k] > 0 for k in ("augment", "teacher_ema", "teacher_dino", "student_fwd", "backward",
                                     "optimizer_ema"))
    assert np.isfinite(float(out["loss"]))


def test_an_accumulated_step_times_its_first_pass_as_one_phase(sample_shards):
    """Under train.grad_accum the teachers run in the first pass: its time is ``first_pass``, not theirs."""
    cfg = build_config(PretrainConfig, overrides=["model.head_hidden=64", "views.n_local=2", "train.batch_size=4",
                                                  "train.grad_accum=2"])
    (batch, ids), = shard_batches(str(sample_shards), 4, 1)
    runner = TrainStep(cfg, torch.device("cpu"), ShardDataset.open(str(sample_shards)).stats)
    runner(batch, ids, 0)
    (step,) = runner.clock.steps()
    assert step["first_pass"] > 0 and "teacher_ema" not in step and "teacher_dino" not in step
    assert step["total"] == pytest.approx(sum(v for k, v in step.items() if k != "total"))
