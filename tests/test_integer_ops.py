"""Integer ops defined once: every registered op × every integer target, bit-exact.

Each op's :meth:`examples` become one-node integer-stage models (``example_model``),
compiled for every target that runs integer graphs and compared bit for bit with the
reference interpreter, which runs the op's decomposition in numpy. A target that does
not lower an op fails here. Hand-tuned TVM kernels that override a decomposition are
also compared with the decomposition rendered generically.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qcompiler
from qcompiler.integer import Builder, DecompositionError, registered_ops
from qcompiler.integer.examples import example_model
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.targets import aarch64_toolchain

#: Integer targets (arm-neon and cuda in the slow lane: cross compiles, qemu, CUDA builds).
TARGETS = [
    "reference", "host", "npu-sim", "fpga-sim",
    pytest.param("arm-neon", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.slow),
]

CASES = [
    pytest.param(op, example, id=f"{op.op_type}-{example.name or index}")
    for op in registered_ops()
    for index, example in enumerate(op.examples(np.random.default_rng(0)))
]


def test_every_registered_op_has_examples():
    missing = [op.label() for op in registered_ops() if not op.examples(np.random.default_rng(0))]
    assert not missing, f"integer ops without examples (the coverage test cannot check them): {missing}"


def _compile(model: onnx.ModelProto, spec: str, out):
    return qcompiler.compile_model(qcompiler.load_onnx(model), parse_one(spec, default_targets()), out, pipeline=Pipeline([]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("op", "example"), CASES)
def test_op_lowers_on_every_integer_target_bit_exactly(op, example, target, tmp_path):
    if target == "arm-neon" and aarch64_toolchain.missing_tools(run=True):
        pytest.skip(f"arm-neon needs {', '.join(aarch64_toolchain.missing_tools(run=True))}")
    model, feeds = example_model(op, example)
    expected = qcompiler.ReferenceInterpreter(model).run(feeds)
    result = _compile(model, target, tmp_path / "out")
    if target == "cuda":  # built (kernels in CUDA source); running needs a GPU
        assert result.manifest["target_info"]["kernels"] > 0
        return
    got = qcompiler.load(tmp_path / "out").run(feeds)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value, err_msg=f"{op.label()} on {target}")


OVERRIDDEN = [case for case in CASES if case.values[0].op_type in ("IntSoftmax", "IntMatMul")]


@pytest.mark.parametrize(("op", "example"), OVERRIDDEN)
def test_hand_tuned_kernels_match_the_rendered_decomposition(op, example):
    """The TVM overrides (the fused softmax kernel, the int8/int16 matmul kernels) and the
    decomposition rendered primitive by primitive compute the same integers."""
    from qcompiler.targets import tvm_bridge

    model, feeds = example_model(op, example)
    ir_model = qcompiler.load_onnx(model)
    target = {"kind": "llvm", "mtriple": tvm_bridge.host_triple(), "mcpu": tvm_bridge.host_cpu()}
    inputs = [feeds[v.name] for v in ir_model.graph.inputs if v.name in feeds]
    results = []
    for overrides in (True, False):
        mod = tvm_bridge.lower(ir_model, int8_dot="vnni" if tvm_bridge.llvm_has_feature(target, "avx512vnni") else None,
                               overrides=overrides)
        results.append(tvm_bridge.VMModule(executable=tvm_bridge.compile(mod, target))(inputs))
    for tuned, generic in zip(*results):
        np.testing.assert_array_equal(tuned, generic)


# -- the primitives -----------------------------------------------------------------------------


def test_intervals_bound_every_value():
    """Static intervals hold for the values the numpy rendering computes (random inputs)."""
    from qcompiler.integer import numpy_backend, reachable

    rng = np.random.default_rng(1)
    for op in registered_ops():
        for example in op.examples(rng):
            infos = [None if a is None else qcompiler.integer.TensorInfo(np.shape(a), np.asarray(a).dtype, np.asarray(a))
                     for a in example.inputs]
            _, outputs = op.trace(infos, example.attrs)
            nodes = reachable(outputs)
            values = numpy_backend.evaluate(nodes, {i: a for i, a in enumerate(example.inputs) if a is not None})
            for node, value in zip(nodes, values):
                if value.size:
                    assert node.lo <= int(value.min()) and int(value.max()) <= node.hi, (op.op_type, node)


def test_builder_simplifies_and_folds():
    b = Builder()
    x = b.input(0, (2, 3), np.int8)
    assert (x + 0) is x and (x * 1) is x and (x >> 0) is x and b.clamp(x, -128, 127) is x
    folded = b.const(6) * 7 + 1
    assert folded.op == "const" and int(folded.value) == 43
    assert (x * x).lo == 0  # a square is never negative
    with pytest.raises(DecompositionError, match="divisors must be ≥ 1"):
        b.floordiv(x, x)


def test_a_broken_promise_raises_instead_of_wrapping():
    from qcompiler.integer import numpy_backend

    b = Builder()
    x = b.input(0, (2,), np.int64)
    y = b.bound(x, 0, 10)
    with pytest.raises(OverflowError, match=r"promised range \[0, 10\]"):
        numpy_backend.evaluate([y], {0: np.array([3, 11])})
    big = b.input(0, (2,), np.int64) * (1 << 40)
    with pytest.raises(OverflowError, match="exceeds 2\\^62"):
        numpy_backend.evaluate([big], {0: np.array([1 << 30, 1])})
