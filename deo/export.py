"""Export a trained student as ``backbone.safetensors`` and load it back with :func:`load_backbone`.

The file holds the student's weights (patch embeddings + shared Swin stages). Its safetensors header
metadata (string -> string, values JSON-encoded) carries what a user needs to feed it correctly:

| key | value |
|---|---|
| ``format`` / ``format_version`` | ``deo-backbone`` / ``1`` |
| ``architecture`` | the ``model`` section of the training config (``student`` name ...) |
| ``img_size`` | global crop size the windows were built for |
| ``bands`` | ``{"ms": [10 S2 bands], "optical": ["R","G","B"], "sar": ["VV","VH"]?}`` in channel order |
| ``gsd`` / ``gsd_range`` | metres per pixel per input of the training tiles: median, and [min, max] |
| ``stats`` | ``{"ms": {"mean": [...], "std": [...]}, ...}`` normalisation in stored units |
| ``config`` | the whole resolved training config |
| ``step`` / ``weights_sha256`` / ``source`` | provenance |
| ``deo_version`` | package version that wrote it |

Example:
    >>> import deo
    >>> net = deo.load_backbone("runs/default/backbone.safetensors", bands=["B02", ..., "B12"])
    >>> feats = net.forward_features(net.normalise(x, "ms"), "ms")   # (B, H/32, W/32, C)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deo.io import storage
from deo.models.weights import load_safetensors, safetensors_header

FORMAT = "deo-backbone"
FORMAT_VERSION = "1"
_JSON_KEYS = ("architecture", "img_size", "bands", "gsd", "gsd_range", "stats", "config", "step")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in export metadata")


def export_backbone(
    student: nn.Module,
    cfg: Any,
    stats: dict[str, Any],
    bands: Any,
    out: str,
    step: int | None = None,
    gsd: dict[str, float] | None = None,
    gsd_range: dict[str, list[float]] | None = None,
    source: str = "",
) -> dict[str, str]:
    """Write ``student`` as safetensors with the metadata of the table above.

    Args:
        student: the ``DEOStudent`` (unwrapped from DDP).
        cfg: the resolved ``PretrainConfig`` (dataclass or dict).
        stats: normalisation stats per modality (the shard manifest's ``stats``).
        bands: the ``ms`` band sequence or ``{modality: bands}``.
        out: destination path or URI.
        step: optimizer steps done.
        gsd: median metres per pixel of the training tiles per modality
            (:func:`deo.io.shards.manifest_gsd`; default ``{"ms": 10.0}``).
        gsd_range: their [min, max] per modality (default: none recorded).
        source: where the weights came from (recorded as provenance).

    Returns:
        The header metadata written.
    """
    import dataclasses

    import deo
    from deo.eval.checkpoint import DEFAULT_GSD, bands_by_modality, weights_sha256

    cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    values = {
        "architecture": cfg_dict["model"],
        "img_size": int(cfg_dict.get("views", {}).get("global_size", 224)),
        "bands": bands_by_modality(bands, tuple(student.modalities)),
        "gsd": gsd or DEFAULT_GSD,
        "gsd_range": gsd_range or {},
        "stats": stats,
        "config": cfg_dict,
        "step": step,
    }
    header = {k: json.dumps(v, default=_json_default) for k, v in values.items()}
    header.update(
        format=FORMAT, format_version=FORMAT_VERSION, deo_version=deo.__version__,
        weights_sha256=weights_sha256(state), source=source or out,
    )
    from safetensors.torch import save

    storage.write_bytes(out, save(state, metadata=header))
    return header


def export_checkpoint(checkpoint: str, out: str = "") -> tuple[str, dict[str, str]]:
    """Export the student of a run folder, ``checkpoint_*`` folder or existing export.

    Args:
        checkpoint: run folder (latest checkpoint), ``checkpoint_*`` folder or ``.safetensors``.
        out: destination (empty: ``backbone.safetensors`` in the run folder).

    Returns:
        (the written URI, the header metadata).
    """
    from deo.eval.checkpoint import load_checkpoint_student

    student, cfg, meta = load_checkpoint_student(checkpoint)
    if not out:
        if checkpoint.endswith(".safetensors"):
            raise ValueError("out is required when re-exporting a .safetensors file")
        out = storage.join(meta["checkpoint"].rsplit("/", 1)[0], "backbone.safetensors")
    header = export_backbone(
        student, cfg, meta["stats"], meta["bands"], out, step=meta["step"], gsd=meta["gsd"],
        gsd_range=meta["gsd_range"], source=meta["checkpoint"],
    )
    return out, header


def write_summary(out: str, header: dict[str, str], summary: str = "") -> str:
    """Write the export's summary JSON (where it is, provenance, bands, GSD) and return its URI.

    Args:
        out: the export's URI.
        header: its metadata (:func:`export_backbone`'s return).
        summary: destination (empty: ``out`` with ``.safetensors`` replaced by ``.summary.json``).
    """
    summary = summary or out.removesuffix(".safetensors") + ".summary.json"
    fields = {k: json.loads(header[k]) for k in ("step", "bands", "gsd", "gsd_range", "img_size", "architecture")}
    record = {"backbone": out, "source": header["source"], "weights_sha256": header["weights_sha256"],
              "deo_version": header["deo_version"], **fields}
    storage.write_text(summary, json.dumps(record, indent=1))
    return summary


def read_header(data: bytes, uri: str = "the file") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes; ValueError naming ``uri`` when it is none."""
    return safetensors_header(data, uri).get("__metadata__") or {}


def read_export(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and decoded metadata of an exported backbone.

    Returns:
        (state dict, meta) with meta holding ``config``, ``step``, ``stats``, ``bands``, ``gsd``, ``gsd_range``,
        ``img_size``, ``weights_sha256`` (recomputed), ``checkpoint`` (= uri) and ``deo_version``.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: not a deo backbone export, or an unknown format version.
    """
    from deo.eval.checkpoint import weights_sha256

    if not storage.exists(uri):
        raise FileNotFoundError(f"backbone {uri} not found")
    data = storage.read_bytes(uri)
    header = read_header(data, uri)
    if header.get("format") != FORMAT:
        raise ValueError(f"{uri} is not a deo backbone export (format {header.get('format')!r}, expected {FORMAT!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{uri} has export format_version {header.get('format_version')!r}; this deo reads {FORMAT_VERSION!r}"
        )
    meta: dict[str, Any] = {k: json.loads(header[k]) for k in _JSON_KEYS if k in header}
    meta.setdefault("gsd_range", {})  # exports before it was recorded
    state = load_safetensors(data, uri)
    meta.update(checkpoint=uri, deo_version=header.get("deo_version"), weights_sha256=weights_sha256(state))
    return state, meta


def _norm_band(name: str, modality: str) -> str:
    from deo.bands import normalise_band_name

    return normalise_band_name(name) if modality == "ms" else name.strip().upper()


class Backbone(nn.Module):
    """A trained DEO student with the metadata needed to feed it.

    Attributes:
        student: the ``DEOStudent``.
        bands: channel names per modality, in order.
        stats: normalisation mean/std per modality in stored units.
        gsd: median metres per pixel of the training tiles per modality.
        gsd_range: their [min, max] per modality (empty in exports that predate it).
        config: the training config.
    """

    def __init__(self, student: nn.Module, meta: dict[str, Any], config: dict[str, Any]) -> None:
        """Wrap ``student`` with ``meta`` (bands, stats, gsd, step, weights_sha256)."""
        super().__init__()
        self.student = student
        self.bands: dict[str, list[str]] = {m: list(b) for m, b in meta["bands"].items()}
        self.stats: dict[str, dict[str, list[float]]] = meta["stats"]
        self.gsd: dict[str, float] = meta["gsd"]
        self.gsd_range: dict[str, list[float]] = meta.get("gsd_range", {})
        self.config = config
        self.step: int | None = meta.get("step")
        self.weights_sha256: str = meta["weights_sha256"]
        self.num_features: int = int(student.num_features)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Accepted ``modality`` values."""
        return tuple(self.student.modalities)

    def check_bands(self, modality: str, bands: Sequence[str] | str) -> None:
        """Raise ValueError unless ``bands`` names this backbone's ``modality`` channels in order.

        ``bands``: a list, or a comma string (``"B02,B03,..."``) or, for ``ms``, a preset name, as
        ``s2_band_order`` takes them (a string used to be read one character at a time)."""
        if modality not in self.bands:
            raise ValueError(f"modality must be one of {tuple(self.bands)}, got {modality!r}")
        if isinstance(bands, str):
            from deo.bands import parse_band_order

            bands = parse_band_order(bands) if modality == "ms" else [b for b in bands.split(",") if b.strip()]
        want = [_norm_band(b, modality) for b in self.bands[modality]]
        got = [_norm_band(b, modality) for b in bands]
        if got != want:
            raise ValueError(
                f"{modality} input bands {','.join(got)} do not match the backbone's "
                f"{','.join(want)} (names and order must agree; reorder or select channels)"
            )

    def check_input(self, x: torch.Tensor, modality: str, bands: Sequence[str] | None = None) -> None:
        """Check the modality, channel count and (when given) band names of ``x`` (B, C, H, W)."""
        if modality not in self.modalities:
            raise ValueError(f"modality must be one of {self.modalities}, got {modality!r}")
        n = len(self.bands[modality])
        if x.ndim != 4 or x.shape[1] != n:
            raise ValueError(
                f"{modality} input must be (B, {n}, H, W) with bands {','.join(self.bands[modality])}, "
                f"got shape {tuple(x.shape)}"
            )
        if bands is not None:
            self.check_bands(modality, bands)

    def normalise(self, x: torch.Tensor | Any, modality: str) -> torch.Tensor:
        """(x - mean) / std with the training stats: (B, C, H, W) stored units -> normalised float32.

        ``x`` may be a numpy array (rasterio's ``read()`` with a batch axis added); its shape is checked
        as :meth:`check_input` does."""
        x = torch.as_tensor(x)
        self.check_input(x, modality)
        if modality not in self.stats:
            raise ValueError(f"no normalisation stats for {modality!r}; have {sorted(self.stats)}")
        s = self.stats[modality]
        mean = torch.tensor(s["mean"], dtype=torch.float32, device=x.device)[None, :, None, None]
        std = torch.tensor(s["std"], dtype=torch.float32, device=x.device)[None, :, None, None]
        return (x.float() - mean) / std

    def forward_features(
        self, x: torch.Tensor, modality: str = "ms", bands: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Final-stage tokens (timm NHWC): (B, C, H, W) normalised input -> (B, H/32, W/32, D)."""
        self.check_input(x, modality, bands)
        return self.student.forward_features(x, modality)

    def forward_intermediates(
        self, x: torch.Tensor, modality: str = "ms", bands: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """timm ``forward_intermediates`` (``indices``, ``norm``, ``stop_early``, ``output_fmt``,
        ``intermediates_only``) of the Swin stages for a normalised input (B, C, H, W)."""
        self.check_input(x, modality, bands)
        return self.student.forward_intermediates(x, modality, **kwargs)

    def forward(self, x: torch.Tensor, modality: str = "ms", bands: Sequence[str] | None = None) -> torch.Tensor:
        """Pooled feature (mean of the final tokens): (B, C, H, W) -> (B, D)."""
        return self.forward_features(x, modality, bands).mean(dim=(1, 2))


def load_backbone(
    path_or_uri: str,
    bands: Sequence[str] | dict[str, Sequence[str]] | None = None,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Load an exported backbone (or a run / checkpoint folder) for inference.

    Args:
        path_or_uri: ``.safetensors`` export, run folder or ``checkpoint_*`` folder (local or URI).
        bands: the caller's channel order: a list for the ``ms`` input, or ``{modality: list}``;
            checked against the backbone's bands (names and order).
        device: where to put the weights.

    Returns:
        :class:`Backbone` in eval mode.

    Raises:
        ValueError: ``bands`` disagree with the backbone's, or the file is not a deo export.
    """
    from deo.eval.checkpoint import load_checkpoint_student

    student, cfg, meta = load_checkpoint_student(path_or_uri)
    net = Backbone(student, meta, cfg)
    if bands is not None:
        for modality, names in (bands.items() if isinstance(bands, dict) else [("ms", bands)]):
            net.check_bands(modality, names)
    return net.to(device).eval()
