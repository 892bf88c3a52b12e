"""Multi-crop augmentation of MS and optical tiles as batched tensor ops (CPU or GPU).

Input tiles stay raw (ms uint16 reflectance x 10000, optical uint8) until here, so the GPU path ships
small integer tensors and augments on the device. Per-sample random parameters come from a CPU generator
seeded by (seed, epoch, sample_id), so a sample's views do not depend on the world size, batch
composition or device. Every view is cut with the SAME normalised geometry from MS and optical (an
``affine_grid`` crop + flip + 90-degree rotation, bilinear ``grid_sample``), so each view exists in both
modalities. MS photometric jitter is per band and multiplicative around the band's view mean in
reflectance (no RGB assumptions, clamped at 0); optical gets DINO's colour jitter (brightness, contrast,
saturation, hue via a YIQ rotation), grayscale, Gaussian blur and solarisation. Normalisation uses the
manifest's band stats.

SAR (``model.sar``): Sentinel-1 VV/VH backscatter in dB on the MS grid is cut with the MS geometry into
``sar_global`` views (the only SAR views MSAD needs), interpolated in dB, without photometric jitter, and
normalised with the manifest's ``stats["sar"]`` when present, else :data:`SAR_DB_STATS`.

GSD target of a view (SatDINO): tile GSD x crop side / output side, the crop side being the square root of
the crop area in tile pixels.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from deo.bands import true_colour_max

_RATIO = (3 / 4, 4 / 3)

SAR_DB_STATS: dict[str, list[float]] = {"mean": [-12.619993, -19.290445], "std": [5.115911, 5.464428]}
"""VV, VH dB mean/std over BigEarthNet-S1 (the values torchgeo ships), for shards without ``stats.sar``."""


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 63-bit seed from (seed, epoch, sample_id), stable across processes and Python versions."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def scale_ranges(lo: float, hi: float, n: int, uniform: bool) -> list[tuple[float, float]]:
    """Per-view area ranges: ``n`` equal segments of [lo, hi] (SatDINO uniform sampling) or [lo, hi] each."""
    if not uniform:
        return [(lo, hi)] * n
    step = (hi - lo) / n
    return [(lo + k * step, lo + (k + 1) * step) for k in range(n)]


def view_gsd(
    tile_gsd: torch.Tensor, crop_frac_side: torch.Tensor, tile_px: int, out_px: int
) -> torch.Tensor:
    """GSD (metres) of a view: tile GSD x crop side (tile pixels) / output side (pixels)."""
    return tile_gsd * crop_frac_side * tile_px / out_px


class MultiCrop:
    """Cut 2 global + V_l local views from paired MS/optical tiles.

    Args:
        views: ``ViewConfig`` (sizes, counts, scale ranges, ``uniform_local``).
        stats: manifest ``stats``: ``{"ms": {"mean": [10], "std": [10]}, "optical": {"mean": [3], "std": [3]}}``
            in stored units (ms: reflectance x 10000, optical: 0-255), optionally ``"sar"`` (2, dB).
        seed: ``train.seed``.

    ``true_colour_max`` is the stretch of the S2 true colour that fills in the optical tile of a row
    without one (:func:`deo.data.loader.fill_true_colour`): ingest's, from the stats.
    """

    def __init__(self, views: Any, stats: dict[str, dict[str, list[float]]], seed: int = 0) -> None:
        """Check the stats and remember the view layout."""
        stats = {"sar": SAR_DB_STATS, **stats}
        for key, n in (("ms", 10), ("optical", 3), ("sar", 2)):
            st = stats.get(key, {})
            if len(st.get("mean", [])) != n or len(st.get("std", [])) != n:
                raise ValueError(f"stats.{key} needs {n} means and stds, got {st}")
            if any(v is None for v in [*st["mean"], *st["std"]]):
                raise ValueError(f"stats.{key} has no values ({st}): the manifest counted no {key} pixels; "
                                 "re-ingest the shards with this version of deo")
            if min(st["std"]) <= 0:
                raise ValueError(f"stats.{key}.std must be > 0, got {st['std']}")
        self.v = views
        self.seed = seed
        self.true_colour_max = true_colour_max(stats)
        self.ms_mean = torch.tensor(stats["ms"]["mean"]).view(1, 10, 1, 1)
        self.ms_std = torch.tensor(stats["ms"]["std"]).view(1, 10, 1, 1)
        self.opt_mean = torch.tensor(stats["optical"]["mean"]).view(1, 3, 1, 1)
        self.opt_std = torch.tensor(stats["optical"]["std"]).view(1, 3, 1, 1)
        self.sar_mean = torch.tensor(stats["sar"]["mean"]).view(1, 2, 1, 1)
        self.sar_std = torch.tensor(stats["sar"]["std"]).view(1, 2, 1, 1)
        self.ranges = [tuple(views.global_scale)] * views.n_global + scale_ranges(
            views.local_scale[0], views.local_scale[1], views.n_local, views.uniform_local
        )

    def params(self, sample_ids: list[str], epoch: int) -> dict[str, torch.Tensor]:
        """Random parameters (V, B, ...) of every view of every sample, on CPU.

        Returns ``scale`` (area fraction), ``theta`` (V, B, 2, 3) affine crop, ``side`` (crop side fraction),
        ``ms_gain``/``ms_contrast`` (V, B, 10), ``jitter`` (V, B, 4), ``jitter_on``, ``gray``, ``blur_sigma``,
        ``solarize``.
        """
        nv, b = len(self.ranges), len(sample_ids)
        u = torch.empty(b, nv, 40, dtype=torch.float64)
        for i, sid in enumerate(sample_ids):
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, sid))
            u[i] = torch.rand(nv, 40, generator=g, dtype=torch.float64)
        u = u.transpose(0, 1).float()  # (V, B, 40)
        lo = torch.tensor([r[0] for r in self.ranges]).view(nv, 1)
        hi = torch.tensor([r[1] for r in self.ranges]).view(nv, 1)
        scale = lo + (hi - lo) * u[..., 0]
        log_r = math.log(_RATIO[0]) + (math.log(_RATIO[1]) - math.log(_RATIO[0])) * u[..., 1]
        w = torch.sqrt(scale * log_r.exp()).clamp(max=1.0)
        h = torch.sqrt(scale / log_r.exp()).clamp(max=1.0)
        cx = (u[..., 2] * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the crop inside the tile
        cy = (u[..., 3] * 2 - 1) * (1 - h)
        flip = torch.where(u[..., 4] < 0.5, -1.0, 1.0)
        k = (u[..., 5] * 4).floor().clamp(max=3)
        cos, sin = torch.cos(k * math.pi / 2).round(), torch.sin(k * math.pi / 2).round()
        # input = centre + diag(w, h) @ rot(k) @ diag(flip, 1) @ output
        theta = torch.zeros(nv, b, 2, 3)
        theta[..., 0, 0], theta[..., 0, 1] = w * cos * flip, -w * sin
        theta[..., 1, 0], theta[..., 1, 1] = h * sin * flip, h * cos
        theta[..., 0, 2], theta[..., 1, 2] = cx, cy
        ms_on = (u[..., 6] < 0.8).float().unsqueeze(-1)
        gain = 1 + ms_on * (u[..., 7:17] - 0.5) * 0.4  # per-band brightness x [0.8, 1.2]
        contrast = 1 + ms_on * (u[..., 17:27] - 0.5) * 0.4  # per-band contrast x [0.8, 1.2]
        jitter = torch.stack(
            [
                1 + (u[..., 27] - 0.5) * 0.8,
                1 + (u[..., 28] - 0.5) * 0.8,
                1 + (u[..., 29] - 0.5) * 0.4,
                (u[..., 30] - 0.5) * 0.2,
            ],
            dim=-1,
        )  # brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (fraction of a turn)
        blur_p = torch.full((nv, 1), 0.5)
        blur_p[0], blur_p[1] = 1.0, 0.1  # DINO: global 1 always blurred, global 2 rarely
        sol_p = torch.zeros(nv, 1)
        sol_p[1] = 0.2
        return {
            "scale": scale,
            "side": torch.sqrt(w * h),
            "theta": theta,
            "ms_gain": gain,
            "ms_contrast": contrast,
            "jitter": jitter,
            "jitter_on": u[..., 31] < 0.8,
            "gray": u[..., 32] < 0.2,
            "blur_sigma": torch.where(u[..., 33] < blur_p, 0.1 + 1.9 * u[..., 34], torch.zeros(())),
            "solarize": u[..., 35] < sol_p,
        }

    def __call__(
        self,
        ms: torch.Tensor,
        optical: torch.Tensor,
        sample_ids: list[str],
        epoch: int,
        ms_gsd: torch.Tensor,
        optical_sizes: tuple[int, int] | None = None,
        sar: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Augment a batch on the tiles' device.

        Args:
            ms: (B, 10, S, S) uint16 reflectance x 10000.
            optical: (B, 3, A, A) uint8 RGB (aerial, or the S2 true colour of the same tile).
            sample_ids: B ids (seed the per-sample parameters).
            epoch: epoch number.
            ms_gsd: (B,) metres per MS pixel.
            optical_sizes: (global, local) optical view sides; default (views.optical_global_size,
                views.local_size * optical_global_size / global_size).
            sar: (B, 2, S, S) float32 VV, VH in dB on the MS grid, or None.

        Returns:
            ``ms_global`` (2, B, 10, G, G), ``ms_local`` (V_l, B, 10, L, L), ``opt_global`` (2, B, 3, Go, Go),
            ``opt_local`` (V_l, B, 3, Lo, Lo) float32 normalised, ``gsd_global`` (2, B), ``gsd_local`` (V_l, B)
            in metres, ``scale`` (V, B) crop areas, and with ``sar`` ``sar_global`` (2, B, 2, G, G).
        """
        b = ms.shape[0]
        if (
            ms.ndim != 4
            or ms.shape[1] != 10
            or optical.ndim != 4
            or optical.shape[1] != 3
            or optical.shape[0] != b
        ):
            raise ValueError(
                f"expected ms (B, 10, S, S) and optical (B, 3, A, A), got {tuple(ms.shape)} and {tuple(optical.shape)}"
            )
        if sar is not None and (sar.ndim != 4 or sar.shape[:2] != (b, 2) or sar.shape[2:] != ms.shape[2:]):
            raise ValueError(
                f"expected sar (B, 2, S, S) on the ms grid {tuple(ms.shape[2:])}, got {tuple(sar.shape)}"
            )
        if len(sample_ids) != b:
            raise ValueError(f"got {len(sample_ids)} sample ids for a batch of {b}")
        p = _to_device(self.params(sample_ids, epoch), ms.device)
        return self.apply(ms, optical, p, ms_gsd, optical_sizes, sar)

    def apply(
        self,
        ms: torch.Tensor,
        optical: torch.Tensor,
        p: dict[str, torch.Tensor],
        ms_gsd: torch.Tensor,
        optical_sizes: tuple[int, int] | None = None,
        sar: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The device half of :meth:`__call__`: cut the views with parameters ``p`` of :meth:`params`.

        Every tensor, ``p``'s included, is on the tiles' device, and nothing reads a value back to
        the host, so a CUDA graph can record this (``train.cuda_graph``). Arguments and returns as
        in :meth:`__call__`.
        """
        b = ms.shape[0]
        dev = ms.device
        self.to(dev)
        vg = self.v.n_global
        go = self.v.optical_global_size
        lo = (
            optical_sizes[1]
            if optical_sizes
            else round(self.v.local_size * go / self.v.global_size)
        )
        go = optical_sizes[0] if optical_sizes else go
        ms_f = ms.float()  # stored units (reflectance x 10000): jitter and clamp are scale-free
        opt_f = optical.float() / 255.0
        out: dict[str, torch.Tensor] = {}
        for name, sl, size, osize in (
            ("global", slice(0, vg), self.v.global_size, go),
            ("local", slice(vg, None), self.v.local_size, lo),
        ):
            theta = p["theta"][sl]
            nv = theta.shape[0]
            grid_ms = F.affine_grid(
                theta.flatten(0, 1), [nv * b, 10, size, size], align_corners=False
            )
            x = _sample_views(ms_f, grid_ms)
            x = self._ms_photometric(
                x, p["ms_gain"][sl].flatten(0, 1), p["ms_contrast"][sl].flatten(0, 1)
            )
            x = _normalise(x, self.ms_mean, self.ms_std)
            out[f"ms_{name}"] = x.view(nv, b, 10, size, size)
            if sar is not None and name == "global":
                z = F.grid_sample(
                    sar.float().repeat(nv, 1, 1, 1),
                    grid_ms,
                    mode="bilinear",
                    padding_mode="reflection",
                    align_corners=False,
                )
                z = (z - self.sar_mean.to(dev)) / self.sar_std.to(dev)
                out["sar_global"] = z.view(nv, b, 2, size, size)
            grid_o = F.affine_grid(
                theta.flatten(0, 1), [nv * b, 3, osize, osize], align_corners=False
            )
            y = _sample_views(opt_f, grid_o)
            y = self._optical_photometric(
                y, {k: v[sl].flatten(0, 1) for k, v in p.items() if k != "theta"}
            )
            y = _normalise(y, self.opt_mean / 255.0, self.opt_std / 255.0)
            out[f"opt_{name}"] = y.view(nv, b, 3, osize, osize)
            tile = ms.shape[-1]
            out[f"gsd_{name}"] = view_gsd(
                ms_gsd.to(dev).float().view(1, b), p["side"][sl], tile, size
            )
        out["scale"] = p["scale"]
        return out

    def to(self, dev: torch.device) -> MultiCrop:
        """Keep the normalisation stats on the tiles' device (moved once, not copied every call).

        :class:`deo.train.step.TrainStep` moves them before the first step, so a compiled ``apply``
        (``train.compile``) never traces the move.
        """
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor) and v.device != dev:
                setattr(self, k, v.to(dev))
        for name in _CONSTANTS:  # the colour constants too
            _constant(name, dev)
        return self

    @staticmethod
    def _ms_photometric(
        x: torch.Tensor, gain: torch.Tensor, contrast: torch.Tensor
    ) -> torch.Tensor:
        """Per-band brightness (gain) and contrast around the band's view mean; reflectance stays >= 0.

        gain * (mean + contrast * (x - mean)) as one fused multiply-add per pixel:
        x * (gain * contrast) + mean * gain * (1 - contrast).
        """
        gain, contrast = gain[..., None, None], contrast[..., None, None]
        shift = x.mean(dim=(2, 3), keepdim=True) * (gain * (1 - contrast))
        return torch.addcmul(shift, x, gain * contrast).clamp_(min=0.0)

    @staticmethod
    def _optical_photometric(y: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """DINO photometric augmentation of (N, 3, H, W) RGB in [0, 1]."""
        on = p["jitter_on"].view(-1, 1, 1, 1)
        j = p["jitter"]
        z = (y * j[:, 0].view(-1, 1, 1, 1)).clamp_(0, 1)  # brightness
        # contrast around the mean luminance, saturation around each pixel's: one lerp each
        mean_lum = _luminance(z).mean(dim=(2, 3), keepdim=True)
        z = torch.lerp(mean_lum, z, j[:, 1].view(-1, 1, 1, 1)).clamp_(0, 1)
        z = torch.lerp(_luminance(z), z, j[:, 2].view(-1, 1, 1, 1)).clamp_(0, 1)
        z = _hue_rotate(z, j[:, 3]).clamp_(0, 1)
        y = torch.where(on, z, y)
        lum = _luminance(y).expand_as(y)
        y = torch.where(p["gray"].view(-1, 1, 1, 1), lum, y)
        y = _gaussian_blur(y, p["blur_sigma"])
        return torch.where(p["solarize"].view(-1, 1, 1, 1) & (y >= 0.5), 1.0 - y, y)


GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""Luminance of RGB (ITU-R BT.601, as torchvision's grayscale)."""
_TO_YIQ = torch.tensor([GRAY_WEIGHTS, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_CONSTANTS: dict[str, torch.Tensor] = {
    "to_yiq": _TO_YIQ,
    "from_yiq": torch.linalg.inv(_TO_YIQ),
}
_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _constant(name: str, device: torch.device) -> torch.Tensor:
    """A float32 constant of :data:`_CONSTANTS` on ``device``, copied there once.

    Creating it per call would cost a pageable host-to-device copy, which synchronises the CUDA stream.
    """
    key = (name, device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _CONSTANTS[name].to(device)
    return _ON_DEVICE[key]


def _luminance(y: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luminance (:data:`GRAY_WEIGHTS`), reading ``y`` once."""
    (wr, wg, wb), (r, g, b) = GRAY_WEIGHTS, y.split(1, dim=1)
    return (r * wr).add_(g, alpha=wg).add_(b, alpha=wb)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel ((1, C, 1, 1) stats) as one fused multiply-add."""
    return torch.addcmul(-mean / std, x, 1.0 / std)


def _to_device(p: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    """Move the CPU view parameters to ``dev``; through pinned memory on CUDA, so the copies are async.

    A ``non_blocking`` copy from pageable memory synchronises the stream: one host sync per tensor.
    """
    if dev.type == "cpu":
        return p
    if dev.type == "cuda":
        return {k: v.pin_memory().to(dev, non_blocking=True) for k, v in p.items()}
    return {k: v.to(dev) for k, v in p.items()}


def _sample_views(tiles: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear, reflection-padded samples of every view of every tile.

    Equal to ``grid_sample(tiles.repeat(V, 1, 1, 1), grid)`` without materialising V copies of the
    tiles (1.7 GB of float32 for 10 local views of 64 tiles of 10 x 256^2): the V grids of a tile are
    stacked along the output height of a single ``grid_sample`` call.

    Args:
        tiles: (B, C, S, S) float.
        grid: (V*B, H, W, 2) sampling grid in (view, batch) order, as ``affine_grid`` of (V, B) thetas.

    Returns:
        (V*B, C, H, W) in (view, batch) order.
    """
    b = tiles.shape[0]
    nv, h, w = grid.shape[0] // b, grid.shape[1], grid.shape[2]
    g = grid.view(nv, b, h, w, 2).transpose(0, 1).reshape(b, nv * h, w, 2)
    y = F.grid_sample(tiles, g, mode="bilinear", padding_mode="reflection", align_corners=False)
    return y.view(b, -1, nv, h, w).permute(2, 0, 1, 3, 4).reshape(nv * b, -1, h, w)


def _hue_rotate(y: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``turns`` (N,) of a full turn in YIQ space (linear approximation of HSV hue shift)."""
    to_yiq, from_yiq = _constant("to_yiq", y.device), _constant("from_yiq", y.device)
    a = turns * 2 * math.pi
    rot = torch.zeros(turns.shape[0], 3, 3, device=y.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    m = from_yiq @ rot @ to_yiq  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, y)


def _gaussian_blur(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (N,) in pixels; sigma 0 leaves the image unchanged."""
    n, c, h, w = y.shape
    radius = 6
    x = torch.arange(-radius, radius + 1, device=y.device, dtype=y.dtype)
    s = sigma.to(y.dtype).clamp(min=1e-3).view(n, 1)
    k = torch.exp(-0.5 * (x.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = torch.where((sigma > 0).view(n, 1), k, (x == 0).to(y.dtype).view(1, -1))
    k = k.repeat_interleave(c, 0)  # (N*C, K)
    z = y.reshape(1, n * c, h, w)
    z = F.pad(z, (radius, radius, radius, radius), mode="reflect")
    z = F.conv2d(z, k.view(n * c, 1, 1, -1), groups=n * c)
    z = F.conv2d(z, k.view(n * c, 1, -1, 1), groups=n * c)
    return z.view(n, c, h, w)
