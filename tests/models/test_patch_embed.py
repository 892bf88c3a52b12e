"""The student's patch embeddings: one matrix product over the patches, equal to timm's strided convolution."""

import pytest
import torch
from timm.layers import PatchEmbed

from deo.models.patch_embed import LinearPatchEmbed, make_patch_embed


@pytest.fixture
def conv_embed(monkeypatch):
    """Switch every LinearPatchEmbed back to timm's convolution for the duration of a call."""

    def run(embed, x):
        monkeypatch.setattr(LinearPatchEmbed, "as_matmul", False)
        try:
            return embed(x)
        finally:
            monkeypatch.setattr(LinearPatchEmbed, "as_matmul", True)

    return run


@pytest.mark.parametrize(("chans", "px"), [(10, 224), (10, 96), (3, 64), (2, 32)])
def test_matmul_equals_the_convolution_forward_and_backward(conv_embed, chans, px):
    torch.manual_seed(0)
    embed = make_patch_embed(chans, 32, 4, 64).double()
    assert isinstance(embed, LinearPatchEmbed) and isinstance(embed, PatchEmbed)
    x = torch.randn(2, chans, px, px, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = embed(x), conv_embed(embed, x_ref)
    assert out.shape == (2, px // 4, px // 4, 32) and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    params = [embed.proj.weight, embed.proj.bias, embed.norm.weight]
    mine = torch.autograd.grad(out, [x, *params], grad)
    theirs = torch.autograd.grad(ref, [x_ref, *params], grad)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_same_parameters_and_state_dict_as_timm():
    embed = make_patch_embed(10, 32, 4, 64)
    timm_embed = PatchEmbed(img_size=64, patch_size=4, in_chans=10, embed_dim=32, norm_layer=torch.nn.LayerNorm,
                            strict_img_size=False, output_fmt="NHWC")
    assert {k: v.shape for k, v in embed.state_dict().items()} == {
        k: v.shape for k, v in timm_embed.state_dict().items()}
    embed.load_state_dict(timm_embed.state_dict())
    x = torch.randn(1, 10, 32, 32)
    torch.testing.assert_close(embed(x), timm_embed(x))


def test_input_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(ValueError, match=r"multiple of 4 x 4 pixels, got 30 x 32"):
        make_patch_embed(10, 32, 4, 64)(torch.randn(1, 10, 30, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matmul_matches_cudnns_convolution_under_bf16_autocast_on_cuda(conv_embed):
    torch.manual_seed(0)
    embed = make_patch_embed(10, 96, 4, 224).cuda()
    x = torch.randn(8, 10, 224, 224, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = embed(x), conv_embed(embed, x_ref)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, [x, embed.proj.weight], grad)
    theirs = torch.autograd.grad(ref, [x_ref, embed.proj.weight], grad)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
