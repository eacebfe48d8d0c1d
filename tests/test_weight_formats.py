"""Weight formats in lower-integer: asymmetric (per tensor/channel), uint8, per-group int4."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import qcompiler
from builders import init, make_model, mlp, rng, run, tensor, to_ir
from qcompiler.graph import const_array
from qcompiler.instruments import sqnr_db
from qcompiler.integer_check import first_float_compute
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline
from test_pass_lower_integer import cnn_relu6, quantize

MODELS = {"mlp": (mlp, (1, 16)), "cnn": (cnn_relu6, (1, 3, 8, 8))}
LINEAR = ("MatMulInteger", "ConvInteger", "IntMatMul")


def lowered(model_name: str, weights: str):
    build, shape = MODELS[model_name]
    model = to_ir(build())
    feeds = [{model.graph.inputs[0].name: rng(500 + i).standard_normal(shape).astype(np.float32)} for i in range(4)]
    ctx = quantize(model, shape, f"insert-fake-quant{{weights={weights}}}")
    fake = [run(model, f) for f in feeds]
    run_pipeline(Pipeline.parse("lower-integer"), model, ctx)
    out = [run(model, f) for f in feeds]
    name = model.graph.outputs[0].name
    return model, ctx, min(sqnr_db(a[name], b[name]) for a, b in zip(fake, out))


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("weights", ["int8:per-channel:asym", "int8:per-tensor:asym", "uint8:per-tensor", "uint8:per-channel",
                                     "int4:per-channel:asym"])
def test_asymmetric_weights_keep_their_zero_points(model_name, weights):
    model, _ctx, db = lowered(model_name, weights)
    assert first_float_compute(model) is None
    products = [n for n in model.graph if n.op_type in LINEAR]
    assert products and all(len(n.inputs) == 4 for n in products)  # the weight zero point is an input
    assert any(np.any(const_array(n.inputs[3]) != 0) for n in products)
    assert all(const_array(n.inputs[1]).dtype in (np.int8, np.int16) or "int4" in const_array(n.inputs[1]).dtype.name
               for n in products)  # uint8 weights moved to int8
    assert db > 40  # integer arithmetic ≈ the fake-quant model


def test_symmetric_weights_have_no_weight_zero_point():
    model, ctx, _ = lowered("cnn", "int8:per-channel")
    assert all(len(n.inputs) == 3 for n in model.graph if n.op_type in LINEAR)
    assert "decisions" not in ctx.report


@pytest.mark.parametrize("weights", ["int4:per-group:8", "int4:per-group:8:asym", "int8:per-group:4"])
def test_per_group_weights_are_regridded_per_output_channel(weights):
    model, ctx, db = lowered("mlp", weights)
    assert first_float_compute(model) is None
    decisions = ctx.report["decisions"]
    assert len(decisions) == 2 and all(d["relative_to_peak"] < 1e-4 and 10 <= d["bits"] <= 16 for d in decisions)
    assert all(const_array(n.inputs[1]).dtype == np.int16 for n in model.graph if n.op_type == "IntMatMul")
    assert db > 40


def test_per_group_conv_weights_are_refused_by_name():
    model, ctx, _ = lowered("cnn", "int4:per-group:8")
    kept = ctx.report["integer_lowering"]["kept_float"]
    assert [k["op"] for k in kept] == ["Conv", "Conv"]
    assert all("per-group" in k["reason"] for k in kept)
    assert "per-group (blocked) weights lower only for 2-D MatMul/Gemm weights" in first_float_compute(model)


def test_weight_scaled_along_the_wrong_axis_is_refused():
    """A per-channel MatMul weight scaled along its rows (K) has no per-output-channel form."""
    w = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("MatMul", ["xd", "wd"], ["y0"]),
        helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    inits = [init("w", w), init("ws", np.array([0.1, 0.2, 0.3, 0.4], np.float32)), init("wz", np.zeros(4, np.int8)),
             init("xs", np.array(0.05, np.float32)), init("xz", np.array(0, np.int8)),
             init("ys", np.array(0.1, np.float32)), init("yz", np.array(0, np.int8))]
    model = to_ir(make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 4])], inits, opset=21))
    ctx = PassContext()
    run_pipeline(Pipeline.parse("lower-integer"), model, ctx)
    (kept,) = ctx.report["integer_lowering"]["kept_float"]
    assert kept["op"] == "MatMul" and "axis 0, not the output channels (axis 1)" in kept["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", "npu-sim", "fpga-sim"])
def test_weight_formats_on_integer_targets(target, tmp_path):
    """Every format compiles bit-exactly (the build verification compares with the reference)."""
    cases = [("mlp", "int8:per-channel:asym"), ("cnn", "int8:per-channel:asym"), ("cnn", "uint8:per-tensor"),
             ("mlp", "int4:per-group:8:asym")]
    for i, (model_name, weights) in enumerate(cases):
        build, shape = MODELS[model_name]
        model = to_ir(build())
        calib = {model.graph.inputs[0].name: np.stack([rng(j).standard_normal(shape).astype(np.float32) for j in range(16)])}
        result = qcompiler.compile(model, target, tmp_path / str(i), calib=calib,
                                   pipeline=f"insert-fake-quant{{weights={weights}}},lower-integer")
        assert result.manifest["verified"]["status"] == "bit-exact", (model_name, weights)


def test_int4_matmul_weights_stay_int4_in_the_integer_model(tmp_path):
    """Lowered, int4 MatMul weights stay INT4 initializers: the reference artifact stores
    them two per byte (weight bytes = parameters / 2)."""
    import onnx

    model = to_ir(mlp())
    calib = {"x": np.stack([rng(j).standard_normal((1, 16)).astype(np.float32) for j in range(8)])}
    qcompiler.compile(model, "reference", tmp_path / "out", calib=calib,
                      pipeline="insert-fake-quant{weights=int4:per-channel},lower-integer")
    proto = onnx.load(tmp_path / "out" / "model.onnx")
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "IntMatMul"]
    assert len(weights) == 2 and all(w.data_type == onnx.TensorProto.INT4 for w in weights)
    for w in weights:
        params = int(np.prod(w.dims))
        assert len(w.raw_data) == (params + 1) // 2
