"""Continual pretraining (X-STARS): start the student from an existing backbone, keep a frozen copy as F.

``model.init_from`` names either an exported deo backbone (``backbone.safetensors`` written by
:func:`deo.export.export_backbone`, recognised by its header) or a timm Swin checkpoint (safetensors or
``.pth``, timm key layout ``patch_embed.* / layers.* / norm.*``; a classifier ``head.*`` is ignored).

- deo export: every ``swin.*`` weight and the patch embeddings of the modalities it was trained with are
  loaded. A modality the run adds (e.g. ``sar`` over an MS+optical export) keeps its fresh init; a
  modality the export has but the run does not build is an error (set ``model.sar=true``).
- timm checkpoint: the stages and the RGB patch embedding (-> ``embeds.optical``) are loaded; the MS
  embedding is re-derived from the loaded RGB one when ``model.ms_embed_init=spectral``.

The domain teacher F is a frozen deep copy of the student right after loading (eval mode, no gradients):
MSAD takes v^B = psi_B(F(sensor-B image)) (DESIGN Method), while the student and, through it, the EMA
teacher start from F's weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from deo.io import storage
from deo.models.patch_embed import init_ms_from_rgb
from deo.models.student import DEOStudent
from deo.models.weights import load_checked, read_state_dict

log = logging.getLogger(__name__)


def _is_deo_export(uri: str) -> bool:
    """True when ``uri`` is a safetensors file whose header says ``format=deo-backbone``."""
    if not uri.endswith(".safetensors"):
        return False
    from deo.export import FORMAT, read_header

    return read_header(storage.read_bytes(uri), uri).get("format") == FORMAT


def _load_deo_export(student: DEOStudent, uri: str) -> tuple[str, ...]:
    """Load an exported deo backbone into ``student`` (new modalities keep their init); its modalities."""
    from deo.export import read_export

    state, meta = read_export(uri)
    arch = (meta.get("config") or {}).get("model", {}).get("student") or meta["architecture"].get("student")
    if arch != student.arch:
        raise ValueError(
            f"model.init_from={uri!r} holds a {arch!r} backbone but model.student={student.arch!r}; "
            "set model.student to the exported architecture"
        )
    have = {k.split(".")[1] for k in state if k.startswith("embeds.")}
    extra = sorted(have - set(student.modalities))
    if extra:
        raise ValueError(
            f"model.init_from={uri!r} has patch embeddings {extra} that this student lacks "
            f"(it builds {list(student.modalities)}); set model.sar=true to keep a sar embedding"
        )
    own = student.state_dict()
    # modalities the run adds keep their fresh init: fill their keys from the student itself
    full = {k: v for k, v in own.items() if k.startswith("embeds.") and k.split(".")[1] not in have}
    full.update(state)
    load_checked(student, full, uri)
    return tuple(m for m in student.modalities if m in have)


def _load_timm_swin(student: DEOStudent, uri: str, ms_embed_init: str) -> tuple[str, ...]:
    """Load a timm Swin state dict: stages into ``student.swin``, ``patch_embed`` into the RGB embed.

    Returns the modalities whose embedding carries loaded (or derived) weights.
    """
    state = {k: v for k, v in read_state_dict(uri).items() if not k.startswith("head.")}
    # the timm layout of this student: its RGB embed in place of the Identity ``patch_embed``
    timm_view = nn.ModuleDict({"patch_embed": student.embeds["optical"]})
    for name, child in student.swin.named_children():
        if name not in ("patch_embed", "head"):
            timm_view[name] = child
    load_checked(timm_view, state, uri)
    if ms_embed_init == "spectral":
        init_ms_from_rgb(student.embeds["ms"], student.embeds["optical"])
        return ("ms", "optical")
    return ("optical",)


@torch.no_grad()
def init_from_backbone(
    student: DEOStudent, uri: str, ms_embed_init: str = "spectral"
) -> tuple[DEOStudent, tuple[str, ...]]:
    """Load ``uri`` into ``student`` in place and return the frozen domain teacher F (a copy).

    Args:
        student: the freshly built (unwrapped) student, on its device.
        uri: exported deo backbone or timm Swin checkpoint (path or URI; never downloads).
        ms_embed_init: ``model.ms_embed_init`` (re-derives the MS embed after a timm load when spectral).

    Returns:
        (F, loaded): F a deep copy of the loaded student, eval mode, ``requires_grad`` off; ``loaded`` the
        modalities whose patch embedding came from ``uri`` (the others keep their fresh init).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: the checkpoint's architecture, keys or shapes do not match the student.
    """
    if not storage.exists(uri):
        raise FileNotFoundError(f"model.init_from={uri!r} not found (nothing is downloaded)")
    if _is_deo_export(uri):
        loaded = _load_deo_export(student, uri)
        kind = "deo export"
    else:
        try:
            loaded = _load_timm_swin(student, uri, ms_embed_init)
        except ValueError as e:
            raise ValueError(
                f"model.init_from={uri!r} is neither a deo backbone export nor a timm Swin checkpoint "
                f"of model.student={student.arch!r}: {e}"
            ) from e
        kind = "timm Swin"
    log.info("student initialised from %s (%s); frozen copy kept as domain teacher", uri, kind)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval(), loaded


def check_partner(loaded: tuple[str, ...], modality: str, uri: str) -> None:
    """Raise unless ``uri`` gave the domain teacher a trained embedding of MSAD's sensor B (``modality``)."""
    if modality not in loaded:
        raise ValueError(
            f"model.init_from={uri!r} has no trained {modality!r} patch embedding (it gives "
            f"{list(loaded)}): MSAD's domain teacher F must embed sensor-B ({modality}) images"
        )


def domain_teacher_tokens(teacher: nn.Module, x: Any, modality: str) -> torch.Tensor:
    """F's final tokens of sensor-B views without gradients: (V, B, bands, S, S) -> (V*B, h, w, C)."""
    with torch.no_grad():
        return teacher.forward_features(x.flatten(0, 1), modality)
