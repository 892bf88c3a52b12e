"""Read model weights from a local path or URI (safetensors, timm or PyTorch checkpoints); never downloads."""

from __future__ import annotations

import io
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_safetensors

from deo.io import storage

_NESTED_KEYS = ("model_ema", "teacher", "model", "module", "state_dict")


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Load a state dict from ``uri`` (path, ``file://``, ``s3://``, ``gs://``).

    ``*.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``,
    unwrapping the usual nesting (``model``, ``state_dict``, ``teacher`` ...) and a ``module.`` prefix.

    Raises:
        FileNotFoundError: ``uri`` does not exist.
        ValueError: the file holds no tensor mapping.
    """
    if not uri:
        raise ValueError("weights URI is empty; expected a path or s3:// URI of a checkpoint")
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"weights not found: {uri!r} (nothing is downloaded; give a local path or s3:// URI)"
        )
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        return load_safetensors(data, uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError ... by how the file is broken
        raise ValueError(f"{uri!r} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected a state dict saved by "
                         "torch.save, or a .safetensors file") from e
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri!r} holds no state dict of tensors (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def safetensors_header(data: bytes, uri: str) -> dict:
    """The JSON header of a safetensors file's bytes (tensor entries and ``__metadata__``).

    Raises:
        ValueError: naming ``uri``, when the bytes do not start with a safetensors header.
    """
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < n <= len(data) - 8:
            raise ValueError(f"header length {n} in a file of {len(data)} bytes")
        header = json.loads(data[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"header is a {type(header).__name__}, not a mapping")
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors
        raise ValueError(f"{uri!r} is not a safetensors file ({e}): expected the whole file written by "
                         "safetensors (a truncated or foreign file?)") from None
    return header


def load_safetensors(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes; ValueError naming ``uri`` when the file is cut short or
    is no safetensors file."""
    safetensors_header(data, uri)
    try:
        return dict(_load_safetensors(data))
    except SafetensorError as e:
        raise ValueError(f"{uri!r} is not a whole safetensors file ({e}): a truncated copy?") from None


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)`` with a ValueError naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {source!r} does not match {type(module).__name__}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}), shape mismatches {shapes[:8]}"
        )
    module.load_state_dict(state, strict=True)
