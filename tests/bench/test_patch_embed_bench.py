"""bench/patch_embed_bench.py runs both patch-embedding paths side by side and leaves the matmul one on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import patch_embed_bench  # noqa: E402

from deo.models.patch_embed import LinearPatchEmbed  # noqa: E402


def test_times_both_paths_and_restores_the_matmul():
    rows = patch_embed_bench.main(["--batch", "2", "--px", "32", "--reps", "2"])
    r = rows["2x10x32x32"]
    assert r["matmul_ms"] > 0 and r["convolution_ms"] > 0
    assert r["ratio"] == round(r["convolution_ms"] / r["matmul_ms"], 2)
    assert LinearPatchEmbed.as_matmul is True
