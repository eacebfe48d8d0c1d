"""fold-constants: constant subgraphs and static-shape chains become initializers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from builders import init, make_model, run, tensor, to_ir
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def test_folds_shape_chains_and_constant_math():
    # The legacy torch exporter's style: Reshape(x, Concat(Gather(Shape(x), 0), [-1])).
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Mul", ["two", "three"], ["six"]),
        helper.make_node("Mul", ["r", "six"], ["y"]),
    ]
    inits = [
        init("zero", np.array(0, np.int64)), init("axes", np.array([0], np.int64)),
        init("minus_one", np.array([-1], np.int64)),
        init("two", np.array(2.0, np.float32)), init("three", np.array(3.0, np.float32)),
    ]
    model = to_ir(make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 12])], inits))
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    before = run(model, {"x": x})["y"]
    run_pipeline(Pipeline.parse("fold-constants"), model, PassContext())
    assert [n.op_type for n in model.graph] == ["Reshape", "Mul"]
    np.testing.assert_array_equal(run(model, {"x": x})["y"], before)


def test_never_folds_dequantize_of_quantized_weights():
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    inits = [init("wq", np.ones((3, 2), np.int8)), init("ws", np.array(0.5, np.float32)), init("wz", np.array(0, np.int8))]
    model = to_ir(make_model(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 2])], inits))
    changed = Pipeline.parse("fold-constants").passes[0].run(model, PassContext())
    assert not changed
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]


def test_respects_size_limit():
    nodes = [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Add", ["x", "c"], ["y"])]
    inits = [init("a", np.ones(64, np.float32)), init("b", np.ones(64, np.float32))]
    model = to_ir(make_model(nodes, [tensor("x", [64])], [tensor("y", [64])], inits))
    run_pipeline(Pipeline.parse("fold-constants{max_elements=16}"), model, PassContext())
    assert len(list(model.graph)) == 2
    run_pipeline(Pipeline.parse("fold-constants"), model, PassContext())
    assert len(list(model.graph)) == 1


@pytest.mark.parametrize("shape,size", [([], 1), ([2, 3], 6)])
def test_small_constant_of_shape_is_folded(shape, size):
    """Legacy exports build masks from ConstantOfShape of a Constant node, including the
    empty shape (a scalar); both become initializers."""
    nodes = [helper.make_node("Constant", [], ["s"], value=helper.make_tensor("sv", TensorProto.INT64, [len(shape)], shape)),
             helper.make_node("ConstantOfShape", ["s"], ["fill"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Add", ["x", "fill"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])]))
    run_pipeline(Pipeline.parse("fold-constants"), model, PassContext())
    assert [n.op_type for n in model.graph] == ["Add"]
    assert model.graph.node(0).inputs[1].const_value.numpy().size == size
