"""The TVM bridge: op lowerings bit-exact with qcompiler.intops, errors, determinism, import hygiene."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

import target_models as tm
from qcompiler import intops
from qcompiler.errors import TargetError

tvm_bridge = pytest.importorskip("qcompiler.targets.tvm_bridge")

ROOT = Path(__file__).resolve().parents[1]
LLVM = {"kind": "llvm"}


def run_tvm(model, feeds):
    executable = tvm_bridge.compile(tvm_bridge.lower(model), LLVM)
    outs = tvm_bridge.VMModule(executable=executable)([feeds[v.name] for v in model.graph.inputs])
    return dict(zip([v.name for v in model.graph.outputs], outs))


def assert_bit_exact(model, feeds):
    ref = tm.reference(model, feeds)
    got = run_tvm(model, feeds)
    for name, expected in ref.items():
        assert got[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_requantize_per_channel_rounding_and_bounds():
    g = tm.GraphBuilder(0)
    x = g.input("acc", [64, 4], TensorProto.INT32)
    m = np.array([1 << 30, 1518500250, 3, 0], np.int32)
    k = np.array([31, 38, 0, 5], np.int32)
    y1 = g.op("Requantize", [x, g.const(m), g.const(k), g.const(np.int8(-2))], tm.QC, axis=1, qmin=-100, qmax=90)
    y2 = g.op("Requantize", [x, g.const(np.int32(1 << 29)), g.const(np.int32(40)), g.const(np.int16(7)), g.const(np.int32(5))], tm.QC)
    y3 = g.op("Requantize", [x, g.const(np.int32(1 << 30)), g.const(np.int32(31)), g.const(np.uint8(128))], tm.QC)
    model = g.model([(y1, TensorProto.INT8, [64, 4]), (y2, TensorProto.INT16, [64, 4]), (y3, TensorProto.UINT8, [64, 4])])
    acc = np.random.default_rng(0).integers(-(2**31), 2**31 - 1, (64, 4)).astype(np.int32)
    acc[:8] = np.arange(-4, 4).reshape(-1, 1) * 2 + 1  # halves after >> 1
    assert_bit_exact(model, {"acc": acc})


def test_quantize_linear_rounds_half_to_even_and_saturates():
    g = tm.GraphBuilder(0)
    x = g.input("x", [4, 16])
    q = g.op("QuantizeLinear", [x, g.const(np.float32(0.5)), g.const(np.int8(3))])
    u = g.op("QuantizeLinear", [x, g.const(np.float32(0.25)), g.const(np.uint8(100))])
    model = g.model([(q, TensorProto.INT8, [4, 16]), (u, TensorProto.UINT8, [4, 16])])
    x = np.concatenate([np.arange(-8, 8) * 0.25, np.arange(-8, 8) * 0.125 + 0.0625, [1e6, -1e6, 64, -65] * 4]).astype(np.float32)
    x = np.concatenate([x, np.random.default_rng(1).standard_normal(16).astype(np.float32) * 40]).reshape(4, 16)
    assert_bit_exact(model, {"x": x})


@pytest.mark.parametrize("variant", ["ibert", "linear", "lut"])
def test_int_softmax_variants_over_the_full_input_range(variant):
    g = tm.GraphBuilder(0)
    x = g.input("x", [32, 8], TensorProto.INT8)
    y = g.op("IntSoftmax", [x, g.const(np.int8(0)), g.const(np.uint8(0))], tm.QC, input_scale=0.06, output_scale=1 / 255, variant=variant)
    model = g.model([(y, TensorProto.UINT8, [32, 8])])
    data = np.arange(-128, 128, dtype=np.int8).reshape(32, 8)
    assert_bit_exact(model, {"x": np.random.default_rng(2).permutation(data.ravel()).reshape(32, 8)})


@pytest.mark.parametrize("input_scale", [0.0005, 0.003, 0.02])
def test_int16_softmax_and_layernorm_divisions_are_exact_at_the_extremes(input_scale):
    """The bridge divides with a float quotient plus one correction, and by constants with a
    multiply-shift: rows that put quotients on integer boundaries must still match exactly."""
    g = tm.GraphBuilder(0)
    x = g.input("x", [524, 16], TensorProto.INT16)
    sm = g.op("IntSoftmax", [x, g.const(np.int16(0)), g.const(np.uint16(0))], tm.QC,
              input_scale=input_scale, output_scale=1 / 65535, variant="ibert")
    mult, bias, shift, eps = intops.layernorm_constants(np.linspace(0.5, 1.5, 16), np.zeros(16), input_scale, 0.001, 1e-5)
    ln = g.op("IntLayerNorm", [x, g.const(np.int16(0)), g.const(np.int16(0)), g.const(mult), g.const(bias)], tm.QC, shift=shift, eps_q=eps)
    model = g.model([(sm, TensorProto.UINT16, [524, 16]), (ln, TensorProto.INT16, [524, 16])])
    lo, hi = -32768, 32767
    rows = [
        np.full(16, hi), np.full(16, lo), np.tile([lo, hi], 8), np.r_[hi, np.full(15, lo)],
        np.r_[lo, np.full(15, hi)], np.arange(16) * 4096 - 32768, np.full(16, 7), np.r_[np.full(8, 1), np.full(8, 0)],
        np.r_[hi, hi - 1, np.full(14, hi - 2)], np.arange(16), -np.arange(16) * 1000, np.tile([0, -1, 1, 2], 4),
    ]
    rng = np.random.default_rng(5)  # plus rows of nearby values: quotients of every size
    rows += list(rng.integers(-600, 600, (512, 16)) + rng.integers(lo + 600, hi - 600, (512, 1)))
    assert_bit_exact(model, {"x": np.clip(np.stack(rows), lo, hi).astype(np.int16)})


def test_int_layernorm_and_gelu_on_int16():
    g = tm.GraphBuilder(0)
    x = g.input("x", [8, 24], TensorProto.INT16)
    mult, bias, shift, eps = intops.layernorm_constants(np.linspace(0.2, 2, 24), np.linspace(-1, 1, 24), 0.001, 0.002, 1e-5)
    ln = g.op("IntLayerNorm", [x, g.const(np.int16(0)), g.const(np.int16(0)), g.const(mult), g.const(bias)], tm.QC, shift=shift, eps_q=eps)
    ge = g.op("IntGELU", [x, g.const(np.int16(0)), g.const(np.int16(0))], tm.QC, input_scale=0.001, output_scale=0.001)
    model = g.model([(ln, TensorProto.INT16, [8, 24]), (ge, TensorProto.INT16, [8, 24])])
    data = np.random.default_rng(3).integers(-32768, 32768, (8, 24)).astype(np.int16)
    data[0] = 5  # zero variance row
    assert_bit_exact(model, {"x": data})


def test_isqrt_is_exact_near_perfect_squares():
    g = tm.GraphBuilder(0)
    x = g.input("x", [6, 4], TensorProto.INT64)
    model = g.model([(x, TensorProto.INT64, [6, 4])])
    lo = tvm_bridge.Lowerer(model)
    relax = lo.relax
    var = relax.Var("n", relax.TensorType((24,), "int64"))
    with lo.bb.function("main", [var]):
        with lo.bb.dataflow():
            out = lo.bb.emit_output(relax.Tuple([lo.isqrt(var)]))
        lo.bb.emit_func_output(out)
    roots = np.array([0, 1, 2, 3, 1000, 46340, 2**30 + 3, 2**31 - 1], np.int64)
    n = np.concatenate([roots * roots - 1, roots * roots, roots * roots + 1])
    n = np.maximum(n, 0)
    executable = tvm_bridge.compile(lo.bb.get(), LLVM)
    (got,) = tvm_bridge.VMModule(executable=executable)([n])
    np.testing.assert_array_equal(got, intops.isqrt(n))


def test_matmul_and_conv_integer_with_zero_points():
    g = tm.GraphBuilder(5)
    a = g.input("a", [3, 10], TensorProto.UINT8)
    img = g.input("img", [1, 2, 5, 5], TensorProto.UINT8)
    mm = g.op("MatMulInteger", [a, g.weight((10, 4)), g.const(np.uint8(7)), g.const(np.int8(2))])
    im = g.op("IntMatMul", [a, g.weight((10, 4)), g.const(np.uint8(7))], tm.QC, acc_type="int64")
    cv = g.op("ConvInteger", [img, g.weight((3, 2, 3, 3)), g.const(np.uint8(9))], pads=[1, 0, 1, 2], strides=[1, 2])
    grp = g.op("ConvInteger", [img, g.weight((4, 1, 2, 2))], group=2, dilations=[2, 2], auto_pad="SAME_UPPER")
    model = g.model([(mm, TensorProto.INT32, None), (im, TensorProto.INT64, None), (cv, TensorProto.INT32, None), (grp, TensorProto.INT32, None)])
    assert_bit_exact(model, tm.random_feeds(model))


def test_unsupported_op_names_node_and_op():
    g = tm.GraphBuilder(0)
    x = g.input("x", [2, 2], TensorProto.INT8)
    y = g.op("Mystery", [x], tm.QC, name="odd_one")
    model = g.model([(y, TensorProto.INT8, [2, 2])])
    with pytest.raises(TargetError, match=r"node 'odd_one' \(qcompiler.Mystery\)"):
        tvm_bridge.lower(model)


def test_non_constant_requantize_parameters_are_refused():
    g = tm.GraphBuilder(0)
    x = g.input("x", [2, 2], TensorProto.INT32)
    m = g.input("m", [], TensorProto.INT32)
    y = g.op("Requantize", [x, m, g.const(np.int32(3)), g.const(np.int8(0))], tm.QC, name="rq")
    model = g.model([(y, TensorProto.INT8, [2, 2])])
    with pytest.raises(TargetError, match=r"node 'rq' \(qcompiler.Requantize\): input 'multiplier' must be a compile-time constant"):
        tvm_bridge.lower(model)


def test_same_model_gives_byte_identical_library(tmp_path):
    paths = []
    for i in range(2):
        model = tm.quantized_mlp()
        executable = tvm_bridge.compile(tvm_bridge.lower(model), LLVM)
        paths.append(tmp_path / f"m{i}.so")
        tvm_bridge.export(executable, paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_import_qcompiler_does_not_import_tvm():
    code = "import sys, qcompiler, qcompiler.targets.host; qcompiler.target.default_targets(); print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _imports_tvm(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tvm" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tvm":
            return True
    return False


def test_only_the_bridge_imports_tvm():
    bridge = ROOT / "targets" / "tvm_bridge"  # the package: lowering and build, tuning
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("qcompiler", "targets", "passes")
        for p in (ROOT / folder).rglob("*.py")
        if bridge not in p.parents and _imports_tvm(p)
    ]
    assert offenders == []


def test_gather_takes_negative_indices_and_never_reads_outside_the_table():
    g = tm.GraphBuilder(0)
    ids = g.input("ids", [2, 5], TensorProto.INT64)
    cols = g.input("cols", [3], TensorProto.INT32)
    table = g.weight((7, 4))
    rows = g.op("Gather", [table, ids], axis=0)
    picked = g.op("Gather", [table, cols], axis=1)
    model = g.model([(rows, TensorProto.INT8, [2, 5, 4]), (picked, TensorProto.INT8, [7, 3])])
    feeds = {"ids": np.array([[0, 6, -1, -7, 3], [2, -2, 5, 1, 0]], np.int64), "cols": np.array([-4, 3, -1], np.int32)}
    assert_bit_exact(model, feeds)
    # past the ends (ONNX calls it an error; runners refuse it first): clamped, not read out of bounds
    got = run_tvm(model, {"ids": np.array([[10**9, -(10**9), 7, -8, 0]] * 2, np.int64), "cols": np.array([4, -5, 0], np.int32)})
    every_row = tm.reference(model, {"ids": np.array([[0, 1, 2, 3, 4], [5, 6, 6, 6, 6]], np.int64), "cols": np.array([0, 1, 2], np.int32)})[rows]
    table = every_row.reshape(10, 4)[:7]
    np.testing.assert_array_equal(got[rows][0], table[[6, 0, 6, 0, 0]])  # clamped after wrapping negatives once


def test_cpu_schedule_computes_a_chain_read_at_two_rows_once():
    """An int16 split reads the same expensive chain at row i (high bytes) and i − M (low bytes):
    the schedule keeps the chain in one buffer instead of inlining it into both halves."""
    import tvm
    from tvm import te

    m, n = 64, 96
    x = te.placeholder((m, n), "int32", name="x")
    def step(c, s):
        return te.compute((m, n), lambda i, j: (c[i, j] * (s + 3) + 7) >> 1, name=f"step{s}")

    chain = x
    for s in range(40):  # long enough that recomputing it would cost
        chain = step(chain, s)
    split = te.compute(
        (2 * m, n),
        lambda i, j: tvm.tirx.if_then_else(i < m, chain[i, j] >> 8, chain[i - m, j] & 255).astype("int16"),
        name="split",
    )
    func = te.create_prim_func([x, split])
    scheduled = tvm_bridge.cpu_kernel_schedule(func)
    text = scheduled.script()
    assert text.count("T.parallel") == 2 and "step39" in text  # chain materialised once, then the split
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target="llvm")
    data = np.random.default_rng(0).integers(-1000, 1000, (m, n)).astype(np.int32)
    want = data.astype(np.int64)
    for s in range(40):  # int32 wrap-around, then an arithmetic shift
        want = ((want * (s + 3) + 7) & 0xFFFFFFFF).astype(np.uint32).view(np.int32).astype(np.int64) >> 1
    got = tvm.runtime.tensor(np.zeros((2 * m, n), np.int16))
    lib["main"](tvm.runtime.tensor(data), got)
    np.testing.assert_array_equal(got.numpy(), np.concatenate([want >> 8, want & 255]).astype(np.int16))
