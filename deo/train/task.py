"""The DEO training task: student + heads, EMA teacher, frozen DINOv3 teacher -> a dict of loss terms.

Launcher-agnostic (no Ray, no optimizer): the loop calls ``task(views, step)``, backpropagates
``out["loss"]``, steps its optimizer over ``task.trainable.parameters()`` and calls
``task.update_ema(momentum)``. DDP wraps exactly ``task.trainable``
(``task.trainable = prepare_model(task.trainable)``): every student forward goes through it.

Objective (DESIGN Method):
    L = -C - gamma R - (alpha1 cls_cos + alpha2 pF_cos + alpha3 pmid_cos) + lambda MSAD + w_gsd GSD
A weight of 0 skips its term's computation (and its head's forward).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deo import dist
from deo.losses import CodingRateLoss, CompressionLoss, GSDLoss, MSADLoss, OpticalDistillLoss
from deo.models.continual import check_partner, domain_teacher_tokens, init_from_backbone
from deo.models.dinov3 import DINOv3Teacher, build_teacher
from deo.models.ema import EMATeacher
from deo.models.heads import MLPHead
from deo.models.student import DEOStudent, build_student
from deo.train.parallel import unwrap
from deo.train.side_stream import SideStream


@dataclass
class MicroBatchShare:
    """What one micro-batch of a ``train.grad_accum`` > 1 step takes from the step's first pass
    (:meth:`DEOTask.share_micro_batches`), so that R covers the whole step's batch (DESIGN: the GLOBAL batch).

    Attributes:
        teachers: this micro-batch's teacher outputs (:meth:`DEOTask._teachers`), computed once.
        other_cov: (V_g, d, d) float32 Z^T Z of this rank's other micro-batches of the step (no graph).
        other_rows: how many rows ``other_cov`` sums over.
        micro_steps: micro-batches per optimizer step.
        seed: this micro-batch's own random stream (:func:`micro_batch_stream`), in both passes: stochastic
            depth drops the same blocks, so its Z is the one the other micro-batches counted, and no
            two micro-batches share masks.
    """

    teachers: dict[str, torch.Tensor]
    other_cov: torch.Tensor
    other_rows: int
    micro_steps: int
    seed: int


@contextmanager
def micro_batch_stream(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from ``seed``'s stream on the CPU and on ``device`` (CUDA), then put the step's stream back.

    Restoring one state per micro-batch instead would not do: the second pass draws more than the first
    (local and optical views after the global ones), and those draws would repeat the next
    micro-batch's masks.
    """
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # restores the CPU's and these devices' generators
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


class MSBranch(nn.Module):
    """The student and ``head_ms`` of a :class:`DEOTrainable`: the structure the EMA teacher averages.

    It shares (not copies) the trainable's modules; the EMA deep-copies it. Its forward is the
    teacher's MS embedding, so a sharded EMA (FSDP) runs through one root module.
    """

    def __init__(self, student: DEOStudent, head_ms: MLPHead) -> None:
        super().__init__()
        self.student = student
        self.head_ms = head_ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 10, S, S) MS views -> (N, d) normalised embeddings of the pooled final tokens."""
        return self.head_ms(self.student.forward_features(x, "ms").mean(dim=(1, 2)))


def _to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample NHWC tokens (B, h, w, D) to (B, H*W, D) on ``grid`` (identity if equal)."""
    if tuple(tokens.shape[1:3]) == tuple(grid):
        return tokens.flatten(1, 2)
    x = F.interpolate(tokens.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def parameter_layout(cfg: Any) -> dict[str, Any]:
    """The config values that fix which trained parameters exist and their shapes (:class:`DEOTrainable`
    builds from them): a checkpoint's weights load only under the same layout."""
    m, loss = cfg.model, cfg.loss
    return {
        "model.student": m.student, "model.head_hidden": m.head_hidden, "model.head_out": m.head_out,
        "model.head_layers": m.head_layers, "model.sar": m.sar, "teacher.name": cfg.teacher.name,
        **{f"loss.{k} > 0": getattr(loss, k) > 0 for k in ("alpha1", "alpha2", "alpha3", "msad_lambda",
                                                           "gsd_weight")},
    }


class DEOTrainable(nn.Module):
    """Everything that gets gradients: the student and all its heads (the module DDP wraps).

    Attributes:
        student: :class:`DEOStudent`.
        head_ms: 3-layer MLP on the pooled MS feature, L2-normalised (d = ``model.head_out``).
        head_cls, head_pF, head_pmid: MLPs onto the teacher width (pooled, stage-4, stage-3 tokens).
        psi_a, psi_b: MSAD linear projections (MS and partner sensor), when ``loss.msad_lambda`` > 0.
        head_gsd: linear log-GSD regressor on the pooled MS feature, when ``loss.gsd_weight`` > 0.
    """

    def __init__(self, cfg: Any, teacher_dim: int) -> None:
        """Build from a ``PretrainConfig``; ``teacher_dim`` is the DINOv3 width (0: no optical heads)."""
        super().__init__()
        m, loss = cfg.model, cfg.loss
        self.student: DEOStudent = build_student(m, img_size=cfg.views.global_size)
        c, c3 = self.student.num_features, self.student.stage_dims[-2]
        self.head_ms = MLPHead(c, m.head_out, m.head_hidden, m.head_layers, normalize=True)
        self.use = {
            "cls": loss.alpha1 > 0 and teacher_dim > 0,
            "pF": loss.alpha2 > 0 and teacher_dim > 0,
            "pmid": loss.alpha3 > 0 and teacher_dim > 0,
            "msad": loss.msad_lambda > 0,
            "gsd": loss.gsd_weight > 0,
        }
        if self.use["cls"]:
            self.head_cls = MLPHead(c, teacher_dim, m.head_hidden, m.head_layers)
        if self.use["pF"]:
            self.head_pF = MLPHead(c, teacher_dim, m.head_hidden, m.head_layers)
        if self.use["pmid"]:
            self.head_pmid = MLPHead(c3, teacher_dim, m.head_hidden, m.head_layers)
        if self.use["msad"]:
            self.msad_partner = "sar" if m.sar else "optical"
            self.psi_a = nn.Linear(c, m.head_out)
            self.psi_b = nn.Linear(c, m.head_out)
        if self.use["gsd"]:
            self.head_gsd = nn.Linear(c, 1)
        # which patch embeddings the objective runs (forward follows this; DDP must look for unused
        # parameters when one stays idle)
        partner_from_f = bool(m.init_from) and self.use["msad"]  # v^B from the frozen domain teacher
        self.runs_embedding: dict[str, bool] = {
            "ms": True,
            "optical": any(self.use[k] for k in ("cls", "pF", "pmid"))
            or (self.use["msad"] and self.msad_partner == "optical" and not partner_from_f),
            "sar": self.use["msad"] and self.msad_partner == "sar" and not partner_from_f,
        }
        self.idle_embeddings: list[str] = [k for k in self.student.embeds if not self.runs_embedding[k]]

    def _ms_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, B, 10, S, S) -> final tokens (V*B, h, w, C) and pooled (V*B, C)."""
        tok = self.student.forward_features(x.flatten(0, 1), "ms")
        return tok, tok.mean(dim=(1, 2))

    def forward(
        self,
        views: dict[str, torch.Tensor],
        teacher_grid: tuple[int, int] = (0, 0),
        partner_tokens: torch.Tensor | None = None,
        ms_global_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Student outputs for every term in use.

        Args:
            views: ``ms_global`` (V_g, B, 10, G, G), ``ms_local`` (V_l, B, 10, L, L), and as needed
                ``opt_global`` (V_g, B, 3, Go, Go), ``opt_local`` (V_l, B, 3, Lo, Lo), ``sar_global``
                (V_g, B, 2, G, G).
            teacher_grid: DINOv3 patch grid (h, w) of the optical global views.
            partner_tokens: continual pretraining: the frozen domain teacher F's final tokens
                (V_g*B, h, w, C) of the sensor-B global views, used for v^B instead of the student's.
            ms_global_only: return ``s_ms`` of the global views only, (V_g, B, d) (what the coding rate
                reads; :meth:`DEOTask.share_micro_batches`). The student runs them first either way, so
                both forms draw the same stochastic-depth masks from the same generator state.

        Returns:
            ``s_ms`` (V, B, d); ``s_cls`` (V, B, D_t); ``s_pF``, ``s_pmid`` (V_g, B, N_t, D_t); ``va``,
            ``vb`` (V_g*B, T, d); ``gsd`` (V, B) predicted log-GSD — each only when its term is used.
        """
        g, loc = views["ms_global"], views["ms_local"]
        vg, b = g.shape[:2]
        out: dict[str, torch.Tensor] = {}
        tok_g, pool_g = self._ms_embed(g)
        if ms_global_only:
            return {"s_ms": self.head_ms(pool_g).view(vg, b, -1)}
        tok_l, pool_l = self._ms_embed(loc)
        pooled = torch.cat([pool_g, pool_l])  # (V*B, C), global views first
        out["s_ms"] = self.head_ms(pooled).view(-1, b, self.head_ms.mlp[-1].out_features)
        if self.use["gsd"]:
            out["gsd"] = self.head_gsd(pooled).view(-1, b)
        if self.runs_embedding["optical"]:
            og = views["opt_global"].flatten(0, 1)
            last = len(self.student.stage_dims) - 1
            # the patch heads read stages 3 and 4 as they leave their blocks, before the final norm (as
            # the public DEO code); the pooled [cls] feature and MSAD read the normalised final tokens
            final, stages = self.student.stages(og, "optical", [last - 1, last])
            if self.use["cls"]:
                pooled_o = [final.mean(dim=(1, 2))]
                if "opt_local" in views:
                    pooled_o.append(
                        self.student.pooled(views["opt_local"].flatten(0, 1), "optical")
                    )
                out["s_cls"] = self.head_cls(torch.cat(pooled_o)).view(
                    -1, b, self.head_cls.mlp[-1].out_features
                )
            # heads on the student grid, then resampled: the MLP runs on 4x fewer tokens than after resampling
            if self.use["pF"]:
                out["s_pF"] = _to_grid(self.head_pF(stages[last]), teacher_grid).view(
                    vg, b, -1, self.head_pF.mlp[-1].out_features
                )
            if self.use["pmid"]:
                out["s_pmid"] = _to_grid(self.head_pmid(stages[last - 1]), teacher_grid).view(
                    vg, b, -1, self.head_pmid.mlp[-1].out_features
                )
            opt_final = final
        if self.use["msad"]:
            if partner_tokens is not None:
                opt_final = partner_tokens
            elif self.msad_partner == "sar":
                opt_final = self.student.forward_features(views["sar_global"].flatten(0, 1), "sar")
            grid = tuple(tok_g.shape[1:3])
            out["va"] = self.psi_a(tok_g.flatten(1, 2))
            out["vb"] = self.psi_b(
                _to_grid(opt_final, grid)
            )  # same grid as MS (both views share geometry)
        return out


class DEOTask(nn.Module):
    """Student + heads (``trainable``), EMA teacher (``ema``), frozen DINOv3 (``teacher``) and the losses.

    ``task(views, step)`` returns ``{"loss": total, "compression": C, "coding_rate": R, "cls_cos": ...,
    "pF_cos": ..., "pmid_cos": ..., "msad": ..., "gsd": ...}`` (terms in use, detached except "loss").
    """

    def __init__(
        self, cfg: Any, device: torch.device | str = "cpu", check_finite: bool = True
    ) -> None:
        """Build every part from a ``PretrainConfig`` on ``device``.

        Args:
            cfg: ``deo.train.config.PretrainConfig``.
            device: where the modules live (the DINOv3 teacher is cast to bf16 on CUDA with dtype auto).
            check_finite: raise on a non-finite loss every step (one host sync per step).
        """
        super().__init__()
        loss = cfg.loss
        self.cfg = cfg
        device = torch.device(device)
        self.teacher: DINOv3Teacher | None = (
            build_teacher(cfg.teacher, device) if loss.needs_teacher else None
        )
        dim = self.teacher.embed_dim if self.teacher is not None else 0
        self.trainable: nn.Module = DEOTrainable(cfg, dim).to(device)
        # continual pretraining: load the student BEFORE the EMA copy, so student, EMA and F start equal
        self.domain_teacher: DEOStudent | None = None
        if cfg.model.init_from:
            f, loaded = init_from_backbone(
                self.trainable.student, cfg.model.init_from, cfg.model.ms_embed_init
            )
            if loss.msad_lambda > 0:  # F only serves MSAD's v^B
                check_partner(loaded, self.trainable.msad_partner, cfg.model.init_from)
                self.domain_teacher = f
        self.ema = EMATeacher(self._ms_branch(self.trainable))
        self.compression = CompressionLoss()
        self.coding_rate = CodingRateLoss(loss.eps, gather_distributed=dist.is_distributed())
        self.optical = (
            OpticalDistillLoss(loss.alpha1, loss.alpha2, loss.alpha3) if loss.needs_teacher else None
        )
        self.msad = MSADLoss(loss.msad_tau, loss.msad_smoothing) if loss.msad_lambda > 0 else None
        self.gsd = GSDLoss() if loss.gsd_weight > 0 else None
        self.check_finite_every_step = check_finite
        self.teacher_stream = SideStream(device, cfg.train.overlap_teachers)

    @staticmethod
    def _ms_branch(trainable: nn.Module) -> MSBranch:
        """The (unwrapped) trainable's student and head_ms, the structure the EMA averages."""
        t = unwrap(trainable)
        return MSBranch(t.student, t.head_ms)

    def train(self, mode: bool = True) -> DEOTask:
        """Set train mode on the trainable part; teachers stay in eval."""
        super().train(mode)
        self.ema.train(False)
        if self.teacher is not None:
            self.teacher.train(False)
        if self.domain_teacher is not None:
            self.domain_teacher.train(False)
        return self

    @torch.no_grad()
    def update_ema(self, momentum: float | None = None, weight: torch.Tensor | None = None) -> None:
        """EMA teacher <- momentum * teacher + (1 - momentum) * student (foreach lerp).

        ``weight``: ``1 - momentum`` as a device tensor instead (see :meth:`EMATeacher.update`).
        """
        self.ema.update(self._ms_branch(self.trainable), momentum, weight)

    @torch.no_grad()
    def _teachers(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """EMA MS embeddings ``t_ms`` (V_g, B, d) and DINOv3 ``t_cls`` (V_g, B, D), ``t_pmid``/``t_pF`` (V_g, B, N, D).

        With a domain teacher F (``model.init_from`` and MSAD): ``f_partner`` (V_g*B, h, w, C), F's final
        tokens of the sensor-B global views.
        """
        g = views["ms_global"]
        vg, b = g.shape[:2]
        out = {"t_ms": self.ema(g.flatten(0, 1)).view(vg, b, -1)}
        if self.teacher is not None:
            cls, (mid, fin) = self.teacher(views["opt_global"].flatten(0, 1))
            out["t_cls"] = cls.view(vg, b, -1)
            out["t_pmid"] = mid.view(vg, b, mid.shape[1], -1)
            out["t_pF"] = fin.view(vg, b, fin.shape[1], -1)
        if self.domain_teacher is not None:
            partner = unwrap(self.trainable).msad_partner
            key = "sar_global" if partner == "sar" else "opt_global"
            out["f_partner"] = domain_teacher_tokens(self.domain_teacher, views[key], partner)
        return out

    def teacher_grid(self, views: dict[str, torch.Tensor]) -> tuple[int, int]:
        """DINOv3 patch grid of the optical global views ((0, 0) without a teacher)."""
        if self.teacher is None:
            return (0, 0)
        h, w = views["opt_global"].shape[-2:]
        return (h // self.teacher.patch_size, w // self.teacher.patch_size)

    @torch.no_grad()
    def share_micro_batches(self, micro_views: list[dict[str, torch.Tensor]]) -> list[MicroBatchShare]:
        """The first pass of a gradient-accumulated step: each micro-batch's teacher outputs and Z^T Z.

        Runs the teachers and the student's MS global views (without graph) on every micro-batch, so
        that each micro-step's R (:meth:`forward` with its share) covers the whole step's batch and its
        gradient is the one of R over that batch. Costs one more student forward of the MS global
        views per micro-batch; the teachers run once, here.

        Args:
            micro_views: the step's micro-batches' views (see :meth:`DEOTrainable.forward`), all of one size.

        Returns:
            One :class:`MicroBatchShare` per micro-batch, in order.
        """
        device = micro_views[0]["ms_global"].device
        k = len(micro_views)
        seeds = torch.randint(2**62, (k,)).tolist()  # from the step's stream: a resume draws the same
        teachers, covs = [], []
        for views, seed in zip(micro_views, seeds, strict=True):
            t = self.teacher_stream.fork(self._teachers, views)  # beside the student (train.overlap_teachers)
            try:
                with micro_batch_stream(seed, device):
                    s = self.trainable(views, ms_global_only=True)["s_ms"]
            finally:
                self.teacher_stream.join()
            covs.append(self.coding_rate.covariance(s, t["t_ms"]))
            teachers.append(t)
        rows = micro_views[0]["ms_global"].shape[1]
        return [
            MicroBatchShare(t, sum(c for j, c in enumerate(covs) if j != i), rows * (k - 1), k, seed)
            for i, (t, seed) in enumerate(zip(teachers, seeds, strict=True))
        ]

    def forward(self, views: dict[str, torch.Tensor], step: int,
                share: MicroBatchShare | None = None) -> dict[str, torch.Tensor]:
        """Compute every loss term of one step.

        Args:
            views: augmented, normalised views (see :meth:`DEOTrainable.forward`), plus ``gsd_global``
                (V_g, B) and ``gsd_local`` (V_l, B) target GSDs in metres when ``loss.gsd_weight`` > 0.
            step: optimizer step (for error messages).
            share: under gradient accumulation, this micro-batch's :class:`MicroBatchShare`: the
                teachers are not run again and R covers the step's whole batch. ``loss`` then carries
                R's gradient ``micro_steps`` times (its value is unchanged), because the step divides
                each micro-step's loss by ``micro_steps`` while R's gradient w.r.t. these rows is already
                the whole batch's.

        Returns:
            ``loss`` (scalar with graph) and each term's detached value.

        Raises:
            FloatingPointError: a term is NaN or Inf (names the term, step and rank).
        """
        loss_cfg = self.cfg.loss
        if share is not None:  # the first pass ran the teachers; the student replays its random stream
            t, draws = share.teachers, micro_batch_stream(share.seed, views["ms_global"].device)
        else:  # train.overlap_teachers: the teachers' kernels run beside the student's forward (joined below)
            t, draws = self.teacher_stream.fork(self._teachers, views), nullcontext()
        try:
            if "f_partner" in t:  # continual pretraining: the student reads F's tokens, so wait for them
                self.teacher_stream.join()
            with draws:
                s = self.trainable(views, self.teacher_grid(views), t.get("f_partner"))
        finally:  # also when the student raises: nothing frees the views while the teachers read them
            self.teacher_stream.join()
        vg = t["t_ms"].shape[0]
        c, parts = self.compression(t["t_ms"], s["s_ms"])
        total = -c
        logs = dict(parts)
        if loss_cfg.gamma > 0:
            if share is None:
                r, p = self.coding_rate(s["s_ms"][:vg], t["t_ms"])
            else:
                r, p = self.coding_rate(s["s_ms"][:vg], t["t_ms"], share.other_cov, share.other_rows)
                r = r + (share.micro_steps - 1) * (r - r.detach())  # same value, micro_steps x the gradient
            total = total - loss_cfg.gamma * r
            logs.update(p)
        if self.optical is not None:
            o, p = self.optical(
                s.get("s_cls"),
                t.get("t_cls"),
                s.get("s_pF"),
                t.get("t_pF"),
                s.get("s_pmid"),
                t.get("t_pmid"),
            )
            total = total - o
            logs.update(p)
        if self.msad is not None:
            m, p = self.msad(s["va"], s["vb"])
            total = total + loss_cfg.msad_lambda * m
            logs.update(p)
        if self.gsd is not None:
            target = torch.cat([views["gsd_global"], views["gsd_local"]])
            gl, p = self.gsd(s["gsd"], target.to(s["gsd"].device))
            total = total + loss_cfg.gsd_weight * gl
            logs.update(p)
        out = {"loss": total, **logs}
        if self.check_finite_every_step:
            self.check_finite(out, step)
        return out

    @staticmethod
    def check_finite(out: dict[str, torch.Tensor], step: int) -> None:
        """Raise FloatingPointError naming the first non-finite term (one host sync for all terms)."""
        names = list(out)
        values = torch.stack([out[k].detach().float().reshape(()) for k in names])
        if bool(torch.isfinite(values).all()):
            return
        vals = values.tolist()
        bad = [f"loss.{k}={v}" for k, v in zip(names, vals, strict=True) if not math.isfinite(v)]
        raise FloatingPointError(f"{', '.join(bad)} at step {step}, rank {dist.get_rank()}")
