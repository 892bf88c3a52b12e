"""Continual pretraining: student, EMA teacher and frozen domain teacher F start from a loaded backbone."""

import numpy as np
import pytest
import rasterio
import timm
import torch
from safetensors.torch import load_file, save_file

from deo.data.loader import fill_true_colour
from deo.data.multicrop import MultiCrop
from deo.export import export_backbone
from deo.models.student import TINY_ARGS
from deo.train.config import LossConfig, ModelConfig, PretrainConfig, ViewConfig
from deo.train.task import DEOTask, _to_grid

EUROSAT_TO_DEO = [1, 2, 3, 4, 5, 6, 7, 12, 10, 11]
NO_OPTICAL = dict(alpha1=0.0, alpha2=0.0, alpha3=0.0)



def _cfg(init_from="", sar=False, **loss):
    return PretrainConfig(
        model=ModelConfig(head_hidden=64, head_out=32, drop_path=0.0, init_from=init_from, sar=sar),
        views=ViewConfig(n_local=2),
        loss=LossConfig(**{**NO_OPTICAL, "msad_lambda": 0.1, **loss}),
    )


@pytest.fixture(scope="module")
def views(shared_data):
    files = sorted((shared_data / "eurosat_ms").glob("*/*.tif"))[::27][:8]
    ms = []
    for f in files:
        with rasterio.open(f) as src:
            ms.append(src.read()[EUROSAT_TO_DEO])
    ms_t = torch.from_numpy(np.stack(ms).astype(np.int32)).clamp(min=1).to(torch.uint16)
    opt = fill_true_colour(ms_t, torch.zeros(8, 3, 64, 64, dtype=torch.uint8), torch.zeros(8, dtype=torch.bool))
    stats = {k: {"mean": x.float().mean((0, 2, 3)).tolist(), "std": x.float().std((0, 2, 3)).tolist()}
             for k, x in (("ms", ms_t), ("optical", opt))}
    return MultiCrop(_cfg().views, stats, seed=0)(ms_t, opt, [f.name for f in files], 0,
                                                  torch.full((8,), 10.0))


def _timm_swin(embed_dim=32, seed=1):
    torch.manual_seed(seed)
    args = {**TINY_ARGS, "embed_dim": embed_dim}
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, **args)


def _export(tmp_path, sar=False, student_name=None, seed=3):
    """A trained-looking deo export: a tiny student with perturbed weights."""
    torch.manual_seed(seed)
    task = DEOTask(_cfg(sar=sar, msad_lambda=0.0))
    with torch.no_grad():
        for p in task.trainable.student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    cfg = _cfg(sar=sar)
    if student_name:
        cfg.model.student = student_name
    out = str(tmp_path / f"backbone_sar{int(sar)}.safetensors")
    export_backbone(task.trainable.student, cfg, {}, ["B02", "B03", "B04", "B05", "B06", "B07", "B08",
                                                       "B8A", "B11", "B12"], out)
    return out


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_loads_stages_and_rgb_embed(tmp_path, fmt):
    swin = _timm_swin()
    path = tmp_path / f"swin.{fmt}"
    state = swin.state_dict()
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state}, path)
    task = DEOTask(_cfg(str(path)))
    student = task.trainable.student
    own = student.state_dict()
    for k, v in state.items():  # independent reference: the tensors saved by timm
        if k.startswith("head."):
            continue
        mine = "embeds.optical." + k[len("patch_embed."):] if k.startswith("patch_embed.") else "swin." + k
        assert torch.equal(own[mine], v), k
    # spectral MS init re-derived from the loaded RGB kernel: B04 <- R, scaled by 3/10
    w = state["patch_embed.proj.weight"]
    assert torch.allclose(own["embeds.ms.proj.weight"][:, 2], w[:, 0] * 0.3)
    assert torch.allclose(own["embeds.ms.proj.weight"][:, 5], w.mean(1) * 0.3)
    # student == F == EMA student at the start
    assert _states_equal(student, task.domain_teacher)
    assert _states_equal(student, task.ema.module.student)


def test_deo_export_loads_exactly_and_new_sar_embed_keeps_init(tmp_path):
    path = _export(tmp_path)
    saved = load_file(path)
    torch.manual_seed(0)
    fresh_sar = DEOTask(_cfg(sar=True, msad_lambda=0.0)).trainable.student.embeds["sar"].state_dict()
    torch.manual_seed(0)
    task = DEOTask(_cfg(path, sar=True, msad_lambda=0.0))
    own = task.trainable.student.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    assert sorted(k for k in own if k not in saved) == sorted(f"embeds.sar.{k}" for k in fresh_sar)
    for k, v in fresh_sar.items():
        assert torch.equal(own[f"embeds.sar.{k}"], v)
    # F only serves MSAD: without MSAD no frozen copy is kept
    assert task.domain_teacher is None


def test_mismatched_checkpoints_fail_clearly(tmp_path):
    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_swin(embed_dim=48).state_dict().items()}, str(wide))
    with pytest.raises(ValueError, match=r"shape mismatches .*embeds|shape mismatches .*patch_embed"):
        DEOTask(_cfg(str(wide)))
    other = _export(tmp_path, student_name="swin_tiny_patch4_window7_224")
    with pytest.raises(ValueError, match=r"holds a 'swin_tiny_patch4_window7_224' backbone but "
                                         r"model.student='swin_deo_tiny'"):
        DEOTask(_cfg(other))
    with_sar = _export(tmp_path, sar=True)
    with pytest.raises(ValueError, match=r"\['sar'\] that this student lacks.*model.sar=true"):
        DEOTask(_cfg(with_sar))
    no_sar = _export(tmp_path)
    with pytest.raises(ValueError, match=r"no trained 'sar' patch embedding"):
        DEOTask(_cfg(no_sar, sar=True))  # MSAD against SAR needs F to embed SAR
    with pytest.raises(FileNotFoundError, match="not found"):
        DEOTask(_cfg(str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match="not both"):
        ModelConfig(init_from=no_sar, rgb_weights=str(wide))


def test_domain_teacher_frozen_and_feeds_msad(tmp_path, views):
    path = _export(tmp_path)
    torch.manual_seed(0)
    task = DEOTask(_cfg(path))
    task.train()
    f = task.domain_teacher
    assert not f.training and not any(p.requires_grad for p in f.parameters())
    f_before = {k: v.clone() for k, v in f.state_dict().items()}
    student = task.trainable.student

    # MSAD's v^B is psi_B of F's tokens on the optical views, not the student's
    s = task.trainable(views, task.teacher_grid(views), task._teachers(views)["f_partner"])
    with torch.no_grad():
        tok_f = f.forward_features(views["opt_global"].flatten(0, 1), "optical")
        grid = tuple(student.forward_features(views["ms_global"].flatten(0, 1), "ms").shape[1:3])
        want = task.trainable.psi_b(_to_grid(tok_f, grid))
    torch.testing.assert_close(s["vb"].detach(), want)

    opt = torch.optim.AdamW(task.trainable.parameters(), lr=1e-3)
    for step in range(3):
        out = task(views, step)
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert all(p.grad is None for p in f.parameters())
            assert task.trainable.psi_b.weight.grad.abs().sum() > 0
            # the student's optical embed is outside MSAD's graph once F gives v^B
            assert student.embeds["optical"].proj.weight.grad is None
        opt.step()
        task.update_ema(0.9)
    assert all(torch.equal(f.state_dict()[k], v) for k, v in f_before.items())
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, f_before[k])]
    assert any(k.startswith("swin.layers") for k in moved)
    assert torch.isfinite(out["msad"])
