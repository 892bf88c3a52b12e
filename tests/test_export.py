"""Export a checkpoint to safetensors and load it back through deo.load_backbone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deo
from deo.bands import DEO_BANDS
from deo.config import build_config, read_yaml, to_dict
from deo.eval.checkpoint import load_checkpoint_student, resolve_checkpoint, weights_sha256
from deo.export import export_checkpoint, load_backbone, read_export, read_header
from deo.io import storage
from deo.models.student import build_student
from deo.train import checkpoint as ckpt
from deo.train.config import PretrainConfig
from deo.train.loop import train
from deo.train.runtime import LocalRuntime

from tests_helpers import REPO

STATS = {
    "ms": {"mean": [float(1000 + 100 * i) for i in range(10)], "std": [float(500 + 10 * i) for i in range(10)]},
    "optical": {"mean": [90.0, 100.0, 80.0], "std": [40.0, 35.0, 30.0]},
}


def write_run(run: str, steps=(5, 10)) -> dict[int, torch.nn.Module]:
    """A run folder with one checkpoint_* per step, each with a different random student."""
    cfg = PretrainConfig()
    students = {}
    for step in steps:
        torch.manual_seed(step)
        student = build_student(cfg.model, img_size=cfg.views.global_size)
        state = {"student": student.state_dict(), "config": to_dict(cfg), "step": step,
                 "stats": STATS, "bands": DEO_BANDS}
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(run, f"checkpoint_{step:08d}", "state.pt"), buf.getvalue())
        students[step] = student.eval()
    return students


def test_export_then_load_gives_identical_features(tmp_path):
    run = str(tmp_path / "runs" / "default")
    students = write_run(run)
    assert resolve_checkpoint(run).endswith("checkpoint_00000010")
    out, header = export_checkpoint(run)
    assert out == f"{run}/backbone.safetensors"
    assert json.loads(header["bands"])["ms"] == list(DEO_BANDS)
    assert json.loads(header["stats"]) == STATS and json.loads(header["step"]) == 10
    assert read_header((tmp_path / "runs/default/backbone.safetensors").read_bytes())["format"] == "deo-backbone"

    net = deo.load_backbone(out, bands=list(DEO_BANDS))
    x = torch.rand(2, 10, 64, 64) * 3000
    with torch.no_grad():
        want = students[10].forward_features(net.normalise(x, "ms"), "ms")
        got = net.forward_features(net.normalise(x, "ms"), "ms")
        other = students[5].forward_features(net.normalise(x, "ms"), "ms")
    assert got.shape == (2, 2, 2, net.num_features)  # timm NHWC, 64 px / 32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, other)  # the latest checkpoint was exported, not the first
    manual = (x - torch.tensor(STATS["ms"]["mean"])[:, None, None]) / torch.tensor(STATS["ms"]["std"])[:, None, None]
    torch.testing.assert_close(net.normalise(x, "ms"), manual)
    # numpy as rasterio reads it (uint16), and a wrong band count named before the arithmetic
    torch.testing.assert_close(net.normalise(x.round().numpy().astype("uint16"), "ms"),
                               net.normalise(x.round(), "ms"))
    with pytest.raises(ValueError, match=r"ms input must be \(B, 10, H, W\) with bands B02,.*got shape \(2, 13, 64, 64\)"):
        net.normalise(torch.zeros(2, 13, 64, 64), "ms")

    final, stages = net.forward_intermediates(manual, "ms", indices=[1, 3])
    ref_final, ref_stages = students[10].forward_intermediates(manual, "ms", indices=[1, 3])
    assert [tuple(s.shape) for s in stages] == [(2, 64, 8, 8), (2, 256, 2, 2)]  # NCHW per stage
    for a, b in zip(stages, ref_stages, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the checkpoint and its export name the same weights
    _, _, meta = load_checkpoint_student(run)
    state, emeta = read_export(out)
    assert meta["weights_sha256"] == emeta["weights_sha256"] == weights_sha256(students[10].state_dict())
    assert net.weights_sha256 == meta["weights_sha256"]


def test_wrong_bands_and_channels_raise(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, steps=(1,))
    out, _ = export_checkpoint(run, str(tmp_path / "b.safetensors"))
    swapped = list(DEO_BANDS)
    swapped[7], swapped[8] = swapped[8], swapped[7]
    with pytest.raises(ValueError, match="B8A,B11"):
        load_backbone(out, bands=swapped)
    with pytest.raises(ValueError, match="do not match"):
        load_backbone(out, bands={"optical": ["B", "G", "R"]})
    net = load_backbone(out, bands={"ms": [b.lower() for b in DEO_BANDS], "optical": ["r", "g", "b"]})
    # comma strings and presets, as s2_band_order takes them (a string was read one character at a time)
    load_backbone(out, bands={"ms": ",".join(DEO_BANDS), "optical": "R,G,B"})
    load_backbone(out, bands="deo")
    with pytest.raises(ValueError, match="ms input bands B01,B02,.* do not match the backbone's B02,"):
        load_backbone(out, bands="eurosat")  # 13 bands: select the 10 first
    with pytest.raises(ValueError, match=r"\(B, 10, H, W\)"):
        net.forward_features(torch.zeros(1, 13, 64, 64), "ms")
    with pytest.raises(ValueError, match="do not match"):
        net.forward_features(torch.zeros(1, 10, 64, 64), "ms", bands=swapped)
    with pytest.raises(ValueError, match="modality"):
        net.forward_features(torch.zeros(1, 2, 64, 64), "sar")


def test_export_and_load_through_s3(tmp_path, s3_bucket):
    run = f"{s3_bucket}/runs/default"
    students = write_run(run, steps=(3,))
    out, _ = export_checkpoint(run)
    assert out == f"{run}/backbone.safetensors" and storage.exists(out)
    net = load_backbone(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x, "optical"), students[3].forward_features(x, "optical"))


def test_not_an_export_and_missing_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a deo backbone"):
        load_backbone(str(tmp_path / "plain.safetensors"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_backbone(str(tmp_path / "empty_run"))


def test_import_deo_stays_light():
    code = "import sys, deo; print('torch' in sys.modules); print(callable(deo.load_backbone))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_gsd_of_the_training_tiles_is_recorded_from_the_manifest(tmp_path):
    """The export's GSD describes the tiles trained on (it was a constant {"ms": 10.0}): the median by
    tile count and [min, max] of the ok S2 sources, the optical at the same extent in optical_px."""
    from deo.io.shards import manifest_gsd

    manifest = {"tile": {"ms_px": 64, "optical_px": 128}, "sources": [
        {"kind": "s2_stacked", "status": "ok", "gsd": 10.0, "tiles": 40},
        {"kind": "s2_bands", "status": "ok", "gsd": 100.0, "tiles": 30},
        {"kind": "s2_bands", "status": "ok", "gsd": 900.0, "tiles": 20},
        {"kind": "s2_bands", "status": "failed", "gsd": 5.0, "tiles": 0},
        {"kind": "s2_bands", "status": "partial", "gsd": 1000.0, "tiles": 5},  # its written tiles count
        {"kind": "aerial", "status": "ok", "gsd": 0.5, "tiles": 99},  # aerial-only rows are not trained
    ]}
    gsd, gsd_range = manifest_gsd(manifest)
    assert gsd == {"ms": 100.0, "optical": 50.0}  # 40 of 95 tiles at 10 m: the 48th is at 100 m
    assert gsd_range == {"ms": [10.0, 1000.0], "optical": [5.0, 500.0]}
    assert manifest_gsd({"sources": []}) == ({}, {})

    # a checkpoint without gsd (older runs) takes it from the run's manifest copy, and the export keeps it
    run = str(tmp_path / "run")
    write_run(run, steps=(5,))
    storage.write_text(storage.join(run, "manifest.json"), json.dumps(manifest))
    out, header = export_checkpoint(run)
    assert json.loads(header["gsd"]) == gsd and json.loads(header["gsd_range"]) == gsd_range
    net = load_backbone(out)
    assert net.gsd == gsd and net.gsd_range == gsd_range


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_an_unreadable_newest_checkpoint_is_named_and_skipped_for_the_one_before(tmp_path, capsys, damage):
    """What a worker lost mid-copy leaves: export/evaluate of the run fell over with torch's raw error."""
    import random

    from deo.train.checkpoint import UnreadableCheckpoint, load_state, newest_readable_state

    run = str(tmp_path / "run")
    write_run(run, steps=(5, 10))
    state = tmp_path / "run" / "checkpoint_00000010" / "state.pt"
    size = state.stat().st_size
    noise = [random.Random(seed).randbytes(4096) for seed in range(20)]  # the unpickler raises many kinds
    for data in ({"truncate": [state.read_bytes()[: size // 2]], "random": noise, "empty": [b""]}[damage]):
        state.write_bytes(data)
        with pytest.raises(UnreadableCheckpoint, match=f"checkpoint {state} is unreadable"):
            load_state(str(state.parent))
    with pytest.raises(UnreadableCheckpoint, match=f"checkpoint {state} is unreadable"):
        load_state(str(state.parent))
    assert newest_readable_state(run)["step"] == 5
    out, header = export_checkpoint(run, str(tmp_path / "b.safetensors"))
    assert json.loads(header["step"]) == 5 and header["source"].endswith("checkpoint_00000005")
    assert f"skipping: checkpoint {state} is unreadable" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"checkpoint {state} is unreadable"):  # named: no fallback
        export_checkpoint(str(state.parent), str(tmp_path / "c.safetensors"))
    # none loads: resuming must not start the run over (that rewrites its config and metrics)
    other = tmp_path / "run" / "checkpoint_00000005" / "state.pt"
    other.write_bytes(b"")
    with pytest.raises(UnreadableCheckpoint, match="no checkpoint of .* loads: .*; so the run cannot resume"):
        newest_readable_state(run)
    with pytest.raises(ValueError, match="no checkpoint of .* loads: ") as e:  # exporting it says no more
        export_checkpoint(run, str(tmp_path / "d.safetensors"))
    assert "resume" not in str(e.value)


@pytest.mark.filterwarnings("ignore:teacher.weights is empty")
def test_the_export_holds_the_trained_student_not_the_ema(sample_shards, tmp_path):
    """A run's exported backbone is its student (not the EMA teacher), weight for weight."""
    cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), [
        f"data={sample_shards}", f"run.storage={tmp_path}", "run.name=x", "train.batch_size=8",
        "views.n_local=2", "model.drop_path=0", "run.tensorboard=false", "train.max_steps=2",
        "train.warmup_steps=0"])
    uri = str(tmp_path / "x")
    train(cfg, LocalRuntime(uri, device=torch.device("cpu")), uri)
    state = ckpt.load_state(str(tmp_path / "x" / ckpt.checkpoint_name(2)))
    exported, _ = read_export(str(tmp_path / "x" / "backbone.safetensors"))
    assert exported.keys() == state["student"].keys()
    for k, v in state["student"].items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)
    ema = {k.removeprefix("module.student."): v for k, v in state["ema"].items()}
    assert any(not torch.equal(ema[k], v) for k, v in state["student"].items() if v.is_floating_point())
