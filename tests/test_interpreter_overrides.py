"""Where ``onnx.reference`` is wrong, the interpreter overrides it: each override against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from builders import make_model, rng, tensor
from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.onnx_import import import_proto


def _both(model, feeds):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ReferenceInterpreter(import_proto(model)).run(feeds)
    return want, list(got.values())


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_batchnorm_uses_running_statistics_whatever_the_attributes(opset):
    """``onnx.reference`` switches to the batch's statistics when ``momentum`` is set (an
    attribute paddle2onnx writes): PP-OCRv4's detector was off by 0.63."""
    r = rng(opset)
    params = [numpy_helper.from_array(r.uniform(0.5, 1.5, 3).astype(np.float32), n) for n in ("s", "b", "m", "v")]
    attrs = {"momentum": 0.9} if opset < 14 else {"momentum": 0.9, "training_mode": 0}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3, **attrs)
    model = make_model([node], [tensor("x", [2, 3, 4, 5])], [tensor("y", [2, 3, 4, 5])], params, opset=opset)
    x = r.standard_normal((2, 3, 4, 5)).astype(np.float32) * 3 + 1
    want, got = _both(model, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 4, 5, 6), (1, 2, 3, 4, 5)])
def test_global_max_pool_reduces_every_spatial_axis(shape):
    """``onnx.reference`` reduces axes (rank-2, rank-1): right only for 4-D inputs (Magika
    feeds it a 3-D tensor)."""
    model = make_model([helper.make_node("GlobalMaxPool", ["x"], ["y"])], [tensor("x", list(shape))],
                       [tensor("y", list(shape[:2]) + [1] * (len(shape) - 2))])
    x = rng(1).standard_normal(shape).astype(np.float32)
    want, got = _both(model, {"x": x})
    assert got[0].shape == want[0].shape
    np.testing.assert_array_equal(got[0], want[0])
