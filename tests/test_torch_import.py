"""qcompiler.from_torch: torch.export → IR, same outputs as eager PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.errors import UnsupportedOpError


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.nn.functional.relu6(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


def test_from_torch_matches_eager():
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 16, 16)
    model = qcompiler.from_torch(net, (x,), input_names=["image"], output_names=["logits"])
    assert [v.name for v in model.graph.inputs] == ["image"]
    ours = qcompiler.ReferenceInterpreter(model).run({"image": x.numpy()})["logits"]
    with torch.no_grad():
        theirs = net(x).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_untraceable_module_is_a_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x * 2
            return x

    with pytest.raises(UnsupportedOpError, match="torch.export could not capture"):
        qcompiler.from_torch(DataDependent(), (torch.randn(3),))
