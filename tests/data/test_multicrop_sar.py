"""SAR views: cut with the MS geometry, normalised with the manifest's or the fixed dB stats."""

import numpy as np
import pytest
import torch

from deo.data.multicrop import SAR_DB_STATS, MultiCrop
from deo.train.config import ViewConfig

STATS = {"ms": {"mean": [1000.0] * 10, "std": [500.0] * 10},
         "optical": {"mean": [100.0] * 3, "std": [50.0] * 3}}


def _inputs(b=4, s=48):
    g = torch.Generator().manual_seed(0)
    ms = torch.randint(1, 5000, (b, 10, s, s), generator=g).to(torch.uint16)
    opt = torch.randint(0, 255, (b, 3, s, s), generator=g).to(torch.uint8)
    return ms, opt, [f"id{i}" for i in range(b)], torch.full((b,), 10.0)


def test_sar_views_follow_the_ms_crop_geometry():
    views = ViewConfig(n_local=2, global_size=16, local_size=8)
    mc = MultiCrop(views, {**STATS, "sar": {"mean": [0.0, 0.0], "std": [1.0, 2.0]}}, seed=3)
    ms, opt, ids, gsd = _inputs()
    s = ms.shape[-1]
    # VV = column index (a ramp in x), VH = row index: bilinear sampling of a ramp is exact
    xs = torch.arange(s, dtype=torch.float32)
    sar = torch.stack([xs.view(1, s).expand(s, s), xs.view(s, 1).expand(s, s)]).expand(4, 2, s, s)
    out = mc(ms, opt, ids, 0, gsd, sar=sar * 1.0)
    assert out["sar_global"].shape == (2, 4, 2, 16, 16)
    assert out["ms_global"].shape[-2:] == out["sar_global"].shape[-2:]
    theta = mc.params(ids, 0)["theta"][:2].double().numpy()  # (2, B, 2, 3)
    # reference with plain loops: output pixel centre -> normalised input coords -> pixel coords
    for v in range(2):
        for i in range(4):
            for r in (0, 7, 15):
                for c in (0, 9, 15):
                    u, w = (2 * c + 1) / 16 - 1, (2 * r + 1) / 16 - 1
                    x, y = theta[v, i] @ np.array([u, w, 1.0])
                    px, py = ((x + 1) * s - 1) / 2, ((y + 1) * s - 1) / 2
                    got = out["sar_global"][v, i, :, r, c]
                    assert float(got[0]) == pytest.approx(px, abs=1e-3)
                    assert float(got[1]) == pytest.approx(py / 2, abs=1e-3)  # VH std 2


def test_sar_stats_default_to_fixed_db_stats_and_bad_input_fails():
    views = ViewConfig(n_local=2, global_size=16, local_size=8)
    ms, opt, ids, gsd = _inputs()
    mean = torch.tensor(SAR_DB_STATS["mean"]).view(1, 2, 1, 1)
    sar = mean.expand(4, 2, 48, 48) + 0.0
    out = MultiCrop(views, STATS)(ms, opt, ids, 0, gsd, sar=sar)
    assert out["sar_global"].abs().max() < 1e-5  # the dataset mean maps to 0
    assert "sar_global" not in MultiCrop(views, STATS)(ms, opt, ids, 0, gsd)
    with pytest.raises(ValueError, match=r"expected sar \(B, 2, S, S\) on the ms grid"):
        MultiCrop(views, STATS)(ms, opt, ids, 0, gsd, sar=sar[:, :, :40])
    with pytest.raises(ValueError, match=r"stats.sar needs 2 means"):
        MultiCrop(views, {**STATS, "sar": {"mean": [0.0], "std": [1.0]}})
