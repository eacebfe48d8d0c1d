"""The ``arm-neon`` target: cross-compiled, run under qemu-aarch64, bit-exact; sdot proven to execute."""

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
from qcompiler.targets import aarch64_toolchain as tc
from qcompiler.targets.arm_neon import QemuRunner

pytestmark = [
    pytest.mark.slow,  # cross compiles and qemu
    pytest.mark.skipif(
        bool(tc.missing_tools(run=True)),
        reason=f"aarch64 toolchain absent ({', '.join(tc.missing_tools(run=True))}); {tc.SETUP_HINT}",
    ),
]


def wide_int8_mlp() -> tm.ir.Model:
    """int8 x[4,64] → 64→128 → 128→32, per-channel requantize: dot products long enough for sdot."""
    g = tm.GraphBuilder(7)
    x = g.input("x", [4, 64], TensorProto.INT8)
    acc = g.op("MatMulInteger", [x, g.weight((64, 128), -40, 41)], name="fc1")
    h = g.requant(acc, g.rng.uniform(0.0005, 0.001, 128), np.int8(0), axis=1, qmin=0)
    acc = g.op("MatMulInteger", [h, g.weight((128, 32), -40, 41)], name="fc2")
    y = g.requant(acc, 0.0008, np.int8(0))
    return g.model([(y, TensorProto.INT8, [4, 32])])


GRAPHS = {
    "mlp-neon": ("arm-neon", lambda: tm.quantized_mlp(asym_input=True)),
    "attention-dotprod": ("arm-neon{dotprod=true}", lambda: tm.attention_block("lut", act16=False, softmax_out=np.int8)),
    "wide-dotprod": ("arm-neon{dotprod=true}", wide_int8_mlp),
    "weight-only-i8mm": ("arm-neon{dotprod=true,i8mm=true}", lambda: tm.weight_only_mlp(8)),
    "convs-dotprod": ("arm-neon{dotprod=true}", tm.int8_convs),
    "convs-neon": ("arm-neon", tm.int8_convs),
}


def build(spec, model, out_dir):
    return qcompiler.compile_model(model, parse_one(spec, default_targets()), out_dir, pipeline=Pipeline([])).manifest


@pytest.fixture(scope="module")
def arm_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("arm")
    for name, (spec, make) in GRAPHS.items():
        build(spec, make(), root / name)
    return root


@pytest.mark.parametrize("name", ["mlp-neon", "attention-dotprod", "wide-dotprod", "convs-dotprod", "convs-neon"])
def test_bit_exact_under_qemu(arm_builds, name):
    model = GRAPHS[name][1]()
    feeds = tm.random_feeds(model, 1)
    expected = tm.reference(model, feeds)
    got = qcompiler.load(arm_builds / name).run(feeds)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        np.testing.assert_array_equal(got[key], value, err_msg=f"{name}/{key}")


def test_int8_convs_are_sdot_kernels(arm_builds):
    """Every group-1 int8 conv (stride, padding, dilation, 1-D, uint8/int8 inputs with zero
    points, per-channel weight zero points) is im2col + a scheduled dense kernel with sdot;
    the depthwise conv keeps the generic conv2d and is reported as a fallback."""
    info = json.loads((arm_builds / "convs-dotprod" / "manifest.json").read_text())["target_info"]
    kernels = info["int8_matmul_kernels"]
    assert sorted(n for k in kernels.values() for n in k["nodes"]) == ["batch2", "conv1d", "dilated", "stride2"]
    assert all(k["sdot"] > 0 for k in kernels.values()), info["matmul_kernel_sdot"]
    assert info["int8_matmul_fallback"] == ["depthwise"]
    other = list(info["other_matmul_kernels"])
    assert len(other) == 1 and "conv2d" in other[0], other  # the depthwise conv alone
    plain = json.loads((arm_builds / "convs-neon" / "manifest.json").read_text())["target_info"]
    assert plain["sdot_total"] == 0 and len(plain["int8_matmul_kernels"]) == len(kernels)


def test_weight_only_float_graph_under_qemu_max_cpu(arm_builds):
    model = GRAPHS["weight-only-i8mm"][1]()
    feeds = tm.random_feeds(model)
    runner = qcompiler.load(arm_builds / "weight-only-i8mm")
    assert runner.cpu == "max"
    got = runner.run(feeds)
    for key, value in tm.reference(model, feeds).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5)


def test_dotprod_build_uses_sdot_in_every_int8_matmul_kernel(arm_builds):
    manifest = json.loads((arm_builds / "wide-dotprod" / "manifest.json").read_text())
    info = manifest["target_info"]
    assert info["tvm_target"]["mattr"] == ["+neon", "+dotprod"] and info["int8_dot_kernel"] == "sdot"
    kernels = info["int8_matmul_kernels"]
    assert sorted(n for k in kernels.values() for n in k["nodes"]) == ["fc1", "fc2"]
    assert info["matmul_kernel_sdot"] == {name: k["sdot"] for name, k in kernels.items()}
    assert len(kernels) == 2 and all(k["sdot"] > 0 for k in kernels.values()), kernels
    assert info["int8_matmul_fallback"] == [] and info["other_matmul_kernels"] == {}
    plain = json.loads((arm_builds / "mlp-neon" / "manifest.json").read_text())["target_info"]
    assert plain["sdot_total"] == 0 and plain["features"] == ["neon"] and plain["int8_dot_kernel"] == "neon"
    assert len(plain["int8_matmul_kernels"]) == 2  # the same scheduled kernels, with smull/saddlp


def test_attention_matmuls_of_activations_are_sdot_kernels_too(arm_builds):
    """q·kᵀ and probs·v (8-bit activations with zero points, K and N padded to 4) use the kernel."""
    info = json.loads((arm_builds / "attention-dotprod" / "manifest.json").read_text())["target_info"]
    bmm = {name: k for name, k in info["int8_matmul_kernels"].items() if name.startswith("qc_int8_bmm_")}
    assert len(bmm) == 2 and all(k["sdot"] > 0 for k in bmm.values()), info["int8_matmul_kernels"]
    assert info["int8_matmul_fallback"] == []


def test_sdot_runs_on_neoverse_n1_and_dies_with_sigill_on_cortex_a53(arm_builds):
    out = arm_builds / "wide-dotprod"
    manifest = json.loads((out / "manifest.json").read_text())
    model = wide_int8_mlp()
    feeds = tm.random_feeds(model)
    expected = tm.reference(model, feeds)
    got = QemuRunner(out, manifest, cpu="neoverse-n1").run(feeds)
    np.testing.assert_array_equal(list(got.values())[0], list(expected.values())[0])
    with pytest.raises(TargetError, match="SIGILL under qemu -cpu cortex-a53"):
        QemuRunner(out, manifest, cpu="cortex-a53").run(feeds)


def test_many_runs_in_one_emulator_process(arm_builds):
    model = GRAPHS["mlp-neon"][1]()
    runner = qcompiler.load(arm_builds / "mlp-neon")
    batch = [tm.random_feeds(model, seed) for seed in range(3)]
    for feeds, got in zip(batch, runner.run_many(batch)):
        for key, value in tm.reference(model, feeds).items():
            np.testing.assert_array_equal(got[key], value)
    assert len(runner.last_run_us) == 3 and all(t >= 0 for t in runner.last_run_us)


def test_artifact_is_self_contained_and_deterministic(arm_builds, tmp_path):
    out = arm_builds / "mlp-neon"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.so", "vm_runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "README.md"} <= set(manifest["files"])
    assert "qemu-aarch64" in (out / "README.md").read_text()
    build("arm-neon", GRAPHS["mlp-neon"][1](), tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").read_text() == (out / "manifest.json").read_text()


def test_missing_runner_tools_give_a_clear_error(arm_builds, monkeypatch):
    monkeypatch.setattr(tc, "QEMU", "qemu-aarch64-not-installed")
    runner = qcompiler.load(arm_builds / "mlp-neon")
    with pytest.raises(TargetError, match="needs qemu-aarch64-not-installed"):
        runner.run(tm.random_feeds(GRAPHS["mlp-neon"][1]()))


def test_setup_command_reports_a_ready_toolchain(cli):
    """``qcompile --setup arm-neon`` installs what is missing (apt-get, the aarch64 runtime) and checks it."""
    result = cli("--setup", "arm-neon")
    assert result.returncode == 0, result.stderr
    assert "arm-neon: ready (cross toolchain, qemu-aarch64, aarch64 TVM runtime in" in result.stdout
