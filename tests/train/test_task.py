import math

import numpy as np
import pytest
import rasterio
import torch

from deo.data.multicrop import MultiCrop
from deo.train.config import LossConfig, ModelConfig, PretrainConfig, ViewConfig
from deo.train.task import DEOTask

EUROSAT_TO_DEO = [1, 2, 3, 4, 5, 6, 7, 12, 10, 11]


def _real_batch(shared_data, b=8):
    ms_files = sorted((shared_data / "eurosat_ms").glob("*/*.tif"))[:: 216 // b][:b]
    opt_files = sorted((shared_data / "neon_rgb" / "OSBS").glob("*.tif"))[:b]
    ms, opt = [], []
    for f in ms_files:
        with rasterio.open(f) as src:
            ms.append(src.read()[EUROSAT_TO_DEO])
    for f in opt_files:
        with rasterio.open(f) as src:
            opt.append(src.read(masked=False)[:, :256, :256])
    ms_t = torch.from_numpy(np.stack(ms).astype(np.int32)).clamp(min=1).to(torch.uint16)
    opt_t = torch.from_numpy(np.stack(opt))
    stats = {
        "ms": {
            "mean": ms_t.float().mean((0, 2, 3)).tolist(),
            "std": ms_t.float().std((0, 2, 3)).tolist(),
        },
        "optical": {
            "mean": opt_t.float().mean((0, 2, 3)).tolist(),
            "std": opt_t.float().std((0, 2, 3)).tolist(),
        },
    }
    return ms_t, opt_t, [f.name for f in ms_files], stats


def _cfg(**loss):
    return PretrainConfig(
        model=ModelConfig(head_hidden=128, drop_path=0.0),
        views=ViewConfig(n_local=2),
        loss=LossConfig(**loss),
    )



@pytest.fixture(scope="module")
def views(shared_data):
    torch.manual_seed(0)
    ms, opt, ids, stats = _real_batch(shared_data)
    cfg = _cfg()
    return MultiCrop(cfg.views, stats, seed=0)(
        ms, opt, ids, epoch=0, ms_gsd=torch.full((len(ids),), 10.0)
    )


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_student_learns_on_real_samples_and_teachers_behave(views):
    torch.manual_seed(0)
    task = DEOTask(_cfg(msad_lambda=0.1, gsd_weight=0.1))
    task.train()
    assert not task.teacher.training and not task.ema.training
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    ema_before = {k: v.clone() for k, v in task.ema.state_dict().items()}
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert not any(p.requires_grad for p in task.ema.parameters())
    opt = torch.optim.AdamW(task.trainable.parameters(), lr=1e-3)
    losses = []
    for step in range(20):
        out = task(views, step)
        assert set(out) == {
            "loss",
            "compression",
            "coding_rate",
            "cls_cos",
            "pF_cos",
            "pmid_cos",
            "msad",
            "gsd",
        }
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            # every term's parameters get a gradient (MSAD's two projections included)
            for name in (
                "psi_a",
                "psi_b",
                "head_gsd",
                "head_cls",
                "head_pF",
                "head_pmid",
                "head_ms",
            ):
                g = (
                    getattr(task.trainable, name).weight
                    if name.startswith(("psi", "head_gsd"))
                    else getattr(task.trainable, name).mlp[0].weight
                )
                assert g.grad is not None and g.grad.abs().sum() > 0, name
            assert all(p.grad is None for p in task.teacher.parameters())
        opt.step()
        task.update_ema(0.9)
        losses.append(float(out["loss"].detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    moved = [
        k
        for k, v in task.ema.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, ema_before[k])
    ]
    assert moved


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_token_path_shapes_and_zero_weights_skip(views):
    task = DEOTask(_cfg(alpha2=0.0, alpha3=0.0, gamma=0.0))
    s = task.trainable(views, task.teacher_grid(views))
    assert s["s_ms"].shape == (4, 8, 256)
    assert s["s_cls"].shape == (4, 8, 64)
    assert "s_pF" not in s and not hasattr(task.trainable, "head_pF")
    out = task(views, 0)
    assert set(out) == {"loss", "compression", "cls_cos"}
    full = DEOTask(_cfg())
    s = full.trainable(views, full.teacher_grid(views))
    assert s["s_pF"].shape == (2, 8, 16, 64) and s["s_pmid"].shape == (2, 8, 16, 64)


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_patch_heads_read_stages_before_the_final_norm_and_cls_after(views):
    """As the public DEO code: head_pF and head_pmid read stages 4 and 3 as they leave their blocks;
    head_cls reads the pooled, normalised final tokens."""
    task = DEOTask(_cfg())
    t = task.trainable.eval()
    s = t(views, task.teacher_grid(views))
    student = t.student
    og = views["opt_global"].flatten(0, 1)
    final, raw = student.stages(og, "optical", [2, 3])
    grid = task.teacher_grid(views)

    def on_grid(head, tokens):
        x = torch.nn.functional.interpolate(head(tokens).permute(0, 3, 1, 2), size=grid, mode="bilinear")
        return x.flatten(2).transpose(1, 2).reshape(s["s_pF"].shape)

    torch.testing.assert_close(s["s_pF"], on_grid(t.head_pF, raw[3]))
    torch.testing.assert_close(s["s_pmid"], on_grid(t.head_pmid, raw[2]))
    assert not torch.allclose(s["s_pF"], on_grid(t.head_pF, final), atol=1e-3)  # the normalised tokens differ
    torch.testing.assert_close(s["s_cls"][:2].flatten(0, 1), t.head_cls(final.mean(dim=(1, 2))))


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_non_finite_loss_raises_with_term_and_step(views):
    task = DEOTask(_cfg())
    bad = dict(views)
    bad["ms_global"] = views["ms_global"].clone()
    bad["ms_global"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"loss\.compression=nan.* at step 7, rank 0"):
        task(bad, 7)


class _ForkJoinLog:
    """A SideStream that records where DEOTask forks the teachers off and joins them back."""

    def __init__(self, log):
        self.log = log

    def fork(self, fn, *args):
        self.log.append("fork")
        out = fn(*args)
        self.log.append("teachers")
        return out

    def join(self):
        self.log.append("join")


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_the_student_runs_while_the_teachers_are_forked_off(views):
    """train.overlap_teachers: the teachers' stream joins after the student's forward, before the losses read
    the teachers' outputs, unless the student itself reads one of them (continual pretraining's F)."""
    from deo.train.side_stream import SideStream

    assert SideStream("cpu", enabled=True).stream is None  # off CUDA: in order, on the current stream
    torch.manual_seed(0)
    task = DEOTask(_cfg(), check_finite=False)
    log = []
    task.teacher_stream = _ForkJoinLog(log)
    student = task.trainable.forward

    def logged_student(*args, **kwargs):
        log.append("student")
        return student(*args, **kwargs)

    def logged_losses(*args, **kwargs):
        log.append("losses")
        return compression(*args, **kwargs)

    task.trainable.forward = logged_student
    compression = task.compression.forward
    task.compression.forward = logged_losses
    task(views, 0)
    assert log == ["fork", "teachers", "student", "join", "losses"]
    log.clear()
    teachers = task._teachers
    task._teachers = lambda v: {**teachers(v), "f_partner": None}  # as with a domain teacher F
    task(views, 0)
    assert log == ["fork", "teachers", "join", "student", "join", "losses"]


def _task_and_views(**loss):
    """A fresh task (EMA = student) and random views of 8 samples."""
    cfg = PretrainConfig(model=ModelConfig(head_hidden=128, drop_path=0.0), views=ViewConfig(n_local=2),
                         loss=LossConfig(**loss))
    g = torch.Generator().manual_seed(0)
    ms = torch.randint(1, 5000, (8, 10, 64, 64), generator=g).to(torch.uint16)
    opt = torch.randint(0, 256, (8, 3, 256, 256), generator=g).to(torch.uint8)
    stats = {"ms": {"mean": [2500.0] * 10, "std": [1400.0] * 10},
             "optical": {"mean": [128.0] * 3, "std": [74.0] * 3}}
    views = MultiCrop(cfg.views, stats, seed=0)(ms, opt, [f"s{i}" for i in range(8)], 0,
                                                torch.linspace(5.0, 40.0, 8))
    torch.manual_seed(0)
    return cfg, DEOTask(cfg), views


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_task_terms_are_their_losses_on_the_right_views():
    """Each logged term is its loss on the right tensors (views in order, teacher blocks, GSD targets), and
    the total is DESIGN's objective with the configured weights."""
    from deo.losses import CodingRateLoss, GSDLoss, MSADLoss, cross_view_cosine, patch_cosine

    cfg, task, views = _task_and_views(msad_lambda=0.1, gsd_weight=0.1)
    with torch.no_grad():  # the random teacher's LayerScale (1e-5) makes every block near-identity:
        for n, p in task.teacher.named_parameters():  # mid and final tokens would then agree to 1e-6
            if "gamma" in n:
                p.fill_(1.0)
    task.train()
    vg, vl = views["ms_global"].shape[0], views["ms_local"].shape[0]
    with torch.no_grad():
        out = task(views, 0)
        s = task.trainable(views, task.teacher_grid(views))
        t = task._teachers(views)
        branch = task._ms_branch(task.trainable)
        # student embeddings: global views first, in order, then the local views
        for v in range(vg):
            torch.testing.assert_close(s["s_ms"][v], branch(views["ms_global"][v]))
        for v in range(vl):
            torch.testing.assert_close(s["s_ms"][vg + v], branch(views["ms_local"][v]))
        # the EMA starts as a copy: its embeddings are the student's global ones, view for view
        torch.testing.assert_close(t["t_ms"], s["s_ms"][:vg])
        # pF is distilled from the teacher's final block, pmid from its intermediate one
        _, (mid, fin) = task.teacher(views["opt_global"].flatten(0, 1))
        assert (mid - fin).abs().max() > 1e-2
        torch.testing.assert_close(t["t_pF"].flatten(0, 1), fin)
        torch.testing.assert_close(t["t_pmid"].flatten(0, 1), mid)
    loss = cfg.loss
    want = {
        "compression": cross_view_cosine(t["t_ms"], s["s_ms"]),
        "coding_rate": CodingRateLoss(loss.eps)(s["s_ms"][:vg], t["t_ms"])[0],
        "cls_cos": cross_view_cosine(t["t_cls"], s["s_cls"]),
        "pF_cos": patch_cosine(s["s_pF"], t["t_pF"]),
        "pmid_cos": patch_cosine(s["s_pmid"], t["t_pmid"]),
        "msad": MSADLoss(loss.msad_tau, loss.msad_smoothing)(s["va"], s["vb"])[0],
        "gsd": GSDLoss()(s["gsd"], torch.cat([views["gsd_global"], views["gsd_local"]]))[0],
    }
    for k, v in want.items():
        torch.testing.assert_close(out[k], v, msg=k)
    total = (-out["compression"] - loss.gamma * out["coding_rate"]
             - (loss.alpha1 * out["cls_cos"] + loss.alpha2 * out["pF_cos"] + loss.alpha3 * out["pmid_cos"])
             + loss.msad_lambda * out["msad"] + loss.gsd_weight * out["gsd"])
    torch.testing.assert_close(out["loss"].detach(), total)
