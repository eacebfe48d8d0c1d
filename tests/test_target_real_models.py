"""Every target end to end on real models, bit-exact with the reference interpreter.

* all-MiniLM-L6-v2 (dynamo export, batch 1 × seq 128), ``--preset w8a8`` calibrated on
  16 sentences, checked on 2 held-out sentences (``bench/targets_acceptance.py`` runs 20);
* the digits CNN (``qcompiler.examples.digits_cnn``: Conv/BN/ReLU6/pooling/Gemm trained on
  scikit-learn's 8×8 digits), checked on every held-out digit.

The quantization pipeline runs once per model (``qcompile --target reference``); each
target then compiles that integer-stage model once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from conftest import run_cli
from qcompiler.errors import TargetError
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.targets import aarch64_toolchain as tc
from qcompiler.targets import cuda as cuda_target
from qcompiler.targets import tvm_bridge
from qcompiler.targets.arm_neon import QemuRunner

pytestmark = pytest.mark.slow

needs_qemu = pytest.mark.skipif(bool(tc.missing_tools(run=True)), reason=f"aarch64 toolchain absent; {tc.SETUP_HINT}")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="fpga-sim needs gcc")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
MATMULS = ("MatMulInteger", "IntMatMul")


class Builds:
    """The integer-stage model of one real model, compiled once per target spec on demand."""

    def __init__(self, root: Path, reference: Path):
        self.root = root
        self.reference = reference
        self.outs: dict[str, Path] = {}

    def model(self) -> ir.Model:
        return ir.load(self.reference / "model.onnx")

    def get(self, spec: str) -> Path:
        if spec not in self.outs:
            out = self.root / spec.replace("{", "_").replace("}", "").replace("=", "-").replace(",", "_")
            qcompiler.compile_model(self.model(), parse_one(spec, default_targets()), out, pipeline=Pipeline([]))
            self.outs[spec] = out
        return self.outs[spec]

    def info(self, spec: str) -> dict:
        return json.loads((self.get(spec) / "manifest.json").read_text())["target_info"]


def assert_bit_exact(expected: list[dict], got: list[dict], what: str) -> None:
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        for key, value in want.items():
            assert have[key].dtype == value.dtype, f"{what}[{i}]/{key}"
            np.testing.assert_array_equal(have[key], value, err_msg=f"{what}[{i}]/{key}")


def run_all(out: Path, feeds: list[dict]) -> list[dict]:
    runner = qcompiler.load(out)
    if hasattr(runner, "run_many"):  # arm-neon: one emulator process for the whole batch
        return runner.run_many(feeds)
    return [runner.run(f) for f in feeds]


# -- MiniLM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_dynamo, tmp_path_factory):
    from qcompiler.examples import minilm as example

    root = tmp_path_factory.mktemp("minilm-targets")
    calib, held_out = example.calibration_and_eval_sentences(16, 20)
    calib_path = example.write_calibration(root / "calib16.npz", calib)
    done = run_cli(minilm_dynamo, "--target", "reference", "--calib", calib_path, "--preset", "w8a8", "-o", root / "reference")
    assert done.returncode == 0, done.stderr
    tokens = example.tokenize(held_out[:2])
    feeds = [{name: tokens[name][i] for name in example.INPUT_NAMES} for i in range(2)]
    reference = qcompiler.load(root / "reference")
    return SimpleNamespace(builds=Builds(root, root / "reference"), feeds=feeds, expected=[reference.run(f) for f in feeds])


def test_minilm_integer_stage_has_the_ops_targets_run(minilm):
    ops = {(n.domain, n.op_type) for n in minilm.builds.model().graph}
    assert ("", "MatMulInteger") in ops and ("qcompiler", "IntSoftmax") in ops and ("qcompiler", "IntLayerNorm") in ops


@pytest.mark.parametrize("spec", ["host", "npu-sim"])
def test_minilm_tvm_cpu_targets_bit_exact(minilm, spec):
    assert_bit_exact(minilm.expected, run_all(minilm.builds.get(spec), minilm.feeds), spec)


def test_minilm_npu_sim_reports_cycles_and_energy_per_layer(minilm):
    info = minilm.builds.info("npu-sim")
    cost = json.loads((minilm.builds.get("npu-sim") / info["cost"]).read_text())
    matmuls = [layer for layer in cost["layers"] if layer["op"].split(".")[-1] in MATMULS]
    n_matmuls = sum(n.op_type in MATMULS for n in minilm.builds.model().graph)
    assert len(matmuls) == n_matmuls and all(m["macs"] > 0 and m["cycles"] > 0 and m["energy_pj"] > 0 for m in matmuls)
    assert {m["precision"] for m in matmuls} <= {"a8w8", "a16w8"}
    assert all(layer["cycles"] > 0 and layer["energy_pj"] >= 0 for layer in cost["layers"])
    assert cost["total"]["cycles"] == sum(layer["cycles"] for layer in cost["layers"])
    assert info["cost_total"] == cost["total"]
    print(f"npu-sim MiniLM: {cost['total']}")


@needs_gcc
def test_minilm_fpga_sim_bit_exact_with_dsp_and_bram_per_layer(minilm):
    out = minilm.builds.get("fpga-sim")
    assert_bit_exact(minilm.expected, run_all(out, minilm.feeds), "fpga-sim")
    report = json.loads((out / "resources.json").read_text())
    layers = [layer for layer in report["layers"] if layer["kind"] == "layer"]
    matmuls = [layer for layer in layers if layer["op"].split(".")[-1] in MATMULS]
    assert matmuls and all(m["dsp"] > 0 and m["latency_cycles"] > 0 for m in matmuls)
    assert all(m["bram18"] > 0 for m in matmuls if m["constant_bytes"] > 0)  # weights in BRAM
    assert all({"dsp", "bram18", "lut", "latency_cycles"} <= set(layer) for layer in layers)
    print(f"fpga-sim MiniLM: {report['total']}")


@needs_qemu
def test_minilm_arm_neon_dotprod_sdot_in_every_int8_matmul_kernel_bit_exact_on_neoverse_n1(minilm):
    spec = "arm-neon{dotprod=true}"
    info = minilm.builds.info(spec)
    kernels = info["int8_matmul_kernels"]
    covered = sorted(node for k in kernels.values() for node in k["nodes"])
    matmuls = sorted(n.name for n in minilm.builds.model().graph if n.op_type in MATMULS)
    assert covered == matmuls  # every matmul (int16 activations are split into two int8 halves) ...
    assert all(k["sdot"] > 0 for k in kernels.values()), info["matmul_kernel_sdot"]  # ... uses sdot
    assert info["int8_matmul_fallback"] == [] and info["other_matmul_kernels"] == {}
    print(f"sdot per int8 matmul kernel: {info['matmul_kernel_sdot']}")
    runner = qcompiler.load(minilm.builds.get(spec))
    assert runner.cpu == "neoverse-n1"
    assert_bit_exact(minilm.expected, runner.run_many(minilm.feeds), spec)


@needs_qemu
def test_minilm_sdot_build_dies_with_sigill_on_cortex_a53(minilm):
    out = minilm.builds.get("arm-neon{dotprod=true}")
    manifest = json.loads((out / "manifest.json").read_text())
    with pytest.raises(TargetError, match="SIGILL under qemu -cpu cortex-a53"):
        QemuRunner(out, manifest, cpu="cortex-a53").run(minilm.feeds[0])


def test_minilm_cuda_build_holds_cuda_kernels_and_compiles_for_sm80_and_sm90(minilm):
    info = minilm.builds.info("cuda{arch=sm_80}")
    source = minilm.builds.get("cuda{arch=sm_80}") / info["source"]
    assert info["tvm_target"] == {"kind": "cuda", "arch": "sm_80"} and info["kernels"] > 0
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the CUDA sources were built but not compiled")
    results = [info["nvcc"], cuda_target.nvcc_instructions(source, "sm_90")]
    for result in results:
        assert result["cubin_bytes"] > 0 and result["ptx"]["dp4a"] > 0, result
    print(f"cuda MiniLM: {results}")


@pytest.mark.gpu
def test_minilm_cuda_bit_exact_on_gpu(minilm):
    if not tvm_bridge.cuda_available():
        pytest.skip("no NVIDIA GPU on this machine")
    assert_bit_exact(minilm.expected, run_all(minilm.builds.get("cuda{arch=sm_80}"), minilm.feeds), "cuda")


# -- the digits CNN --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from qcompiler.examples import digits_cnn

    root = tmp_path_factory.mktemp("digits-targets")
    model = digits_cnn.export_onnx(root / "digits_cnn.onnx")
    calib = digits_cnn.write_calibration(root / "calib.npz")
    done = run_cli(model, "--target", "reference", "--calib", calib, "--preset", "w8a8", "-o", root / "reference")
    assert done.returncode == 0, done.stderr
    images, labels = digits_cnn.held_out()
    feeds = [{digits_cnn.INPUT_NAME: images[i : i + 1]} for i in range(len(images))]
    reference = qcompiler.load(root / "reference")
    return SimpleNamespace(
        builds=Builds(root, root / "reference"), feeds=feeds, labels=labels, fp32=digits_cnn.fp32_logits(images),
        expected=[reference.run(f) for f in feeds], output=digits_cnn.OUTPUT_NAME, top1=digits_cnn.top1,
    )


def test_digits_cnn_is_integer_only_and_agrees_with_fp32(digits):
    ops = [n.op_type for n in digits.builds.model().graph]
    assert ops.count("ConvInteger") == 2 and "MaxPool" in ops and "ReduceSum" in ops and "MatMulInteger" in ops
    assert "BatchNormalization" not in ops and "Conv" not in ops
    quantized = digits.top1(np.stack([e[digits.output][0] for e in digits.expected]))
    fp32 = digits.top1(digits.fp32)
    agreement, accuracy = float(np.mean(quantized == fp32)), float(np.mean(quantized == digits.labels))
    print(f"digits CNN w8a8: top-1 agreement with FP32 {agreement:.4f}, accuracy {accuracy:.4f} "
          f"(FP32 {np.mean(fp32 == digits.labels):.4f}) on {len(fp32)} held-out digits")
    assert agreement >= 0.97 and accuracy >= 0.93


@pytest.mark.parametrize(
    "spec",
    [
        "host",
        "npu-sim",
        pytest.param("fpga-sim", marks=needs_gcc),
        pytest.param("arm-neon{dotprod=true}", marks=needs_qemu),
    ],
)
def test_digits_cnn_bit_exact_on_every_held_out_digit(digits, spec):
    assert_bit_exact(digits.expected, run_all(digits.builds.get(spec), digits.feeds), spec)


@needs_qemu
def test_digits_cnn_arm_neon_dotprod_convs_and_matmul_are_sdot_kernels(digits):
    info = digits.builds.info("arm-neon{dotprod=true}")
    kernels = info["int8_matmul_kernels"]
    covered = sorted(node for k in kernels.values() for node in k["nodes"])
    layers = sorted(n.name for n in digits.builds.model().graph if n.op_type in ("ConvInteger", *MATMULS))
    assert covered == layers and len(layers) == 3  # two convs (im2col + dense kernel), the head
    assert all(k["sdot"] > 0 for k in kernels.values()), info["matmul_kernel_sdot"]
    assert info["int8_matmul_fallback"] == [] and info["other_matmul_kernels"] == {}
    print(f"digits CNN sdot per int8 kernel: {info['matmul_kernel_sdot']}")


def test_digits_cnn_host_convs_use_the_int8_kernels(digits):
    info = digits.builds.info("host")
    if info["int8_dot_kernel"] != "vnni":
        pytest.skip("this CPU has no AVX-512 VNNI: TVM's generic conv2d/dense kernels")
    covered = sorted(node for nodes in info["int8_matmul_kernels"].values() for node in nodes)
    convs = [n.name for n in digits.builds.model().graph if n.op_type == "ConvInteger"]
    assert set(convs) <= set(covered) and info["int8_matmul_fallback"] == []


def test_digits_cnn_cost_and_resource_reports_per_layer(digits):
    cost = json.loads((digits.builds.get("npu-sim") / "cost.json").read_text())
    convs = [layer for layer in cost["layers"] if layer["op"] == "ConvInteger"]
    assert [c["macs"] for c in convs] == [16 * 64 * 9, 32 * 16 * 16 * 9]  # 8×8×16 taps 3×3×1; 4×4×32 taps 3×3×16
    assert all(c["cycles"] > 0 and c["energy_pj"] > 0 for c in convs)
    if shutil.which("gcc") is not None:
        report = json.loads((digits.builds.get("fpga-sim") / "resources.json").read_text())
        convs = [layer for layer in report["layers"] if layer["op"] == "ConvInteger"]
        assert len(convs) == 2 and all(c["dsp"] > 0 and c["bram18"] > 0 for c in convs)


@needs_nvcc
def test_digits_cnn_cuda_sources_compile(digits):
    info = digits.builds.info("cuda")
    assert info["kernels"] > 0 and info["nvcc"]["cubin_bytes"] > 0
    other = cuda_target.nvcc_instructions(digits.builds.get("cuda") / info["source"], "sm_80")
    assert other["cubin_bytes"] > 0


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_minilm_with_token_type_ids_is_integer_only(minilm_dir, dynamo, tmp_path):
    """all-MiniLM-L6-v2 exported with three inputs (token_type_ids as an input, as optimum
    does): the embedding sum and its LayerNorm are integer too, so npu-sim builds it and
    the output stays close to FP32."""
    from qcompiler.examples import minilm
    from qcompiler.interpreter import ReferenceInterpreter

    path = minilm.export_onnx(minilm_dir / f"types-{dynamo}" / "minilm.onnx", dynamo=dynamo, token_type_ids=True)
    calib, held_out = minilm.calibration_and_eval_sentences(16, 2)
    tokens = minilm.tokenize(calib)
    tokens["token_type_ids"] = np.zeros_like(tokens["input_ids"])
    result = qcompiler.compile(path, "npu-sim", tmp_path / "npu", preset="w8a8", calib=tokens)
    assert result.manifest["verified"]["status"] == "bit-exact"
    assert not result.context.report["integer_lowering"]["kept_float"]
    feeds = {k: v[0] for k, v in minilm.tokenize(held_out[:1]).items()}
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    want = ReferenceInterpreter(qcompiler.load_onnx(path)).run(feeds)[minilm.OUTPUT_NAME].reshape(-1)
    got = qcompiler.load(tmp_path / "npu").run(feeds)[minilm.OUTPUT_NAME].reshape(-1)
    assert want @ got / (np.linalg.norm(want) * np.linalg.norm(got)) > 0.98
