import pytest
import torch
from safetensors.torch import save_file

from deo.models.dinov3 import build_dinov3_vit, build_teacher, default_layers
from deo.train.config import TeacherConfig


def _ref_outputs(vit, x, layers):
    # independent path: timm's own forward_intermediates on the raw model
    out = vit.forward_intermediates(x, indices=layers, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True)
    return out[-1][1][:, 0], [p for p, _ in out]


def _meta_keys(state):
    meta = {}
    for k, v in state.items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta[k] = v
    meta["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    meta["rope_embed.periods"] = torch.ones(8)
    return meta


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "meta"])
def test_teacher_weights_round_trip(tmp_path, fmt):
    src = build_dinov3_vit("vit_deo_tiny_dinov3").eval()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "t.safetensors"
        save_file(state, str(path))
    elif fmt == "pth":
        path = tmp_path / "t.pth"
        torch.save({"model": state}, path)
    else:
        path = tmp_path / "meta.pth"
        torch.save(_meta_keys(state), path)
    teacher = build_teacher(TeacherConfig(weights=str(path)))
    x = torch.randn(2, 3, 64, 64)
    cls, patches = teacher(x)
    ref_cls, ref_patches = _ref_outputs(src, x, [2, 3])
    torch.testing.assert_close(cls, ref_cls)
    for a, b in zip(patches, ref_patches, strict=True):
        assert a.shape == (2, 16, 64)
        torch.testing.assert_close(a, b)


def test_teacher_weights_from_s3(s3_bucket, tmp_path):
    from deo.io import storage

    src = build_dinov3_vit("vit_deo_tiny_dinov3")
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    uri = f"{s3_bucket}/weights/t.safetensors"
    storage.write_bytes(uri, path.read_bytes())
    teacher = build_teacher(TeacherConfig(weights=uri))
    torch.testing.assert_close(teacher.vit.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_teacher(TeacherConfig(weights=str(tmp_path / "none.safetensors")))
    other = build_dinov3_vit("vit_small_patch16_dinov3")
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="shape mismatches"):
        build_teacher(TeacherConfig(weights=str(path)))
    with pytest.raises(ValueError, match="teacher.layers"):
        build_teacher(TeacherConfig(layers=[3, 7]))
    with pytest.raises(ValueError, match=r"final the teacher's last block \(3 of its 4\).*got \[1, 2\]"):
        build_teacher(TeacherConfig(layers=[1, 2]))  # DESIGN: [cls] and p_F come from the last block
    with pytest.raises(ValueError, match="teacher.layers"):
        build_teacher(TeacherConfig(layers=[3]))
    with pytest.raises(ValueError, match="teacher.name"):
        build_teacher(TeacherConfig(name="vit_base_patch16_224"))


def test_empty_layers_pick_the_public_codes_blocks_for_the_depth():
    assert default_layers(12) == [8, 11] and default_layers(24) == [15, 23] and default_layers(4) == [2, 3]
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        assert build_teacher(TeacherConfig()).layers == [2, 3]
        assert build_teacher(TeacherConfig(name="vit_base_patch16_dinov3")).layers == [8, 11]


def test_random_teacher_warns_and_is_frozen():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        teacher = build_teacher(TeacherConfig())
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.vit.training
    cls, _ = teacher(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert not cls.requires_grad


def test_compiled_teacher_blocks_share_one_graph_and_match_eager():
    """train.compile compiles DINOv3 block by block: every block shares one forward-only graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from deo.train.config import PretrainConfig
    from deo.train.loop import compiled_regions, configure_models

    torch._dynamo.reset()
    counters.clear()
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        teacher = build_teacher(TeacherConfig(layers=[1, 3]))
    x = torch.randn(2, 3, 32, 32)
    want_cls, want_patches = teacher(x)
    cfg = PretrainConfig()
    cfg.train.compile = True
    student = torch.nn.Module()
    student.swin = torch.nn.Module()  # no Swin regions: this test looks at the teacher's alone
    configure_models(student, cfg, backend="eager", teacher=teacher)
    assert len(compiled_regions(teacher)) == len(teacher.vit.blocks) == 4
    for _ in range(2):
        cls, patches = teacher(x)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    torch.testing.assert_close(cls, want_cls)
    for got, want in zip(patches, want_patches, strict=True):
        torch.testing.assert_close(got, want)
