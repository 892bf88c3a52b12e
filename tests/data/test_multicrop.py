import numpy as np
import pytest
import rasterio
import torch

from deo.data.multicrop import MultiCrop, scale_ranges, view_gsd
from deo.train.config import ViewConfig

STATS = {
    "ms": {"mean": [1500.0] * 10, "std": [800.0] * 10},
    "optical": {"mean": [110.0] * 3, "std": [50.0] * 3},
}


def _tile(shared_data):
    with rasterio.open(
        shared_data
        / "eurosat_ms"
        / "Forest"
        / sorted(p.name for p in (shared_data / "eurosat_ms" / "Forest").glob("*.tif"))[0]
    ) as src:
        x = src.read()[[1, 2, 3, 4, 5, 6, 7, 12, 10, 11]]
    return torch.from_numpy(x.astype(np.int32)).to(torch.uint16)


def test_uniform_local_scales_fall_in_their_segments():
    v = ViewConfig(n_local=5, local_scale=[0.05, 0.5], uniform_local=True)
    mc = MultiCrop(v, STATS, seed=3)
    p = mc.params([f"s{i}" for i in range(50)], epoch=1)
    edges = np.linspace(0.05, 0.5, 6)
    for k in range(5):
        s = p["scale"][2 + k]
        assert (s >= edges[k] - 1e-6).all() and (s <= edges[k + 1] + 1e-6).all()
    assert scale_ranges(0.1, 0.3, 2, False) == [(0.1, 0.3), (0.1, 0.3)]


def test_gsd_target_and_same_geometry(shared_data):
    ms = _tile(shared_data)[None].repeat(2, 1, 1, 1)
    # optical = S2 true colour of the same tile (B04 B03 B02) as uint8: both modalities see the same crop
    tc = (ms[:, [2, 1, 0]].float() / 3000 * 255).clamp(0, 255).to(torch.uint8)
    v = ViewConfig(global_size=32, local_size=16, optical_global_size=32)
    out = MultiCrop(v, STATS, seed=0)(ms, tc, ["a", "b"], 0, torch.tensor([10.0, 20.0]))
    p = MultiCrop(v, STATS, seed=0).params(["a", "b"], 0)
    torch.testing.assert_close(
        out["gsd_global"], p["side"][:2] * torch.tensor([10.0, 20.0]) * 64 / 32
    )
    assert view_gsd(torch.tensor(10.0), torch.tensor(0.5), 64, 16).item() == pytest.approx(20.0)

    # same geometry: B04 of each MS view correlates with the optical view of the same index (photometric
    # jitter is monotone per image), much more than with the other global view
    def corr(a, b):
        return np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]

    ms_b04, opt_gray = out["ms_global"][:, :, 2], out["opt_global"].mean(2)
    same = [corr(ms_b04[v, i], opt_gray[v, i]) for v in range(2) for i in range(2)]
    other = [corr(ms_b04[v, i], opt_gray[1 - v, i]) for v in range(2) for i in range(2)]
    assert np.mean(same) > 0.6 and np.mean(same) > np.mean(other) + 0.2, (same, other)


def test_params_depend_only_on_seed_epoch_and_id():
    mc = MultiCrop(ViewConfig(), STATS, seed=0)
    a = mc.params(["x", "y", "z"], 2)
    b = mc.params(["z", "x"], 2)
    torch.testing.assert_close(a["theta"][:, 0], b["theta"][:, 1])
    torch.testing.assert_close(a["theta"][:, 2], b["theta"][:, 0])
    assert not torch.equal(mc.params(["x"], 3)["theta"][:, 0], a["theta"][:, 0])
    with pytest.raises(ValueError, match="stats.ms needs 10"):
        MultiCrop(ViewConfig(), {"ms": {"mean": [1.0], "std": [1.0]}, "optical": STATS["optical"]})


def test_apply_traces_as_one_graph_equal_to_eager(shared_data):
    """MultiCrop.apply (crop, flips, jitter, blur, normalisation) traces as one Dynamo graph with no break,
    which a second batch reuses: what bench/gpu_step.py's ref_compile_augment compiles with Inductor
    (Dynamo alone here, the eager backend: the test checks the tracing, fast)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    views = ViewConfig(n_local=3)
    tile = _tile(shared_data)
    ms = torch.stack([tile, tile.flip(-1)])
    tc = (ms[:, [2, 1, 0]].float() / 3000 * 255).clamp(0, 255).to(torch.uint8)
    gsd = torch.tensor([10.0, 10.0])
    eager = MultiCrop(views, STATS, seed=1)
    compiled = MultiCrop(views, STATS, seed=1).to(torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    compiled.apply = torch.compile(compiled.apply, backend="eager", dynamic=False)
    for epoch in (0, 1):
        want = eager(ms, tc, ["a", "b"], epoch, gsd)
        got = compiled(ms, tc, ["a", "b"], epoch, gsd)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], msg=k)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]


def test_local_views_share_geometry_and_their_gsd_is_the_local_size(shared_data):
    ms = _tile(shared_data)[None].repeat(2, 1, 1, 1)
    tc = (ms[:, [2, 1, 0]].float() / 3000 * 255).clamp(0, 255).to(torch.uint8)
    v = ViewConfig(global_size=32, local_size=16, optical_global_size=32, n_local=6)
    mc = MultiCrop(v, STATS, seed=0)
    out = mc(ms, tc, ["a", "b"], 0, torch.tensor([10.0, 20.0]))
    p = mc.params(["a", "b"], 0)
    # the side of a crop is the square root of its area in tile units: sqrt(|det|) of the affine crop
    torch.testing.assert_close(p["side"], p["theta"][..., :2, :2].det().abs().sqrt())
    torch.testing.assert_close(out["gsd_local"], p["side"][2:] * torch.tensor([10.0, 20.0]) * 64 / 16)

    def corr(a, b):
        return np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]

    ms_b04, gray = out["ms_local"][:, :, 2], out["opt_local"].mean(2)
    n = ms_b04.shape[0]
    same = [corr(ms_b04[k, i], gray[k, i]) for k in range(n) for i in range(2)]
    other = [corr(ms_b04[k, i], gray[(k + 1) % n, i]) for k in range(n) for i in range(2)]
    assert np.mean(same) > 0.6 and np.mean(same) > np.mean(other) + 0.2, (same, other)


def test_views_are_normalised_with_the_stats():
    g = torch.Generator().manual_seed(0)
    ms = torch.randint(1000, 3000, (8, 10, 64, 64), generator=g).to(torch.uint16)
    opt = torch.randint(0, 256, (8, 3, 64, 64), generator=g).to(torch.uint8)
    stats = {"ms": {"mean": [2000.0] * 10, "std": [577.0] * 10},
             "optical": {"mean": [127.5] * 3, "std": [73.9] * 3}}
    out = MultiCrop(ViewConfig(n_local=2, global_size=32, local_size=16, optical_global_size=32), stats)(
        ms, opt, [f"s{i}" for i in range(8)], 0, torch.full((8,), 10.0))
    for k in ("ms_global", "ms_local", "opt_global", "opt_local"):
        assert abs(float(out[k].mean())) < 0.5, k


def test_ms_contrast_keeps_the_band_mean_and_gain_scales_it():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 10, 8, 8, generator=g) * 2000 + 1000  # no clamp at 0 for contrast <= 1.2
    contrast = 0.8 + 0.4 * torch.rand(4, 10, generator=g)
    y = MultiCrop._ms_photometric(x.clone(), torch.ones(4, 10), contrast)
    torch.testing.assert_close(y.mean((2, 3)), x.mean((2, 3)))
    y = MultiCrop._ms_photometric(x.clone(), torch.full((4, 10), 1.2), contrast)
    torch.testing.assert_close(y.mean((2, 3)), 1.2 * x.mean((2, 3)))
