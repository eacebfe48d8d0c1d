"""lower-integer: QDQ graphs become integer-only graphs with the same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from builders import init, make_model, mlp, rng, run, tensor, to_ir
from qcompiler.calibdata import CalibrationData, input_specs
from qcompiler.graph import get_stage
from qcompiler.instruments import sqnr_db
from qcompiler.integer_check import first_float_compute
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline


def cnn_relu6():
    r = rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [
        init("w1", r.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.4), init("b1", r.standard_normal(8).astype(np.float32) * 0.1),
        init("zero", np.array(0.0, np.float32)), init("six", np.array(6.0, np.float32)),
        init("w2", r.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2), init("b2", r.standard_normal(8).astype(np.float32) * 0.1),
        init("wf", r.standard_normal((10, 8)).astype(np.float32) * 0.5), init("bf", r.standard_normal(10).astype(np.float32) * 0.1),
    ]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 10])], inits)


def attention_block(d=16, t=8):
    """LayerNorm → Q,K,V → softmax(QKᵀ/√d)V → out proj → residual → LayerNorm → GELU MLP."""
    r = rng(11)
    w = lambda *s: init(f"w{len(inits)}", (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32))  # noqa: E731
    inits = []
    names = {}
    for key, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)), ("up", (d, 2 * d)), ("down", (2 * d, d))):
        tensor_init = w(*shape)
        tensor_init.name = f"w_{key}"
        inits.append(tensor_init)
        names[key] = tensor_init.name
    inits += [init("g1", r.uniform(0.5, 1.5, d).astype(np.float32)), init("be1", r.standard_normal(d).astype(np.float32) * 0.1),
              init("g2", r.uniform(0.5, 1.5, d).astype(np.float32)), init("be2", r.standard_normal(d).astype(np.float32) * 0.1),
              init("scale", np.array(1 / np.sqrt(d), np.float32)), init("bup", r.standard_normal(2 * d).astype(np.float32) * 0.1)]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "be1"], ["n1"], axis=-1),
        helper.make_node("MatMul", ["n1", "w_q"], ["q"]),
        helper.make_node("MatMul", ["n1", "w_k"], ["k"]),
        helper.make_node("MatMul", ["n1", "w_v"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "w_o"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "g2", "be2"], ["n2"], axis=-1),
        helper.make_node("MatMul", ["n2", "w_up"], ["u0"]),
        helper.make_node("Add", ["u0", "bup"], ["u"]),
        helper.make_node("Gelu", ["u"], ["gl"]),
        helper.make_node("MatMul", ["gl", "w_down"], ["dn"]),
        helper.make_node("Add", ["dn", "n2"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [1, t, d])], [tensor("y", [1, t, d])], inits, opset=20)


def quantize(model, shape, spec, n=32, scale=1.0):
    name = model.graph.inputs[0].name
    samples = [{name: (rng(i).standard_normal(shape) * scale).astype(np.float32)} for i in range(n)]
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    run_pipeline(Pipeline.parse(spec), model, ctx)
    return ctx


def check_lowering(proto, shape, spec="insert-fake-quant", min_db=25.0):
    model = to_ir(proto)
    feeds = [{model.graph.inputs[0].name: rng(500 + i).standard_normal(shape).astype(np.float32)} for i in range(4)]
    float_out = [run(model, f) for f in feeds]
    ctx = quantize(model, shape, spec)
    fake = [run(model, f) for f in feeds]
    run_pipeline(Pipeline.parse("lower-integer"), model, ctx)
    assert get_stage(model) == "integer"
    assert first_float_compute(model) is None
    out = [run(model, f) for f in feeds]
    name = model.graph.outputs[0].name
    for f, q, i in zip(float_out, fake, out):
        assert sqnr_db(q[name], i[name]) > min_db  # integer arithmetic ≈ its fake-quant model
        assert sqnr_db(f[name], i[name]) > min_db - 5
    return model, ctx


def op_counts(model):
    counts = {}
    for n in model.graph:
        key = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_mlp_becomes_integer_matmuls():
    model, ctx = check_lowering(mlp(), (1, 16), min_db=30)
    counts = op_counts(model)
    assert counts["MatMulInteger"] == 2 and counts["qcompiler.Requantize"] == 2
    assert counts["QuantizeLinear"] == 1 and counts["DequantizeLinear"] == 1  # boundaries only
    assert "MatMul" not in counts and "Relu" not in counts  # ReLU fused into the requantize clamp
    assert ctx.report["integer_lowering"]["kept_float"] == []


def test_cnn_with_relu6_pooling_and_gemm():
    model, _ = check_lowering(cnn_relu6(), (1, 3, 8, 8), min_db=25)
    counts = op_counts(model)
    assert counts["ConvInteger"] == 2 and counts["MatMulInteger"] == 1
    assert counts["MaxPool"] == 1 and counts["ReduceSum"] == 1
    clip = [n for n in model.graph if n.op_type == "Requantize" and "qmax" in n.attributes]
    assert clip, "ReLU6 becomes a requantize upper bound"


def test_attention_block_with_integer_nonlinearities():
    model, ctx = check_lowering(attention_block(), (1, 8, 16), spec="insert-fake-quant{wide_below_db=30.0}", min_db=20)
    counts = op_counts(model)
    for op in ("qcompiler.IntSoftmax", "qcompiler.IntLayerNorm", "qcompiler.IntAdd"):
        assert counts.get(op, 0) >= 1, op
    assert counts.get("qcompiler.IntGELU", 0) + counts.get("qcompiler.IntLookup", 0) == 1
    variants = ctx.report["integer_lowering"]["variants"]
    softmax = next(v for v in variants if v["op"] == "Softmax")
    assert set(softmax["errors"]) >= {"linear", "ibert"} and softmax["chosen"] in softmax["errors"]


def test_softmax_variant_can_be_forced():
    model = to_ir(attention_block())
    ctx = quantize(model, (1, 8, 16), "insert-fake-quant,lower-integer{softmax=linear}")
    node = next(n for n in model.graph if n.op_type == "IntSoftmax")
    assert node.attributes["variant"].as_string() == "linear"


def test_large_int16_sums_use_int64_accumulators():
    k = 512
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", [1, k])], [tensor("y", [1, 4])],
                       [init("w", np.full((k, 4), 0.5, np.float32))])
    model = to_ir(proto)
    quantize(model, (1, k), "insert-fake-quant{activations=int16:per-tensor:asym}")
    ctx = PassContext()
    run_pipeline(Pipeline.parse("lower-integer"), model, ctx)
    (acc,) = ctx.report["integer_lowering"]["accumulators"]
    assert acc["accumulator"] == "int64" and acc["bound"] >= 2**31
    node = next(n for n in model.graph if n.op_type == "IntMatMul")
    assert node.attributes["acc_type"].as_string() == "int64"
    (warning,) = ctx.warnings
    assert "1 of 1 integer products could overflow an int32 accumulator" in warning and "node 'mm' (MatMul)" in warning
    assert ctx.report["warnings"] == ctx.warnings


def test_int8_products_that_fit_int32_give_no_warning():
    model = to_ir(mlp())
    ctx = quantize(model, (1, 16), "insert-fake-quant,lower-integer")
    accumulators = ctx.report["integer_lowering"]["accumulators"]
    assert accumulators and all(a["accumulator"] == "int32" for a in accumulators)
    assert ctx.warnings == []


def test_does_not_lower_what_has_no_integer_form():
    model = to_ir(cnn_relu6())  # per-group conv weights: no integer form
    ctx = quantize(model, (1, 3, 8, 8), "insert-fake-quant{weights=int4:per-group:8},lower-integer")
    kept = ctx.report["integer_lowering"]["kept_float"]
    assert kept and all("per-group" in k["reason"] for k in kept)
    assert first_float_compute(model) is not None  # an integer-only target will refuse it
    model = to_ir(mlp())
    ctx = quantize(model, (1, 16), "insert-fake-quant,lower-integer{keep_float=fc2;}")
    assert [k["node"] for k in ctx.report["integer_lowering"]["kept_float"]] == ["fc2"]


@pytest.mark.slow
def test_minilm_w8a8_integer_stage_accuracy(minilm_dynamo):
    import onnxruntime as ort

    import qcompiler
    from qcompiler.examples import minilm

    model = qcompiler.load_onnx(minilm_dynamo)
    calib, evaluation = minilm.calibration_and_eval_sentences(16, 12)
    data = CalibrationData.from_arrays(minilm.tokenize(calib)).bind(input_specs(model))
    from qcompiler.presets import PRESETS

    ctx = PassContext(calibration=data)
    run_pipeline(Pipeline.parse(PRESETS["w8a8"].spec), model, ctx)
    assert get_stage(model) == "integer" and first_float_compute(model) is None
    tokens = minilm.tokenize(evaluation)
    session = ort.InferenceSession(str(minilm_dynamo))
    reference = minilm.embed_with(lambda f: session.run(None, f)[0], tokens)
    interpreter = qcompiler.ReferenceInterpreter(model)
    ours = minilm.embed_with(lambda f: interpreter.run(f)["last_hidden_state"], tokens)
    assert minilm.mean_cosine(reference, ours) > 0.985


def upsample_model(mode: str):
    r = rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["h"]),
             helper.make_node("Resize", ["h", "", "scales"], ["up"], mode=mode),
             helper.make_node("Add", ["up", "skip"], ["y"])]
    inits = [init("w", r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
             init("scales", np.array([1, 1, 2, 2], np.float32))]
    return make_model(nodes, [tensor("x", [1, 3, 4, 4]), tensor("skip", [1, 4, 8, 8])], [tensor("y", [1, 4, 8, 8])], inits)


def upsample_samples():
    return [{"x": rng(i).standard_normal((1, 3, 4, 4)).astype(np.float32),
             "skip": rng(50 + i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(8)]


@pytest.mark.parametrize("mode,lowered", [("nearest", True), ("linear", False)])
def test_nearest_resize_moves_integers(mode, lowered):
    """A nearest-neighbour Resize (an FPN/PAN upsample) runs on the integer tensor with its
    input's parameters; a linear one interpolates and stays float."""
    model = to_ir(upsample_model(mode))
    samples = upsample_samples()
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    feeds = samples[0]
    before = run(model, feeds)["y"]
    run_pipeline(Pipeline.parse("insert-fake-quant,lower-integer"), model, ctx)
    resize = next(n for n in model.graph if n.op_type == "Resize")
    assert (resize.inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8)) == lowered
    assert sqnr_db(before, run(model, feeds)["y"]) > 25


@pytest.mark.slow
@pytest.mark.parametrize("target", ["npu-sim", "host"])
def test_nearest_resize_on_integer_targets(tmp_path, target):
    import qcompiler

    calib = {k: np.stack([s[k] for s in upsample_samples()]) for k in ("x", "skip")}
    result = qcompiler.compile(upsample_model("nearest"), target, tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"


def pool_model(**attrs):
    r = rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["h"]),
             helper.make_node("AveragePool", ["h"], ["y"], **attrs)]
    inits = [init("w", r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3)]
    out = 4 if attrs.get("strides") else 8
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, out, out])], inits)


@pytest.mark.slow
@pytest.mark.parametrize("attrs,lowered", [
    ({"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, True),
    ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, False),  # edge windows average fewer values
])
def test_average_pool_is_a_windowed_integer_sum(attrs, lowered, tmp_path):
    import qcompiler

    calib = {"x": rng(5).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)}
    model = to_ir(pool_model(**attrs))
    x = calib["x"][0]
    before = run(model, {"x": x})["y"]
    ctx = PassContext(calibration=CalibrationData.from_samples([{"x": s} for s in calib["x"]]).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("insert-fake-quant,lower-integer"), model, ctx)
    assert ("AveragePool" not in [n.op_type for n in model.graph]) == lowered
    assert sqnr_db(before, run(model, {"x": x})["y"]) > 25
    if lowered:
        result = qcompiler.compile(pool_model(**attrs), "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
        assert result.manifest["verified"]["status"] == "bit-exact"


@pytest.mark.slow
@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]},  # the FPN/DB-head upsample
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"strides": [1, 1], "pads": [1, 0, 1, 0]},
    {"strides": [3, 2], "dilations": [1, 2]},
])
def test_conv_transpose_lowers_to_a_conv_integer(attrs, tmp_path):
    """ConvTranspose = ConvInteger over the input spread by the stride (zero points between
    values), padded by d·(k−1)−pad, with the kernel flipped: bit-exact on integer targets."""
    import qcompiler

    r = rng(9)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Relu", ["c"], ["y"])]
    inits = [init("w", r.standard_normal((3, 4, 3, 3)).astype(np.float32) * 0.3), init("b", r.normal(0, 0.1, 4).astype(np.float32))]
    spec = make_model(nodes, [tensor("x", [1, 3, 5, 6])], [tensor("y", None)], inits)
    y_shape = ort.InferenceSession(spec.SerializeToString()).run(None, {"x": np.zeros((1, 3, 5, 6), np.float32)})[0].shape
    proto = make_model(nodes, [tensor("x", [1, 3, 5, 6])], [tensor("y", list(y_shape))], inits)
    calib = {"x": rng(10).standard_normal((8, 1, 3, 5, 6)).astype(np.float32)}
    model = to_ir(proto)
    x = calib["x"][0]
    before = run(model, {"x": x})["y"]
    ctx = PassContext(calibration=CalibrationData.from_samples([{"x": v} for v in calib["x"]]).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("insert-fake-quant,lower-integer"), model, ctx)
    assert "ConvTranspose" not in [n.op_type for n in model.graph]
    assert sqnr_db(before, run(model, {"x": x})["y"]) > 25
    result = qcompiler.compile(proto, "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"


@pytest.mark.slow
def test_constant_minus_activation(tmp_path):
    """``anchors − distances`` (YOLOv8's dist2bbox): a constant minus a quantized tensor is an
    IntAdd with a negative multiplier; bit-exact on npu-sim."""
    import qcompiler

    r = rng(11)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["d"]), helper.make_node("Sub", ["anchors", "d"], ["y"])]
    inits = [init("w", r.standard_normal((6, 4)).astype(np.float32)), init("anchors", r.uniform(0, 80, (5, 4)).astype(np.float32))]
    proto = make_model(nodes, [tensor("x", [5, 6])], [tensor("y", [5, 4])], inits)
    calib = {"x": rng(12).standard_normal((8, 5, 6)).astype(np.float32)}
    result = qcompiler.compile(proto, "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
    x = calib["x"][0]
    got = qcompiler.load(tmp_path / "out").run({"x": x})["y"]
    reference = run(to_ir(proto), {"x": x})["y"]
    assert sqnr_db(reference, got) > 30


@pytest.mark.slow
@pytest.mark.parametrize("target,op", [("npu-sim", "IntMul"), ("host", "Requantize")])
def test_product_by_a_vector_follows_the_target(target, op, tmp_path):
    """``boxes · strides`` (a constant varying along one axis): one per-channel requantize
    where the target rescales activations per channel, an IntMul by an int16 constant on
    the NPU (per-tensor activation scales only)."""
    import qcompiler

    r = rng(13)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["d"]), helper.make_node("Mul", ["d", "strides"], ["y"])]
    inits = [init("w", r.standard_normal((6, 4)).astype(np.float32)), init("strides", np.array([[8.0], [8.0], [16.0], [32.0], [32.0]], np.float32))]
    proto = make_model(nodes, [tensor("x", [5, 6])], [tensor("y", [5, 4])], inits)
    calib = {"x": rng(14).standard_normal((8, 5, 6)).astype(np.float32)}
    result = qcompiler.compile(proto, target, tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
    ops = [n.op_type for n in result.model.graph]
    assert op in ops


@pytest.mark.slow
@pytest.mark.parametrize("tail", ["Max", "ReduceMax", "GlobalMaxPool"])
def test_max_ops_are_integer(tail, tmp_path):
    """Max, ReduceMax and GlobalMaxPool commute with the (increasing) quantization."""
    import qcompiler

    r = rng(15)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1])]
    if tail == "Max":
        nodes.append(helper.make_node("Max", ["a", "b"], ["y"]))
        out = [1, 4, 6, 6]
    elif tail == "ReduceMax":
        nodes.append(helper.make_node("ReduceMax", ["a"], ["y"], axes=[2, 3], keepdims=1))
        out = [1, 4, 1, 1]
    else:
        nodes.append(helper.make_node("GlobalMaxPool", ["a"], ["y"]))
        out = [1, 4, 1, 1]
    inits = [init("w", r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3), init("w2", r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3)]
    proto = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", out)], inits)
    calib = {"x": rng(16).standard_normal((8, 1, 3, 6, 6)).astype(np.float32)}
    result = qcompiler.compile(proto, "npu-sim", tmp_path / "out", preset="w8a8", calib=calib)
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert tail in [n.op_type for n in result.model.graph]
    got = qcompiler.load(tmp_path / "out").run({"x": calib["x"][0]})["y"]
    assert sqnr_db(run(to_ir(proto), {"x": calib["x"][0]})["y"], got) > 30


@pytest.mark.parametrize("hi", [np.inf, np.finfo(np.float32).max])
def test_clip_to_infinity_is_a_one_sided_clip(hi):
    """Exporters write a one-sided clamp as Clip(x, 0, FLT_MAX) or with an infinite bound: the
    bound beyond the output type's range is dropped (was an internal error)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Clip", ["h", "lo", "hi"], ["y"])]
    inits = [init("w", rng(17).standard_normal((6, 4)).astype(np.float32)), init("lo", np.array(1e-10, np.float32)),
             init("hi", np.array(hi, np.float32))]
    model = to_ir(make_model(nodes, [tensor("x", [3, 6])], [tensor("y", [3, 4])], inits))
    samples = [{"x": rng(i).standard_normal((3, 6)).astype(np.float32)} for i in range(8)]
    before = run(model, samples[0])["y"]
    ctx = PassContext(calibration=CalibrationData.from_samples(samples).bind(input_specs(model)))
    run_pipeline(Pipeline.parse("insert-fake-quant,lower-integer"), model, ctx)
    assert get_stage(model) == "integer"
    assert sqnr_db(before, run(model, samples[0])["y"]) > 25


@pytest.mark.parametrize("op,bound", [("Max", -0.4), ("Min", 0.7)])
def test_max_and_min_with_a_constant_bound(op, bound):
    """``Max(x, c)`` (tf2onnx's tf.math.maximum after a LeakyRelu): the constant quantized with
    the output's parameters; exactly the QDQ model, since max(Q(x), Q(c)) = Q(max(x, c))."""
    nodes = [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.2), helper.make_node(op, ["a", "c"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])], [init("c", np.full((1, 1), bound, np.float32))])
    model = to_ir(proto)
    quantize(model, (2, 8), "insert-fake-quant")
    feeds = [{"x": rng(40 + i).standard_normal((2, 8)).astype(np.float32)} for i in range(4)]
    fake = [run(model, f)["y"] for f in feeds]
    ctx = PassContext()
    run_pipeline(Pipeline.parse("lower-integer"), model, ctx)
    assert first_float_compute(model) is None and op in op_counts(model)
    for f, want in zip(feeds, fake):
        np.testing.assert_array_equal(run(model, f)["y"], want)
