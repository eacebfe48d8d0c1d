"""eliminate-dead-code: unused nodes and initializers go; live ones and outputs stay."""

from __future__ import annotations

import numpy as np
from onnx import helper

from builders import init, make_model, run, tensor, to_ir
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def test_removes_unused_nodes_and_initializers():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead1"]),
        helper.make_node("Add", ["dead1", "unused_w"], ["dead2"]),
    ]
    model = to_ir(make_model(nodes, [tensor("x", [4])], [tensor("y", [4])], [init("unused_w", np.ones(4, np.float32))]))
    x = np.array([-1, 0, 1, 2], np.float32)
    run_pipeline(Pipeline.parse("eliminate-dead-code"), model, PassContext())
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert "unused_w" not in model.graph.initializers
    np.testing.assert_array_equal(run(model, {"x": x})["y"], np.maximum(x, 0))


def test_keeps_everything_live():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("x", [4])], [tensor("y", [4])]))
    assert not Pipeline.parse("eliminate-dead-code").passes[0].run(model, PassContext())
    assert len(list(model.graph)) == 2
