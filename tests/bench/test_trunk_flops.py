"""bench/trunk_flops.py: where deo's step does less work than the public code's (its padded windows)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import trunk_flops  # noqa: E402


def test_adaptive_windows_save_the_public_trunks_padding_on_96px_crops(tmp_path):
    rows = trunk_flops.main(["--sizes", "96", "--out", str(tmp_path / "t.json")])
    r = rows[96]
    # padded as torchvision pads (24/12/6/3 -> 28/14/7/7), deo's trunk costs about what the public one does
    assert abs(r["deo_padded_gflops"] / r["public_swin_t_gflops"] - 1) < 0.05
    # the adaptive windows remove about a quarter of it
    assert 0.65 < r["deo_gflops"] / r["deo_padded_gflops"] < 0.85
    assert (tmp_path / "t.json").is_file()
