"""The ``npu-sim`` target: what it accepts, bit-exact execution, the cost model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto

import qcompiler
import target_models as tm
from qcompiler.errors import TargetError
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.targets.npu_sim import NpuSpec, estimate_cost

NPU_GRAPHS = {
    "mlp": tm.quantized_mlp,
    "cnn": tm.quantized_cnn,
    "attention-int16-act": lambda: tm.attention_block("linear", act16=True, acc64=False),
    "attention-lut": lambda: tm.attention_block("lut", act16=False, softmax_out=np.int8),
}


def build(model, out_dir, spec: str = "npu-sim"):
    target = parse_one(spec, default_targets())
    return qcompiler.compile_model(model, target, out_dir, pipeline=Pipeline([])).manifest


@pytest.fixture(scope="module")
def npu_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("npu")
    for name, make in NPU_GRAPHS.items():
        build(make(), root / name)
    return root


@pytest.mark.parametrize("name", sorted(NPU_GRAPHS))
def test_bit_exact_with_reference(npu_builds, name):
    model = NPU_GRAPHS[name]()
    tm.assert_runner_bit_exact(qcompiler.load(npu_builds / name), model, 2, name)


def test_cost_report_in_artifact_matches_python_api(npu_builds):
    manifest = json.loads((npu_builds / "cnn" / "manifest.json").read_text())
    cost = json.loads((npu_builds / "cnn" / manifest["target_info"]["cost"]).read_text())
    assert cost == json.loads(json.dumps(estimate_cost(tm.quantized_cnn())))
    convs = [layer for layer in cost["layers"] if layer["op"] == "ConvInteger"]
    assert len(convs) == 2 and all(c["macs"] > 0 and c["cycles"] > 0 and c["energy_pj"] > 0 for c in convs)
    # conv1: 4 output channels x 8x8 pixels x 3x3x3 taps
    assert convs[0]["macs"] == 4 * 64 * 27
    assert cost["total"]["cycles"] == sum(layer["cycles"] for layer in cost["layers"])
    assert manifest["target_info"]["cost_total"] == cost["total"]


def test_cost_model_rewards_int4_weights_and_penalises_int16_activations():
    def one_layer(a_type, w_bits):
        g = tm.GraphBuilder(0)
        x = g.input("x", [16, 256], a_type)
        w = g.rng.integers(-7, 8, (256, 256)).astype(np.int8)
        w = w.astype(np.dtype("int4")) if w_bits == 4 else w
        y = g.op("MatMulInteger" if a_type != TensorProto.INT16 else "IntMatMul", [x, g.const(w)],
                 "" if a_type != TensorProto.INT16 else tm.QC)
        return g.model([(y, TensorProto.INT32, [16, 256])])

    base = estimate_cost(one_layer(TensorProto.INT8, 8))["layers"][0]
    int4 = estimate_cost(one_layer(TensorProto.INT8, 4))["layers"][0]
    act16 = estimate_cost(one_layer(TensorProto.INT16, 8))["layers"][0]
    assert base["precision"] == "a8w8" and int4["precision"] == "a8w4" and act16["precision"] == "a16w8"
    assert int4["weight_bytes"] == base["weight_bytes"] / 2
    assert int4["energy_pj"] < base["energy_pj"] < act16["energy_pj"]
    assert int4["cycles"] <= base["cycles"] <= act16["cycles"]
    slow = estimate_cost(one_layer(TensorProto.INT8, 8), NpuSpec(dram_bytes_per_cycle=1.0))["layers"][0]
    assert slow["bound"] == "memory" and slow["cycles"] > base["cycles"]


def _single(op, inputs, out_type, domain="", **attrs):
    g = tm.GraphBuilder(0)
    names = []
    for item in inputs:
        if isinstance(item, tuple):
            names.append(g.input(*item))
        else:
            names.append(g.const(item))
    y = g.op(op, names, domain, name="bad", **attrs)
    return g.model([(y, out_type, None)])


REJECTED = {
    "float compute": (_single("Relu", [("x", [2, 2])], TensorProto.FLOAT), r"computes|float"),
    "int64 accumulator": (
        _single("IntMatMul", [("x", [2, 4], TensorProto.INT8), np.ones((4, 2), np.int8)], TensorProto.INT64, tm.QC, acc_type="int64"),
        r"node 'bad' \(qcompiler.IntMatMul\): the NPU accumulates in int32",
    ),
    "int16 weights": (
        _single("IntMatMul", [("x", [2, 4], TensorProto.INT8), np.ones((4, 2), np.int16)], TensorProto.INT32, tm.QC),
        r"node 'bad' \(qcompiler.IntMatMul\): weights must be int4/int8, got int16",
    ),
    "per-channel activation scale": (
        _single("Requantize", [("x", [2, 3], TensorProto.INT8), np.array([1, 2, 3], np.int32), np.array([1, 1, 1], np.int32), np.int8(0)],
                TensorProto.INT8, tm.QC),
        r"node 'bad' \(qcompiler.Requantize\): per-channel requantization of activations",
    ),
    "unknown op": (
        _single("Abs", [("x", [2, 3], TensorProto.INT8)], TensorProto.INT8),
        r"node 'bad' \(Abs\) is not an NPU operation",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejects_what_an_npu_cannot_run(case, tmp_path):
    model, pattern = REJECTED[case]
    with pytest.raises(TargetError, match=pattern):
        build(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_int32_only_npu_rejects_int64_accumulating_attention_naming_the_node(tmp_path):
    with pytest.raises(TargetError, match=r"target 'npu-sim': node '\w+' \(qcompiler.IntMatMul\): the NPU accumulates in int32"):
        build(tm.attention_block("ibert", act16=True), tmp_path / "out", "npu-sim{acc48=false}")


def test_48_bit_accumulators_run_int16_activation_matmuls_bit_exact(tmp_path):
    """Default acc48: a 16-bit-activation IntMatMul with an int64 accumulator is a 48-bit one."""
    model = tm.attention_block("ibert", act16=True)
    build(model, tmp_path / "out")
    feeds = tm.random_feeds(model, 0)
    got = qcompiler.load(tmp_path / "out").run(feeds)
    for key, value in tm.reference(model, feeds).items():
        np.testing.assert_array_equal(got[key], value)


def test_48_bit_accumulator_bound_is_checked(tmp_path):
    g = tm.GraphBuilder(0)  # |a|·|b|·K = 2^15 · 2^15 · 2^17 = 2^47
    a = g.input("a", [1, 1 << 17], TensorProto.INT16)
    b = g.input("b", [1 << 17, 1], TensorProto.INT16)
    y = g.op("IntMatMul", [a, b], tm.QC, name="huge", acc_type="int64")
    model = g.model([(y, TensorProto.INT64, [1, 1])])
    with pytest.raises(TargetError, match=r"node 'huge' \(qcompiler.IntMatMul\): the sum can exceed the 48-bit accumulator"):
        build(model, tmp_path / "out")


def test_embedding_lookup_costs_the_rows_it_reads():
    g = tm.GraphBuilder(0)
    ids = g.input("ids", [1, 8], TensorProto.INT64)
    rows = g.op("Gather", [g.weight((1000, 64)), ids], axis=0)
    layer = estimate_cost(g.model([(rows, TensorProto.INT8, [1, 8, 64])]))["layers"][0]
    assert layer["weight_bytes"] == 8 * 64


def test_cli_rejects_a_float_graph_with_one_line(cli, tmp_path):
    from builders import mlp, save

    path = save(mlp(), tmp_path / "mlp.onnx")
    done = cli(path, "--target", "npu-sim", "--preset", "float", "-o", tmp_path / "out")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "npu-sim" in done.stderr
