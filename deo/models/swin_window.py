"""Swin blocks whose attention window adapts to each input's token grid, so no crop size pays for padding.

timm's Swin fixes each block's window when the model is built (``img_size``) and, for other input sizes
(``strict_img_size=False``), zero-pads the token grid up to a multiple of the window: a 96 px local crop of
Swin-T has a 24 x 24 stage-1 grid padded to 28 x 28 (36% wasted tokens, and the padded zeros take part in
attention). :class:`AdaptiveWindowBlock` instead uses, per forward, the largest window <= the built one
that divides the grid (the whole grid when it is smaller than the window, as timm does at build time), with
the shift halved accordingly. The relative-position bias of a smaller window is the sub-table of the built
one (the same relative offsets), so parameters and timm checkpoints are unchanged.

Swin-T with window 7: global 224 px -> stage grids 56/28/14/7, windows 7/7/7/7 (as built); local 96 px ->
grids 24/12/6/3, windows 6/6/6/3 (no padding). Tiny (window 8): 64 px -> 16/8/4/2, windows 8/8/4/2;
32 px -> 8/4/2/1, windows 8/4/2/1. A grid with no divisor >= half the window (a prime, say) falls back to
timm's padding with the built window.

Every block's stochastic depth is a :class:`StochasticDepth` whose rate is a buffer, not a Python float:
regional compilation (``train.compile``) then compiles one graph per (stage, shift, input shape) that all
blocks of that kind share, instead of one per block (timm's per-block rates are compile-time constants).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import nn


def effective_window(grid: int, window: int) -> int:
    """The window used for a ``grid``-token side with a block built for ``window``.

    Returns ``grid`` when it fits in one window, else the largest divisor of ``grid`` in
    ``[ceil(window / 2), window]``, else ``window`` (then the grid is padded as in timm).
    """
    if grid <= window:
        return grid
    for w in range(window, (window + 1) // 2 - 1, -1):
        if grid % w == 0:
            return w
    return window


def _shift_mask(
    hp: int, wp: int, win: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Attention mask (nW, win_area, win_area) of shifted windows: -100 between tokens of different regions."""
    img = torch.zeros((1, hp, wp, 1), device=device)
    cnt = 0
    for h in ((0, -win[0]), (-win[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -win[1]), (-win[1], -shift[1]), (-shift[1], None)):
            img[:, h[0] : h[1], w[0] : w[1], :] = cnt
            cnt += 1
    mw = window_partition(img, win).view(-1, win[0] * win[1])
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _rel_index(win: tuple[int, int], built: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Indices (win_area, win_area) into the bias table of a ``built`` window for a smaller ``win``."""
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(win[0], device=device), torch.arange(win[1], device=device), indexing="ij"
        )
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + built[0] - 1) * (2 * built[1] - 1) + (rel[1] + built[1] - 1)


SDPA_BIAS_ALIGNMENT = 8
"""Elements: SDPA's memory-efficient CUDA kernel wants every stride of its bias but the last to be a
multiple of this, and copies a bias that is not into a padded one (``preprocess_mask`` in PyTorch's
attention.cpp; Inductor's ``sdpa_constraint`` pads to the same)."""


class _WindowBias(torch.autograd.Function):
    """The bias of every window, repeated over the images, written once into rows padded to
    :data:`SDPA_BIAS_ALIGNMENT` and returned as the unpadded view.

    ``bias.repeat`` gave SDPA an unaligned (N = 49 or 36) bias, which its memory-efficient kernel (the
    one that computes a bias gradient) padded in a second copy (a fill and a copy), and autograd undid
    that padding with a zero-filled gradient and a third copy; here one copy goes forward and the
    gradient is summed over the images straight from SDPA's.
    """

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, images: int) -> torch.Tensor:
        """(nW, heads, N, N) -> (images * nW, heads, N, N) with 8-aligned row strides."""
        nw, heads, n, _ = bias.shape
        ctx.windows = nw
        row = -(-n // SDPA_BIAS_ALIGNMENT) * SDPA_BIAS_ALIGNMENT
        out = bias.new_empty(images, nw, heads, n, row)[..., :n]
        out.copy_(bias.unsqueeze(0).expand(images, -1, -1, -1, -1))
        return out.flatten(0, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(images * nW, heads, N, N) -> (nW, heads, N, N): the sum over the images."""
        return grad.unflatten(0, (-1, ctx.windows)).sum(0), None


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(windows, N, 3 * C) projection -> q, k, v, each (windows, heads, N, C / heads), as views.

    Split along the (windows, N, 3, heads, hd) layout the projection writes: autograd then stacks the
    three gradients straight into that layout (one copy). Unbinding timm's (3, windows, heads, N, hd)
    permute took a stack and then a permuted copy of the whole qkv gradient.
    """
    qkv = qkv.unflatten(-1, (3, heads, -1))
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k, v


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention inside each window, with relative-position bias and the shifted-window mask.

    Args:
        q, k, v: (images * nW, heads, N, hd), windows ordered (image, window).
        bias: (heads, N, N) relative-position bias.
        mask: (nW, N, N) additive mask of shifted windows, or None.
        dropout_p: attention dropout.

    Returns:
        (images * nW, heads, N, hd).
    """
    bias = bias.unsqueeze(0).to(q.dtype)  # (1, heads, N, N)
    if mask is not None:
        bias = bias + mask.unsqueeze(1).to(q.dtype)  # (nW, heads, N, N)
    # one bias per window (window w of every image gets mask[w]), materialised: SDPA's memory-efficient
    # and cuDNN kernels refuse a bias broadcast over the windows and fall back to the math path (3.6x
    # slower forward on an H100, torch 2.11, bench/RESULTS.md)
    images = q.shape[0] // bias.shape[0]
    if bias.requires_grad and not torch.compiler.is_compiling():
        bias = _WindowBias.apply(bias, images)  # (images * nW, heads, N, N), 8-aligned rows
    else:
        # compiled, Inductor aligns SDPA's bias itself (``sdpa_constraint``), and a custom autograd.Function
        # would keep AOTAutograd from caching the graph; without a gradient (the EMA teacher) SDPA took
        # the cuDNN kernel on the H100 (torch 2.11), which never padded: the contiguous bias it had
        bias = bias.repeat(images, 1, 1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def _window_order(
    h: int, w: int, win: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of the shifted windows of an (h, w) grid that ``win`` divides, and its inverse.

    ``tokens.index_select(1, order)`` on (B, h*w, C) equals timm's ``roll(-shift)`` followed by
    ``window_partition`` (windows in (image, row, column) order, tokens row-major in each window), in
    one copy instead of two; ``index_select(1, inverse)`` undoes both.
    """
    rows = (torch.arange(h, device=device) + shift[0]) % h  # token row at each shifted-grid row
    cols = (torch.arange(w, device=device) + shift[1]) % w
    rows, cols = rows.view(h // win[0], win[0]), cols.view(w // win[1], win[1])
    order = (rows[:, None, :, None] * w + cols[None, :, None, :]).flatten()  # (nWh, nWw, wh, ww)
    return order, torch.argsort(order)


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, order)`` whose backward is the inverse gather (no zero-fill and scatter-add)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Reorder the tokens of ``x`` (B, L, C) by the permutation ``order`` (L,) with inverse ``inverse``."""
    return _PermuteTokens.apply(x, order, inverse)


class AdaptiveWindowBlock(SwinTransformerBlock):
    """A timm :class:`SwinTransformerBlock` whose window follows the input grid (see module docstring).

    Masks, bias indices and token orders are cached per (grid, device): a training run sees two or three
    grid sizes. In eager mode, when the window divides the grid (always, except prime-like grids), the
    shift and the window partition are one gather (:func:`permute_tokens`), and so are the window
    reverse and the shift back (compiled, Inductor fuses timm's ops instead); the stochastic-depth
    residuals are one ``addcmul`` each. ``fused = False`` (class attribute)
    runs timm's roll / partition / reverse / roll and separate residual ops instead (same results; kept
    for side-by-side benchmarks).
    """

    _cache: dict[tuple, tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]
    fused: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): pre-norm attention and MLP residuals, as timm's block."""
        if not self.fused:
            return super().forward(x)
        b, h, w, c = x.shape
        x = self.drop_path1.residual(x, self._attn(self.norm1(x)))
        x = x.reshape(b, -1, c)
        x = self.drop_path2.residual(x, self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed attention of ``x`` (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        built = tuple(self.attn.window_size)
        win = (effective_window(h, built[0]), effective_window(w, built[1]))
        shifted = any(self.target_shift_size)
        shift = (
            win[0] // 2 if shifted and h > win[0] else 0,
            win[1] // 2 if shifted and w > win[1] else 0,
        )
        key = (h, w, win, shift, x.device)
        # under torch.compile the cache would be a guarded Python dict (torch 2.11: a graph break, then a
        # recompile once it fills); the mask and orders are built from static values inside the graph
        cache = {} if torch.compiler.is_compiling() else self.__dict__.setdefault("_cache", {})
        pad_h, pad_w = (win[0] - h % win[0]) % win[0], (win[1] - w % win[1]) % win[1]
        # compiled, roll and partition are index arithmetic Inductor fuses into its kernels, and a
        # custom autograd.Function would keep AOTAutograd from caching the graph: gather in eager only
        eager_gather = self.fused and not (pad_h or pad_w or torch.compiler.is_compiling())
        if key not in cache:
            hp, wp = h + pad_h, w + pad_w
            mask = _shift_mask(hp, wp, win, shift, x.device) if any(shift) else None
            order = _window_order(h, w, win, shift, x.device) if eager_gather else None
            cache[key] = (mask, _rel_index(win, built, x.device), order)
        mask, index, order = cache[key]
        n = win[0] * win[1]
        gather = order is not None and eager_gather
        # unshifted windows as wide as the grid: the windows are the rows of tokens in order (no copy)
        rows = gather and not any(shift) and win[1] == w

        if rows:
            xw = x.reshape(-1, n, c)  # (B*nW, N, C)
        elif gather:
            xw = permute_tokens(x.reshape(b, h * w, c), *order).view(-1, n, c)  # (B*nW, N, C)
        else:
            if any(shift):
                x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            xw = window_partition(x, win).view(-1, n, c)  # (B*nW, N, C)

        attn = self.attn
        q, k, v = split_qkv(attn.qkv(xw), attn.num_heads)  # (nW*B, heads, N, hd)
        bias = (
            attn.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        )  # (heads, N, N)
        out = window_attention(q, k, v, bias, mask, attn.attn_drop.p if self.training else 0.0)
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(xw.shape[0], n, -1)))

        if rows:
            return out.view(b, h, w, c)
        if gather:
            return permute_tokens(out.view(b, h * w, c), order[1], order[0]).view(b, h, w, c)
        x = window_reverse(out.view(-1, win[0], win[1], c), win, h + pad_h, w + pad_w)[:, :h, :w, :]
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x.contiguous()


class StochasticDepth(nn.Module):
    """timm's ``DropPath`` (per-sample residual drop, survivors scaled by 1/keep) with its rate in a buffer.

    Non-persistent: state dicts and checkpoints are those of timm's Swin. A rate of 0 is the identity
    (``active`` is a bool, so it splits compiled graphs only into "drops" and "never drops").
    """

    rate: torch.Tensor

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
        self.register_buffer("rate", torch.tensor(float(rate)), persistent=False)
        self.active = rate > 0.0

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) per-sample factor: 0 (dropped) or 1 / keep, in ``x``'s dtype."""
        keep = 1.0 - self.rate.float()  # float32: a bf16 draw would round small rates to steps of 1/256
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
        return (mask / keep).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, ...): in training, each sample's branch is zeroed with probability ``rate``."""
        if not (self.training and self.active):
            return x
        return x * self._scale(x)

    def residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + self(branch)`` in one elementwise pass (``addcmul``), with the same random draws."""
        if not (self.training and self.active):
            return x + branch
        return torch.addcmul(x, branch, self._scale(branch))


def _rate(module: nn.Module) -> float:
    if isinstance(module, DropPath):
        return float(module.drop_prob)
    if isinstance(module, nn.Identity):
        return 0.0
    raise ValueError(f"expected timm DropPath or Identity as drop path, got {type(module).__name__}")


def make_windows_adaptive(model: SwinTransformer) -> SwinTransformer:
    """Turn every block of a timm Swin into an :class:`AdaptiveWindowBlock` in place (same parameters),
    with :class:`StochasticDepth` at the rates timm gave each block."""
    for stage in model.layers:
        for block in stage.blocks:
            if not isinstance(block, SwinTransformerBlock):
                raise ValueError(f"expected timm SwinTransformerBlock, got {type(block).__name__}")
            block.__class__ = AdaptiveWindowBlock
            block.drop_path1 = StochasticDepth(_rate(block.drop_path1))
            block.drop_path2 = StochasticDepth(_rate(block.drop_path2))
    return model
