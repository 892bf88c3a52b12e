"""Load the student backbone of a run for evaluation: run folder, ``checkpoint_*`` folder or export.

Checkpoint layout read here (written by the training loop, see :mod:`deo.train.checkpoint`)::

    <run.storage>/<run.name>/
        manifest.json                 copy of the shard manifest (fallback for ``stats``)
        checkpoint_00000300/state.pt  torch.save dict, torch.load(weights_only=True) readable:
            student   state dict of DEOStudent (patch embeds + shared stages, no heads)   required
            config    resolved PretrainConfig as a plain dict (``model``, ``views`` ...)  required
            step      optimizer steps done (int)                                         required
            stats     {"ms": {"mean": [10], "std": [10]}, "optical": {...}} stored units  optional*
            bands     {"ms": [...], "optical": [...]}                                     optional
            gsd       {"ms": metres, "optical": metres} median of the training tiles      optional*
            gsd_range {"ms": [min, max], "optical": [min, max]}                           optional*
            optical_teacher  state dict of a randomly initialised teacher                optional

    * without ``stats`` in the state, ``manifest.json`` of the run folder must hold them; ``gsd`` and
      ``gsd_range`` also come from it when the state has none (checkpoints before they were recorded).

The latest checkpoint of a run folder is the ``checkpoint_<digits>`` folder with the highest number.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import torch

from deo.io import storage
from deo.io.shards import manifest_gsd
from deo.train.checkpoint import STATE_FILE, latest_checkpoint, load_state, newest_readable

DEFAULT_GSD: dict[str, float] = {"ms": 10.0}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the weights (names, dtypes, shapes and bytes in sorted name order).

    The same for a checkpoint's ``student`` and its exported safetensors, so reports name the exact
    weights whatever file they came from.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_checkpoint(uri: str) -> str:
    """The ``checkpoint_*`` folder meant by ``uri`` (itself, or the latest one of a run folder).

    Raises:
        FileNotFoundError: nothing there, or a run folder without checkpoints.
    """
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, STATE_FILE)):
        return uri
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint {uri} not found")
    latest = latest_checkpoint(uri)
    if latest is None:
        raise FileNotFoundError(
            f"{uri} holds no checkpoint: expected a run folder with checkpoint_<step>/{STATE_FILE}, "
            "a checkpoint_* folder, or a .safetensors export"
        )
    return latest


def _load_newest_readable(uri: str) -> tuple[str, dict[str, Any]]:
    """(checkpoint folder, its state) for ``uri``; a run folder's unreadable newest checkpoints (cut short
    by a lost worker) are skipped, with a warning, for the newest that loads.

    Raises:
        FileNotFoundError: as :func:`resolve_checkpoint`.
        UnreadableCheckpoint: the named checkpoint, or every checkpoint of the run, does not load.
    """
    ckpt = resolve_checkpoint(uri)
    if ckpt == uri.rstrip("/"):  # a checkpoint_* folder, named by the caller
        return ckpt, load_state(ckpt)
    found = newest_readable(uri.rstrip("/"), log=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    assert found is not None  # resolve_checkpoint found one
    return found


def _run_manifest(checkpoint_dir: str) -> dict[str, Any]:
    import json

    run = checkpoint_dir.rsplit("/", 1)[0] if "/" in checkpoint_dir else "."
    uri = storage.join(run, "manifest.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


def build_student_from_config(cfg: dict[str, Any]) -> torch.nn.Module:
    """A randomly initialised student of the architecture in a resolved pretrain config dict.

    File-backed initialisers (``rgb_weights``, ``init_from``) are cleared: the weights come from the
    checkpoint, and those files need not exist where the backbone is evaluated.
    """
    from deo.models.student import build_student
    from deo.train.config import ModelConfig

    model = {**cfg["model"], "rgb_weights": "", "init_from": ""}
    img_size = int(cfg.get("views", {}).get("global_size", 224))
    return build_student(ModelConfig(**model), img_size=img_size)


def load_checkpoint_student(uri: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Student with trained weights, the resolved config and metadata.

    Args:
        uri: a run folder (its latest checkpoint), a ``checkpoint_*`` folder or a ``.safetensors``
            export (local path or URI).

    Returns:
        (student in eval mode on CPU, config dict, meta) where meta holds ``checkpoint`` (resolved
        location), ``step``, ``stats``, ``bands``, ``gsd``, ``weights_sha256`` and, for checkpoints,
        ``optical_teacher`` (a state dict, or None).

    Raises:
        FileNotFoundError: nothing to load at ``uri``.
        ValueError: the file lacks required entries or its weights do not fit the architecture.
    """
    if uri.endswith(".safetensors"):
        from deo.export import read_export

        state, meta = read_export(uri)
        cfg = meta.pop("config")
        student = build_student_from_config(cfg)
        _load(student, state, uri)
        return student.eval(), cfg, meta
    ckpt, state = _load_newest_readable(uri)
    missing = [k for k in ("student", "config", "step") if k not in state]
    if missing:
        raise ValueError(f"{ckpt}/{STATE_FILE} lacks {missing}; it holds {sorted(state)}")
    cfg = state["config"]
    # the run's manifest copy, for what older checkpoints did not store
    manifest = {} if state.get("stats") and state.get("gsd") else _run_manifest(ckpt)
    stats = state.get("stats") or manifest.get("stats")
    if not stats or "ms" not in stats:
        raise ValueError(
            f"{ckpt} has no normalisation stats: expected 'stats' in {STATE_FILE} or in the run's "
            "manifest.json, shaped {'ms': {'mean': [...], 'std': [...]}, 'optical': {...}}"
        )
    student = build_student_from_config(cfg)
    _load(student, state["student"], ckpt)
    gsd, gsd_range = (state["gsd"], state.get("gsd_range") or {}) if state.get("gsd") else manifest_gsd(manifest)
    meta = {
        "checkpoint": ckpt,
        "step": int(state["step"]),
        "stats": stats,
        "bands": bands_by_modality(state.get("bands"), student.modalities),
        "gsd": gsd or DEFAULT_GSD,
        "gsd_range": gsd_range,
        "weights_sha256": weights_sha256(state["student"]),
        "optical_teacher": state.get("optical_teacher"),
    }
    return student.eval(), cfg, meta


def bands_by_modality(bands: Any, modalities: tuple[str, ...]) -> dict[str, list[str]]:
    """``{modality: band names}`` for every input of the student.

    Args:
        bands: a dict per modality, a sequence of the ``ms`` bands (as the shards record them), or None.
        modalities: the student's inputs; those not named in ``bands`` get the model's defaults.
    """
    from deo.models.patch_embed import MODALITY_BANDS

    given: dict[str, Any] = {}
    if isinstance(bands, dict):
        given = dict(bands)
    elif bands:
        given = {"ms": bands}
    return {m: [str(b) for b in given.get(m, MODALITY_BANDS[m])] for m in modalities}


def _load(student: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from deo.models.weights import load_checked

    load_checked(student, state, source)
