"""What the pretraining driver refuses before Ray starts: weights files that cannot load, data too small
for one batch. On a worker each cost Ray's retries (about 50 s here) and ended in a worker traceback."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from deo.config import ConfigError, build_config
from deo.models.dinov3 import build_dinov3_vit
from deo.models.student import build_student, build_swin
from deo.models.weights import read_state_dict
from deo.train.config import PretrainConfig
from deo.train.driver import check_weights, validate

from conftest import run_cli


def _contiguous(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Good and broken weights files of the default config's teacher and student."""
    d = tmp_path_factory.mktemp("weights")
    cfg = PretrainConfig()
    save_file(_contiguous(build_dinov3_vit(cfg.teacher.name)), str(d / "teacher.safetensors"))
    torch.save(_contiguous(build_dinov3_vit(cfg.teacher.name)), d / "teacher.pth")
    save_file(_contiguous(build_student(cfg.model, 64)), str(d / "student.safetensors"))
    save_file(_contiguous(build_swin(cfg.model.student, 64)), str(d / "swin.safetensors"))
    (d / "text.safetensors").write_text("not weights")
    for name in ("teacher.safetensors", "teacher.pth"):
        data = (d / name).read_bytes()
        (d / f"cut_{name}").write_bytes(data[: len(data) // 2])
    return d


def test_broken_weights_files_are_named_with_what_was_expected(weights):
    for name, expected in (("text.safetensors", "is not a safetensors file"),
                           ("cut_teacher.safetensors", "is not a whole safetensors file .*a truncated copy"),
                           ("cut_teacher.pth", "is not a readable PyTorch checkpoint")):
        with pytest.raises(ValueError, match=f"{weights / name}.* {expected}"):
            read_state_dict(str(weights / name))


def test_the_driver_loads_each_weights_file_into_its_model_on_the_meta_device(weights):
    def check(*overrides):
        check_weights(build_config(PretrainConfig, overrides=list(overrides)))

    check(f"teacher.weights={weights / 'teacher.safetensors'}")
    check(f"teacher.weights={weights / 'teacher.pth'}")
    check(f"model.init_from={weights / 'swin.safetensors'}")  # a timm Swin, its MS embed derived (meta)
    check(f"model.rgb_weights={weights / 'swin.safetensors'}")
    for key, name, expected in (
        ("teacher.weights", "text.safetensors", "is not a safetensors file"),
        ("teacher.weights", "cut_teacher.pth", "is not a readable PyTorch checkpoint"),
        ("teacher.weights", "student.safetensors", "does not match Eva: missing"),  # a student as the teacher
        ("model.init_from", "cut_teacher.safetensors", "is not a whole safetensors file"),
        ("model.init_from", "teacher.safetensors", "neither a deo backbone export nor a timm Swin checkpoint"),
        ("model.rgb_weights", "teacher.pth", "does not match SwinTransformer"),
    ):
        with pytest.raises(ConfigError, match=f"^{key}={weights / name}: .*{expected}"):
            check(f"{key}={weights / name}")
    with pytest.raises(ConfigError, match=f"^model.init_from={weights} is a folder; expected a weights file "
                                          f"\\(for a deo run folder, its export: python pipelines/export.py"):
        check(f"model.init_from={weights}")
    # no optical loss, no teacher built: its weights are not read (as on the workers)
    check(f"teacher.weights={weights / 'text.safetensors'}", "loss.alpha1=0", "loss.alpha2=0", "loss.alpha3=0")


def test_pretrain_refuses_a_broken_teacher_file_before_ray_starts(weights, sample_shards, tmp_path):
    r = run_cli(["pipelines/pretrain.py", f"data={sample_shards}", f"run.storage={tmp_path}",
                 f"teacher.weights={weights / 'cut_teacher.safetensors'}"], timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: teacher.weights={weights / 'cut_teacher.safetensors'}: " in r.stderr
    assert "Traceback" not in r.stderr and "Ray" not in r.stderr + r.stdout  # no worker, no retries
    assert not (tmp_path / "default").exists()


def test_data_with_fewer_rows_than_one_global_batch_is_refused(sample_shards, bigearthnet_sar_shards):
    rows = validate(build_config(PretrainConfig, overrides=[f"data={sample_shards}"])).manifest["counts"]["ms"]
    validate(build_config(PretrainConfig, overrides=[f"data={sample_shards}", f"train.batch_size={rows}"]))
    with pytest.raises(ConfigError, match=f"has {rows} trainable rows .*train.batch_size={rows + 1}"):
        validate(build_config(PretrainConfig, overrides=[f"data={sample_shards}", f"train.batch_size={rows + 1}"]))
    with pytest.raises(ConfigError, match="rows with ms and sar"):
        validate(build_config(PretrainConfig, overrides=[f"data={bigearthnet_sar_shards}", "model.sar=true",
                                                         "train.batch_size=64"]))


def test_gpu_only_step_options_on_cpu_workers(sample_shards, capsys):
    """train.cuda_graph failed on each CPU worker in turn (4 starts); overlap_teachers did nothing, silently."""
    with pytest.raises(ConfigError, match="train.cuda_graph=true .* needs scaling.use_gpu=true"):
        validate(build_config(PretrainConfig, overrides=[f"data={sample_shards}", "train.cuda_graph=true"]))
    validate(build_config(PretrainConfig, overrides=[f"data={sample_shards}", "train.overlap_teachers=true"]))
    assert "train.overlap_teachers=true runs the teachers on a second CUDA stream" in capsys.readouterr().err
