"""qcompiler-domain integer ops: schemas registered, kernels bit-exact with int64 math."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from builders import init, tensor
from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.intops import requantize, rshift_round
from qcompiler.opset import QC_DOMAIN


def test_rounding_right_shift_rounds_half_up():
    x = np.array([-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rshift_round(x, 1), [-2, -2, -1, -1, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(rshift_round(x, 0), x)


def test_requantize_matches_exact_rational_arithmetic():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**24), 2**24, size=1000).astype(np.int32)
    m, k = 1518500250, 38  # ≈ 0.0055 as M / 2^k
    got = requantize(acc, np.int32(m), np.int32(k), np.int8(3))
    exact = np.floor(acc.astype(object) * m / 2**k + 0.5).astype(np.int64) + 3  # python ints: no overflow
    np.testing.assert_array_equal(got, np.clip(exact, -128, 127).astype(np.int8))


def test_requantize_per_channel_through_interpreter():
    node = helper.make_node("Requantize", ["acc", "m", "k", "z"], ["y"], domain=QC_DOMAIN, axis=1)
    m = np.array([1 << 30, 1 << 29, 3 << 28], np.int32)
    k = np.array([31, 31, 32], np.int32)
    graph = helper.make_graph(
        [node], "g", [tensor("acc", [2, 3], TensorProto.INT32)], [tensor("y", [2, 3], TensorProto.INT8)],
        [init("m", m), init("k", k), init("z", np.int8(-1))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(QC_DOMAIN, 1)])
    onnx.checker.check_model(model)  # the schema is registered
    acc = np.array([[10, 10, 10], [-300, 301, 1000]], np.int32)
    y = ReferenceInterpreter(model).run({"acc": acc})["y"]
    np.testing.assert_array_equal(y, requantize(acc, m, k, np.int8(-1), axis=1))
    np.testing.assert_array_equal(y, [[4, 2, 1], [-128, 74, 127]])  # 2.5 rounds up to 3


def _float_layernorm_steps(q, zx, sx, gamma, beta, sy, zy, eps=1e-5):
    x = (q.astype(np.float64) - zx) * sx
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta
    return np.round(y / sy) + zy


def test_layernorm_of_rows_spread_over_few_steps_is_exact_to_a_step():
    """A residual stream quantized with a coarse scale has rows whose σ is a step or two; the
    mean and σ are then not rounded to whole steps (c = N·x − Σx, σ from N·Σx² − (Σx)²)."""
    from qcompiler.intops import int_layernorm, layernorm_constants

    rng = np.random.default_rng(3)
    n = 384
    q = (9 + rng.integers(-2, 3, (16, n))).astype(np.uint8)  # σ ≈ 1.4 steps around a zero point of 9
    q[:, :3] = 200  # outlier channels that set the coarse scale
    gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)
    sx, sy, zy = 0.9, 0.03, 128
    mult, bias, k, eps_q = layernorm_constants(gamma, beta, sx, sy, 1e-5)
    got = int_layernorm(q, np.uint8(9), np.uint8(zy), mult, bias, k, eps_q).astype(np.int64)
    want = np.clip(_float_layernorm_steps(q, 9, sx, gamma, beta, sy, zy), 0, 255)
    assert np.abs(got - want).max() <= 1


def test_layernorm_of_wide_int16_rows_falls_back_to_a_rounded_mean():
    """Where N·max|x| ≥ 2^30 (int64 cannot hold N·Σx²) the mean is rounded to a step: still
    within a step of float for rows spread over many steps."""
    from qcompiler.intops import int_layernorm, layernorm_constants

    rng = np.random.default_rng(4)
    n = 40000
    q = rng.integers(-30000, 30000, (2, n)).astype(np.int16)
    gamma, beta = np.ones(n), np.zeros(n)
    mult, bias, k, eps_q = layernorm_constants(gamma, beta, 1e-3, 0.02, 1e-5)
    got = int_layernorm(q, np.int16(0), np.int8(0), mult, bias, k, eps_q).astype(np.int64)
    want = np.clip(_float_layernorm_steps(q, 0, 1e-3, gamma, beta, 0.02, 0), -128, 127)
    assert np.abs(got - want).max() <= 1
