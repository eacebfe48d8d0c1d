"""fpga-sim: HLS-style C run as a gcc C simulation, bit-exact with the reference interpreter."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qcompiler
from builders import init, save, tensor
from qcompiler.compiler import compile_model
from qcompiler.errors import TargetError
from qcompiler.intops import add_constants, fixed_point, layernorm_constants
from qcompiler.onnx_import import import_proto
from qcompiler.opset import QC_DOMAIN
from qcompiler.pipeline import Pipeline
from qcompiler.targets.fpga_sim import FpgaSimTarget
from qcompiler.targets.fpga_resources import dsp_per_multiplier, memory_cost

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="fpga-sim needs gcc")

I8, U8, I16, I32, I64, F32, BOOL = (
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.FLOAT, TensorProto.BOOL,
)


# -- building integer graphs ----------------------------------------------------------------------


class Graph:
    """A tiny builder of integer-stage ONNX graphs (default and qcompiler domains)."""

    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(init(name, np.asarray(array)))
        return name

    def input(self, name: str, shape, dtype=F32) -> str:
        self.inputs.append(tensor(name, shape, dtype))
        return name

    def output(self, name: str, dtype=F32, shape=None) -> None:
        self.outputs.append(tensor(name, shape, dtype))

    def op(self, op_type: str, inputs, domain: str = "", outputs: int = 1, **attrs):
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(f"n_{op_type}"), domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def qc(self, op_type: str, inputs, **attrs):
        return self.op(op_type, inputs, domain=QC_DOMAIN, **attrs)

    def weights(self, shape, dtype=np.int8, lo=-127, hi=128) -> str:
        return self.const(self.rng.integers(lo, hi, shape).astype(dtype), "w")

    def requant(self, x, real, out_dtype=np.int8, zero_point=0, axis=1, **attrs) -> str:
        """Requantize with (per-channel if ``real`` is a list) fixed-point multipliers."""
        reals = np.atleast_1d(np.asarray(real, np.float64))
        pairs = [fixed_point(float(r)) for r in reals]
        m = np.array([p[0] for p in pairs], np.int32)
        k = np.array([p[1] for p in pairs], np.int32)
        if reals.size == 1 and np.ndim(real) == 0:
            m, k = m[0], k[0]
        zp = self.const(np.asarray(zero_point, out_dtype), "z")
        return self.qc("Requantize", [x, self.const(m, "m"), self.const(k, "k"), zp], axis=axis, **attrs)

    def quantize(self, x, scale, zero_point=0, dtype=np.int8) -> str:
        return self.op("QuantizeLinear", [x, self.const(np.float32(scale), "s"), self.const(np.asarray(zero_point, dtype), "z")])

    def dequantize(self, x, scale, zero_point=0, dtype=np.int8, name="y") -> None:
        node = helper.make_node(
            "DequantizeLinear", [x, self.const(np.float32(scale), "s"), self.const(np.asarray(zero_point, dtype), "z")],
            [name], name=self.name("n_dq"),
        )
        self.nodes.append(node)
        self.output(name)

    def model(self, opset: int = 17) -> onnx.ModelProto:
        model = self._model(self.outputs, opset)
        if any(not o.type.tensor_type.HasField("shape") for o in self.outputs):  # give outputs their shapes
            zeros = {
                vi.name: np.zeros([d.dim_value for d in vi.type.tensor_type.shape.dim], helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
                for vi in self.inputs
            }
            values = qcompiler.ReferenceInterpreter(model).run(zeros)
            outputs = [tensor(o.name, list(values[o.name].shape), o.type.tensor_type.elem_type) for o in self.outputs]
            model = self._model(outputs, opset)
        return model

    def _model(self, outputs, opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QC_DOMAIN, 1)],
            producer_name="qcompiler-tests",
        )
        model.ir_version = 9
        helper.set_model_props(model, {"qcompiler.stage": "integer"})
        return model


def compile_fpga(proto: onnx.ModelProto, out_dir, **options):
    """Compile through the compiler driver (``ir.from_proto``: the target needs no importer shapes)."""
    model = ir.from_proto(proto)
    return compile_model(model, FpgaSimTarget(**options), out_dir, pipeline=Pipeline.parse("eliminate-dead-code"))


def assert_bit_exact(proto, feeds, tmp_path, name="out", **options) -> dict:
    """Compile for fpga-sim, run the C simulation, compare every output bit for bit."""
    result = compile_fpga(proto, tmp_path / name, **options)
    got = qcompiler.load(tmp_path / name).run(feeds)
    want = qcompiler.ReferenceInterpreter(proto).run(feeds)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key].view(np.uint8), np.ascontiguousarray(want[key]).view(np.uint8), err_msg=key)
    return result.manifest


def resources(out_dir) -> dict:
    return json.loads((out_dir / "resources.json").read_text())


# -- models ---------------------------------------------------------------------------------------------


def quantized_mlp(din=24, hidden=40, dout=10, batch=3) -> onnx.ModelProto:
    """uint8 asymmetric input, two MatMulInteger layers with int32 bias, per-channel requantize + ReLU."""
    g = Graph(1)
    x = g.quantize(g.input("x", [batch, din]), 0.04, 120, np.uint8)
    h = g.op("MatMulInteger", [x, g.weights((din, hidden)), g.const(np.uint8(120)), g.const(np.int8(0))])
    h = g.op("Add", [h, g.const(g.rng.integers(-3000, 3000, hidden).astype(np.int32), "b")])
    h = g.requant(h, list(g.rng.uniform(2e-4, 6e-4, hidden)), np.uint8, 0, axis=1)  # ReLU: the uint8 floor
    y = g.op("MatMulInteger", [h, g.weights((hidden, dout)), g.const(np.uint8(0))])
    y = g.op("Add", [y, g.const(g.rng.integers(-3000, 3000, dout).astype(np.int32), "b")])
    y = g.requant(y, 3e-4, np.int8, -3)
    g.dequantize(y, 0.05, -3)
    return g.model()


def conv_net(unroll_safe=True) -> onnx.ModelProto:
    """Conv (pads, x zero point) → bias → requantize with ReLU6 (qmin/qmax) → depthwise conv (stride 2,
    dilation) → MaxPool 2×2/2 → Cast → ReduceSum global pool → requantize → MatMulInteger head."""
    g = Graph(2)
    x = g.quantize(g.input("x", [2, 3, 12, 12]), 0.03, -5)
    c1 = g.op("ConvInteger", [x, g.weights((8, 3, 3, 3)), g.const(np.int8(-5))], pads=[1, 1, 1, 1])
    c1 = g.op("Add", [c1, g.const(g.rng.integers(-500, 500, (1, 8, 1, 1)).astype(np.int32), "b")])
    six = round(6.0 / 0.05)
    r1 = g.requant(c1, list(g.rng.uniform(3e-4, 8e-4, 8)), np.int8, 0, axis=1, qmin=0, qmax=six)
    dw = g.op(
        "ConvInteger", [r1, g.weights((8, 1, 3, 3))], group=8, strides=[2, 2], pads=[2, 2, 2, 2], dilations=[2, 2]
    )
    r2 = g.requant(dw, 2e-3, np.int8, 0, qmin=0)
    p = g.op("MaxPool", [r2], kernel_shape=[2, 2], strides=[2, 2])
    wide = g.op("Cast", [p], to=I32)
    s = g.op("ReduceSum", [wide, g.const(np.array([2, 3], np.int64))], keepdims=0)
    avg = g.requant(s, 1.0 / 9, np.int8, 0)
    logits = g.op("MatMulInteger", [avg, g.weights((8, 5))])
    g.dequantize(g.requant(logits, 1e-2, np.int8, 0), 0.1)
    return g.model()


def attention(variant: str, seq=6, dim=8, heads=2, axis=-1) -> onnx.ModelProto:
    """One attention block on int8 activations: Q/K/V projections, QKᵀ (IntMatMul on run-time
    operands), IntSoftmax, P·V, residual IntAdd, IntLayerNorm, IntGELU."""
    g = Graph(3)
    x = g.quantize(g.input("x", [1, seq, dim]), 0.05)
    hd = dim // heads

    def project(name):
        h = g.op("MatMulInteger", [x, g.weights((dim, dim), lo=-60, hi=61)])
        h = g.requant(h, 1.5e-3, np.int8)
        h = g.op("Reshape", [h, g.const(np.array([1, seq, heads, hd], np.int64))])
        return g.op("Transpose", [h], perm=[0, 2, 1, 3])

    q, k, v = project("q"), project("k"), project("v")
    kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = g.qc("IntMatMul", [q, kt])
    scores = g.requant(scores, 0.3, np.int8)
    if axis != -1:  # softmax over a non-last axis: transpose there and back
        scores = g.op("Transpose", [scores], perm=[0, 1, 3, 2])
    probs = g.qc(
        "IntSoftmax", [scores, g.const(np.int8(0)), g.const(np.uint8(0))],
        input_scale=0.08, output_scale=1.0 / 256, variant=variant, axis=axis if axis == -1 else 2,
    )
    if axis != -1:
        probs = g.op("Transpose", [probs], perm=[0, 1, 3, 2])
    ctx = g.op("MatMulInteger", [probs, v, g.const(np.uint8(0)), g.const(np.int8(0))])
    ctx = g.requant(ctx, 8e-3, np.int8)
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const(np.array([1, seq, dim], np.int64))])
    ma, mb, sh = add_constants(0.05, 0.04, 0.06)
    res = g.qc("IntAdd", [x, g.const(np.int8(0)), ctx, g.const(np.int8(0)), g.const(np.int8(0))], a_multiplier=ma, b_multiplier=mb, shift=sh)
    gamma = g.rng.uniform(0.5, 1.5, dim)
    beta = g.rng.normal(0, 0.1, dim)
    mult, bias, shift, eps_q = layernorm_constants(gamma, beta, 0.06, 0.03, 1e-5)
    ln = g.qc("IntLayerNorm", [res, g.const(np.int8(0)), g.const(np.int8(0)), g.const(mult), g.const(bias)], shift=shift, eps_q=eps_q)
    gelu = g.qc("IntGELU", [ln, g.const(np.int8(0)), g.const(np.int8(0))], input_scale=0.03, output_scale=0.02)
    g.dequantize(gelu, 0.02)
    return g.model()


def int16_block() -> onnx.ModelProto:
    """int16 activations: IntMatMul int16 × int8 (int64 accumulator), int16 requantize, IntMul, IntLookup."""
    g = Graph(4)
    x = g.quantize(g.input("x", [4, 32]), 0.001, 0, np.int16)
    acc = g.qc("IntMatMul", [x, g.weights((32, 16))], acc_type="int64")
    h = g.requant(acc, 2e-3, np.int16, 0)
    sq = g.qc("IntMul", [h, g.const(np.int16(0)), h, g.const(np.int16(0)), g.const(np.int16(5))], multiplier=fixed_point(3e-3)[0], shift=fixed_point(3e-3)[1] + 4, pre_shift=4, qmin=-2000)
    small = g.requant(sq, 0.25, np.int8, 0)
    table = g.rng.integers(-30000, 30000, 256).astype(np.int16)
    looked = g.qc("IntLookup", [small, g.const(table)])
    g.dequantize(looked, 0.01, 0, np.int16)
    return g.model()


# -- bit-exactness ---------------------------------------------------------------------------------------


def test_quantized_mlp_bit_exact(tmp_path):
    x = np.random.default_rng(0).normal(0, 2, (3, 24)).astype(np.float32)
    assert_bit_exact(quantized_mlp(), {"x": x}, tmp_path)


def test_conv_net_bit_exact_and_resources(tmp_path):
    x = np.random.default_rng(1).normal(0, 1.5, (2, 3, 12, 12)).astype(np.float32)
    assert_bit_exact(conv_net(), {"x": x}, tmp_path)
    report = resources(tmp_path / "out")
    convs = [e for e in report["layers"] if e["op"] == "ConvInteger"]
    assert [e["macs"] for e in convs] == [2 * 8 * 144 * 27, 2 * 8 * 36 * 9]
    assert all(e["dsp"] >= 1 and e["latency_cycles"] > e["macs"] / max(e["lanes"], 1) for e in convs)


@pytest.mark.parametrize("variant", ["ibert", "linear", "lut"])
def test_attention_block_bit_exact(tmp_path, variant):
    x = np.random.default_rng(2).normal(0, 2, (1, 6, 8)).astype(np.float32)
    assert_bit_exact(attention(variant), {"x": x}, tmp_path, unroll=4)


def test_softmax_on_a_middle_axis(tmp_path):
    x = np.random.default_rng(3).normal(0, 2, (1, 6, 8)).astype(np.float32)
    assert_bit_exact(attention("ibert", axis=2), {"x": x}, tmp_path)


def test_int16_activations_bit_exact(tmp_path):
    x = np.random.default_rng(4).normal(0, 3, (4, 32)).astype(np.float32)
    assert_bit_exact(int16_block(), {"x": x}, tmp_path, unroll=3)


def data_movement() -> onnx.ModelProto:
    """Embedding Gather on run-time ids, masks and bool ops, Slice/Concat/Split/Pad/Expand/Where,
    Gather* with negative and run-time indices, broadcasting integer arithmetic; integer and bool outputs."""
    g = Graph(5)
    ids, mask = g.input("ids", [2, 5], I64), g.input("mask", [2, 5], I64)
    emb = g.op("Gather", [g.weights((11, 6)), ids])  # [2, 5, 6]
    picked = g.op("Gather", [emb, g.const(np.array([-1, 0, 2], np.int64))], axis=1)  # [2, 3, 6]
    sliced = g.op("Slice", [emb] + [g.const(np.array(v, np.int64)) for v in ([4, 1], [-100, 6], [1, 2], [-2, 2])])
    cat = g.op("Concat", [picked, sliced], axis=-1)  # [2, 3, 9]
    left, right = g.op("Split", [cat, g.const(np.array([4, 5], np.int64))], axis=2, outputs=2)
    reflect = g.op("Pad", [left, g.const(np.array([0, 1, 0, 0, 0, 2], np.int64))], mode="reflect")
    edge = g.op("Pad", [right, g.const(np.array([1, 0, 0, 0, 2, 1], np.int64))], mode="edge")
    const = g.op("Pad", [right, g.const(np.array([0, 2, 1, 0, 1, 0], np.int64)), g.const(np.int8(-7))])
    on = g.op("Cast", [mask], to=BOOL)
    either = g.op("Or", [g.op("And", [g.op("Less", [ids, g.const(np.int64(7))]), g.op("Greater", [ids, g.const(np.int64(1))])]),
                         g.op("Equal", [ids, g.const(np.int64(3))])])
    keep = g.op("And", [g.op("Not", [either]), on])
    chosen = g.op("Where", [g.op("Unsqueeze", [keep, g.const(np.array([2], np.int64))]), emb, g.const(np.arange(6, dtype=np.int8))])
    wide = g.op("Expand", [g.op("Unsqueeze", [chosen, g.const(np.array([1], np.int64))]), g.const(np.array([2, 3, 5, 6], np.int64))])
    mask3 = g.op("Unsqueeze", [mask, g.const(np.array([2], np.int64))])  # run-time indices in {0, 1}
    by_mask = g.op("GatherND", [emb, mask3], batch_dims=1)  # [2, 5, 6]
    elements = g.op("GatherElements", [emb, g.const(g.rng.integers(-6, 6, (2, 5, 3)).astype(np.int64))], axis=2)
    first = g.op("Slice", [mask3, g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64)), g.const(np.array([1], np.int64))])
    rows = g.op("GatherElements", [emb, g.op("Expand", [first, g.const(np.array([2, 2, 6], np.int64))])], axis=1)  # [2, 2, 6]
    nd = g.op("GatherND", [emb, g.const(np.array([[0, -1], [1, 2], [1, 4]], np.int64))])  # [3, 6]
    ma, mb, sh = add_constants(0.1, 0.03, 0.08)
    summed = g.qc("IntAdd", [emb, g.const(np.int8(2)), g.const(g.rng.integers(-100, 100, 6).astype(np.int8)), g.const(np.int8(-1)), g.const(np.int8(3))],
                  a_multiplier=ma, b_multiplier=mb, shift=sh, qmin=-50)
    acc = g.op("Cast", [g.op("Transpose", [emb], perm=[2, 0, 1])], to=I32)
    arith = g.op("Mul", [g.op("Sub", [g.op("Add", [acc, g.const(np.int32(2**31 - 100))]), g.const(np.arange(5, dtype=np.int32))]), g.const(np.int32(3))])
    flat = g.op("Flatten", [rows], axis=1)
    squeezed = g.op("Squeeze", [mask3, g.const(np.array([2], np.int64))])  # an alias of an input
    for name, dtype in [
        (reflect, I8), (edge, I8), (const, I8), (keep, BOOL), (wide, I8), (by_mask, I8), (elements, I8),
        (nd, I8), (summed, I8), (arith, I32), (flat, I8), (squeezed, I64),
    ]:
        g.output(name, dtype)
    g.output("ids", I64)  # an input that is also an output
    return g.model(opset=18)


def test_data_movement_and_masks_bit_exact(tmp_path):
    rng = np.random.default_rng(6)
    feeds = {"ids": rng.integers(0, 11, (2, 5)).astype(np.int64), "mask": rng.integers(0, 2, (2, 5)).astype(np.int64)}
    manifest = assert_bit_exact(data_movement(), feeds, tmp_path, unroll=2)
    assert len(manifest["target_info"]["outputs"]) == 13
    kinds = {e["op"]: e["kind"] for e in resources(tmp_path / "out")["layers"]}
    assert kinds["Unsqueeze"] == "alias" and kinds["Flatten"] == "alias"


def boundary() -> onnx.ModelProto:
    """Per-axis uint8 QuantizeLinear (ties, NaN, ±inf, huge values), int32 DequantizeLinear with an
    int32 zero point (numpy computes that one in float64), MatMulInteger with per-column b zero points."""
    g = Graph(7)
    q = g.op("QuantizeLinear", [g.input("x", [3, 4]), g.const(np.array([0.5, 0.25, 2.0, 0.1], np.float32)), g.const(np.array([0, 128, 7, 255], np.uint8))])
    g.output(q, U8)
    acc = g.op("MatMulInteger", [q, g.weights((4, 5), np.uint8, 0, 256), g.const(np.uint8(100)), g.const(np.arange(5, dtype=np.uint8) * 40)])
    big = g.op("Mul", [acc, g.const(np.int32(40003))])
    g.dequantize(big, 1.7e-3, np.int32(-123456), np.int32, name="y")
    return g.model()


def test_boundary_ops_bit_exact(tmp_path):
    x = np.array(
        [[0.25, 0.375, -1e10, np.nan], [1e10, np.inf, -np.inf, 12.25], [-0.75, 31.875, 3.0, -0.05]], np.float32
    )
    with np.errstate(invalid="ignore"):
        assert_bit_exact(boundary(), {"x": x}, tmp_path)


def conv_variants() -> onnx.ModelProto:
    """uint8 activations with a zero point, per-channel weight zero points, SAME_UPPER padding with
    stride 2, a grouped (not depthwise) conv, and a 1-D conv."""
    g = Graph(8)
    x = g.quantize(g.input("x", [1, 4, 9, 7]), 0.05, 128, np.uint8)
    a = g.op("ConvInteger", [x, g.weights((6, 4, 3, 2)), g.const(np.uint8(128)), g.const(np.array([0, 1, -2, 3, 0, 5], np.int8))],
             auto_pad="SAME_UPPER", strides=[2, 2])
    b = g.op("ConvInteger", [x, g.weights((6, 2, 1, 3)), g.const(np.uint8(128))], group=2, pads=[0, 1, 0, 0])
    g.output(a, I32)
    g.output(b, I32)
    seq = g.quantize(g.input("s", [2, 3, 10]), 0.05)
    c = g.op("ConvInteger", [seq, g.weights((4, 3, 3))], pads=[2, 1], dilations=[2], strides=[3])
    g.output(c, I32)
    return g.model()


def test_conv_variants_bit_exact(tmp_path):
    rng = np.random.default_rng(9)
    feeds = {"x": rng.normal(0, 2, (1, 4, 9, 7)).astype(np.float32), "s": rng.normal(0, 2, (2, 3, 10)).astype(np.float32)}
    assert_bit_exact(conv_variants(), feeds, tmp_path, unroll=5)


def maxpool_model(shape=None, **attrs) -> onnx.ModelProto:
    g = Graph(10)
    g.output(g.op("MaxPool", [g.input("x", [2, 3, 7, 6], I8)], **attrs), I8, shape)
    return g.model()


def onnx_maxpool(x, kernel, strides, pads):
    """ONNX MaxPool (padding never wins), written independently of the target."""
    n, c, h, w = x.shape
    oh = (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
    padded = np.full((n, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), -(2**15), np.int64)
    padded[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = x
    y = np.empty((n, c, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            window = padded[:, :, i * strides[0] : i * strides[0] + kernel[0], j * strides[1] : j * strides[1] + kernel[1]]
            y[:, :, i, j] = window.max(axis=(2, 3))
    return y.astype(x.dtype)


def test_maxpool_variants(tmp_path):
    x = np.random.default_rng(11).integers(-128, 128, (2, 3, 7, 6)).astype(np.int8)
    x[0, 0] = -100  # a window of only negative values next to padding
    # strided pooling (with padding, ceil mode, dilation): the reference interpreter runs these
    assert_bit_exact(maxpool_model(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1), {"x": x}, tmp_path, "a")
    assert_bit_exact(maxpool_model(kernel_shape=[2, 2], strides=[2, 1], dilations=[2, 2]), {"x": x}, tmp_path, "b")
    # stride 1 with padding: onnx.reference fails on integer inputs (it pads with NaN), so compare with ONNX semantics
    compile_fpga(maxpool_model([2, 3, 7, 6], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), tmp_path / "c")
    got = qcompiler.load(tmp_path / "c").run({"x": x})
    np.testing.assert_array_equal(list(got.values())[0], onnx_maxpool(x, [3, 3], [1, 1], [1, 1, 1, 1]))


# -- errors ------------------------------------------------------------------------------------------


def test_float_graph_is_refused_naming_a_node(tmp_path):
    from builders import mlp

    with pytest.raises(TargetError, match=r"fpga-sim.*node 'fc1' \(MatMul\)"):
        compile_model(import_proto(mlp()), FpgaSimTarget(), tmp_path / "out", pipeline=Pipeline.parse("eliminate-dead-code"))
    assert not (tmp_path / "out").exists()
    # float compute in the middle of an integer-stage graph
    g = Graph()
    x = g.quantize(g.input("x", [2, 4]), 0.1)
    deq = g.op("DequantizeLinear", [x, g.const(np.float32(0.1)), g.const(np.int8(0))])
    g.output(g.op("Relu", [deq]))
    with pytest.raises(TargetError, match=r"node 'n_Relu\d+' \(Relu\) computes the float tensor"):
        compile_fpga(g.model(), tmp_path / "out2")


def test_unsupported_ops_are_refused_naming_node_and_op(tmp_path):
    g = Graph()
    x = g.input("x", [3, 4], I32)
    g.output(g.op("CumSum", [x, g.const(np.int64(1))]), I32)
    with pytest.raises(TargetError, match=r"node 'n_CumSum\d+' \(CumSum\): op type CumSum is not supported"):
        compile_fpga(g.model(), tmp_path / "a")

    g = Graph()
    x = g.input("x", [2, 8], I16)
    g.output(g.qc("IntSoftmax", [x, g.const(np.int16(0)), g.const(np.uint8(0))], variant="lut", output_scale=1 / 256), U8, [2, 8])
    with pytest.raises(TargetError, match=r"\(qcompiler.IntSoftmax\): variant 'lut' needs 8-bit inputs"):
        compile_fpga(g.model(), tmp_path / "b")

    g = Graph()
    x = g.input("x", [1, 1, 4, 4], I8)
    g.nodes.append(helper.make_node("MaxPool", ["x"], ["y", "i"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    g.output("y", I8, [1, 1, 2, 2])
    g.output("i", I64, [1, 1, 2, 2])
    with pytest.raises(TargetError, match=r"node 'pool' \(MaxPool\): the Indices output"):
        compile_fpga(g.model(), tmp_path / "c")


def test_dynamic_shapes_and_bad_options_are_refused(tmp_path):
    g = Graph()
    g.output(g.requant(g.input("x", ["n", 4], I32), 0.01), I8, ["n", 4])
    proto = g._model(g.outputs, 17)
    with pytest.raises(TargetError, match="input 'x' needs a static shape"):
        compile_fpga(proto, tmp_path / "a")
    from qcompiler.pipeline import parse_one
    from qcompiler.target import default_targets

    with pytest.raises(TargetError, match="unroll must be between 1 and 1024"):
        parse_one("fpga-sim{unroll=0}", default_targets())
    assert str(parse_one("fpga-sim{unroll=8,part=xc7a100t}", default_targets())) == "fpga-sim{unroll=8,part=xc7a100t}"


# -- resources and determinism -----------------------------------------------------------------------------


def test_resources_scale_with_unroll_and_weights(tmp_path):
    x = np.random.default_rng(0).normal(0, 2, (3, 24)).astype(np.float32)
    reports = {}
    for unroll in (1, 4, 16):
        assert_bit_exact(quantized_mlp(), {"x": x}, tmp_path, f"u{unroll}", unroll=unroll)
        reports[unroll] = resources(tmp_path / f"u{unroll}")
        source = (tmp_path / f"u{unroll}" / "qc_model.c").read_text()
        assert ("#pragma HLS UNROLL factor=" in source) == (unroll > 1)
        assert "#pragma HLS PIPELINE II=1" in source
    for small, big in ((1, 4), (4, 16)):
        assert reports[big]["total"]["dsp"] > reports[small]["total"]["dsp"]
        assert reports[big]["total"]["latency_cycles"] < reports[small]["total"]["latency_cycles"]
    for report in reports.values():
        layers = [e for e in report["layers"] if e["kind"] == "layer"]
        assert all({"dsp", "bram18", "lut", "ii", "latency_cycles", "multipliers"} <= set(e) for e in layers)
        for key in ("dsp", "bram18", "lut", "latency_cycles"):
            assert report["total"][key] == sum(e[key] for e in report["layers"] + report["buffers"] if key in e)
        fc = [e for e in layers if e["op"] == "MatMulInteger"]
        assert fc[0]["multipliers"] == [{"bits": [9, 8], "count": report["unroll"], "dsp_each": 1}]  # uint8 − z × int8
        assert fc[0]["macs"] == 3 * 24 * 40
    # BRAM grows with the weights: 24×40 int8 fit in LUT RAM banks; 24×1024 + 1024×10 need block RAM
    compile_fpga(quantized_mlp(hidden=1024), tmp_path / "big")
    big = resources(tmp_path / "big")
    assert big["total"]["bram18"] > reports[1]["total"]["bram18"]
    assert big["total"]["constant_bytes"] > 30000
    assert big["utilisation"]["part"].startswith("xczu7ev")
    # the manifest carries the totals too
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["target_info"]["resources"]["total"] == big["total"]


def test_resource_model_primitives():
    assert dsp_per_multiplier(8, 8) == 1 and dsp_per_multiplier(27, 18) == 1
    assert dsp_per_multiplier(32, 31) == 4 and dsp_per_multiplier(18, 30) == 2
    assert memory_cost(64, 8) == (0, 8)  # 512 bits: distributed RAM
    assert memory_cost(4096, 8) == (2, 0)  # 2K × 9 aspect: two BRAM18
    assert memory_cost(4096, 8, banks=4) == (4, 0)


def test_builds_are_deterministic(tmp_path):
    proto = attention("linear")
    for name in ("a", "b"):
        compile_fpga(proto, tmp_path / name / "deep" / "out", unroll=2)
    first, second = tmp_path / "a" / "deep" / "out", tmp_path / "b" / "deep" / "out"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"qc_model.c", "qc_model.h", "qc_tb.c", "qc_sim", "resources.json", "manifest.json", "run_hls.tcl"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert str(tmp_path).encode() not in (first / "qc_sim").read_bytes()


def test_generated_c_is_warning_free_and_has_no_dynamic_allocation(tmp_path):
    compile_fpga(data_movement(), tmp_path / "out")
    result = subprocess.run(
        ["gcc", "-std=c99", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-fsyntax-only", "qc_model.c", "qc_tb.c"],
        cwd=tmp_path / "out", capture_output=True, text=True,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    source = (tmp_path / "out" / "qc_model.c").read_text()
    assert "malloc" not in source and "void qc_top(" in source
    assert source.count("static void layer_") == sum(1 for e in resources(tmp_path / "out")["layers"] if e["kind"] == "layer")


# -- command line ---------------------------------------------------------------------------------------


def cli_model() -> onnx.ModelProto:
    """Only ops the ONNX importer accepts today: quantize, MatMulInteger, bias, requantize, softmax, dequantize."""
    g = Graph(12)
    x = g.quantize(g.input("x", [4, 16]), 0.05)
    h = g.op("MatMulInteger", [x, g.weights((16, 12))])
    h = g.requant(g.op("Add", [h, g.const(g.rng.integers(-900, 900, 12).astype(np.int32))]), 2e-3, np.int8)
    p = g.qc("IntSoftmax", [h, g.const(np.int8(0)), g.const(np.uint8(0))], input_scale=0.1, output_scale=1 / 256, variant="ibert")
    g.dequantize(p, 1 / 256, 0, np.uint8)
    return g.model()


def test_cli_compiles_an_integer_onnx_model(cli, tmp_path):
    proto = cli_model()
    path = save(proto, tmp_path / "int.onnx")
    out = tmp_path / "out"
    result = cli(path, "--target", "fpga-sim{unroll=4}", "--pipeline", "eliminate-dead-code", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "stage integer" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "fpga-sim" and manifest["target_spec"] == "fpga-sim{unroll=4}"
    assert {"qc_model.c", "qc_sim", "resources.json"} <= set(manifest["files"])
    x = np.random.default_rng(13).normal(0, 2, (4, 16)).astype(np.float32)
    got = qcompiler.load(out).run({"x": x})["y"]
    np.testing.assert_array_equal(got, qcompiler.ReferenceInterpreter(proto).run({"x": x})["y"])
    listing = cli("--list-targets")
    assert "fpga-sim" in listing.stdout and "unroll" in listing.stdout


def test_cli_refuses_a_float_model(cli, tmp_path):
    from builders import mlp

    result = cli(save(mlp(), tmp_path / "f.onnx"), "--target", "fpga-sim", "--pipeline", "eliminate-dead-code", "-o", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.startswith("qcompile: error: target 'fpga-sim' runs integer-only graphs")
    assert "node 'fc1' (MatMul)" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_builds_are_identical_across_processes(cli, tmp_path):
    import os

    path = save(cli_model(), tmp_path / "int.onnx")
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = cli(path, "--target", "fpga-sim{unroll=2}", "--pipeline", "eliminate-dead-code", "-o", tmp_path / seed / "out", env=env)
        assert result.returncode == 0, result.stderr
    first, second = tmp_path / "1" / "out", tmp_path / "2" / "out"
    for file in sorted(first.iterdir()):
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name
