"""Quantization-aware training with the compiler's quantizer (qcompiler.qat)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qcompiler
from builders import rng
from qcompiler import qat
from qcompiler.errors import UserError
from qcompiler.interpreter import ReferenceInterpreter


def _quantizers(model):
    return [m for m in model.modules() if type(m).__name__ == "ActivationFakeQuant"]


def test_fake_quantize_is_onnx_quantize_dequantize_with_a_straight_through_gradient():
    from onnx import TensorProto, helper

    x = np.concatenate([np.arange(-300, 300) * 0.025, [0.0125, 0.0375, -0.0125, 1e6, -1e6]]).astype(np.float32)  # ties
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.025]), helper.make_tensor("z", TensorProto.INT8, [], [3])])
    expected = ReferenceInterpreter(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).run({"x": x})["y"]
    t = torch.from_numpy(x).requires_grad_(True)
    y = qat.fake_quantize(t, 0.025, 3, -128, 127)
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    y.sum().backward()
    inside = (x / 0.025 + 3 >= -128) & (x / 0.025 + 3 <= 127)
    np.testing.assert_array_equal(t.grad.numpy(), inside.astype(np.float32))


def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()


def test_prepare_places_quantizers_where_the_compiler_does():
    net = small_cnn()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    model = qat.prepare(net, weights="int4:per-channel")
    # input, ReLU (Conv+BN+ReLU fused), the Linear output: pooling/flatten keep their input's
    assert len(_quantizers(model)) == 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # folded into the conv
    parametrized = [m for m in model.modules() if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    assert len(parametrized) == 2
    x = torch.from_numpy(rng(0).standard_normal((8, 1, 4, 4)).astype(np.float32))
    for q in _quantizers(model):  # observing: activations pass unchanged
        q.observing = True
    conv = parametrized[0]
    w = conv.weight  # int4 per-channel grid: at most 15 levels per channel
    assert all(len(torch.unique(w[c])) <= 15 for c in range(w.shape[0]))
    with torch.no_grad():
        folded = torch.nn.functional.conv2d(x, conv.parametrizations.weight.original, conv.bias, padding=1)
        np.testing.assert_allclose(folded.numpy(), net[1](net[0](x)).numpy(), rtol=1e-5, atol=1e-5)


def test_a_conv_read_twice_is_quantized_and_a_model_without_layers_gets_no_weight_quantizers():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y  # the conv output is not only its ReLU's

    model = qat.prepare(Twice())
    assert len(_quantizers(model)) == 4  # input, conv, relu, add
    assert len(_quantizers(qat.prepare(torch.nn.Sequential(torch.nn.ReLU())))) == 2
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in qat.prepare(torch.nn.ReLU()).modules())


def test_bad_formats_and_missing_ranges_are_user_errors():
    with pytest.raises(UserError, match="symmetric per-channel"):
        qat.prepare(small_cnn(), weights="int8:per-channel:asym")
    with pytest.raises(UserError, match="8-bit per-tensor"):
        qat.prepare(small_cnn(), activations="int16:per-tensor:asym")
    with pytest.raises(UserError, match="run qat.calibrate first"):
        qat.prepare(small_cnn())(torch.zeros(1, 1, 4, 4))


@pytest.fixture(scope="module")
def digits_qat(tmp_path_factory):
    """The bundled digits CNN: post-training W4A8 through the compiler, and W4A8 QAT."""
    from qcompiler.examples import digits_cnn as digits

    work = tmp_path_factory.mktemp("qat")
    x_tr, y_tr, x_te, y_te = digits.dataset()
    onnx_path = digits.export_onnx(work / "digits.onnx")
    calib = digits.write_calibration(work / "calib.npz")
    qcompiler.compile(str(onnx_path), "reference", work / "ptq", preset="w4a8", calib=str(calib))
    ptq = qcompiler.load(work / "ptq")
    ptq_top1 = float(np.mean([ptq.run({"image": x[None]})["logits"].argmax() == y for x, y in zip(x_te, y_te)]))
    torch.manual_seed(0)
    model = qat.prepare(digits.trained_network(), weights="int4:per-channel")
    qat.calibrate(model, [torch.from_numpy(x_tr[i:i + 64]) for i in range(0, 128, 64)])  # the PTQ calibration images
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model.train()
    for _ in range(5):
        for batch in torch.randperm(len(x), generator=order).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_te)).numpy()
    exported = qat.export(model, (torch.zeros(1, 1, 8, 8),), input_names=["image"], output_names=["logits"])
    step = _quantizers(model)[-1].params()[0]
    return {"ptq_top1": ptq_top1, "qat_top1": float((logits.argmax(1) == y_te).mean()), "logits": logits,
            "exported": onnx.ModelProto.FromString(__import__("onnx_ir").to_proto(exported).SerializeToString()),
            "x_te": x_te, "y_te": y_te, "step": step}


@pytest.mark.slow
def test_qat_beats_post_training_at_w4a8(digits_qat):
    print(f"digits W4A8 top-1: post-training {digits_qat['ptq_top1']:.4f}, QAT {digits_qat['qat_top1']:.4f}")
    assert digits_qat["qat_top1"] >= digits_qat["ptq_top1"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["reference", "host", "npu-sim", "fpga-sim"])
def test_the_compiled_qat_model_reproduces_it_on_every_target(digits_qat, target, tmp_path):
    """No calibration: the trained scales and int4 weights are lowered as they are. The
    artifact is bit-exact with the reference interpreter (verified) and within one output
    step of the QAT model in torch (integer requantization vs float arithmetic)."""
    from qcompiler.integer_check import first_float_compute
    from qcompiler.onnx_import import import_proto

    model = import_proto(digits_qat["exported"], source="qat")
    result = qcompiler.compile(model, target, tmp_path / "out")
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert first_float_compute(result.model) is None
    runner = qcompiler.load(tmp_path / "out")
    x_te = digits_qat["x_te"][:100]
    ours = np.stack([runner.run({"image": x[None]})["logits"][0] for x in x_te])
    theirs = digits_qat["logits"][:100]
    assert np.abs(ours - theirs).max() <= digits_qat["step"] * 1.01
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99
