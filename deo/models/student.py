"""The DEO student: a timm Swin Transformer with one patch embedding per modality and shared stages.

Names (``model.student``): ``swin_deo_tiny`` (about 2.6M backbone parameters; tests and the CPU default)
or any timm ``swin_*_patch4_window*`` name (``swin_tiny_patch4_window7_224`` reference,
``swin_base_patch4_window7_224`` paper, about 87M). Every block uses an adaptive window
(:mod:`deo.models.swin_window`), so global and local crops of any size tile without padding, and every
LayerNorm keeps bf16 activations in bf16 under autocast (:mod:`deo.models.layer_norm`).
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import SwinTransformer
from timm.models._features import feature_take_indices
from torch import nn

from deo.models.layer_norm import keep_input_dtype_in_layer_norms
from deo.models.patch_embed import (
    MODALITY_BANDS,
    MS_EMBED_INITS,
    init_ms_from_rgb,
    make_patch_embed,
)
from deo.models.swin_window import make_windows_adaptive
from deo.models.weights import load_checked, read_state_dict

log = logging.getLogger(__name__)

TINY_NAME = "swin_deo_tiny"
# Small width/depth over swin_tiny's architecture; window 8 tiles the 16/8/4/2 grids of 64 px crops and
# the 8/4/2/1 grids of 32 px crops exactly.
TINY_ARGS: dict[str, Any] = dict(
    embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), window_size=8, img_size=64
)


class DEOStudent(nn.Module):
    """Swin backbone with per-modality patch embeddings.

    Attributes:
        embeds: ``ms`` (10 -> C), ``optical`` (3 -> C), optionally ``sar`` (2 -> C) patch embeddings.
        swin: the timm Swin (its own ``patch_embed`` is an Identity; its classifier removed).
        num_features: width of the final stage.
        stage_dims: width of each stage.
        arch: the name this student was built from.
    """

    def __init__(self, swin: SwinTransformer, embeds: nn.ModuleDict, arch: str) -> None:
        """Wrap ``swin`` (its ``patch_embed`` already replaced by an Identity) with ``embeds``."""
        super().__init__()
        self.embeds = embeds
        self.swin = swin
        self.arch = arch
        self.num_features: int = swin.num_features
        self.stage_dims: list[int] = [int(f["num_chs"]) for f in swin.feature_info]
        self.patch_size: int = int(swin.feature_info[0]["reduction"])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Accepted ``modality`` values."""
        return tuple(self.embeds.keys())

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Patch-embed ``x`` (B, bands, H, W) of ``modality`` -> (B, H/4, W/4, C)."""
        if modality not in self.embeds:
            raise ValueError(f"modality must be one of {self.modalities}, got {modality!r}")
        want = len(MODALITY_BANDS[modality])
        if x.ndim != 4 or x.shape[1] != want:
            raise ValueError(f"{modality} input must be (B, {want}, H, W), got {tuple(x.shape)}")
        return self.embeds[modality](x)

    def forward_features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Final-stage normalised tokens: (B, bands, H, W) -> (B, H/32, W/32, num_features) (timm NHWC)."""
        return self.swin.forward_features(self.embed(x, modality))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        modality: str,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` over stages (indices as in ``feature_take_indices``).

        Returns:
            (final NHWC normalised tokens, [stage outputs (B, C_i, H_i, W_i)]) or only the list.
        """
        return self.swin.forward_intermediates(
            self.embed(x, modality),
            indices=indices,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    def stages(
        self, x: torch.Tensor, modality: str, indices: list[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Final normalised tokens (B, h, w, C) and the raw NHWC outputs of stages ``indices``."""
        return self.stages_of_tokens(self.embed(x, modality), indices)

    def stages_of_tokens(
        self, h: torch.Tensor, indices: list[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`stages` from patch-embedded tokens (B, H/4, W/4, C), of any modality or a mix of them."""
        take, _ = feature_take_indices(len(self.swin.layers), indices)
        taken: dict[int, torch.Tensor] = {}
        for i, stage in enumerate(self.swin.layers):
            h = stage(h)
            if i in take:
                taken[i] = h
        return self.swin.norm(h), taken

    def pooled(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Mean of the final tokens: (B, bands, H, W) -> (B, num_features)."""
        return self.forward_features(x, modality).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor, modality: str = "ms") -> torch.Tensor:
        """Same as :meth:`pooled`."""
        return self.pooled(x, modality)


def build_swin(name: str, img_size: int, drop_path: float = 0.0) -> SwinTransformer:
    """A randomly initialised timm Swin (no download) accepting any input size, without classifier."""
    if name == TINY_NAME:
        args = dict(TINY_ARGS)
        timm_name = "swin_tiny_patch4_window7_224"
    elif name.startswith("swin_") and name in timm.list_models("swin_*"):
        args = {"img_size": img_size}
        timm_name = name
    else:
        raise ValueError(f"model.student must be {TINY_NAME!r} or a timm swin_* name, got {name!r}")
    model = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        strict_img_size=False,
        drop_path_rate=drop_path,
        **args,
    )
    if not isinstance(model, SwinTransformer):
        raise ValueError(
            f"{name!r} is not a timm SwinTransformer (got {type(model).__name__}); use swin_*_patch4_*"
        )
    return keep_input_dtype_in_layer_norms(make_windows_adaptive(model))


def build_student(model_cfg: Any, img_size: int = 224) -> DEOStudent:
    """Build the student from a ``ModelConfig`` (``student``, ``rgb_weights``, ``ms_embed_init``, ``drop_path``, ``sar``).

    Args:
        model_cfg: ``deo.train.config.ModelConfig``.
        img_size: the global crop size, used only to size each block's built window (timm clamps the window
            to the built grid); later inputs may have any size.
    """
    if model_cfg.ms_embed_init not in MS_EMBED_INITS:
        raise ValueError(
            f"model.ms_embed_init must be one of {MS_EMBED_INITS}, got {model_cfg.ms_embed_init!r}"
        )
    swin = build_swin(model_cfg.student, img_size, model_cfg.drop_path)
    old: PatchEmbed = swin.patch_embed
    dim, patch = old.proj.out_channels, old.proj.kernel_size[0]
    size = int(old.img_size[0]) if old.img_size is not None else img_size
    if model_cfg.rgb_weights:
        state = read_state_dict(model_cfg.rgb_weights)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        load_checked(swin, state, model_cfg.rgb_weights)
        log.info("student stages and RGB embed loaded from %s", model_cfg.rgb_weights)
    optical = make_patch_embed(3, dim, patch, size)
    optical.load_state_dict(old.state_dict())
    embeds = nn.ModuleDict(
        {"ms": make_patch_embed(len(MODALITY_BANDS["ms"]), dim, patch, size), "optical": optical}
    )
    # spectral transfers pretrained RGB kernels; from a random RGB kernel it would only give 7 of the 10
    # bands one shared kernel, so without rgb_weights the MS embedding keeps its own random init
    if model_cfg.ms_embed_init == "spectral" and model_cfg.rgb_weights:
        init_ms_from_rgb(embeds["ms"], optical)
    if model_cfg.sar:
        embeds["sar"] = make_patch_embed(len(MODALITY_BANDS["sar"]), dim, patch, size)
    swin.patch_embed = nn.Identity()
    return DEOStudent(swin, keep_input_dtype_in_layer_norms(embeds), model_cfg.student)
