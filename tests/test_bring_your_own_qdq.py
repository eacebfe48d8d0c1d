"""QDQ models quantized elsewhere (onnxruntime ``quantize_static``) lowered with their own
scales: settle-qdq, exact masks behind quantize/dequantize pairs, integer-only targets."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import qcompiler
from builders import init, make_model, rng, run, save, tensor, to_ir
from qcompiler.graph import get_stage
from qcompiler.integer_check import first_float_compute
from qcompiler.passmanager import PassContext, run_pipeline
from qcompiler.pipeline import Pipeline

T, D = 8, 16


def masked_attention(d: int = D, t: int = T) -> onnx.ModelProto:
    """A BERT-style block with a padding mask: ``scores + Where(mask, 0, finfo.min)``, then
    softmax, the value product, a GELU MLP behind a ``Reshape`` (as exporters write it)."""
    r = rng(3)
    w = lambda name, *s: init(name, (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32))
    inits = [w("wq", d, d), w("wk", d, d), w("wv", d, d), w("wup", d, 2 * d), w("wdown", 2 * d, d),
             init("g", r.uniform(0.5, 1.5, d).astype(np.float32)), init("b", r.standard_normal(d).astype(np.float32) * 0.1),
             init("zero", np.array(0.0, np.float32)), init("neg", np.array(np.finfo(np.float32).min, np.float32)),
             init("axes", np.array([1], np.int64)), init("flat", np.array([t, 2 * d], np.int64)),
             init("back", np.array([1, t, 2 * d], np.int64)), init("inv_sqrt_d", np.array(1 / np.sqrt(d), np.float32))]
    nodes = [
        helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["keep", "axes"], ["keep3"]),
        helper.make_node("Where", ["keep3", "zero", "neg"], ["additive"]),
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"]),
        helper.make_node("MatMul", ["n", "wk"], ["k"]),
        helper.make_node("MatMul", ["n", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "inv_sqrt_d"], ["s1"]),
        helper.make_node("Add", ["s1", "additive"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("Add", ["a", "x"], ["res"]),
        helper.make_node("MatMul", ["res", "wup"], ["u"]),
        helper.make_node("Gelu", ["u"], ["gl"]),
        helper.make_node("Reshape", ["gl", "flat"], ["gl2"]),
        helper.make_node("Reshape", ["gl2", "back"], ["gl3"]),
        helper.make_node("MatMul", ["gl3", "wdown"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [1, t, d]), tensor("mask", [1, t], TensorProto.INT64)],
                      [tensor("y", [1, t, d])], inits, opset=20)


def samples(n: int, t: int = T, d: int = D) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(n):
        mask = np.ones((1, t), np.int64)
        mask[0, t - 1 - i % 3:] = 0  # 1-3 padded positions
        out.append({"x": rng(100 + i).standard_normal((1, t, d)).astype(np.float32), "mask": mask})
    return out


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def ort_quantize_static(proto: onnx.ModelProto, feeds, tmp_path, *, per_channel: bool = False) -> str:
    """The model quantized by onnxruntime (QDQ format, uint8 activations, int8 weights)."""
    src = save(proto, tmp_path / "float.onnx")
    dst = str(tmp_path / "qdq.onnx")
    quantize_static(src, dst, _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


@pytest.fixture(scope="module")
def qdq_attention(tmp_path_factory) -> str:
    return ort_quantize_static(masked_attention(), samples(16), tmp_path_factory.mktemp("byo"))


def test_quantize_static_model_lowers_without_calibration(qdq_attention, tmp_path):
    model = qcompiler.load_onnx(qdq_attention)
    assert get_stage(model) == "fakequant"
    result = qcompiler.compile(model, "reference", tmp_path / "out")  # no calib: its own scales
    lowered = onnx.load(tmp_path / "out" / "model.onnx")
    ops = {n.op_type for n in lowered.graph.node}
    assert "IntSoftmax" in ops and "MatMulInteger" in ops
    assert first_float_compute(to_ir(lowered)) is None
    assert result.manifest["verified"]["status"] == "bit-exact"


def test_quantize_static_model_is_close_to_its_own_qdq_model(qdq_attention, tmp_path):
    """The integer model computes what the QDQ model says (with the mask made exact), not a
    recalibrated one: its output agrees with onnxruntime running the QDQ model it came from."""
    qcompiler.compile(qdq_attention, "reference", tmp_path / "out")
    runner = qcompiler.load(tmp_path / "out")
    settled = ort.InferenceSession(str(tmp_path / "out" / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    floats = ort.InferenceSession(masked_attention().SerializeToString(), providers=["CPUExecutionProvider"])
    for feeds in samples(4):
        ours = runner.run(feeds)["y"]
        theirs = settled.run(None, feeds)[0]
        reference = floats.run(None, feeds)[0]
        # within a few output steps of the QDQ model; close to float
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.995
        assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.97


@pytest.mark.parametrize("target", ["reference", pytest.param("npu-sim", marks=pytest.mark.slow)])
def test_padded_positions_get_probability_zero(qdq_attention, tmp_path, target):
    """onnxruntime quantizes the finfo.min mask (scale ~1e36); lowered, padded keys have
    probability exactly 0: changing them leaves every unpadded row bit-identical."""
    qcompiler.compile(qdq_attention, target, tmp_path / "out")
    runner = qcompiler.load(tmp_path / "out")
    feeds = samples(1)[0]
    keep = feeds["mask"][0].astype(bool)
    changed = {"x": feeds["x"].copy(), "mask": feeds["mask"]}
    changed["x"][0, ~keep] = rng(9).standard_normal((int((~keep).sum()), D)).astype(np.float32) * 3
    a, b = runner.run(feeds)["y"], runner.run(changed)["y"]
    np.testing.assert_array_equal(a[0, keep], b[0, keep])


# -- settle-qdq ---------------------------------------------------------------------------------


def _qdq(name, scale, zero, x):
    return [helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])], \
        [init(f"{name}_s", np.array(scale, np.float32)), init(f"{name}_z", np.array(zero, np.uint8))]


def movement_chain(second_reader: bool = False, per_channel: bool = False) -> onnx.ModelProto:
    """``DQ → Reshape → Gelu → Transpose → Q → DQ → Sigmoid`` (pairs placed as onnxruntime does)."""
    a_nodes, a_inits = _qdq("a", 0.05, 128, "x")
    b_nodes, b_inits = _qdq("b", 0.02, 10, "t")
    if per_channel:
        b_inits[0] = init("b_s", np.full(4, 0.02, np.float32))
        b_inits[1] = init("b_z", np.full(4, 10, np.uint8))
        b_nodes[0].attribute.append(helper.make_attribute("axis", 1))
        b_nodes[1].attribute.append(helper.make_attribute("axis", 1))
    nodes = a_nodes + [
        helper.make_node("Reshape", ["a_dq", "shape"], ["r"]),
        helper.make_node("Gelu", ["r"], ["g"]),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1]),
        *b_nodes,
        helper.make_node("Sigmoid", ["b_dq"], ["y"]),
    ]
    outputs = [tensor("y", [1, 4, 6])]
    if second_reader:
        nodes.append(helper.make_node("Neg", ["t"], ["other"]))
        outputs.append(tensor("other", [1, 4, 6]))
    return make_model(nodes, [tensor("x", [1, 24])], outputs, a_inits + b_inits + [init("shape", np.array([1, 6, 4], np.int64))], opset=20)


def _settle(proto):
    model = to_ir(proto)
    ctx = PassContext()
    run_pipeline(Pipeline.parse("settle-qdq"), model, ctx)
    return model, ctx


def _pairs(model: ir.Model) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in model.graph)


def test_settle_qdq_quantizes_both_sides_of_data_movement():
    model, ctx = _settle(movement_chain())
    # DQ → Reshape gets a pair after the Reshape; Transpose → Q gets one before the Transpose
    assert _pairs(model) == 4
    assert ctx.report["settle_qdq"]["pairs_added"] == 2
    gelu = next(n for n in model.graph if n.op_type == "Gelu")
    assert gelu.inputs[0].producer().op_type == "DequantizeLinear"
    assert [u.node.op_type for u in gelu.outputs[0].uses()] == ["QuantizeLinear"]


def test_settle_qdq_is_exact():
    proto = movement_chain()
    model, _ = _settle(proto)
    for i in range(4):
        feeds = {"x": rng(i).standard_normal((1, 24)).astype(np.float32) * 3}
        np.testing.assert_array_equal(run(to_ir(proto), feeds)["y"], run(model, feeds)["y"])


def test_settle_qdq_does_not_fire_on_its_own_fake_quant_or_unsafe_places():
    from test_pass_lower_integer import attention_block, quantize

    model = to_ir(attention_block())
    quantize(model, (1, 8, 16), "insert-fake-quant")
    before = _pairs(model)
    ctx = PassContext()
    assert not Pipeline.parse("settle-qdq").passes[0].run(model, ctx)
    assert _pairs(model) == before
    # the moved value has another float reader: quantizing before the move would change it
    model, ctx = _settle(movement_chain(second_reader=True))
    assert ctx.report["settle_qdq"]["pairs_added"] == 1  # only after the Reshape
    # per-channel parameters do not commute with a transpose
    model, ctx = _settle(movement_chain(per_channel=True))
    assert ctx.report["settle_qdq"]["pairs_added"] == 1


# -- the bundled example, quantized by onnxruntime -----------------------------------------------


@pytest.mark.slow
def test_minilm_quantize_static_on_npu_sim(minilm_legacy, tmp_path, cli):
    """all-MiniLM-L6-v2 quantized by onnxruntime's ``quantize_static`` (per-channel int8
    weights, uint8 activations, its finfo.min mask quantized with the rest) compiles for
    ``npu-sim`` from the CLI with no ``--calib``: integer-only, bit-exact with the reference
    on real sentences, and as close to FP32 as onnxruntime's own QDQ model once its mask is exact."""
    from qcompiler.examples import minilm

    calib, evals = minilm.calibration_and_eval_sentences(16, 8)
    tokens = minilm.tokenize(calib)
    feeds = [{name: tokens[name][i] for name in minilm.INPUT_NAMES} for i in range(len(calib))]
    qdq = ort_quantize_static(onnx.load(minilm_legacy), feeds, tmp_path, per_channel=True)
    done = cli(qdq, "--target", "npu-sim", "-o", tmp_path / "npu")
    assert done.returncode == 0, done.stderr
    assert "fakequant stage" in done.stdout + done.stderr
    qcompiler.compile(qdq, "reference", tmp_path / "ref")
    assert first_float_compute(to_ir(onnx.load(tmp_path / "ref" / "model.onnx"))) is None
    npu, reference = qcompiler.load(tmp_path / "npu"), qcompiler.load(tmp_path / "ref")
    eval_tokens = minilm.tokenize(evals)
    fp = ort.InferenceSession(str(minilm_legacy), providers=["CPUExecutionProvider"])
    ours = minilm.embed_with(lambda f: npu.run(f)["last_hidden_state"], eval_tokens)
    exact = minilm.embed_with(lambda f: reference.run(f)["last_hidden_state"], eval_tokens)
    np.testing.assert_array_equal(ours, exact)
    fp32 = minilm.embed_with(lambda f: fp.run(None, f)[0], eval_tokens)
    settled = ort.InferenceSession(str(tmp_path / "npu" / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    theirs = minilm.embed_with(lambda f: settled.run(None, f)[0], eval_tokens)
    ours_cos, theirs_cos = minilm.mean_cosine(ours, fp32), minilm.mean_cosine(theirs, fp32)
    print(f"cosine vs FP32: integer {ours_cos:.4f}, onnxruntime QDQ (exact mask) {theirs_cos:.4f}")
    assert ours_cos > theirs_cos - 0.06


def test_chain_of_unquantized_element_wise_ops_is_one_table():
    """``DQ → Div(√2) → Erf → Q`` (onnxruntime does not quantize Div/Erf): one IntLookup of
    the composition, bit-identical to the QDQ model on every input step."""
    a_nodes, a_inits = _qdq("a", 0.05, 128, "x")
    b_nodes, b_inits = _qdq("b", 1 / 127, 128, "e")
    nodes = a_nodes + [helper.make_node("Div", ["a_dq", "root2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]), *b_nodes]
    proto = make_model(nodes, [tensor("x", [1, 256])], [tensor("b_dq", [1, 256])],
                       a_inits + b_inits + [init("root2", np.array(np.sqrt(2), np.float32))], opset=20)
    model = to_ir(proto)
    ctx = PassContext()
    run_pipeline(Pipeline.parse("lower-integer"), model, ctx)
    assert [n.op_type for n in model.graph if n.op_type not in ("QuantizeLinear", "DequantizeLinear")] == ["IntLookup"]
    assert not ctx.report["integer_lowering"]["kept_float"]
    feeds = {"x": ((np.arange(256, dtype=np.float32) - 128) * 0.05).reshape(1, 256)}  # every input step
    np.testing.assert_array_equal(run(to_ir(proto), feeds)["b_dq"], run(model, feeds)["b_dq"])
