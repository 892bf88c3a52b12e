import pytest
import torch
from torch import nn

from deo.models.ema import EMATeacher


def test_ema_update_is_lerp_and_copies_int_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMATeacher(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(8, 4))  # changes running stats and num_batches_tracked
    ema.update(model, 0.9)
    now = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * now[k])
        else:
            assert torch.equal(v, now[k])
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.module.training


def test_ema_rejects_different_structure():
    ema = EMATeacher(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError):
        ema.update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)
