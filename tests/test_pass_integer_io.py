"""integer-io: model state (a cache, a recurrent state) crosses the artifact boundary as int8."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import qcompiler
from builders import init, make_model, rng, tensor, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.errors import PipelineError
from qcompiler.integer_check import first_float_compute
from qcompiler.io_quantization import integer_io
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline

IO = "integer-io{tensors=state:-3.0:3.0;present:-3.0:3.0}"


def sliding_state() -> object:
    """``present = concat(state, x·W)[1:]`` (a window of 3 rows) and ``y = x·W``."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["new"]),
        helper.make_node("Unsqueeze", ["new", "axis1"], ["new3"]),
        helper.make_node("Concat", ["state", "new3"], ["window"], axis=1),
        helper.make_node("Slice", ["window", "one", "four", "axis1"], ["present"]),
        helper.make_node("Relu", ["new"], ["y"]),
    ]
    inits = [init("w", rng(1).standard_normal((4, 4)).astype(np.float32)), init("axis1", np.array([1], np.int64)),
             init("one", np.array([1], np.int64)), init("four", np.array([4], np.int64))]
    return make_model(nodes, [tensor("x", [1, 4]), tensor("state", [1, 3, 4])],
                      [tensor("present", [1, 3, 4]), tensor("y", [1, 4])], inits, opset=20)


def samples(n=16):
    return [{"x": rng(i).standard_normal((1, 4)).astype(np.float32),
             "state": rng(100 + i).standard_normal((1, 3, 4)).astype(np.float32)} for i in range(n)]


def calibrated(spec: str):
    model = to_ir(sliding_state())
    ctx = PassContext(calibration=CalibrationData.from_samples(samples()).bind(input_specs(model)))
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return model


def test_state_inputs_and_outputs_become_int8_with_fixed_parameters():
    model = calibrated(f"insert-fake-quant,{IO},lower-integer")
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    assert str(inputs["state"].dtype) == "INT8" and str(outputs["present"].dtype) == "INT8"
    assert str(inputs["x"].dtype) == "FLOAT" and str(outputs["y"].dtype) == "FLOAT"
    params = integer_io(model)
    assert set(params) == {"state", "present"} and params["state"] == params["present"]
    assert abs(params["state"]["scale"] - 6.0 / 255) < 1e-7
    assert first_float_compute(model) is None


@pytest.mark.parametrize("target", ["reference", pytest.param("npu-sim", marks=pytest.mark.slow)])
def test_the_kept_rows_round_trip_exactly(target, tmp_path):
    calib = {k: np.stack([s[k] for s in samples()]) for k in ("x", "state")}
    result = qcompiler.compile(sliding_state(), target, tmp_path / "out", calib=calib,
                               pipeline=f"insert-fake-quant,{IO},lower-integer")
    assert result.manifest["verified"]["status"] == "bit-exact"  # float samples quantized for the int8 input
    entry = {e["name"]: e for e in result.manifest["inputs"]}["state"]
    assert entry["dtype"] == "int8" and entry["quantization"]["zero_point"] == 0
    runner = qcompiler.load(tmp_path / "out")
    state = rng(7).integers(-128, 128, (1, 3, 4)).astype(np.int8)
    out = runner.run({"x": samples(1)[0]["x"], "state": state})
    assert out["present"].dtype == np.int8
    np.testing.assert_array_equal(out["present"][:, :2], state[:, 1:])


def test_does_nothing_without_tensors_and_refuses_what_it_cannot_do():
    model = calibrated("insert-fake-quant")
    assert not Pipeline.parse("integer-io").passes[0].run(model, PassContext())
    with pytest.raises(PipelineError, match="neither a graph input nor a graph output"):
        run_pipeline(Pipeline.parse("integer-io{tensors=nope:0:1}"), model, PassContext())
    with pytest.raises(PipelineError, match="is not NAME:MIN:MAX"):
        Pipeline.parse("integer-io{tensors=state:1:0}")
    float_model = to_ir(sliding_state())
    with pytest.raises(PipelineError, match="not read by QuantizeLinear only"):
        Pipeline.parse(IO).passes[0].run(float_model, PassContext())
