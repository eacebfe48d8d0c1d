"""remove-identity: Identity/Dropout/same-type Cast/no-op Reshape/identity Transpose vanish."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from builders import init, make_model, run, tensor, to_ir
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def test_removes_no_ops_and_keeps_outputs():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b"], ["c"]),
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["d", "shape"], ["e"]),
        helper.make_node("Transpose", ["e"], ["f"], perm=[0, 1]),
        helper.make_node("Sigmoid", ["f"], ["y"]),
    ]
    model = to_ir(make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], [init("shape", np.array([2, 3], np.int64))]))
    x = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)
    before = run(model, {"x": x})["y"]
    run_pipeline(Pipeline.parse("remove-identity"), model, PassContext())
    assert [n.op_type for n in model.graph] == ["Relu", "Sigmoid"]
    np.testing.assert_array_equal(run(model, {"x": x})["y"], before)


def test_keeps_ops_that_change_something():
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["b", "shape"], ["c"]),
        helper.make_node("Transpose", ["c"], ["y"], perm=[1, 0]),
    ]
    model = to_ir(make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], [init("shape", np.array([3, 2], np.int64))]))
    changed = Pipeline.parse("remove-identity").passes[0].run(model, PassContext())
    assert not changed
    assert [n.op_type for n in model.graph] == ["Cast", "Cast", "Reshape", "Transpose"]


def test_identity_feeding_graph_output_from_input_is_kept():
    model = to_ir(make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])]))
    run_pipeline(Pipeline.parse("remove-identity"), model, PassContext())
    assert [n.op_type for n in model.graph] == ["Identity"]  # y cannot alias the graph input x
