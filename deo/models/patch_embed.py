"""Per-modality patch embeddings of the student (MS 10 bands, optical RGB, optional SAR VV/VH).

All embeddings map to the same width and grid, so the Swin stages after them are shared.

Initialisation (``model.ms_embed_init``):
- optical: the given RGB weights (``model.rgb_weights``, a timm Swin checkpoint) or timm's random init.
- ms ``spectral``, when the RGB kernels are pretrained (``model.rgb_weights``, or a timm Swin as
  ``model.init_from``): they are copied to the matching S2 bands (R -> B04, G -> B03, B -> B02) and
  the mean RGB kernel to the seven other bands; all ten are then scaled by 3/10 so that a spatially flat
  input of equal normalised value in every channel gives the same response as the RGB embedding.
  Without pretrained RGB kernels there is nothing to transfer and the MS embedding stays random.
- ms ``random``: timm's default init. SAR is always random (no optical analogue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Format, PatchEmbed

from deo.bands import DEO_BANDS, RGB_BANDS, SAR_BANDS

MS_EMBED_INITS = ("spectral", "random")
MODALITY_BANDS: dict[str, tuple[str, ...]] = {
    "ms": DEO_BANDS,
    "optical": RGB_BANDS,
    "sar": SAR_BANDS,
}
"""Input bands of each modality, in channel order."""

_RGB_TO_S2 = {"R": "B04", "G": "B03", "B": "B02"}


class LinearPatchEmbed(PatchEmbed):
    """timm's PatchEmbed computed as one matrix product over the patches instead of a strided convolution.

    A p x p convolution with stride p is a linear map of each patch's ``in_chans * p * p`` values. cuDNN
    runs it in NHWC, so for the NCHW views it converted every input (and gradient) first: in the H100
    profile of the reference step the 6 patch-embedding convolutions took 3.8 ms, the layout conversions
    3.0 ms and the backward 2.1 ms, against a few hundred microseconds of memory traffic. Here one copy
    gathers the patches, already in the NHWC order the Swin stages take and already in autocast's dtype,
    and the convolution's own weight, flattened, multiplies them: same parameters and state dict, the
    same result up to summation order. Only the NHWC, unpadded, size-flexible configuration that
    :func:`make_patch_embed` builds takes this path; any other runs timm's code. ``as_matmul = False``
    (class attribute) restores timm's convolution everywhere, for benchmarks.
    """

    as_matmul = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W), H and W multiples of the patch -> (B, H/p, W/p, embed_dim)."""
        if (not self.as_matmul or self.flatten or self.output_fmt != Format.NHWC or self.dynamic_img_pad
                or self.strict_img_size):
            return super().forward(x)
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"patch embedding input must be a multiple of {ph} x {pw} pixels, got {h} x {w}")
        # one copy that gathers and casts: the float32 views are read once and written in bf16 under autocast
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        patches = (
            x.view(b, c, h // ph, ph, w // pw, pw)
            .permute(0, 2, 4, 1, 3, 5)
            .to(dtype, memory_format=torch.contiguous_format)  # a no-op when the dtype is unchanged,
            .reshape(b, h // ph, w // pw, c * ph * pw)  # and then this is the copy
        )
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))


def make_patch_embed(in_chans: int, embed_dim: int, patch_size: int, img_size: int) -> PatchEmbed:
    """A :class:`LinearPatchEmbed` (B, in_chans, H, W) -> (B, H/p, W/p, embed_dim) accepting any input size."""
    return LinearPatchEmbed(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        norm_layer=torch.nn.LayerNorm,
        strict_img_size=False,
        output_fmt="NHWC",
    )


@torch.no_grad()
def init_ms_from_rgb(ms: PatchEmbed, rgb: PatchEmbed) -> None:
    """The ``spectral`` init: copy RGB kernels to B04/B03/B02, the mean RGB kernel elsewhere, scale by 3/10.

    Args:
        ms: 10-channel embedding (channels in :data:`deo.bands.DEO_BANDS` order), modified in place.
        rgb: 3-channel embedding (R, G, B).
    """
    w = rgb.proj.weight  # (C, 3, p, p)
    if ms.proj.weight.shape[1] != len(DEO_BANDS) or w.shape[1] != 3:
        raise ValueError(
            f"expected a 10-channel MS and 3-channel RGB embed, got {ms.proj.weight.shape[1]} and {w.shape[1]}"
        )
    new = w.mean(dim=1, keepdim=True).expand(-1, len(DEO_BANDS), -1, -1).clone()
    for c, name in enumerate(RGB_BANDS):
        new[:, DEO_BANDS.index(_RGB_TO_S2[name])] = w[:, c]
    ms.proj.weight.copy_(new * (3 / len(DEO_BANDS)))
    ms.proj.bias.copy_(rgb.proj.bias)
    if ms.norm is not None and rgb.norm is not None:
        ms.norm.load_state_dict(rgb.norm.state_dict())
