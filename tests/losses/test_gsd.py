import torch

from deo.losses import GSDLoss


def test_gsd_is_mse_on_log():
    pred = torch.tensor([[1.0, 2.0], [0.5, 3.0]], requires_grad=True)
    target = torch.tensor([[10.0, 5.0], [2.0, 20.0]])
    loss, parts = GSDLoss()(pred, target)
    ref = sum((pred[i, j] - torch.log(target[i, j])) ** 2 for i in range(2) for j in range(2)) / 4
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
