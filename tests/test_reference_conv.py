"""The reference interpreter's Conv/ConvInteger (qcompiler/reference_conv.py) against
onnxruntime (float) and onnx.reference's own kernel (integer, exact)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from builders import init, make_model, rng, tensor
from qcompiler.interpreter import ReferenceInterpreter

CASES = [
    # (input shape, weight shape, attributes)
    ((1, 3, 9, 9), (4, 3, 3, 3), {}),
    ((2, 4, 10, 7), (6, 4, 3, 2), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ((1, 8, 11, 11), (8, 1, 3, 3), {"group": 8, "pads": [1, 1, 1, 1]}),  # depthwise
    ((1, 6, 8, 8), (4, 3, 1, 1), {"group": 2}),  # grouped 1x1
    ((1, 2, 12, 12), (3, 2, 3, 3), {"dilations": [2, 3], "pads": [2, 1, 2, 3]}),
    ((1, 2, 11, 12), (3, 2, 3, 2), {"strides": [2, 3], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 9, 10), (3, 2, 2, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 9, 10), (3, 2, 4, 3), {"auto_pad": "VALID", "strides": [3, 2]}),
    ((2, 3, 16), (5, 3, 5), {"pads": [2, 2], "strides": [2]}),  # 1-D
    ((1, 2, 5, 6, 4), (3, 2, 3, 3, 2), {"pads": [1, 1, 0, 1, 1, 1]}),  # 3-D
]


def conv_model(xs, ws, attrs, integer=False):
    r = rng(3)
    if integer:
        w = r.integers(-128, 128, ws).astype(np.int8)
        zp = r.integers(-3, 4, ws[0]).astype(np.int8)
        node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], **attrs)
        inits = [init("w", w), init("xz", np.array(7, np.uint8)), init("wz", zp)]
        return make_model([node], [tensor("x", xs, TensorProto.UINT8)], [tensor("y", None, TensorProto.INT32)], inits)
    w = r.standard_normal(ws).astype(np.float32)
    b = r.standard_normal(ws[0]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    return make_model([node], [tensor("x", xs)], [tensor("y", None)], [init("w", w), init("b", b)])


@pytest.mark.parametrize("xs,ws,attrs", CASES)
def test_float_conv_matches_onnxruntime(xs, ws, attrs):
    model = conv_model(xs, ws, attrs)
    x = rng(4).standard_normal(xs).astype(np.float32)
    got = ReferenceInterpreter(model).run({"x": x})["y"]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("xs,ws,attrs", CASES)
def test_conv_integer_is_exact(xs, ws, attrs):
    model = conv_model(xs, ws, attrs, integer=True)
    x = rng(5).integers(0, 256, xs).astype(np.uint8)
    got = ReferenceInterpreter(model).run({"x": x})["y"]
    assert got.dtype == np.int32
    # onnx.reference's own float Conv on the zero-point-shifted operands in float64: another
    # implementation (im2col), exact for these integers
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits["w"].astype(np.float64) - inits["wz"].astype(np.float64).reshape((-1,) + (1,) * (len(ws) - 1))
    shifted = make_model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)],
                         [tensor("x", xs, TensorProto.DOUBLE)], [tensor("y", None, TensorProto.DOUBLE)], [init("w", w)])
    want = ReferenceEvaluator(shifted).run(None, {"x": x.astype(np.float64) - 7.0})[0]
    np.testing.assert_array_equal(got, want.astype(np.int64))
