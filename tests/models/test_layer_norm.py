import pytest
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNormFp32
from torch import nn

from deo.models.dinov3 import build_dinov3_vit
from deo.models.layer_norm import InputDtypeLayerNorm, keep_input_dtype_in_layer_norms
from deo.models.student import build_student
from deo.train.config import ModelConfig


def _pair(dim=48):
    torch.manual_seed(0)
    ref = nn.LayerNorm(dim)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = nn.LayerNorm(dim)
    ours.load_state_dict(ref.state_dict())
    keep_input_dtype_in_layer_norms(ours)
    return ref, ours


def test_without_autocast_it_is_layer_norm_exactly():
    ref, ours = _pair()
    x = torch.randn(4, 7, 48) * 3 + 1
    assert isinstance(ours, InputDtypeLayerNorm)
    assert torch.equal(ours(x), ref(x))


def test_under_cpu_autocast_it_is_what_autocast_does_to_layer_norm():
    # CPU autocast already normalises bf16 in bf16 with float32 statistics; CUDA autocast does not, which
    # is the case this module exists for (its numerics are checked on the GPU by bench/gpu_step.py)
    ref, ours = _pair()
    x = (torch.randn(64, 48) * 40 + 300).bfloat16()  # a large mean: bf16 statistics would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_autocast = ours(x), ref(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_autocast)
    y_ref = ref(x.float())
    # only roundings to bf16 (output: a few ulp), nothing from the statistics
    assert ((y.float() - y_ref).abs() <= (y_ref.abs() + 1) * 2**-7).all()


def test_conversion_keeps_parameters_and_leaves_explicit_fp32_norms():
    model = nn.Sequential(nn.LayerNorm(8), TimmLayerNorm(8), LayerNormFp32(8), nn.Linear(8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep_input_dtype_in_layer_norms(model)
    assert [type(m) for m in model] == [InputDtypeLayerNorm, InputDtypeLayerNorm, LayerNormFp32, nn.Linear]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("build", [lambda: build_student(ModelConfig()), lambda: build_dinov3_vit("vit_deo_tiny_dinov3")])
def test_student_and_teacher_norms_are_converted(build):
    model = build()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(type(m) is InputDtypeLayerNorm for m in norms)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_under_cuda_autocast_bf16_stays_bf16_and_gradients_stay_close():
    # the case this module exists for: CUDA autocast would normalise in float32 (bench/layer_norm_bench.py
    # measures the same on a whole Swin stage's activations)
    ref, ours = _pair()
    ref, ours = ref.cuda().double(), ours.cuda()
    x = (torch.randn(4096, 48, device="cuda") * 3 + 1).bfloat16()
    g = torch.randn(4096, 48, device="cuda").bfloat16()
    xo = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ours(xo)
    y.backward(g)
    xr = x.double().requires_grad_(True)
    y_ref = ref(xr)
    y_ref.backward(g.double())
    assert y.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    assert rel(y, y_ref) < 1e-2 and rel(xo.grad, xr.grad) < 1e-2
    assert rel(ours.weight.grad, ref.weight.grad) < 1e-2 and rel(ours.bias.grad, ref.bias.grad) < 1e-2
