"""bench/public_step.py: the public DEO code's own step, the baseline a device session measures beside deo's.

The end-to-end smoke needs a local checkout of the public code (never vendored, never downloaded):
``git clone https://github.com/wolfilip/DEO-FM .public/DEO-FM``, or ``DEO_PUBLIC_REPO`` pointing at one.
Without it that test skips; the rest runs everywhere.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_step  # noqa: E402
import public_step  # noqa: E402

PUBLIC_REPO = Path(os.environ.get("DEO_PUBLIC_REPO", ROOT / ".public" / "DEO-FM"))


def test_missing_checkout_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*DEO/main_dino\.py.*git clone https://github.com/wolfilip/DEO-FM"):
        public_step.import_public(tmp_path / "nowhere")


def test_dinov3_stand_in_answers_the_call_the_public_distiller_makes():
    """``get_intermediate_layers(x=, n=, return_class_token=True)``: normed (patches, [cls]) per block."""
    torch.manual_seed(0)
    model = public_step.DINOv3Intermediates("vit_small_patch16_dinov3").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.get_intermediate_layers(x=x, n=(8, 11), return_class_token=True)
        tokens = model.vit.forward_features(x)  # all 12 blocks, then the final norm
    assert [(p.shape, c.shape) for p, c in out] == [((2, 16, 384), (2, 384))] * 2
    # the last block's pair is the final normed sequence: [cls] first, then 4 registers, then patches
    torch.testing.assert_close(out[-1][1], tokens[:, 0])
    torch.testing.assert_close(out[-1][0], tokens[:, 5:])
    assert not torch.allclose(out[0][0], out[1][0])


def test_pinned_batches_hand_over_the_public_crops_and_clock_every_step():
    loader = public_step.PinnedBatches(steps=3, batch=2, local_crops=2, global_px=32, local_px=16, pin=False)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and len(loader.times) == 4
    crops, ms = batches[0]
    assert ms is None
    assert [tuple(c.shape) for c in crops] == [(2, 10, 32, 32)] * 2 + [(2, 10, 16, 16)] * 2
    assert all(c.dtype == torch.float32 for c in crops)
    assert batches[2][0] is batches[0][0] and batches[1][0] is not batches[0][0]  # two batches, cycled
    assert loader.times == sorted(loader.times)


def test_gpu_step_reads_only_a_successful_public_record_of_its_own_kind(tmp_path):
    path = tmp_path / "public.json"
    assert gpu_step.read_public(None, smoke=False, batch=64) is None
    assert gpu_step.read_public(str(path), smoke=False, batch=64) is None  # not written: the run failed early
    rec = {"status": "ok", "smoke": False, "device": "NVIDIA H200", "samples_per_s": 200.0, "batch": 64,
           "global_px": 224, "local_px": 96, "local_crops": 10, "step_ms_median": 320.0, "peak_mem_gib": 38.0,
           "public_commit": "55c7ae1", "scaler_skipped_timed_steps": 0, "process_group": "nccl"}
    path.write_text(json.dumps(rec))
    assert gpu_step.read_public(str(path), smoke=False, batch=64) == {k: rec[k] for k in (
        "device", "samples_per_s", "step_ms_median", "peak_mem_gib", "public_commit",
        "scaler_skipped_timed_steps", "process_group")}
    assert gpu_step.read_public(str(path), smoke=True, batch=64) is None  # tiny CPU sizes pair only with themselves
    assert gpu_step.read_public(str(path), smoke=False, batch=8) is None  # another batch (a FLOP count's)
    for other in ({"status": "error: RuntimeError: NCCL"}, {"local_px": 32}, {"local_crops": 2}):
        path.write_text(json.dumps({**rec, **other}))
        assert gpu_step.read_public(str(path), smoke=False, batch=64) is None, other


@pytest.mark.slow
@pytest.mark.skipif(not (PUBLIC_REPO / "DEO" / "main_dino.py").is_file(),
                    reason=f"no checkout of wolfilip/DEO-FM at {PUBLIC_REPO} (DEO_PUBLIC_REPO)")
def test_public_step_smoke_runs_the_public_training_loop(tmp_path):
    out = tmp_path / "public.json"
    subprocess.run([sys.executable, str(BENCH / "public_step.py"), "--smoke", "--public-repo", str(PUBLIC_REPO),
                    "--count-flops", "--out", str(out)], check=True, timeout=600)
    rec = json.loads(out.read_text())
    assert rec["status"] == "ok", rec["status"]
    assert rec["smoke"] is True and rec["device"] == "cpu" and rec["process_group"] == "gloo"  # DDP, one rank
    # the architecture: Swin-T with both patch embeddings and its four heads, 55M trainable
    assert rec["trainable_params_m"] == pytest.approx(55.1, abs=0.1)
    assert rec["steps"] == 2 and rec["warmup"] == 1
    assert rec["samples_per_s"] == pytest.approx(rec["batch"] * 1000 / rec["step_ms_median"], rel=0.01, abs=0.006)
    assert set(rec["stand_ins"]) <= set(public_step.OPTIONAL_MODULES)
    assert rec["public_args"][:2] == ["--arch", "swin_t"] and "--smoke" in rec["command"]
    assert "scaler_skipped_timed_steps" not in rec  # fp32 on the CPU: no grad scaler
    # its first step's work: 2 images through 4 crops, both patch embeddings, the EMA teacher and DINOv3
    assert 2e11 < rec["flops_per_step"] < 1e12
