"""Control flow at import (qcompiler/specialize.py): If decided by constants or pinned inputs
is inlined; If left undecided runs on the reference and is refused, with the pin that would
remove it, by the targets that compile graphs; exporters' ``dim_value: -1`` is dynamic."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qcompiler
from builders import init, make_model, rng, save, tensor
from qcompiler import errors as E
from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.onnx_import import import_proto

W = rng(0).standard_normal((6, 4)).astype(np.float32)


def _branch(name: str, op: str, operand: float) -> onnx.GraphProto:
    """A branch reading the outer ``h`` (captured from the enclosing graph)."""
    nodes = [helper.make_node("Constant", [], [f"{name}_k"], value=helper.make_tensor(f"{name}_kv", TensorProto.FLOAT, [], [operand])),
             helper.make_node(op, ["h", f"{name}_k"], [f"{name}_out"])]
    return helper.make_graph(nodes, name, [], [tensor(f"{name}_out", [2, 4])])


def sample_rate_model(*, condition_from_constant=False, nested=False) -> onnx.ModelProto:
    """x[2,6] · W → If(sr > 8000) {h*2 | h+1} → Relu; like Silero VAD's sample-rate switch."""
    then_branch = _branch("fast", "Mul", 2.0)
    if nested:
        inner = helper.make_node("If", ["wide"], ["inner_out"], then_branch=_branch("wide_b", "Mul", 3.0),
                                 else_branch=_branch("narrow_b", "Sub", 0.5))
        then_branch = helper.make_graph(
            [helper.make_node("Greater", ["sr", "k12000"], ["wide"]), inner], "fast", [], [tensor("inner_out", [2, 4])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Greater", ["sr", "k8000"], ["cond"]),
             helper.make_node("If", ["cond"], ["branch"], name="rate_switch", then_branch=then_branch,
                              else_branch=_branch("slow", "Add", 1.0)),
             helper.make_node("Relu", ["branch"], ["y"])]
    inputs = [tensor("x", [2, 6])]
    inits = [init("W", W), init("k8000", np.array(8000, np.int64)), init("k12000", np.array(12000, np.int64))]
    if condition_from_constant:
        inits.append(init("sr", np.array(16000, np.int64)))
    else:
        inputs.append(tensor("sr", [], TensorProto.INT64))
    return make_model(nodes, inputs, [tensor("y", [2, 4])], inits)


def onnxruntime_outputs(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def op_types(model) -> list[str]:
    return [node.op_type for node in model.graph]


X = rng(1).standard_normal((2, 6)).astype(np.float32)


def test_constant_condition_is_inlined():
    proto = sample_rate_model(condition_from_constant=True)
    model = import_proto(proto)
    assert "If" not in op_types(model) and "Greater" not in op_types(model)
    got = ReferenceInterpreter(model).run({"x": X})["y"]
    np.testing.assert_allclose(got, onnxruntime_outputs(proto, {"x": X}), rtol=1e-6)


@pytest.mark.parametrize("sr", [16000, 8000])
def test_pinned_input_decides_the_branch(sr):
    proto = sample_rate_model()
    model = import_proto(proto, input_values={"sr": sr})
    assert "If" not in op_types(model)
    assert [v.name for v in model.graph.inputs] == ["x"]
    got = ReferenceInterpreter(model).run({"x": X})["y"]
    np.testing.assert_allclose(got, onnxruntime_outputs(proto, {"x": X, "sr": np.array(sr, np.int64)}), rtol=1e-6)


@pytest.mark.parametrize("sr", [16000, 10000, 8000])
def test_nested_if_resolves(sr):
    proto = sample_rate_model(nested=True)
    model = import_proto(proto, input_values={"sr": sr})
    assert "If" not in op_types(model)
    got = ReferenceInterpreter(model).run({"x": X})["y"]
    np.testing.assert_allclose(got, onnxruntime_outputs(proto, {"x": X, "sr": np.array(sr, np.int64)}), rtol=1e-6)


def test_undecided_if_runs_on_the_reference():
    proto = sample_rate_model(nested=True)
    model = import_proto(proto)
    assert op_types(model).count("If") == 1
    for sr in (16000, 10000, 8000):
        feeds = {"x": X, "sr": np.array(sr, np.int64)}
        got = ReferenceInterpreter(model).run(feeds)["y"]
        np.testing.assert_allclose(got, onnxruntime_outputs(proto, feeds), rtol=1e-6)


def test_pins_are_checked():
    proto = sample_rate_model()
    with pytest.raises(E.InputError, match="'rate', which is not a model input"):
        import_proto(proto, input_values={"rate": 1})
    with pytest.raises(E.InputError, match="int64, got a fraction"):
        import_proto(proto, input_values={"sr": 0.5})
    with pytest.raises(E.InputError, match="3 values for an input of 1 elements"):
        import_proto(proto, input_values={"sr": [1, 2, 3]})


@pytest.mark.slow
@pytest.mark.parametrize("target", ["npu-sim", "host"])
def test_targets_refuse_undecided_if_naming_the_pin(cli, tmp_path, target):
    path = save(sample_rate_model(), tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng(2).standard_normal((8, 2, 6)).astype(np.float32), sr=np.full(8, 16000, np.int64))
    result = cli(path, "-t", target, "-o", tmp_path / "out", "--preset", "w8a8", "--calib", calib)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "rate_switch" in line and "--input-value sr=VALUE" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_input_value_compiles_the_branch_taken(cli, tmp_path):
    proto = sample_rate_model(nested=True)
    path = save(proto, tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng(2).standard_normal((8, 2, 6)).astype(np.float32))
    result = cli(path, "-t", "host", "-o", tmp_path / "out", "--preset", "w8a8", "--calib", calib,
                 "--input-value", "sr=16000")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["verified"]["status"] == "bit-exact"
    assert [spec["name"] for spec in manifest["inputs"]] == ["x"]
    runner = qcompiler.load(tmp_path / "out")
    got = runner.run({"x": X})["y"]
    want = onnxruntime_outputs(proto, {"x": X, "sr": np.array(16000, np.int64)})
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.slow
def test_cli_input_value_malformed(cli, tmp_path):
    path = save(sample_rate_model(), tmp_path / "m.onnx")
    result = cli(path, "-t", "reference", "-o", tmp_path / "out", "--input-value", "sr")
    assert result.returncode == 2 and "expected NAME=VALUE" in result.stderr


@pytest.mark.parametrize("marker", [-1, 0])
def test_exporter_dynamic_dim_markers(marker):
    """paddle2onnx writes ``dim_value: -1`` (some exporters 0) for a dynamic dimension."""
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [tensor("x", [marker, 6])],
                       [tensor("y", [marker, 4])], [init("W", W)])
    with pytest.raises(E.ShapeError, match="--input-shape"):
        import_proto(proto)
    model = import_proto(proto, input_shapes={"x": [2, 6]})
    np.testing.assert_allclose(ReferenceInterpreter(model).run({"x": X})["y"], X @ W, rtol=1e-6)
