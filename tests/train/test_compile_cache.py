"""train.compile's cache of compiled code: a fresh process that loads the run's bundles compiles nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deo.train.compile_cache import CompileCache, device_tag

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
from deo.train.compile_cache import CompileCache

cache = CompileCache(sys.argv[1])
load_s = cache.load()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
model.compile(backend="inductor", dynamic=False)
t0 = time.perf_counter()
model(torch.randn(8, 16)).square().mean().backward()
compile_s = time.perf_counter() - t0
saved = cache.save()
print(json.dumps({"loaded": len(cache.loaded), "skipped": [r for _, r in cache.skipped], "saved": saved,
                  "compile_s": compile_s, "load_s": load_s,
                  "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
                  "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
                  "grad": model[1].weight.grad.abs().sum().item()}))
"""


def _run(folder: Path, inductor_dir: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_fresh_process_loads_the_bundles_and_compiles_nothing(tmp_path):
    folder = tmp_path / "run" / "compile_cache" / "tag"
    cold = _run(folder, tmp_path / "inductor_a")  # compiles from scratch and saves a bundle
    assert cold["loaded"] == 0 and cold["fx_miss"] >= 2 and cold["fx_hit"] == 0  # forward and backward
    assert cold["saved"] and Path(cold["saved"]).is_file()

    # another machine (empty local Inductor cache) with the run's bundles: every graph is a cache hit
    warm = _run(folder, tmp_path / "inductor_b")
    assert warm["loaded"] == 1 and warm["fx_miss"] == 0 and warm["fx_hit"] >= 2
    assert warm["grad"] == pytest.approx(cold["grad"], rel=1e-6)  # the same compiled code
    assert warm["saved"] is None and len(list(folder.glob("*.bin"))) == 1  # cache hits are not new code

    # a damaged bundle is reported and skipped; the run compiles as if it were absent
    (folder / "00099-0.bin").write_bytes(b"not a bundle")
    damaged = _run(folder, tmp_path / "inductor_c")
    assert damaged["loaded"] == 1 and len(damaged["skipped"]) == 1 and damaged["fx_miss"] == 0


def test_cache_folder_defaults_to_the_run_and_names_the_setup(tmp_path):
    cache = CompileCache.for_run("", str(tmp_path / "run"), torch.device("cpu"))
    assert cache.folder == str(tmp_path / "run" / "compile_cache" / device_tag(torch.device("cpu")))
    assert device_tag(torch.device("cpu")).startswith(f"torch-{torch.__version__}".replace("+", "_"))
    shared = CompileCache.for_run("s3://bucket/sweep/compile_cache", str(tmp_path / "run"), torch.device("cpu"))
    assert shared.folder.startswith("s3://bucket/sweep/compile_cache/torch-")
    cache.load()
    assert cache.bundles() == [] and not cache.loaded and not cache.skipped
