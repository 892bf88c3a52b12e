"""The frozen DINOv3 optical teacher: a timm ``vit_*_patch16_dinov3*`` model, weights from a path or URI.

Nothing is downloaded: the model is always built with ``pretrained=False`` and weights come only from
``teacher.weights`` (safetensors or timm state dict, or Meta's ``.pth`` with its keys remapped by timm's
``checkpoint_filter_fn``). With no weights the teacher stays random and a loud warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import timm
import torch
from timm.models.eva import Eva, checkpoint_filter_fn
from torch import nn

from deo.models.layer_norm import keep_input_dtype_in_layer_norms
from deo.models.weights import load_checked, read_state_dict

log = logging.getLogger(__name__)

TINY_NAME = "vit_deo_tiny_dinov3"
# DINOv3 architecture (RoPE, 4 registers, layer scale) at a CPU-friendly size.
TINY_ARGS: dict[str, Any] = dict(embed_dim=64, depth=4, num_heads=2)
TEACHER_DTYPES = ("auto", "fp32", "bf16")


def default_layers(depth: int) -> list[int]:
    """The [mid, final] blocks the public DEO code distils for a ViT of ``depth`` blocks.

    ViT-S/B (12 blocks): [8, 11]; ViT-L (24): [15, 23]; other depths: two thirds of the way, and the last.
    """
    mid = {12: 8, 24: 15}.get(depth, 2 * depth // 3)
    return [mid, depth - 1]


class DINOv3Teacher(nn.Module):
    """Frozen ViT: (B, 3, H, W) -> [cls] of the last block and patch tokens of chosen blocks.

    Always in eval mode, without gradients, registers dropped. ``train()`` is a no-op so the owner's
    ``train()`` cannot switch it back (dropout, drop path).
    """

    def __init__(self, vit: Eva, layers: list[int], dtype: torch.dtype | None = None) -> None:
        """Freeze ``vit`` and record the blocks to output.

        Args:
            vit: a timm DINOv3 Eva model.
            layers: 0-based [mid, final] block indices, final the last block (e.g. [8, 11] for ViT-B);
                empty: :func:`default_layers` of the model's depth.
            dtype: compute dtype (None: the input's / autocast's).
        """
        super().__init__()
        depth = len(vit.blocks)
        layers = list(layers) or default_layers(depth)
        if len(layers) != 2 or not 0 <= layers[0] < layers[1] or layers[1] != depth - 1:
            raise ValueError(
                f"teacher.layers must be [mid, final] 0-based blocks with final the teacher's last block "
                f"({depth - 1} of its {depth}) and mid below it, e.g. {default_layers(depth)} "
                f"(empty picks that); got {layers}"
            )
        self.vit = vit
        self.layers = list(layers)
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.compute_dtype = dtype
        self.vit.requires_grad_(False)
        super().train(False)
        if vit.rope is not None:
            _cache_rope_embeddings(vit.rope)

    def train(self, mode: bool = True) -> DINOv3Teacher:
        """Stay in eval mode whatever ``mode`` is."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher outputs.

        Args:
            x: (B, 3, H, W) normalised RGB, H and W multiples of 16.

        Returns:
            cls: (B, D) normalised [cls] token of block ``layers[-1]``.
            patches: one (B, H/16 * W/16, D) normalised patch-token tensor per entry of ``layers``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"teacher input must be (B, 3, H, W), got {tuple(x.shape)}")
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.compute_dtype is torch.bfloat16 and x.device.type == "cuda":
            ctx = torch.autocast("cuda", dtype=torch.bfloat16)
        elif self.compute_dtype is torch.float32:
            ctx = torch.autocast(x.device.type, enabled=False)
        with ctx:
            out = self.vit.forward_intermediates(
                x,
                indices=self.layers,
                return_prefix_tokens=True,
                norm=True,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
        patches = [p for p, _ in out]
        cls = out[-1][1][:, 0]  # prefix tokens are [cls, registers...]; registers dropped
        return cls, patches


def _cache_rope_embeddings(rope: nn.Module) -> None:
    """Keep the frozen teacher's RoPE table of each patch grid on its device, computed once.

    timm rebuilds it at every forward from a coordinate grid made on the host and copied to the
    device: a blocking copy (one host sync per step), which also fails a CUDA-graph capture
    (``train.cuda_graph``). The table depends only on the grid size (its coordinate augmentation runs
    only in training mode, and the teacher stays in eval).
    """
    original = rope.get_embed
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def get_embed(shape: list[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if shape is None or rope.training:
            return original(shape=shape, dtype=dtype)
        key = (tuple(shape), dtype, rope.periods.device, rope.periods.dtype)
        if key not in cache:
            cache[key] = original(shape=shape, dtype=dtype)
        return cache[key]

    rope.get_embed = get_embed


def build_dinov3_vit(name: str) -> Eva:
    """A randomly initialised timm DINOv3 ViT (``pretrained=False``; nothing is downloaded)."""
    if name == TINY_NAME:
        vit = timm.create_model(
            "vit_small_patch16_dinov3", pretrained=False, num_classes=0, **TINY_ARGS
        )
    else:
        known = timm.list_models("*dinov3*")
        if name not in known:
            raise ValueError(f"teacher.name must be {TINY_NAME!r} or one of {known}, got {name!r}")
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    if not isinstance(vit, Eva):
        raise ValueError(f"{name!r} is not a timm DINOv3 (Eva) model")
    return keep_input_dtype_in_layer_norms(vit)  # bf16 stays bf16 under autocast


def teacher_depth(name: str) -> int:
    """Number of blocks of the DINOv3 ViT ``name`` (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        return len(build_dinov3_vit(name).blocks)


def load_dinov3_weights(vit: Eva, uri: str) -> None:
    """Load ``uri`` (safetensors / timm state dict / Meta ``.pth``) into ``vit``; ValueError on mismatch."""
    state = read_state_dict(uri)
    if "storage_tokens" in state:  # Meta's DINOv3 naming
        state = checkpoint_filter_fn(state, vit)
    state = {k: v for k, v in state.items() if not k.startswith("head.") and "rope" not in k}
    load_checked(vit, state, uri)


def build_teacher(teacher_cfg: Any, device: torch.device | str = "cpu") -> DINOv3Teacher:
    """Build the frozen teacher from a ``TeacherConfig`` (``name``, ``weights``, ``layers``, ``dtype``).

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: bad name, layers, dtype, or weights that do not match the architecture.
    """
    if teacher_cfg.dtype not in TEACHER_DTYPES:
        raise ValueError(
            f"teacher.dtype must be one of {TEACHER_DTYPES}, got {teacher_cfg.dtype!r}"
        )
    vit = build_dinov3_vit(teacher_cfg.name)
    if teacher_cfg.weights:
        load_dinov3_weights(vit, teacher_cfg.weights)
        log.info("DINOv3 teacher %s loaded from %s", teacher_cfg.name, teacher_cfg.weights)
    else:
        msg = (
            f"teacher.weights is empty: the DINOv3 teacher {teacher_cfg.name!r} is RANDOMLY INITIALISED. "
            "Optical distillation then teaches nothing useful; set teacher.weights to a checkpoint."
        )
        warnings.warn(msg, stacklevel=2)
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(teacher_cfg.dtype)
    if teacher_cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    if dtype is torch.bfloat16 and device.type == "cuda":
        vit = vit.to(dtype=torch.bfloat16)  # weights too: half the memory and bandwidth
    return DINOv3Teacher(vit.to(device), list(teacher_cfg.layers), dtype)
