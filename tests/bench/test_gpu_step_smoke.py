"""bench/gpu_step.py --smoke: the prepared GPU script runs end to end on CPU, so it cannot break silently."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_step  # noqa: E402

from deo.train.task import DEOTask  # noqa: E402

from step_bench import PHASES  # noqa: E402


@pytest.mark.slow
def test_gpu_step_smoke_runs_every_variant_and_guards_compile_time(tmp_path):
    out = tmp_path / "gpu.json"
    # a public_step record of the same (smoke) kind: every variant gets its ratio to it
    public = tmp_path / "public.json"
    public.write_text(json.dumps({"status": "ok", "smoke": True, "device": "cpu", "samples_per_s": 0.5, "batch": 4}))
    # generous wall budget: the test checks the script, not the speed of a shared CI machine. Its own
    # process, as on the GPU machine: it forks its variants, and autograd refuses to run in a child
    # forked from a process that already ran a backward (as earlier tests in this one may have)
    subprocess.run([sys.executable, str(BENCH / "gpu_step.py"), "--smoke", "--out", str(out),
                    "--compile-warmup-s", "0", "--steps", "2", "--budget-s", "900",
                    "--public-json", str(public)], check=True, timeout=1200)
    summary = on_disk = json.loads(out.read_text())
    assert on_disk["variants"].keys() == {v["name"] for v in gpu_step.VARIANTS}
    v = on_disk["variants"]
    for name in ("ref_eager", "ref_unfused", "ref_fp32_ln", "ref_broadcast_bias", "ref_repeat_bias", "ref_conv_embed",
                 "ref_joint_trunk",
                 "ref_check_finite", "ref_loader", "paper_ckpt", "paper_nockpt", "paper_vitl_ckpt"):
        r = v[name]
        assert r["status"] == "ok", (name, r.get("status"), r.get("traceback"))
        assert r["loss_finite"] is True
        assert r["samples_per_s"] == pytest.approx(r["batch"] * 1000 / r["step_ms_mean"])
        assert set(PHASES) <= set(r["split_ms_median"])
        assert -1.0 <= r["losses_last"]["compression"] <= 1.0
    assert v["paper_ckpt"]["activation_checkpointing"] and not v["paper_nockpt"]["activation_checkpointing"]
    # the baselines run the code each change replaced, over the same steps: the same losses (fp32 CPU)
    assert v["ref_broadcast_bias"]["window_attention"] == "broadcast_bias"  # the old code really ran
    assert v["ref_repeat_bias"]["window_attention"] == "repeated_bias"
    assert v["ref_repeat_bias"]["qkv_split"] == "permuted_qkv_split"
    assert v["ref_eager"]["window_attention"] == "window_attention" and v["ref_eager"]["qkv_split"] == "split_qkv"
    assert v["ref_conv_embed"]["patch_embed"] == "convolution" and v["ref_eager"]["patch_embed"] == "matmul"
    for name in ("ref_unfused", "ref_fp32_ln", "ref_broadcast_bias", "ref_repeat_bias", "ref_conv_embed"):
        assert v[name]["losses_last"] == pytest.approx(v["ref_eager"]["losses_last"], rel=1e-4, abs=1e-5), name
    # compiled variants stop at the time guard (a 0 s warm-up budget), and the run goes on after them
    for name in ("ref_compile", "ref_compile_cudagraphs", "ref_compile_broadcast", "ref_compile_bundles",
                 "ref_compile_warm", "ref_compile_graph", "ref_compile_graph_overlap", "ref_compile_augment",
                 "ref_compile_augment_graph"):
        assert v[name]["status"].startswith(("timeout", "skipped")), v[name]["status"]
    # tests/train/test_step.py checks what the CUDA graph records
    for name in ("ref_graph", "paper_graph"):
        assert v[name]["status"] == "skipped: train.cuda_graph needs a CUDA device", v[name]["status"]
    assert 0.0 <= v["ref_loader"]["data_wait"] < 1.0 and v["ref_loader"]["loader_threads"] >= 1
    ref = v["ref_eager"]
    assert ref["flops_per_step"] > 0 and ref["tflops_achieved"] > 0
    assert v["ref_check_finite"]["with_check_finite"]["samples_per_s"] > 0
    prof = ref["profile"]
    assert prof["steps"] == 2 and prof["wall_ms_per_step"] > 0 and len(prof["top_by_device_time"]) > 10
    assert any(r["name"] == "aten::scaled_dot_product_attention" for r in prof["attention_by_shape"])
    assert ref["host_bound"]["steps"] == 1 and ref["host_bound"]["enqueue_ms"] > 0
    # the real variants: eager ones stay eager although reference.yaml compiles
    real = {v["name"]: gpu_step.variant_config(v, smoke=False, batch=64) for v in gpu_step.VARIANTS}
    assert all(c.train.compile == ("compile" in name) for name, c in real.items())
    # the trainable count is the task's, built independently
    cfg = gpu_step.variant_config(gpu_step.VARIANTS[0], smoke=True, batch=4)
    task = DEOTask(cfg)
    assert ref["trainable_params"] == sum(p.numel() for p in task.trainable.parameters())
    assert summary["best_reference"]["variant"] == "ref_eager"
    ok = {n for n, r in v.items() if r["status"] == "ok" and n.startswith("ref_")}  # the public step's sizes
    assert summary["public_here"]["samples_per_s"] == 0.5 and summary["vs_public_here"].keys() == ok
    assert summary["vs_public_here"]["ref_eager"] == round(ref["samples_per_s"] / 0.5, 2)
    assert summary["best_reference"]["speedup_vs_public_here"] == summary["vs_public_here"]["ref_eager"]


def test_variants_run_in_the_order_named_and_the_first_compiled_one_starts_cold():
    """The prepared GPU calls put the candidate first: it must compile cold, and later ones reuse its caches."""
    chosen, cold = gpu_step.plan_variants("ref_eager,ref_compile_graph,ref_compile,ref_graph")
    assert [v["name"] for v in chosen] == ["ref_eager", "ref_compile_graph", "ref_compile", "ref_graph"]
    assert cold == "ref_compile_graph"
    assert gpu_step.plan_variants("ref_eager,ref_compile_graph", keep_caches=True)[1] is None
    # a process that loads the bundles is never the cold one; all variants run in the listed order
    assert gpu_step.plan_variants("ref_compile,ref_compile_bundles")[1] == "ref_compile"
    everything, cold = gpu_step.plan_variants("")
    assert [v["name"] for v in everything] == [v["name"] for v in gpu_step.VARIANTS] and cold == "ref_compile"
    assert gpu_step.plan_variants("ref_eager")[1] is None
    with pytest.raises(ValueError, match="ref_nope"):
        gpu_step.plan_variants("ref_eager,ref_nope")
    with pytest.raises(ValueError, match="more than once"):
        gpu_step.plan_variants("ref_eager,ref_eager")
    with pytest.raises(ValueError, match="loads the bundle"):  # nothing saved a bundle before it
        gpu_step.plan_variants("ref_compile_bundles,ref_compile")
