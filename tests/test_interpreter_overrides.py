"""Where ``onnx.reference`` is wrong, the interpreter overrides it: each override against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

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


def test_loop_stacks_scan_outputs_along_a_new_axis():
    """A Loop with a scalar and a 2x3 scan output: (N,) and (N, 2, 3), as onnxruntime
    stacks them (onnx.reference's vstack gives (N, 1) and (2N, 3))."""
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["step_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["acc_in", "step_f"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["acc_out"], ["scalar_scan"]),
         helper.make_node("Mul", ["x", "acc_out"], ["matrix_scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("scalar_scan", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("matrix_scan", TensorProto.FLOAT, [2, 3])])
    loop = helper.make_node("Loop", ["trips", "", "acc0"], ["acc", "scalars", "matrices"], body=body)
    model = make_model([loop], [tensor("x", [2, 3])],
                       [tensor("acc", []), tensor("scalars", [4]), tensor("matrices", [4, 2, 3])],
                       [numpy_helper.from_array(np.array(4, np.int64), "trips"), numpy_helper.from_array(np.array(0.5, np.float32), "acc0")])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = ReferenceInterpreter(import_proto(model)).run({"x": x})
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for name, expected in zip(["acc", "scalars", "matrices"], want):
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected)
