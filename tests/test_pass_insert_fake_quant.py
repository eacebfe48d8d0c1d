"""insert-fake-quant: QDQ on weights and activations from calibrated ranges."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from builders import cnn_bn, init, make_model, mlp, rng, run, tensor, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.errors import PipelineError
from qcompiler.graph import get_stage
from qcompiler.instruments import sqnr_db
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def calibrate(model, shape, n=16, scale=1.0):
    name = model.graph.inputs[0].name
    samples = [{name: (rng(i).standard_normal(shape) * scale).astype(np.float32)} for i in range(n)]
    return PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))


def ops(model):
    return [n.op_type for n in model.graph]


def test_mlp_gets_qdq_everywhere_and_keeps_accuracy():
    model = to_ir(mlp())
    x = rng(99).standard_normal((1, 16)).astype(np.float32)
    before = run(model, {"x": x})["y"]
    ctx = calibrate(model, (1, 16))
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    assert get_stage(model) == "fakequant"
    # input, relu output, fc2 output are quantized; matmul outputs inside linear groups are not
    quantized = sorted(n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear")
    assert quantized == ["h2", "x", "y_float"]
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3 + 2 + 2  # activations, weights, int32 biases
    bias = [n for n in dq if n.inputs[0].dtype == ir.DataType.INT32]
    assert len(bias) == 2
    after = run(model, {"x": x})["y"]
    assert sqnr_db(before, after) > 25
    rows = ctx.report["activations"]
    assert {r["tensor"] for r in rows} == {"x", "h2", "y"}
    assert all(r["format"] == "int8:per-tensor:asym" for r in rows)


def test_onnxruntime_agrees_within_one_output_step():
    model = to_ir(cnn_bn())
    ctx = calibrate(model, (1, 3, 8, 8))
    run_pipeline(Pipeline.parse("fold-batchnorm,insert-fake-quant"), model, ctx)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options)
    step = next(r["scale"] for r in ctx.report["activations"] if r["tensor"] == "y")
    for i in range(5):
        x = rng(100 + i).standard_normal((1, 3, 8, 8)).astype(np.float32)
        ours = run(model, {"x": x})["y"]
        theirs = session.run(None, {"x": x})[0]
        assert np.abs(ours - theirs).max() <= step * 1.001


def test_outlier_tensor_is_widened_to_16_bits():
    # A rare outlier (1 value in 1024): min-max int8 steps swamp the bulk of the data.
    model = to_ir(mlp())
    samples = []
    for i in range(64):
        x = rng(i).standard_normal((1, 16)).astype(np.float32)
        if i == 0:
            x[0, 3] = 80.0
        samples.append({"x": x})
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("insert-fake-quant{method=minmax,wide_below_db=30.0}"), model, ctx)
    formats = {r["tensor"]: r for r in ctx.report["activations"]}
    assert formats["x"]["format"] == "int16:per-tensor:asym"
    assert formats["x"]["est_sqnr_db"] > 30
    assert formats["h2"]["format"] == "int8:per-tensor:asym"  # h2 stays 8-bit: no outlier there


def test_overrides_and_keep_float():
    model = to_ir(mlp())
    ctx = calibrate(model, (1, 16))
    run_pipeline(Pipeline.parse('insert-fake-quant{overrides="fc2=float;Relu=a:int16:per-tensor"}'), model, ctx)
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT8 and n.inputs[0].const_value is not None]
    assert len(weights) == 1  # fc2 keeps its float weight
    assert {"node": "fc2", "op": "MatMul", "reason": "configured (override float)"} in ctx.report["kept_float"]
    relu = next(r for r in ctx.report["activations"] if r["op"] == "Relu")
    assert relu["format"] == "int16:per-tensor"


def test_additive_mask_saturates_instead_of_setting_the_range():
    # scores + mask, where the mask comes from an integer input: 0 or -3.4e38
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"]),
        helper.make_node("Cast", ["keep"], ["keep_b"], to=9),
        helper.make_node("Where", ["keep_b", "zero", "neg"], ["mask"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
    ]
    inits = [init("w", rng(5).standard_normal((4, 6)).astype(np.float32)), init("zero", np.array(0.0, np.float32)),
             init("neg", np.array(-3.4e38, np.float32))]
    model = to_ir(make_model(nodes, [tensor("x", [1, 4]), tensor("keep", [1, 6], 7)], [tensor("y", [1, 6])], inits))
    keep = np.array([[1, 1, 1, 1, 0, 0]], np.int64)
    samples = [{"x": rng(i).standard_normal((1, 4)).astype(np.float32), "keep": keep} for i in range(8)]
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    x = rng(50).standard_normal((1, 4)).astype(np.float32)
    before = run(model, {"x": x, "keep": keep})["y"]
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    masked = next(r for r in ctx.report["activations"] if r["tensor"] == "masked")
    assert masked["method"].startswith("masked add")
    assert masked["range"][0] > -100  # not -3.4e38
    after = run(model, {"x": x, "keep": keep})["y"]
    assert np.abs(after - before).max() < 0.02
    assert after[0, 4:].max() < 1e-3  # masked positions stay ~0


def test_does_not_fire_without_float_activations_or_twice():
    nodes = [helper.make_node("Gather", ["table", "ids"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("ids", [3], 7)], [tensor("y", [3, 2], 7)], [init("table", np.arange(8, dtype=np.int64).reshape(4, 2))]))
    ctx = PassContext(calibration=CalibrationData.from_samples([{"ids": np.array([0, 1, 2])}]).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    assert ops(model) == ["Gather"]
    quantized = to_ir(mlp())
    run_pipeline(Pipeline.parse("insert-fake-quant"), quantized, calibrate(quantized, (1, 16)))
    with pytest.raises(PipelineError, match="works on the float stage"):
        run_pipeline(Pipeline.parse("insert-fake-quant"), quantized, calibrate(quantized, (1, 16)))


def test_needs_calibration_and_valid_options():
    model = to_ir(mlp())
    with pytest.raises(PipelineError, match="needs calibration data"):
        run_pipeline(Pipeline.parse("insert-fake-quant"), model, PassContext())
    with pytest.raises(PipelineError, match="per-tensor"):
        Pipeline.parse("insert-fake-quant{activations=int8:per-channel}")
    with pytest.raises(PipelineError, match="SELECTOR=SPEC"):
        Pipeline.parse('insert-fake-quant{overrides="Softmax"}')


def detector_head(box_scale: float) -> ir.Model:
    """features → MatMul → boxes·box_scale ; MatMul → Sigmoid scores ; Concat(boxes, scores):
    the shape of a YOLO/SSD head, boxes in pixels next to class probabilities."""
    r = rng(5)
    nodes = [
        helper.make_node("MatMul", ["x", "wb"], ["b0"]),
        helper.make_node("Mul", ["b0", "pixels"], ["boxes"]),
        helper.make_node("MatMul", ["x", "wc"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="head_concat"),
    ]
    inits = [init("wb", r.standard_normal((8, 4)).astype(np.float32)),
             init("wc", (r.standard_normal((8, 3)) - 1.0).astype(np.float32)),
             init("pixels", np.array(box_scale, np.float32))]
    return to_ir(make_model(nodes, [tensor("x", [64, 8])], [tensor("y", [64, 7])], inits))


def test_concat_of_boxes_and_scores_keeps_the_scores():
    model = detector_head(box_scale=20.0)
    x = rng(50).standard_normal((64, 8)).astype(np.float32)
    before = run(model, {"x": x})["y"]
    ctx = calibrate(model, (64, 8))
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    after = run(model, {"x": x})["y"]
    decision = ctx.report["decisions"][0]
    assert decision["node"] == "head_concat" and decision["chosen"] == "16 bits"
    assert decision["worst_part"] == "scores" and decision["worst_part_sqnr_db"]["8"] < 20
    row = next(r for r in ctx.report["activations"] if r["tensor"] == "y")
    assert row["format"].startswith("int16") and "parts' ranges differ" in row["method"]
    # the scores' error is the logits' int8 step through the sigmoid (~0.04), not the Concat's
    # (one int8 scale for boxes and scores would make them 0 or ~1.7)
    assert np.abs(after[:, 4:] - before[:, 4:]).max() < 0.05
    kept = (after[:, 4:] > 0.25) == (before[:, 4:] > 0.25)
    assert kept.mean() > 0.99
    assert sqnr_db(before[:, 4:], after[:, 4:]) > 30


def test_concat_of_alike_parts_stays_8_bit():
    model = detector_head(box_scale=0.1)
    ctx = calibrate(model, (64, 8))
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    assert "decisions" not in ctx.report
    row = next(r for r in ctx.report["activations"] if r["tensor"] == "y")
    assert row["format"].startswith("int8")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["npu-sim", "host"])
def test_widened_concat_lowers_bit_exact(tmp_path, target):
    import qcompiler

    calib = {"x": rng(1).standard_normal((16, 64, 8)).astype(np.float32)}
    result = qcompiler.compile(detector_head(20.0), target, tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"


def test_dead_channel_keeps_its_bias():
    """A pruned output channel (all-zero weights) with a bias: its weight scale must not make
    the bias scale s_x·s_w underflow (0/0 → an int32 garbage bias)."""
    r = rng(7)
    w = r.standard_normal((8, 4)).astype(np.float32)
    w[:, 2] = 0.0
    b = np.array([0.5, -0.25, 0.75, 0.1], np.float32)
    model = to_ir(make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [tensor("x", [16, 8])], [tensor("y", [16, 4])], [init("w", w), init("b", b)]))
    x = r.standard_normal((16, 8)).astype(np.float32)
    ctx = calibrate(model, (16, 8))
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    after = run(model, {"x": x})["y"]
    np.testing.assert_allclose(after[:, 2], 0.75, atol=0.02)
    assert sqnr_db(x @ w + b, after) > 25


@pytest.mark.slow
def test_bias_of_a_nearly_dead_channel_fits_int32(tmp_path):
    """A folded BatchNorm with a tiny γ leaves a channel with ~1e-9 weights and a real bias:
    at s_x·s_w its bias needs more than 2^31 steps. The channel's weight scale grows until
    the bias fits, so the conv still lowers to an integer conv (and stays accurate)."""
    import qcompiler

    r = rng(8)
    w = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w[1] *= 1e-9
    b = np.array([0.1, 2.5, -0.3, 0.2], np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])], [init("w", w), init("b", b)])
    model = to_ir(proto)
    ctx = calibrate(model, (1, 3, 8, 8))
    run_pipeline(Pipeline.parse("insert-fake-quant"), model, ctx)
    x = rng(60).standard_normal((1, 3, 8, 8)).astype(np.float32)
    after = run(model, {"x": x})["y"]
    np.testing.assert_allclose(after[0, 1], 2.5, atol=0.05)
    calib = {"x": rng(1).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)}
    result = qcompiler.compile(to_ir(proto), "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert not result.context.report.get("integer_lowering", {}).get("kept_float")


def test_conv_inputs_are_not_widened():
    """Convolutions take 8-bit inputs: an outlier-heavy conv input stays 8-bit (and says
    why) instead of leaving the conv in float on every integer target."""
    model = to_ir(cnn_bn())
    samples = []
    for i in range(32):
        x = rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)
        if i == 0:
            x[0, 0, 0, 0] = 200.0
        samples.append({"x": x})
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("fold-batchnorm,insert-fake-quant{method=minmax,wide_below_db=30.0},lower-integer"), model, ctx)
    row = next(r for r in ctx.report["activations"] if r["tensor"] == "x")
    assert row["format"].startswith("int8") and "a convolution reads it" in row["method"]
    assert "Conv" not in ops(model) and "ConvInteger" in ops(model)


@pytest.mark.parametrize("reader,widened", [("Sqrt", True), ("Relu", False)])
def test_steep_reader_decides_the_width(reader, widened):
    """A power spectrum (heavy-tailed, mostly near 0) is fine at 8 bits on its own, but its
    square root magnifies the steps near 0: judged through the Sqrt, it gets 16 bits."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["power"]), helper.make_node(reader, ["power"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("x", [1, 256])], [tensor("y", [1, 256])]))
    samples = [{"x": (rng(i).standard_normal((1, 256)) * np.geomspace(0.05, 20, 256)).astype(np.float32)} for i in range(16)]
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("insert-fake-quant{wide_below_db=30.0}"), model, ctx)
    row = next(r for r in ctx.report["activations"] if r["tensor"] == "power")
    assert row["format"].startswith("int16") == widened, row
    assert ("through its Sqrt" in row["method"]) == widened


@pytest.mark.slow
def test_float64_tensors_stay_float(tmp_path):
    """A tail computed in float64 (a pitch tracker's Cast to double) is not quantized:
    DequantizeLinear would hand back float32 where the graph declares float64."""
    import qcompiler

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Cast", ["h"], ["hd"], to=11),
             helper.make_node("Mul", ["hd", "k"], ["y"])]
    inits = [init("w", rng(18).standard_normal((6, 4)).astype(np.float32)), init("k", np.array(2.0, np.float64))]
    proto = make_model(nodes, [tensor("x", [3, 6])], [helper.make_tensor_value_info("y", 11, [3, 4])], inits)
    calib = {"x": rng(19).standard_normal((8, 3, 6)).astype(np.float32)}
    result = qcompiler.compile(proto, "host", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] in ("bit-exact", "islands-within-one-step")
    got = qcompiler.load(tmp_path / "out").run({"x": calib["x"][0]})["y"]
    assert got.dtype == np.float64
