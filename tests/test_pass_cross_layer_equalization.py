"""cross-layer-equalization: per-channel weight ranges of consecutive layers equalized, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from builders import cnn_bn, init, make_model, rng, run, tensor, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.graph import const_array
from qcompiler.instruments import NumericCheck, sqnr_db
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline

f32 = np.float32


def ctx_for(model, scale=1.0, n=2):
    specs = input_specs(model)
    samples = [{s.name: (rng(50 + i).standard_normal(s.shape) * scale).astype(f32) for s in specs} for i in range(n)]
    return PassContext(calibration=CalibrationData.from_samples(samples).bind(specs),
                       instruments=[NumericCheck(tolerance=1e-5, samples=n)])


def equalize(model, spec="cross-layer-equalization", scale=1.0):
    ctx = ctx_for(model, scale)
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return ctx


def weight(model, node):
    return const_array(node.inputs[1]).astype(np.float64)


def out_ranges(w):
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def in_ranges(w):
    return np.abs(np.moveaxis(w, 1, 0)).reshape(w.shape[1], -1).max(axis=1)


def conv_chain(mid_activation="Relu", clip_high=6.0, out_of_conv1_is_output=False, shared=False):
    """x → Conv(3→8, biased, output ranges spread 1e-2..10) → act → Conv(8→6, input ranges the inverse) → y."""
    r = rng(0)
    spread = np.logspace(-2, 1, 8, dtype=f32)  # as BatchNorm folding leaves them; the next layer compensates
    w1 = r.standard_normal((8, 3, 3, 3)).astype(f32) * spread[:, None, None, None]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])]
    if mid_activation == "Clip":
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"]))
    else:
        nodes.append(helper.make_node(mid_activation, ["c1"], ["a1"]))
    nodes.append(helper.make_node("Conv", ["a1", "w1" if shared else "w2", "b2"], ["y"], pads=[1, 1, 1, 1]))
    inits = [init("w1", w1), init("b1", r.standard_normal(8).astype(f32) * 0.1),
             init("b2", r.standard_normal(8 if shared else 6).astype(f32) * 0.1),
             init("lo", np.array(0.0, f32)), init("hi", np.array(clip_high, f32))]
    if shared:
        w1_sq = r.standard_normal((8, 8, 3, 3)).astype(f32)
        inits[0] = init("w1", w1_sq)
        nodes[0] = helper.make_node("Conv", ["x8", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])
        inputs = [tensor("x8", [1, 8, 6, 6])]
        outputs = [tensor("y", [1, 8, 6, 6])]
    else:
        inits.append(init("w2", r.standard_normal((6, 8, 3, 3)).astype(f32) * 0.3 / spread[None, :, None, None]))
        inputs, outputs = [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 6, 6, 6])]
    if out_of_conv1_is_output:
        outputs.append(tensor("a1", [1, 8, 6, 6]))
    return to_ir(make_model(nodes, inputs, outputs, inits))


def test_conv_relu_conv_ranges_become_equal():
    model = conv_chain()
    conv1, _, conv2 = list(model.graph)
    r1, r2 = out_ranges(weight(model, conv1)), in_ranges(weight(model, conv2))
    ctx = equalize(model)
    n1, n2 = out_ranges(weight(model, conv1)), in_ranges(weight(model, conv2))
    np.testing.assert_allclose(n1, np.sqrt(r1 * r2), rtol=1e-5)  # both become √(r₁r₂)
    np.testing.assert_allclose(n2, np.sqrt(r1 * r2), rtol=1e-5)
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5
    (pair,) = ctx.report["cross_layer_equalization"]["pairs"]
    assert pair["channels"] == 8 and pair["range_ratio_after"] < 1.001


def test_equalization_helps_per_tensor_weight_quantization():
    x = {"x": rng(9).standard_normal((1, 3, 6, 6)).astype(f32)}
    sqnr = {}
    for spec in ("cross-layer-equalization,", ""):
        model = conv_chain()
        reference = run(model, x)["y"]
        ctx = ctx_for(model)
        ctx.instruments = []
        run_pipeline(Pipeline.parse(spec + "insert-fake-quant{weights=int8:per-tensor,activations=none}"), model, ctx)
        sqnr[spec] = sqnr_db(reference, run(model, x)["y"])
    assert sqnr["cross-layer-equalization,"] > sqnr[""] + 20  # measured: 1.3 → 40.3 dB (small channels were lost)


def depthwise_chain():
    """x → 1×1 Conv (4→8) → Relu → 3×3 depthwise Conv (group 8) → Relu → 1×1 Conv (8→6)."""
    r = rng(1)
    spread = np.logspace(-1.5, 1, 8, dtype=f32)
    nodes = [
        helper.make_node("Conv", ["x", "pw1", "pb1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "dw", "db"], ["c2"], group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("Conv", ["a2", "pw2"], ["y"]),
    ]
    inits = [
        init("pw1", r.standard_normal((8, 4, 1, 1)).astype(f32) * spread[:, None, None, None]),
        init("pb1", r.standard_normal(8).astype(f32) * 0.1),
        init("dw", r.standard_normal((8, 1, 3, 3)).astype(f32) * spread[::-1, None, None, None]),
        init("db", r.standard_normal(8).astype(f32) * 0.1),
        init("pw2", r.standard_normal((6, 8, 1, 1)).astype(f32)),
    ]
    return to_ir(make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 6, 6, 6])], inits))


def test_depthwise_chain_is_iterated_to_a_fixed_point():
    model = depthwise_chain()
    ctx = equalize(model, "cross-layer-equalization{iterations=50,tolerance=1e-6}")
    report = ctx.report["cross_layer_equalization"]
    assert len(report["pairs"]) == 2 and report["sweeps"] > 1
    pw1, _, dw, _, pw2 = list(model.graph)
    # At the fixed point each pair's ranges match.
    np.testing.assert_allclose(out_ranges(weight(model, pw1)), in_ranges_grouped(weight(model, dw)), rtol=1e-4)
    np.testing.assert_allclose(out_ranges(weight(model, dw)), in_ranges(weight(model, pw2)), rtol=1e-4)
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5


def in_ranges_grouped(w):
    """Depthwise (C, 1, k, k): input channel c is read only by output channel c."""
    return out_ranges(w)


def test_conv_to_gemm_through_pooling_and_flatten_after_batchnorm_folding():
    model = to_ir(cnn_bn())
    ctx = equalize(model, "fold-batchnorm,cross-layer-equalization")
    pairs = ctx.report["cross_layer_equalization"]["pairs"]
    assert [p["channels"] for p in pairs] == [4, 6]  # conv1→conv2, conv2→GAP→Flatten→Gemm(transB)
    assert all(e["max_relative_error"] < 1e-5 for e in ctx.report["numeric_check"])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_relu_gemm(trans_b):
    r = rng(3)
    w1 = r.standard_normal((6, 5) if trans_b else (5, 6)).astype(f32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["g1"], transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["g1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "c2"], ["y"], transB=1 - trans_b),
    ]
    inits = [init("w1", w1 * np.logspace(-2, 1, 6, dtype=f32)[:, None] if trans_b else w1 * np.logspace(-2, 1, 6, dtype=f32)[None, :]),
             init("c1", r.standard_normal(6).astype(f32)),
             init("w2", r.standard_normal((3, 6) if 1 - trans_b else (6, 3)).astype(f32)),
             init("c2", r.standard_normal((1, 3)).astype(f32))]
    model = to_ir(make_model(nodes, [tensor("x", [4, 5])], [tensor("y", [4, 3])], inits))
    ctx = equalize(model)
    assert len(ctx.report["cross_layer_equalization"]["pairs"]) == 1
    assert ctx.report["cross_layer_equalization"]["pairs"][0]["range_ratio_after"] < 1.001
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5


def test_relu6_is_refused_by_default_and_exact_with_per_channel_bounds():
    model = conv_chain("Clip")
    ctx = equalize(model, scale=5.0)  # inputs large enough to hit the upper bound
    assert not ctx.results[-1].changed
    reasons = [r["reason"] for r in ctx.report["cross_layer_equalization"]["refused"]]
    assert any("Clip(0, 6) would need a per-channel upper bound" in r for r in reasons)

    model = conv_chain("Clip")
    ctx = equalize(model, "cross-layer-equalization{relu6=per-channel}", scale=5.0)
    ops = [n.op_type for n in model.graph]
    assert "Clip" not in ops and ops.count("Relu") == 1 and ops.count("Min") == 1
    bound = const_array(next(n for n in model.graph if n.op_type == "Min").inputs[1])
    assert bound.shape == (1, 8, 1, 1) and np.ptp(bound) > 1  # 6/sᵢ per channel
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5


def test_refuses_non_homogeneous_ops_graph_outputs_and_shared_weights():
    for model, reason in (
        (conv_chain("Tanh"), "(Tanh) does not commute"),
        (conv_chain(out_of_conv1_is_output=True), "is a graph output"),
        (conv_chain(shared=True), "shared with another node"),
    ):
        before = [const_array(v).copy() for v in model.graph.initializers.values()]
        ctx = equalize(model)
        assert not ctx.results[-1].changed
        assert any(reason in r["reason"] for r in ctx.report["cross_layer_equalization"]["refused"]), reason
        after = [const_array(v) for v in model.graph.initializers.values()]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_idempotent():
    model = depthwise_chain()
    ctx = equalize(model, "cross-layer-equalization{iterations=50,tolerance=1e-6},cross-layer-equalization")
    first, second = ctx.results
    assert first.changed and not second.changed
