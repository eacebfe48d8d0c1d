"""smooth-quant: per-channel scales folded from activations into the next linear weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from builders import init, make_model, rng, run, tensor, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.graph import const_array
from qcompiler.instruments import NumericCheck, sqnr_db
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline

f32 = np.float32


def const(model, name):
    return const_array(model.graph.initializers[name])


def context(model, n=16, scale=1.0, seed=0, numeric=True):
    specs = input_specs(model)
    samples = [{s.name: (rng(seed + i).standard_normal(s.shape) * scale).astype(f32) for s in specs} for i in range(n)]
    instruments = [NumericCheck(tolerance=1e-5, samples=2)] if numeric else []
    return PassContext(calibration=CalibrationData.from_samples(samples).bind(specs), instruments=instruments)


def smooth(model, spec="smooth-quant", **kwargs):
    ctx = context(model, **kwargs)
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return ctx


def channel_sqnr(x):
    """Median over channels (last axis) of the SQNR of per-tensor asymmetric int8 (min-max):
    outlier channels set the step, the others lose resolution."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    q = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    return float(np.median([sqnr_db(x[..., j], q[..., j]) for j in range(x.shape[-1])]))


# -- models ---------------------------------------------------------------------------


def ln_block(residual=False, output_h=False, shared=False):
    """x → LayerNorm (outlier channels in γ) → two MatMuls (one with bias) → sum."""
    r = rng(0)
    gamma = np.ones(16, f32)
    gamma[[2, 9]] = 25.0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "wa"], ["a0"]),
        helper.make_node("Add", ["a0", "ba"], ["a"]),
        helper.make_node("MatMul", ["h", "wa" if shared else "wb"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    inits = [init("gamma", gamma), init("beta", r.standard_normal(16).astype(f32) * 0.2),
             init("wa", r.standard_normal((16, 16)).astype(f32) * 0.2), init("ba", r.standard_normal(16).astype(f32) * 0.1)]
    if not shared:
        inits.append(init("wb", r.standard_normal((16, 16)).astype(f32) * 0.2))
    outputs = [tensor("y", [1, 8, 16])]
    if residual:  # post-LN transformer: the LayerNorm output is also the residual
        nodes.append(helper.make_node("Add", ["y", "h"], ["z"]))
        outputs = [tensor("z", [1, 8, 16])]
    if output_h:
        outputs.append(tensor("h", [1, 8, 16]))
    return to_ir(make_model(nodes, [tensor("x", [1, 8, 16])], outputs, inits))


def mlp_with_outliers(activation="Relu", opset=17):
    """x → fc1 (+bias) → activation → fc2 (+bias): a few fc1 columns are 20× larger."""
    r = rng(1)
    w1 = r.standard_normal((16, 32)).astype(f32) * 0.3
    w1[:, [3, 17]] *= 20
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node(activation, ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["b2", "h3"], ["y"]),
    ]
    inits = [init("w1", w1), init("b1", r.standard_normal(32).astype(f32) * 0.1),
             init("w2", r.standard_normal((32, 8)).astype(f32) * 0.3), init("b2", r.standard_normal(8).astype(f32) * 0.1)]
    return to_ir(make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [4, 8])], inits, opset=opset))


def attention(merge_perm=(0, 2, 1, 3)):
    """Single-head-group attention, T=6, D=16, 4 heads of 4; V and O projections with biases.

    ``merge_perm`` other than (0, 2, 1, 3) merges (d, head) instead of (head, d): the
    output projection then reads the value channels in a permuted order."""
    r = rng(2)
    t, d, h = 6, 16, 4
    wv = r.standard_normal((d, d)).astype(f32) * 0.3
    wv[:, [1, 10]] *= 15  # outlier value channels
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v0"]),
        helper.make_node("Add", ["v0", "bv"], ["v"]),
        helper.make_node("Reshape", ["q", "split"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "split"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("Reshape", ["v", "split"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=list(merge_perm)),
        helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx_m"]),
        helper.make_node("MatMul", ["ctx_m", "wo"], ["o"]),
        helper.make_node("Add", ["o", "bo"], ["y"]),
    ]
    inits = [init(n, r.standard_normal((d, d)).astype(f32) * 0.3) for n in ("wq", "wk", "wo")]
    inits += [init("wv", wv), init("bv", r.standard_normal(d).astype(f32)), init("bo", r.standard_normal(d).astype(f32)),
              init("split", np.array([1, t, h, d // h], np.int64)), init("merge", np.array([1, t, d], np.int64))]
    return to_ir(make_model(nodes, [tensor("x", [1, t, d])], [tensor("y", [1, t, d])], inits))


# -- the rewrite happens and keeps the float model ---------------------------------------------


def test_layernorm_scale_moves_into_both_consumers():
    model = ln_block()
    gamma, beta, wa, wb = (const(model, n) for n in ("gamma", "beta", "wa", "wb"))
    ctx = smooth(model)
    (chain,) = ctx.report["smooth_quant"]["chains"]
    assert chain["kind"] == "norm" and len(chain["consumers"]) == 2
    s = gamma / const(model, "gamma")  # γ' = γ/s
    assert s.std() > 0.1  # really per channel
    np.testing.assert_allclose(const(model, "beta"), beta / s, rtol=1e-5)
    np.testing.assert_allclose(const(model, "wa"), wa * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(const(model, "wb"), wb * s[:, None], rtol=1e-5)
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5
    assert ctx.report["smooth_quant"]["max_relative_error"] < 1e-5
    act_before, act_after = chain["activation_absmax"]
    assert act_after < act_before / 2


def test_smoothing_improves_int8_activation_and_w8a8_sqnr():
    x = {"x": rng(100).standard_normal((1, 8, 16)).astype(f32)}
    results = {}
    for spec in ("smooth-quant", None):
        model = ln_block()
        reference = run(model, x)["y"]
        if spec:
            smooth(model, spec, numeric=False)
        h = qcompiler_run(model, x, "h")
        model_q = model
        run_pipeline(Pipeline.parse("insert-fake-quant{method=minmax}"), model_q, context(model_q, numeric=False))
        results[spec] = (channel_sqnr(h), sqnr_db(reference, run(model_q, x)["y"]))
    (h_smooth, y_smooth), (h_plain, y_plain) = results["smooth-quant"], results[None]
    assert h_smooth > h_plain + 10  # per-tensor int8 of the LayerNorm output (measured: 22.5 → 38.8 dB)
    assert y_smooth > y_plain + 1.5  # the whole w8a8 model (measured: 31.6 → 34.3 dB)


def qcompiler_run(model, feeds, name):
    import qcompiler

    return qcompiler.ReferenceInterpreter(model).run(feeds, [name])[name]


def test_linear_pair_through_bias_and_relu():
    model = mlp_with_outliers()
    w1, b1, w2, b2 = (const(model, n) for n in ("w1", "b1", "w2", "b2"))
    ctx = smooth(model, "smooth-quant{alpha=0.6}")
    (chain,) = ctx.report["smooth_quant"]["chains"]
    assert chain["kind"] == "linear" and chain["alpha"] == 0.6
    s = const(model, "w2")[:, 0] / w2[:, 0]  # row j of W2 got s_j
    np.testing.assert_allclose(const(model, "w1"), w1 / s[None, :], rtol=1e-5)
    np.testing.assert_allclose(const(model, "b1"), b1 / s, rtol=1e-5)  # the bias Add on the path
    np.testing.assert_allclose(const(model, "w2"), w2 * s[:, None], rtol=1e-5)
    np.testing.assert_array_equal(const(model, "b2"), b2)  # after the consumer: untouched
    assert s[3] > 3 and s[17] > 3  # the outlier channels moved most
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5
    # Only norm producers: nothing to do here.
    model = mlp_with_outliers()
    ctx = smooth(model, "smooth-quant{linear_pairs=false}")
    assert not ctx.results[-1].changed


@pytest.mark.parametrize("merge_perm", [(0, 2, 1, 3), (0, 2, 3, 1)])
def test_attention_value_to_output_projection(merge_perm):
    model = attention(merge_perm)
    wv, wo = const(model, "wv"), const(model, "wo")
    ctx = smooth(model)
    (chain,) = ctx.report["smooth_quant"]["chains"]
    wo_value = model.graph.initializers["wo"]
    assert chain["consumers"] == [n.name for n in model.graph if len(n.inputs) > 1 and n.inputs[1] is wo_value]
    s = wv[0] / const(model, "wv")[0]  # value channel j of V got 1/s_j
    rows = np.arange(16) if merge_perm == (0, 2, 1, 3) else np.arange(16).reshape(4, 4).T.reshape(-1)
    np.testing.assert_allclose(const(model, "wo"), wo * s[rows][:, None], rtol=1e-5)
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5
    reasons = " ".join(r["reason"] for r in ctx.report["smooth_quant"]["refused"])
    assert "contracts over the scaled channels" in reasons  # Q and K stay as they are


def test_rmsnorm_written_as_mul_by_gamma():
    r = rng(3)
    gamma = np.ones(16, f32)
    gamma[5] = 30
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    inits = [init("axes", np.array([-1], np.int64)), init("eps", np.array(1e-6, f32)), init("gamma", gamma),
             init("w", r.standard_normal((16, 8)).astype(f32))]
    model = to_ir(make_model(nodes, [tensor("x", [1, 4, 16])], [tensor("y", [1, 4, 8])], inits, opset=18))
    ctx = smooth(model)
    (chain,) = ctx.report["smooth_quant"]["chains"]
    assert chain["kind"] == "norm" and chain["activation_absmax"][1] < chain["activation_absmax"][0] / 2
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5


# -- alpha search ----------------------------------------------------------------------------


def test_alpha_search_picks_the_least_error_and_bounds_memory():
    from qcompiler.passes.smooth_quant import ActivationRows

    grid = "0.0;0.25;0.5;0.75;1.0"
    model = ln_block()
    ctx = smooth(model, f"smooth-quant{{search=true,grid=\"{grid}\",rows=32}}")
    (chain,) = ctx.report["smooth_quant"]["chains"]
    assert chain["alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert chain["search_error"]["best"] <= chain["search_error"]["at_default"]
    assert ctx.report["numeric_check"][0]["max_relative_error"] < 1e-5
    # The reservoir keeps at most `rows` rows per tensor (16 samples × 8 positions = 128 rows).
    ctx = context(ln_block(), numeric=False)
    rows = ctx.analysis(ActivationRows((("h", 2),), rows=32), ln_block())
    assert rows["h"].shape == (32, 16)
    again = ctx.analysis(ActivationRows((("h", 2),), rows=32, seed=0), ln_block())
    np.testing.assert_array_equal(rows["h"], again["h"])


# -- where it must not fire -------------------------------------------------------------------------


def refusals(ctx):
    return [r["reason"] for r in ctx.report["smooth_quant"]["refused"]]


def test_refuses_post_ln_residual_gelu_shared_weights_and_graph_outputs():
    model = ln_block(residual=True)
    ctx = smooth(model)
    assert not ctx.results[-1].changed
    assert any("combines the scaled tensor with another activation" in r for r in refusals(ctx))

    model = ln_block(output_h=True)
    ctx = smooth(model)
    assert not ctx.results[-1].changed
    assert any("graph output" in r for r in refusals(ctx))

    model = ln_block(shared=True)
    ctx = smooth(model)
    assert not ctx.results[-1].changed
    assert any("shared" in r for r in refusals(ctx))

    model = mlp_with_outliers("Gelu", opset=20)
    ctx = smooth(model)
    assert not ctx.results[-1].changed
    assert any("(Gelu) does not commute" in r for r in refusals(ctx))


def test_refuses_reshapes_that_move_channels_off_the_contraction_axis():
    r = rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["hr"]),  # [1, 8, 16] → [1, 16, 8]: mixes positions and channels
        helper.make_node("MatMul", ["hr", "w2"], ["y"]),
    ]
    inits = [init("w1", r.standard_normal((16, 16)).astype(f32)), init("w2", r.standard_normal((8, 4)).astype(f32)),
             init("shape", np.array([1, 16, 8], np.int64))]
    model = to_ir(make_model(nodes, [tensor("x", [1, 8, 16])], [tensor("y", [1, 16, 4])], inits))
    ctx = smooth(model)
    assert not ctx.results[-1].changed
    assert any("cannot match" in r or "lie on axes" in r for r in refusals(ctx))


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_legacy_export_fuse_gelu_and_value_path(minilm_legacy):
    """Legacy exporter: erf GELUs fuse, symbolic shapes are measured, the six V→O pairs
    are smoothed (post-LN LayerNorms refused), and outputs stay within 1e-5."""
    import qcompiler
    from qcompiler.examples import minilm

    model = qcompiler.load_onnx(minilm_legacy)
    calib = minilm.lee_background_sentences()[:4]
    data = CalibrationData.from_arrays(minilm.tokenize(calib)).bind(input_specs(model))
    ctx = PassContext(calibration=data, instruments=[NumericCheck(tolerance=1e-5)])
    spec = "fold-constants,remove-identity,eliminate-dead-code,fuse-gelu,smooth-quant"
    run_pipeline(Pipeline.parse(spec), model, ctx)
    ops = [n.op_type for n in model.graph]
    assert ops.count("Gelu") == 6 and "Erf" not in ops
    chains = ctx.report["smooth_quant"]["chains"]
    assert len(chains) == 6 and all(len(c["consumers"]) == 1 and c["kind"] == "linear" for c in chains)
    norms = [r for r in ctx.report["smooth_quant"]["refused"] if "LayerNormalization" in r["producer"]]
    # post-LN: each LayerNorm output is also a residual (or the graph output)
    assert len(norms) == 13 and all("another activation" in r["reason"] or "graph output" in r["reason"] for r in norms)
    errors = {e["pass"]: e["max_relative_error"] for e in ctx.report["numeric_check"]}
    assert errors["fuse-gelu"] < 1e-5 and errors["smooth-quant"] < 1e-5


def test_idempotent_second_run_finds_every_scale_at_one():
    # After X' = X/s and W' = s·W the next scale is (max|X|/s)^α / (s·max|W|)^(1−α) = s/s = 1.
    model = attention()
    ctx = smooth(model, "smooth-quant,smooth-quant")
    first, second = ctx.results
    assert first.changed and not second.changed


# -- AWQ --------------------------------------------------------------------------------------


def _w4_weight_only_error(model, feeds, consumers=("wa", "wb")) -> float:
    """Σ ‖h·W − h·Q4(W)‖² / ‖h·W‖² over the LayerNorm's consumers (per-channel int4)."""
    from qcompiler.passes.smooth_quant import fake_quant_columns

    h = qcompiler_run(model, feeds, "h").reshape(-1, 16)
    error = 0.0
    for name in consumers:
        w = const(model, name)
        ref = h @ w
        error += float(np.sum((ref - h @ fake_quant_columns(w, 4)) ** 2) / np.sum(ref**2))
    return error


def test_awq_scales_by_mean_activation_and_lowers_int4_weight_error():
    feeds = {"x": rng(100).standard_normal((1, 8, 16)).astype(f32)}
    model = ln_block()
    reference = run(model, feeds)["y"]
    before = _w4_weight_only_error(model, feeds)
    ctx = smooth(model, "smooth-quant{awq=true,weight_bits=4,linear_pairs=false}")
    (chain,) = ctx.report["smooth_quant"]["chains"]
    assert chain["method"] == "awq" and chain["alpha"] > 0
    assert chain["search_error"]["best"] <= chain["search_error"]["at_default"]
    np.testing.assert_allclose(run(model, feeds)["y"], reference, rtol=1e-5, atol=1e-5)  # float-equivalent
    after = _w4_weight_only_error(model, feeds)
    print(f"int4 weight-only error {before:.4g} → {after:.4g}")
    assert after < before


def test_awq_leaves_channels_alone_when_the_search_keeps_alpha_zero():
    """α = 0 (what the search picks when no migration lowers the error) is s = 1: nothing folds."""
    model = ln_block()
    gamma = const(model, "gamma")
    model.graph.initializers["gamma"].const_value = ir.tensor(np.ones_like(gamma), name="gamma")
    model.graph.initializers["beta"].const_value = ir.tensor(np.zeros_like(gamma), name="beta")
    wa = const(model, "wa").copy()
    ctx = smooth(model, "smooth-quant{awq=true,weight_bits=4,linear_pairs=false,grid=\"0.0\"}")
    assert ctx.report["smooth_quant"]["chains"] == []
    np.testing.assert_array_equal(const(model, "wa"), wa)
