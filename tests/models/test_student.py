import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from deo.bands import DEO_BANDS
from deo.models.student import build_student, build_swin
from deo.models.swin_window import effective_window
from deo.train.config import ModelConfig


def test_effective_windows_tile_reference_grids():
    # Swin-T window 7: 224 px grids 56/28/14/7, 96 px grids 24/12/6/3 -> no padding anywhere
    assert [effective_window(g, 7) for g in (56, 28, 14, 7)] == [7, 7, 7, 7]
    assert [effective_window(g, 7) for g in (24, 12, 6, 3)] == [6, 6, 6, 3]
    assert effective_window(13, 7) == 7  # prime: timm's padding


@pytest.mark.parametrize("size", [64, 32])
def test_token_paths_shapes(size):
    s = build_student(ModelConfig(sar=True), img_size=64)
    assert s.stage_dims == [32, 64, 128, 256] and s.num_features == 256
    for modality, ch in (("ms", 10), ("optical", 3), ("sar", 2)):
        x = torch.randn(2, ch, size, size)
        assert s.forward_features(x, modality).shape == (2, size // 32, size // 32, 256)
        assert s.pooled(x, modality).shape == (2, 256)
        final, inter = s.forward_intermediates(x, modality, indices=[2, 3])
        assert [tuple(t.shape) for t in inter] == [(2, 128, size // 16, size // 16), (2, 256, size // 32, size // 32)]
    with pytest.raises(ValueError, match=r"ms input must be \(B, 10, H, W\)"):
        s.pooled(torch.randn(2, 3, size, size), "ms")
    with pytest.raises(ValueError, match="modality must be one of"):
        s.pooled(torch.randn(2, 3, size, size), "hyperspectral")


def test_adaptive_window_equals_timm_when_grid_is_built_size():
    s = build_student(ModelConfig(drop_path=0.0), img_size=64).eval()
    x = torch.randn(2, 10, 64, 64)
    ours = s.forward_features(x, "ms")
    for stage in s.swin.layers:
        for block in stage.blocks:
            block.__class__ = SwinTransformerBlock
    torch.testing.assert_close(ours, s.forward_features(x, "ms"), rtol=1e-4, atol=1e-5)


def test_adaptive_window_equals_timm_built_for_local_size():
    # A plain timm Swin built at 96 px with window 6 (clamped by timm to 6/6/6/3 on the 24/12/6/3 grids)
    # is what our blocks compute for a 96 px crop of a window-7 model, given the central bias sub-tables.
    torch.manual_seed(0)
    ours = build_swin("swin_tiny_patch4_window7_224", 224).eval()
    ref = type(ours)(img_size=96, window_size=6, num_classes=0, strict_img_size=False).eval()
    state = {k: v for k, v in ours.state_dict().items() if "relative_position_bias_table" not in k}
    ref.load_state_dict(state, strict=False)
    n = 0
    for a, b in zip(ours.modules(), ref.modules(), strict=True):
        if hasattr(a, "relative_position_bias_table"):
            c = 7 - b.window_size[0]
            t = a.relative_position_bias_table.view(13, 13, -1)[c : 13 - c, c : 13 - c]
            b.relative_position_bias_table.data.copy_(t.reshape(-1, t.shape[-1]))
            n += 1
    assert n == 12
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=1e-3, atol=1e-4)


def test_spectral_init_copies_pretrained_rgb_kernels(tmp_path):
    path = tmp_path / "rgb.pth"
    torch.save({"model": build_swin("swin_deo_tiny", 64).state_dict()}, path)
    s = build_student(ModelConfig(rgb_weights=str(path)), img_size=64)
    w_ms, w_rgb = s.embeds["ms"].proj.weight, s.embeds["optical"].proj.weight
    for c, band in enumerate(("B04", "B03", "B02")):
        torch.testing.assert_close(w_ms[:, DEO_BANDS.index(band)], w_rgb[:, c] * 0.3)
    torch.testing.assert_close(w_ms[:, DEO_BANDS.index("B08")], w_rgb.mean(1) * 0.3)
    # without pretrained RGB weights there is nothing to transfer: each band keeps its own random kernel
    w = build_student(ModelConfig(), img_size=64).embeds["ms"].proj.weight
    assert not torch.allclose(w[:, DEO_BANDS.index("B08")], w[:, DEO_BANDS.index("B11")])


def test_rgb_weights_load_into_optical_embed_and_stages(tmp_path):
    src = build_swin("swin_deo_tiny", 64)
    path = tmp_path / "rgb.pth"
    torch.save({"model": src.state_dict()}, path)
    s = build_student(ModelConfig(rgb_weights=str(path)), img_size=64)
    torch.testing.assert_close(s.embeds["optical"].proj.weight, src.patch_embed.proj.weight)
    torch.testing.assert_close(s.swin.layers[3].blocks[1].mlp.fc1.weight, src.layers[3].blocks[1].mlp.fc1.weight)
    with pytest.raises(FileNotFoundError):
        build_student(ModelConfig(rgb_weights=str(tmp_path / "missing.pth")), img_size=64)


def test_paper_config_parameter_count():
    s = build_student(ModelConfig(student="swin_base_patch4_window7_224"), img_size=224)
    backbone = sum(p.numel() for p in s.swin.parameters())
    print(f"paper student swin_base backbone parameters: {backbone / 1e6:.2f}M")
    assert 86e6 < backbone < 88.5e6
    tiny = sum(p.numel() for p in build_student(ModelConfig(), 64).swin.parameters())
    assert 2e6 < tiny < 5e6


def test_stochastic_depth_drops_whole_samples_at_timm_rates():
    from timm.layers import DropPath

    from deo.models.swin_window import StochasticDepth

    s = build_swin("swin_tiny_patch4_window7_224", 224, drop_path=0.2)
    rates = [float(b.drop_path1.rate) for stage in s.layers for b in stage.blocks]
    timm_rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0
                  for stage in build_swin_timm(0.2).layers for b in stage.blocks]
    assert rates == pytest.approx(timm_rates) and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert not any("rate" in k for k in s.state_dict())  # checkpoints stay timm's

    sd = StochasticDepth(0.25).train()
    torch.manual_seed(0)
    y = sd(torch.ones(20000, 3, 2))
    per_sample = y.flatten(1)
    values = per_sample.unique()  # a sample is dropped whole or scaled by 1/keep
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75)
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.015)
    x = torch.randn(4, 3)
    assert torch.equal(sd.eval()(x), x) and torch.equal(StochasticDepth(0.0).train()(x), x)
    # small rates of deep Swins stay exact in bf16 (the draw is float32)
    small = StochasticDepth(0.002).train()(torch.ones(400_000, 1, dtype=torch.bfloat16))
    assert small.dtype == torch.bfloat16
    assert (small == 0).float().mean().item() == pytest.approx(0.002, abs=0.0004)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        StochasticDepth(1.0)


def build_swin_timm(rate):
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, drop_path_rate=rate)


def test_compiled_blocks_of_a_stage_share_graphs():
    """Regional compilation: one graph per (stage, shift, crop size), not one per block."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from deo.train.config import PretrainConfig
    from deo.train.loop import configure_models

    torch._dynamo.reset()
    counters.clear()
    s = build_student(ModelConfig(student="swin_tiny_patch4_window7_224", drop_path=0.1), img_size=64).train()
    cfg = PretrainConfig()
    cfg.train.compile = True
    configure_models(s, cfg, backend="eager")
    for size in (64, 32):
        s.pooled(torch.randn(2, 10, size, size), "ms").sum().backward()
    blocks = sum(len(stage.blocks) for stage in s.swin.layers)
    # per crop size: 4 stages x (even, odd shift) blocks = 8 graphs, whatever the depth (a graph per
    # block would be 12 per size here, 24 for Swin-B), and the 3 patch mergings
    assert blocks == 12
    assert counters["stats"]["unique_graphs"] == 2 * (8 + 3)
    assert not counters["recompiles"]
    # a no-grad pass (the EMA teacher's) adds its 8 + 3 forward graphs once; repeating any pass compiles
    # nothing more (the block's mask cache must not be guarded: torch 2.11 recompiled once it filled)
    for _ in range(2):
        with torch.no_grad():
            s.pooled(torch.randn(2, 10, 64, 64), "ms")
        for size in (64, 32):
            s.pooled(torch.randn(2, 10, size, size), "ms").sum().backward()
    assert counters["stats"]["unique_graphs"] == 3 * (8 + 3)
    assert not counters["recompiles"] and not counters["graph_break"]


# window 8 as built, window 6 (adapted), padded (11: prime), one window as wide as the grid (8)
@pytest.mark.parametrize("grid", [16, 12, 11, 8])
def test_fused_block_equals_timm_ops_forward_and_backward(grid):
    """One gather for shift + partition and one addcmul per residual: same values and gradients."""
    from deo.models.swin_window import AdaptiveWindowBlock

    torch.manual_seed(0)  # weights and input: the test must not depend on what ran before it
    swin = build_swin("swin_deo_tiny", 64, drop_path=0.6)
    swin.train()
    stage = swin.layers[2]  # 4 blocks, plain and shifted, drop rates 0.27-0.4
    x = torch.randn(8, grid, grid, stage.dim)
    runs = []
    for fused in (True, False):
        AdaptiveWindowBlock.fused = fused
        try:
            swin.zero_grad()
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(7)  # the same stochastic-depth draws in both runs
            y = stage(xi)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            runs.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in stage.named_parameters()}))
        finally:
            AdaptiveWindowBlock.fused = True
    (y_f, gx_f, gp_f), (y_t, gx_t, gp_t) = runs
    torch.testing.assert_close(y_f, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_t, rtol=1e-4, atol=1e-5)
    for n in gp_t:
        # float32 sums over 8 x grid^2 tokens in another order: errors scale with the gradient's size
        # (measured up to 6e-5 on gradients of about 150, over 30 seeds)
        atol = 1e-6 * float(gp_t[n].abs().max())
        torch.testing.assert_close(gp_f[n], gp_t[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
    # the draws dropped branches (the addcmul's zero scale is exercised): unlike the no-drop output
    with torch.no_grad():
        assert not torch.allclose(y_f, stage.eval()(x), atol=1e-3)


def test_window_attention_gives_sdpa_one_aligned_bias_per_window(monkeypatch):
    """Every block hands SDPA a (windows, heads, N, N) bias, never one broadcast over windows: with a
    broadcast bias the fused CUDA kernels refuse it and SDPA takes its math path (3.6x slower forward
    on an H100). With a gradient, its strides are multiples of 8 elements, so SDPA's memory-efficient
    kernel takes it as it is instead of copying it into a padded one. The values equal q k^T / sqrt(d) + bias (+ mask),
    softmax, @ v, and the bias gradient equals that of a repeated bias."""
    import torch.nn.functional as F

    from deo.models import swin_window

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[0], tuple(attn_mask.shape), attn_mask.stride()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(swin_window.F, "scaled_dot_product_attention", spy)
    images, nw, heads, n, hd = 3, 4, 2, 9, 8
    q, k, v = (torch.randn(images * nw, heads, n, hd, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(heads, n, n, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(nw, n, n, dtype=torch.float64)
    for m in (None, mask):
        out = swin_window.window_attention(q, k, v, bias, m)
        scores = (q @ k.transpose(-2, -1)) * hd**-0.5 + bias
        if m is not None:
            scores = scores + m.repeat(images, 1, 1).unsqueeze(1)
        want = scores.softmax(-1) @ v
        torch.testing.assert_close(out, want)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, bias, g)[0], torch.autograd.grad(want, bias, g)[0])
    assert seen == [(images * nw, (images * nw, heads, n, n), (heads * n * 16, n * 16, 16, 1))] * 2

    # and inside the Swin blocks, shifted and not, global and local grids
    seen.clear()
    swin = build_swin("swin_deo_tiny", 64)
    swin.layers(torch.randn(2, 16, 16, 32))
    assert seen and all(b == shape[0] for b, shape, _ in seen)
    assert all(st[-1] == 1 and all(x % 8 == 0 and x > 0 for x in st[:-1]) for _, _, st in seen)
    # without a gradient (the EMA teacher) the bias stays contiguous: the H100 ran those on cuDNN, unpadded
    seen.clear()
    with torch.no_grad():
        swin.layers(torch.randn(2, 16, 16, 32))
    assert seen and all(st == torch.empty(shape).stride() for _, shape, st in seen)


def test_block_backward_stacks_the_qkv_gradient_in_the_projection_layout():
    """The q, k and v gradients of a block are stacked once, straight into the (windows, N, 3, heads, hd)
    layout of the qkv projection: no (3, windows, heads, N, hd) stack followed by a permuted copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stacks = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.stack, torch.ops.aten.cat) and out.dim() == 5:
                stacks.append(tuple(out.shape))
            return out

    swin = build_swin("swin_deo_tiny", 64)
    block = swin.layers[0].blocks[1]  # shifted, window 8 on a 16 x 16 grid: 4 windows per image
    x = torch.randn(2, 16, 16, block.norm1.normalized_shape[0], requires_grad=True)
    y = block(x)
    with Spy():
        y.square().mean().backward()
    heads = block.attn.num_heads
    assert stacks == [(8, 64, 3, heads, x.shape[-1] // heads)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_window_attention_matches_the_math_path_with_bias_gradients_on_cuda():
    """On CUDA, every block's attention takes a fused SDPA kernel (not the math path), and its outputs and
    its gradients (inputs and the relative-position bias table) match the math path in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    swin = build_swin("swin_tiny_patch4_window7_224", 224).cuda()
    stage = swin.layers[0]  # 56 x 56 grid, windows 7: one plain and one shifted block
    x = torch.randn(4, 56, 56, stage.dim, device="cuda")
    runs = {}
    for name, backends in (("fused", [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]),
                           ("math", [SDPBackend.MATH])):
        swin.zero_grad()
        xi = x.clone().requires_grad_(True)
        with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16):
            out = stage(xi)  # raises "No available kernel" if a block's bias is refused by both
        out.float().square().mean().backward()
        table = stage.blocks[1].attn.relative_position_bias_table.grad
        runs[name] = (out.float(), xi.grad, table.clone())
    for got, want in zip(runs["fused"], runs["math"], strict=True):
        assert float((got - want).abs().max() / want.abs().max()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_efficient_attention_takes_the_window_bias_without_padding_it_on_cuda():
    """With a gradient, the Swin blocks' bias reaches SDPA's memory-efficient kernel with 8-aligned rows,
    so SDPA pads no copy of it (``constant_pad_nd``), forward or backward; ``repeat`` would be padded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    from deo.models import swin_window

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    stage = build_swin("swin_tiny_patch4_window7_224", 224).cuda().layers[0]  # N = 49: unaligned rows
    x = torch.randn(2, 56, 56, stage.dim, device="cuda", requires_grad=True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        with Ops() as ops:
            stage(x).float().square().mean().backward()
        assert "_scaled_dot_product_efficient_attention" in ops.names and "constant_pad_nd" not in ops.names
        # the control: the repeated bias of before is padded by SDPA
        q = torch.randn(8, 3, 49, 32, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(1, 3, 49, 49, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with Ops() as ops:
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias.repeat(8, 1, 1, 1))
        assert "constant_pad_nd" in ops.names
        with Ops() as ops:
            swin_window.window_attention(q, q, q, bias[0], None)
        assert "constant_pad_nd" not in ops.names
