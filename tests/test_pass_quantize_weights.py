"""quantize-weights: float weights become DequantizeLinear of integers; SQNR is reported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from builders import cnn_bn, init, make_model, mlp, rng, run, tensor, to_ir
from qcompiler.graph import get_stage
from qcompiler.instruments import sqnr_db
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def quantize(model, spec="quantize-weights"):
    ctx = PassContext()
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return ctx


@pytest.mark.parametrize(
    "fmt, min_sqnr",
    [("int8:per-channel", 35), ("int8:per-tensor", 30), ("int16:per-channel", 80), ("int4:per-group:8", 15), ("uint8:per-tensor:asym", 30)],
)
def test_mlp_weights_quantized(fmt, min_sqnr):
    model = to_ir(mlp())
    x = rng(1).standard_normal((1, 16)).astype(np.float32)
    before = run(model, {"x": x})["y"]
    ctx = quantize(model, f"quantize-weights{{format={fmt}}}")
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and get_stage(model) == "fakequant"
    for node in dq:
        assert node.inputs[0].const_value is not None
    after = run(model, {"x": x})["y"]
    sqnr = sqnr_db(before, after)
    assert sqnr > min_sqnr, sqnr
    assert len(ctx.report["weights"]) == 2
    assert all(row["sqnr_db"] > min_sqnr - 5 for row in ctx.report["weights"])
    # The result is valid ONNX that onnxruntime runs with the same numbers (graph
    # optimisations off: they would fuse DQ+MatMul into dynamically quantized kernels).
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], after, rtol=1e-5, atol=1e-6)


def test_per_channel_axis_matches_output_channels():
    model = to_ir(cnn_bn())
    quantize(model, "fold-batchnorm,quantize-weights")
    for node in model.graph:
        if node.op_type == "DequantizeLinear":
            axis = node.attributes["axis"].as_int()
            consumer = node.outputs[0].uses()[0].node
            if consumer.op_type == "Conv":
                assert axis == 0
            elif consumer.op_type == "Gemm":  # transB=1: weight is (N, K)
                assert axis == 0
            assert node.inputs[1].const_value.numpy().shape == (node.inputs[0].shape[axis],)


def test_shared_weight_is_quantized_once():
    w = rng(2).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("x", [1, 4])], [tensor("y", [1, 4])], [init("w", w)]))
    quantize(model)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph) == 1


def test_does_not_fire_on_activation_matmul_or_kept_nodes():
    # MatMul of two activations has no weight to quantize.
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    model = to_ir(make_model(nodes, [tensor("a", [2, 3]), tensor("b", [3, 2])], [tensor("y", [2, 2])]))
    assert not Pipeline.parse("quantize-weights").passes[0].run(model, PassContext())
    assert get_stage(model) == "float"
    # keep_float excludes nodes by name pattern.
    model = to_ir(mlp())
    quantize(model, "quantize-weights{keep_float=fc*}")
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)


def test_int4_upgrades_opset():
    model = to_ir(mlp())
    quantize(model, "quantize-weights{format=int4:per-channel}")
    assert model.graph.opset_imports[""] >= 21
    q = next(n for n in model.graph if n.op_type == "DequantizeLinear").inputs[0]
    assert q.dtype.name == "INT4"
    onnx.checker.check_model(__import__("onnx_ir").to_proto(model))


# -- power-of-two weights and second-moment (γ) scaling ----------------------------------------


def _pow2_closed_form(w: np.ndarray, top: int = 6) -> np.ndarray:
    """Per row: s = max|w| / 2^top; each value the nearest power of two (in log2) times s, 0 below s/√2."""
    out = np.zeros_like(w, dtype=np.float64)
    for r, row in enumerate(w.astype(np.float64)):
        s = np.abs(row).max() / 2.0**top
        for c, v in enumerate(row):
            if v == 0 or abs(v) < s / np.sqrt(2):
                continue
            e = min(max(round(np.log2(abs(v) / s)), 0), top)
            out[r, c] = np.sign(v) * s * 2.0**e
    return out


def test_pow2_weights_are_signed_powers_of_two_as_in_closed_form():
    from qcompiler.quant import QFormat, pow2_quantize_weight

    w = (rng(3).standard_normal((6, 40)) * np.logspace(-2, 0, 40)).astype(np.float32)
    qt = pow2_quantize_weight(w, QFormat.parse("int4:per-channel"), 0)
    magnitudes = np.unique(np.abs(qt.data))
    assert set(magnitudes.tolist()) <= {0, 1, 2, 4, 8, 16, 32, 64}
    np.testing.assert_allclose(qt.dequantize(), _pow2_closed_form(w), rtol=1e-6, atol=1e-12)


def test_pow2_weights_lower_to_integer_products(tmp_path):
    import qcompiler

    model = to_ir(mlp())
    calib = {"x": np.stack([rng(i).standard_normal((1, 16)).astype(np.float32) for i in range(16)])}
    result = qcompiler.compile(model, "npu-sim", tmp_path / "out", calib=calib,
                               pipeline="insert-fake-quant{weights=int4:per-channel,weight_method=pow2},lower-integer")
    assert result.manifest["verified"]["status"] == "bit-exact"
    rows = result.context.report["weights"]
    assert rows and all(r["format"].endswith(":pow2") for r in rows)
    assert all(r["sqnr_db"] > 10 for r in rows)  # 4-bit log codes: coarse but not noise


@pytest.mark.parametrize("fmt", ["int4:per-channel", "int8:per-tensor"])
def test_second_moment_scaling_keeps_each_channels_energy(fmt):
    from qcompiler.quant import QFormat, quantize_weight, second_moment_scaled

    w = rng(4).standard_normal((8, 32)).astype(np.float32)
    plain = quantize_weight(w, QFormat.parse(fmt), 0, 1)
    scaled = second_moment_scaled(plain, w)
    np.testing.assert_array_equal(plain.data, scaled.data)  # only the scales move
    axis = None if fmt.endswith("per-tensor") else 1
    np.testing.assert_allclose(np.sum(scaled.dequantize().astype(np.float64) ** 2, axis=axis),
                               np.sum(w.astype(np.float64) ** 2, axis=axis), rtol=1e-5)


def test_second_moment_is_off_by_default_and_reported_when_on():
    plain, gamma = to_ir(mlp()), to_ir(mlp())
    ctx_plain, ctx_gamma = PassContext(), PassContext()
    run_pipeline(Pipeline.parse("quantize-weights{format=int4:per-channel}"), plain, ctx_plain)
    run_pipeline(Pipeline.parse("quantize-weights{format=int4:per-channel,second_moment=true}"), gamma, ctx_gamma)
    assert all(":γ" not in r["format"] for r in ctx_plain.report["weights"])
    assert all(r["format"].endswith(":γ") for r in ctx_gamma.report["weights"])
    scales = lambda m: [n.inputs[1].const_value.numpy() for n in m.graph if n.op_type == "DequantizeLinear"]
    assert any(not np.array_equal(a, b) for a, b in zip(scales(plain), scales(gamma)))
