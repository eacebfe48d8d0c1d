"""The ``host`` target: artifacts bit-exact with the reference on integer graphs, float within tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qcompiler
import target_models as tm
from builders import mlp, save
from qcompiler.errors import TargetError
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets

INTEGER_GRAPHS = {
    "mlp": tm.quantized_mlp,
    "mlp-uint8-asym": lambda: tm.quantized_mlp(asym_input=True),
    "cnn-relu6-maxpool-gap": tm.quantized_cnn,
    "attention-ibert-int16": lambda: tm.attention_block("ibert"),
    "attention-linear": lambda: tm.attention_block("linear"),
    "attention-lut-int8": lambda: tm.attention_block("lut", act16=False, softmax_out=np.int8),
}
FLOAT_GRAPHS = {
    "weight-only-int8": lambda: tm.weight_only_mlp(8),
    "weight-only-int4-blocked": lambda: tm.weight_only_mlp(4),
    "float-cnn": tm.float_cnn,
}


def build(spec: str, model, out_dir):
    """Compile an IR model (no passes) for a target spec; returns the manifest."""
    target = parse_one(spec, default_targets())
    return qcompiler.compile_model(model, target, out_dir, pipeline=Pipeline([])).manifest


@pytest.fixture(scope="module")
def host_builds(tmp_path_factory):
    """Every test graph built once for host: name -> (model, out_dir)."""
    root = tmp_path_factory.mktemp("host")
    built = {}
    for name, make in {**INTEGER_GRAPHS, **FLOAT_GRAPHS}.items():
        build("host", make(), root / name)
        built[name] = (make(), root / name)
    return built


@pytest.mark.parametrize("name", sorted(INTEGER_GRAPHS))
def test_integer_graphs_bit_exact(host_builds, name):
    model, out = host_builds[name]
    runner = qcompiler.load(out)
    for seed in range(3):
        feeds = tm.random_feeds(model, seed)
        expected = tm.reference(model, feeds)
        got = runner.run(feeds)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}/{key}")


@pytest.mark.parametrize("name", sorted(FLOAT_GRAPHS))
def test_float_and_weight_only_graphs_within_tolerance(host_builds, name):
    model, out = host_builds[name]
    feeds = tm.random_feeds(model)
    expected = tm.reference(model, feeds)
    got = qcompiler.load(out).run(feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{name}/{key}")


def test_manifest_records_library_and_llvm_target(host_builds):
    _, out = host_builds["mlp"]
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["target_info"]
    assert info["library"] in manifest["files"]
    assert info["tvm_target"]["kind"] == "llvm" and info["tvm_target"]["mcpu"]
    assert (out / "README.md").is_file()


def test_rebuild_is_byte_identical(host_builds, tmp_path):
    _, first = host_builds["attention-ibert-int16"]
    build("host", INTEGER_GRAPHS["attention-ibert-int16"](), tmp_path / "again")
    assert (first / "model.so").read_bytes() == (tmp_path / "again" / "model.so").read_bytes()
    assert (first / "manifest.json").read_text() == (tmp_path / "again" / "manifest.json").read_text()


def test_explicit_mcpu_option(tmp_path):
    manifest = build("host{mcpu=x86-64}", tm.quantized_mlp(), tmp_path / "generic")
    assert manifest["target_spec"] == "host{mcpu=x86-64}"
    assert manifest["target_info"]["tvm_target"]["mcpu"] == "x86-64"


def test_unsupported_op_is_a_target_error(tmp_path):
    g = tm.GraphBuilder(0)
    x = g.input("x", [2, 2], tm.TensorProto.INT8)
    y = g.op("Mystery", [x], tm.QC, name="strange")
    with pytest.raises(TargetError, match=r"node 'strange' \(qcompiler.Mystery\)"):
        build("host", g.model([(y, tm.TensorProto.INT8, [2, 2])]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["float", "weights-int8"])
def test_cli_compiles_and_artifact_runs(cli, tmp_path, preset):
    path = save(mlp(), tmp_path / "mlp.onnx")
    for target in ("reference", "host"):
        done = cli(path, "--target", target, "--preset", preset, "-o", tmp_path / target)
        assert done.returncode == 0, done.stderr
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    expected = qcompiler.load(tmp_path / "reference").run({"x": x})["y"]
    got = qcompiler.load(tmp_path / "host").run({"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_quantize_linear_saturates_and_maps_nan_to_the_zero_point(tmp_path):
    """The reference's saturating QuantizeLinear: NaN → zero point, ±inf and huge values clamp."""
    g = tm.GraphBuilder(0)
    x = g.input("x", [2, 6])
    q = g.op("QuantizeLinear", [x, g.const(np.float32(0.25)), g.const(np.int8(-3))])
    u = g.op("QuantizeLinear", [x, g.const(np.float32(0.5)), g.const(np.uint8(200))])
    model = g.model([(q, tm.TensorProto.INT8, [2, 6]), (u, tm.TensorProto.UINT8, [2, 6])])
    build("host", model, tmp_path / "out")
    x = np.array([[np.nan, np.inf, -np.inf, 3e38, -3e38, 0.375], [-0.125, 31.9, -32.1, 1e10, 64.0, -0.0]], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = tm.reference(model, {"x": x})
    got = qcompiler.load(tmp_path / "out").run({"x": x})
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
