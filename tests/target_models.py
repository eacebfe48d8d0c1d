"""Hand-built integer-stage and float graphs for the target tests (deterministic weights).

Integer constants are derived from scales the way the lowering passes do
(``qcompiler.intops.fixed_point``, ``*_constants``), so the graphs look like real
``lower-integer`` output while the quantization issue is in progress.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompiler import intops
from qcompiler.graph import set_stage
from qcompiler.opset import QC_DOMAIN

QC = QC_DOMAIN


class GraphBuilder:
    """Collects nodes and initializers; names are generated in order."""

    def __init__(self, seed: int = 0, opset: int = 21):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.opset = opset
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def input(self, name: str, shape, elem=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def const(self, array, base: str = "c") -> str:
        name = self.fresh(base)
        array = np.asarray(array)
        if array.dtype.name == "int4":
            self.inits.append(helper.make_tensor(name, TensorProto.INT4, array.shape, array.astype(np.int8).ravel().tolist()))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs, domain: str = "", name: str | None = None, **attrs) -> str:
        out = self.fresh(op_type.lower() + "_")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name or out, domain=domain, **attrs))
        return out

    # -- integer building blocks --

    def requant(self, x: str, real, zp, axis: int = 1, **bounds) -> str:
        m, k = intops.fixed_point_array(np.asarray(real, np.float64))
        return self.op("Requantize", [x, self.const(m, "m"), self.const(k, "k"), self.const(zp, "zp")], QC, axis=axis, **bounds)

    def weight(self, shape, lo=-127, hi=128, dtype=np.int8) -> str:
        return self.const(self.rng.integers(lo, hi, shape).astype(dtype), "w")

    def model(self, outputs, stage: str = "integer") -> ir.Model:
        outs = [helper.make_tensor_value_info(name, elem, shape) for name, elem, shape in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        proto = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset), helper.make_opsetid(QC, 1)],
            producer_name="qcompiler-tests",
        )
        proto.ir_version = 10
        proto = onnx.shape_inference.infer_shapes(proto)
        model = ir.from_proto(proto)
        set_stage(model, stage)
        return model


def quantized_mlp(asym_input: bool = False, relu6: bool = True) -> ir.Model:
    """float x → QuantizeLinear → MatMulInteger+bias → Requantize(ReLU) → … → DequantizeLinear."""
    g = GraphBuilder(1)
    x = g.input("x", [2, 16])
    zp_in = np.uint8(128) if asym_input else np.int8(0)
    xq = g.op("QuantizeLinear", [x, g.const(np.float32(0.05)), g.const(zp_in)])
    acc = g.op("MatMulInteger", [xq, g.weight((16, 32)), g.const(zp_in)])
    acc = g.op("Add", [acc, g.const(g.rng.integers(-500, 500, 32).astype(np.int32))])
    s_h = 0.04
    w_scales = g.rng.uniform(0.004, 0.01, 32)
    h = g.requant(acc, 0.05 * w_scales / s_h, np.int8(0), axis=1, qmin=0, qmax=int(6 / s_h) if relu6 else 127)
    acc2 = g.op("MatMulInteger", [h, g.weight((32, 8))])
    acc2 = g.op("Add", [acc2, g.const(g.rng.integers(-500, 500, 8).astype(np.int32))])
    y = g.requant(acc2, s_h * 0.008 / 0.1, np.int8(-3))
    out = g.op("DequantizeLinear", [y, g.const(np.float32(0.1)), g.const(np.int8(-3))])
    return g.model([(out, TensorProto.FLOAT, [2, 8])])


def quantized_cnn() -> ir.Model:
    """uint8 asym input, ConvInteger + per-channel Requantize with ReLU6, MaxPool,
    strided ConvInteger, global average pool by ReduceSum + Requantize, MatMulInteger head."""
    g = GraphBuilder(2)
    x = g.input("x", [1, 3, 8, 8])
    xq = g.op("QuantizeLinear", [x, g.const(np.float32(0.02)), g.const(np.uint8(120))])
    acc = g.op("ConvInteger", [xq, g.weight((4, 3, 3, 3)), g.const(np.uint8(120))], pads=[1, 1, 1, 1])
    acc = g.op("Add", [acc, g.const(g.rng.integers(-300, 300, (1, 4, 1, 1)).astype(np.int32))])
    s1 = 6 / 127
    h = g.requant(acc, 0.02 * g.rng.uniform(0.005, 0.01, 4) / s1, np.int8(0), axis=1, qmin=0, qmax=127)  # ReLU6
    h = g.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    acc = g.op("ConvInteger", [h, g.weight((6, 4, 3, 3))], strides=[2, 2], pads=[1, 1, 1, 1])
    h = g.requant(acc, s1 * 0.008 / 0.8, np.int8(0), axis=1, qmin=0)
    wide = g.op("Cast", [h], to=TensorProto.INT32)
    total = g.op("ReduceSum", [wide, g.const(np.array([2, 3], np.int64))], keepdims=0)
    pooled = g.requant(total, 1 / 4, np.int8(0))  # mean over 2x2
    acc = g.op("MatMulInteger", [pooled, g.weight((6, 5))])
    y = g.requant(acc, 0.8 * 0.008 / 0.1, np.int8(0))
    out = g.op("DequantizeLinear", [y, g.const(np.float32(0.1))])
    return g.model([(out, TensorProto.FLOAT, [1, 5])])


def int8_convs(fallback: bool = True) -> ir.Model:
    """ConvInteger layers for the scheduled int8 conv kernels (im2col + dot-product dense):
    uint8 and int8 inputs with nonzero zero points, stride 2, asymmetric padding, dilation,
    channel counts that are not multiples of 4, per-channel and scalar weight zero points,
    batch 2, a 1-D conv and (``fallback``) a depthwise conv, which keeps the generic path."""
    g = GraphBuilder(21)
    u = g.input("u", [1, 5, 9, 11], TensorProto.UINT8)
    s = g.input("s", [2, 3, 7, 6], TensorProto.INT8)
    t = g.input("t", [1, 6, 13], TensorProto.INT8)
    zu, zs, zt = g.const(np.uint8(131)), g.const(np.int8(-5)), g.const(np.int8(7))
    zw = g.const(g.rng.integers(-4, 5, 7).astype(np.int8))
    a = g.op("ConvInteger", [u, g.weight((7, 5, 3, 3), -120, 121), zu, zw], name="stride2", strides=[2, 2], pads=[1, 2, 0, 1])
    b = g.op("ConvInteger", [u, g.weight((6, 5, 3, 2)), zu], name="dilated", strides=[1, 2], pads=[2, 1, 2, 1], dilations=[2, 1])
    c = g.op("ConvInteger", [s, g.weight((10, 3, 5, 5), -100, 101), zs, g.const(np.int8(3))], name="batch2", pads=[2, 2, 2, 2])
    d = g.op("ConvInteger", [t, g.weight((5, 6, 3)), zt], name="conv1d", strides=[2], dilations=[2], auto_pad="SAME_UPPER")
    outputs = [(a, TensorProto.INT32, [1, 7, 4, 6]), (b, TensorProto.INT32, [1, 6, 9, 6]),
               (c, TensorProto.INT32, [2, 10, 7, 6]), (d, TensorProto.INT32, [1, 5, 7])]
    if fallback:
        e = g.op("ConvInteger", [u, g.weight((5, 1, 3, 3)), zu], name="depthwise", group=5, pads=[1, 1, 1, 1])
        outputs.append((e, TensorProto.INT32, [1, 5, 9, 11]))
    return g.model(outputs)


def attention_block(variant: str = "ibert", act16: bool = True, softmax_out=np.uint8, acc64: bool | None = None) -> ir.Model:
    """int8 embeddings by Gather → IntLayerNorm → Q/K/V IntMatMul → IntSoftmax → context →
    IntAdd residual → IntGELU MLP with an int16 hidden activation → IntLookup → int8 out."""
    g = GraphBuilder(3)
    seq, d = 6, 16
    ids = g.input("ids", [1, seq], TensorProto.INT64)
    table = g.weight((20, d), -100, 100)
    x = g.op("Gather", [table, ids], axis=0)
    z8 = np.int8(0)
    s_x = 0.05
    ln = g.op("IntLayerNorm", [x, g.const(z8), g.const(z8), *_ln_consts(g, d, s_x, 0.03)], QC, shift=_ln_shift(g, d, s_x, 0.03))
    s_ln = 0.03

    def proj(inp, s_in, s_out, cols=d):
        acc = g.op("IntMatMul", [inp, g.weight((d, cols), -60, 61)], QC)
        return g.requant(acc, s_in * 0.01 / s_out, np.int8(0))

    q, k, v = (proj(ln, s_ln, 0.05) for _ in range(3))
    kt = g.op("Transpose", [k], perm=[0, 2, 1])
    scores = g.op("MatMulInteger", [q, kt])
    scores = g.requant(scores, 0.05 * 0.05 / 4 / 0.08, np.int8(0))
    mask = g.op("Equal", [ids, g.const(np.int64(0))])
    mask = g.op("Unsqueeze", [mask, g.const(np.array([1], np.int64))])
    scores = g.op("Where", [mask, g.const(np.int8(-128)), scores])
    y_zp = softmax_out(0) if softmax_out != np.int8 else np.int8(-128)
    probs = g.op("IntSoftmax", [scores, g.const(z8), g.const(y_zp)], QC, input_scale=0.08, output_scale=1 / 256, variant=variant)
    ctx = g.op("IntMatMul", [probs, v, g.const(y_zp)], QC)
    ctx = g.requant(ctx, 0.05 / 256 / 0.05, np.int8(0))
    m_a, m_b, shift = intops.add_constants(0.05, s_x, 0.06)
    res = g.op("IntAdd", [ctx, g.const(z8), x, g.const(z8), g.const(z8)], QC, a_multiplier=m_a, b_multiplier=m_b, shift=shift)
    up = proj(res, 0.06, 0.04, 2 * d)
    wide = np.int16(0) if act16 else z8
    act = g.op("IntGELU", [up, g.const(z8), g.const(wide)], QC, input_scale=0.04, output_scale=0.0005 if act16 else 0.03)
    down = g.op("IntMatMul", [act, g.weight((2 * d, d), -60, 61)], QC, acc_type="int64" if (act16 if acc64 is None else acc64) else "int32")
    down = g.requant(down, (0.0005 if act16 else 0.03) * 0.01 / 0.05, np.int8(0))
    prod = g.op("IntMul", [down, g.const(z8), res, g.const(z8), g.const(z8)], QC, multiplier=1 << 20, shift=24, pre_shift=2)
    table = np.clip(np.round(np.tanh(np.arange(-128, 128) * 0.05) / 0.01), -127, 127).astype(np.int8)
    out = g.op("IntLookup", [prod, g.const(table)], QC)
    return g.model([(out, TensorProto.INT8, [1, seq, d])])


def _ln_params(g: GraphBuilder, d: int, s_x: float, s_y: float):
    gamma = np.linspace(0.5, 1.5, d)
    beta = np.linspace(-0.2, 0.2, d)
    return intops.layernorm_constants(gamma, beta, s_x, s_y, 1e-5)


def _ln_consts(g: GraphBuilder, d: int, s_x: float, s_y: float):
    mult, bias, _, _ = _ln_params(g, d, s_x, s_y)
    return [g.const(mult, "lnm"), g.const(bias, "lnb")]


def _ln_shift(g: GraphBuilder, d: int, s_x: float, s_y: float) -> int:
    return _ln_params(g, d, s_x, s_y)[2]


def weight_only_mlp(bits: int = 8) -> ir.Model:
    """float MLP whose MatMul weights are DequantizeLinear(int8/int4 constant), per-channel or blocked."""
    g = GraphBuilder(4)
    x = g.input("x", [2, 32])
    dtype = np.int8 if bits == 8 else np.dtype("int4")
    lo, hi = (-127, 128) if bits == 8 else (-7, 8)
    w1 = g.rng.integers(lo, hi, (32, 24)).astype(np.int8)
    w1 = w1.astype(dtype) if bits == 4 else w1
    if bits == 4:
        scale = g.rng.uniform(0.01, 0.05, (2, 24)).astype(np.float32)  # blocks of 16 along K
        dq = g.op("DequantizeLinear", [g.const(w1), g.const(scale)], axis=0, block_size=16)
    else:
        scale = g.rng.uniform(0.001, 0.005, 24).astype(np.float32)
        dq = g.op("DequantizeLinear", [g.const(w1), g.const(scale)], axis=1)
    h = g.op("MatMul", [x, dq])
    h = g.op("Add", [h, g.const(g.rng.standard_normal(24).astype(np.float32) * 0.1)])
    h = g.op("Gelu", [h]) if g.opset >= 20 else g.op("Relu", [h])
    h = g.op("LayerNormalization", [h, g.const(np.ones(24, np.float32)), g.const(np.zeros(24, np.float32))], axis=-1)
    h = g.op("Softmax", [h], axis=-1)
    return g.model([(h, TensorProto.FLOAT, [2, 24])], stage="fakequant")


def float_cnn() -> ir.Model:
    """Float Conv/Relu/Clip/MaxPool/AveragePool/GlobalAveragePool/Flatten/Gemm/Erf/Sqrt/Pow/Div."""
    g = GraphBuilder(5, opset=17)
    x = g.input("x", [1, 3, 8, 8])
    h = g.op("Conv", [x, g.const(g.rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
                      g.const(np.zeros(4, np.float32))], pads=[1, 1, 1, 1])
    h = g.op("Relu", [h])
    h = g.op("Clip", [h, g.const(np.float32(0)), g.const(np.float32(6))])
    h = g.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.op("AveragePool", [h], kernel_shape=[2, 2], strides=[1, 1])
    h = g.op("GlobalAveragePool", [h])
    h = g.op("Flatten", [h])
    h = g.op("Gemm", [h, g.const(g.rng.standard_normal((5, 4)).astype(np.float32)), g.const(np.ones(5, np.float32))], transB=1)
    e = g.op("Erf", [h])
    p = g.op("Pow", [h, g.const(np.float32(2))])
    s = g.op("Sqrt", [g.op("Add", [p, g.const(np.float32(1))])])
    h = g.op("Div", [g.op("Sub", [e, s]), g.op("Mul", [s, g.const(np.float32(2))])])
    sl = g.op("Slice", [h, g.const(np.array([1], np.int64)), g.const(np.array([4], np.int64)), g.const(np.array([1], np.int64))])
    h = g.op("Concat", [h, sl], axis=1)
    h = g.op("Reshape", [h, g.const(np.array([2, 4], np.int64))])
    h = g.op("Transpose", [h], perm=[1, 0])
    h = g.op("Cast", [g.op("Cast", [h], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
    return g.model([(h, TensorProto.FLOAT, [4, 2])], stage="float")


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``model``: floats ~ N(0, 1), int64 ids in [0, 20) with one 0 (padding)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        shape = tuple(value.shape)
        dtype = value.dtype.numpy()
        if dtype == np.int64:
            arr = rng.integers(1, 20, shape).astype(np.int64)
            arr.reshape(-1)[-1] = 0
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            arr = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        else:
            arr = (rng.standard_normal(shape) * 2).astype(dtype)
        feeds[value.name] = arr
    return feeds


def reference(model: ir.Model, feeds) -> dict[str, np.ndarray]:
    from qcompiler import ReferenceInterpreter

    return ReferenceInterpreter(model).run(feeds)


def assert_runner_bit_exact(runner, model: ir.Model, seeds: int = 3, label: str = "") -> None:
    """``runner`` reproduces the reference interpreter bit for bit (values and dtypes) on
    ``seeds`` sets of random inputs."""
    for seed in range(seeds):
        feeds = random_feeds(model, seed)
        got = runner.run(feeds)
        for key, value in reference(model, feeds).items():
            assert got[key].dtype == value.dtype, f"{label}/{key}/seed {seed}"
            np.testing.assert_array_equal(got[key], value, err_msg=f"{label}/{key}/seed {seed}")
