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


@pytest.mark.parametrize(("chans", "hw", "channels_last"),
                         [(10, (224, 224), False), (10, (96, 96), False), (3, (32, 48), False), (2, (48, 32), True)])
def test_matmul_equals_the_convolution_forward_and_backward(conv_embed, chans, hw, channels_last):
    torch.manual_seed(0)
    embed = make_patch_embed(chans, 32, 4, 64).double()
    assert isinstance(embed, LinearPatchEmbed) and isinstance(embed, PatchEmbed)
    x = torch.randn(2, chans, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = embed(x), conv_embed(embed, x_ref)
    assert out.shape == (2, hw[0] // 4, hw[1] // 4, 32) and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    params = [embed.proj.weight, embed.proj.bias, embed.norm.weight, embed.norm.bias]
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
    with pytest.raises(ValueError, match=r"multiple of 4 x 4 pixels, got 32 x 30"):
        make_patch_embed(10, 32, 4, 64)(torch.randn(1, 10, 32, 30))


def test_rectangular_patches_and_timms_other_configurations(conv_embed):
    torch.manual_seed(0)
    rect = LinearPatchEmbed(img_size=32, patch_size=(2, 4), in_chans=3, embed_dim=8, strict_img_size=False,
                            output_fmt="NHWC").double()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    assert rect(x).shape == (2, 8, 6, 8)
    torch.testing.assert_close(rect(x), conv_embed(rect, x))
    # the configurations make_patch_embed never builds (NLC tokens, a fixed size) run timm's own code
    default = LinearPatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=8)
    assert default(torch.randn(1, 3, 32, 32)).shape == (1, 64, 8)


def test_tokens_come_out_in_the_autocast_dtype():
    embed = make_patch_embed(10, 32, 4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = embed(torch.randn(2, 10, 32, 32))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 8, 32)


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
