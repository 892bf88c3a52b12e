import os

import pytest
import torch
import torch.multiprocessing as mp

from deo.losses import CodingRateLoss


def _reference(s, t, eps):
    vg, b, d = s.shape
    rs = []
    for v in range(vg):
        z = ((s[v] + t[v]) / 2).double()
        m = torch.eye(d, dtype=torch.float64) + d / (b * eps) * z.T @ z
        rs.append(0.5 * torch.linalg.slogdet(m)[1] * (d + b) / (d * b))
    return sum(rs) / vg


def test_coding_rate_matches_slogdet_loop():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 12, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 12, 6, generator=g)
    r, parts = CodingRateLoss(0.05)(s, t)
    ref = _reference(s, t, 0.05)
    torch.testing.assert_close(r.double(), ref, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(r, s)
    (g2,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g1.double(), g2.double(), rtol=1e-4, atol=1e-6)


def test_coding_rate_float32_under_bf16_autocast():
    s = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, _ = CodingRateLoss(0.05)(s.bfloat16(), s.bfloat16())
    assert r.dtype == torch.float32 and torch.isfinite(r)


def test_gather_without_process_group_raises():
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        CodingRateLoss(0.05, gather_distributed=True)(torch.randn(2, 4, 3), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        CodingRateLoss(0.0)


def _worker(rank, world, port, s, t, out, micro=1):
    """This rank's rows of s, t as ``micro`` micro-batches: each micro-step adds the others' Z^T Z and
    carries ``micro`` x R's gradient (as DEOTask does), and its loss is divided by ``micro`` (as the step)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = s.shape[1] // world
    s_local = s[:, rank * b : (rank + 1) * b].clone().requires_grad_(True)
    t_local = t[:, rank * b : (rank + 1) * b]
    loss = CodingRateLoss(0.05, gather_distributed=True)
    m = b // micro
    parts = [slice(i * m, (i + 1) * m) for i in range(micro)]
    covs = [loss.covariance(s_local[:, p].detach(), t_local[:, p]) for p in parts]
    for i, p in enumerate(parts):
        others = sum(c for j, c in enumerate(covs) if j != i) if micro > 1 else None
        r, _ = loss(s_local[:, p], t_local[:, p], others, m * (micro - 1))
        (r + (micro - 1) * (r - r.detach())).div(micro).backward()
    out[rank] = (r.detach(), s_local.grad.detach())
    dist.destroy_process_group()


def _whole_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (2, 12, 6) student and teacher rows, and R with its gradient w.r.t. the student in one process."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 12, 6, generator=g)
    t = torch.randn(2, 12, 6, generator=g)
    whole = s.clone().requires_grad_(True)
    r, _ = CodingRateLoss(0.05)(whole, t)
    r.backward()
    return s, t, r.detach(), whole.grad


@pytest.mark.parametrize("micro", [1, 2])
def test_coding_rate_two_gloo_processes_equal_one_process(micro):
    """2 ranks (each in ``micro`` accumulated micro-batches) give one process's R and gradient."""
    from conftest import free_port

    s, t, r1, grad1 = _whole_batch(4)

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        out = mgr.dict()
        mp.start_processes(_worker, args=(2, free_port(), s, t, out, micro), nprocs=2, join=True, start_method="spawn")
        res = dict(out)
    for rank in range(2):
        r, grad = res[rank]
        torch.testing.assert_close(r, r1, rtol=1e-5, atol=1e-6)
        # each rank's gradient is world x the single-process one (DDP then averages over ranks)
        torch.testing.assert_close(grad / 2, grad1[:, rank * 6 : (rank + 1) * 6], rtol=1e-4, atol=1e-6)


def test_other_micro_batches_make_r_that_of_the_whole_batch():
    """Gradient accumulation: rows of the other micro-batches, given as their Z^T Z, give R of the whole
    batch, and the gradient w.r.t. this micro-batch's rows is the whole batch's."""
    s, t, r_whole, grad_whole = _whole_batch(5)
    loss = CodingRateLoss(0.05)
    own = s[:, :4].clone().requires_grad_(True)
    other = loss.covariance(s[:, 4:], t[:, 4:])
    r, parts = loss(own, t[:, :4], other, 8)
    r.backward()
    torch.testing.assert_close(r, r_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["coding_rate"], r_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own.grad, grad_whole[:, :4], rtol=1e-4, atol=1e-7)
    # this micro-batch alone is a different (smaller-batch) R
    alone, _ = loss(s[:, :4], t[:, :4])
    alone = alone.detach()
    assert abs(float(alone) - float(r_whole)) > 1e-2
    with pytest.raises(ValueError, match="other_cov must be"):
        loss(own, t[:, :4], other[:, :3], 8)
