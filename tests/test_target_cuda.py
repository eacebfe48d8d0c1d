"""The ``cuda`` target: real CUDA modules for sm_80/sm_90, nvcc-valid source, int8 instructions.

Running needs a GPU: the ``gpu`` test compares bit-exactly where one exists.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qcompiler
import target_models as tm
from qcompiler.errors import TargetError
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.targets import cuda as cuda_target
from qcompiler.targets import tvm_bridge

#: Slow lane: CUDA builds and nvcc.
pytestmark = pytest.mark.slow

BUILDS = {
    "attention-sm90": ("cuda", lambda: tm.attention_block("lut", act16=False, softmax_out=np.int8)),
    "mlp-sm80": ("cuda{arch=sm_80}", tm.quantized_mlp),
    "weight-only-sm90": ("cuda", lambda: tm.weight_only_mlp(4)),
}
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def build(spec, model, out_dir):
    return qcompiler.compile_model(model, parse_one(spec, default_targets()), out_dir, pipeline=Pipeline([])).manifest


@pytest.fixture(scope="module")
def cuda_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    for name, (spec, make) in BUILDS.items():
        build(spec, make(), root / name)
    return root


def _info(root, name):
    return json.loads((root / name / "manifest.json").read_text())["target_info"]


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_build_contains_cuda_kernels_and_source(cuda_builds, name):
    info = _info(cuda_builds, name)
    source = (cuda_builds / name / info["source"]).read_text()
    assert info["kernels"] > 0 and source.count("__global__") == info["kernels"]
    assert info["tvm_target"]["arch"] == ("sm_80" if name.endswith("sm80") else "sm_90")


@needs_nvcc
@pytest.mark.parametrize("name", ["attention-sm90", "mlp-sm80"])
def test_source_compiles_with_nvcc_for_both_archs_and_uses_dp4a(cuda_builds, name):
    info = _info(cuda_builds, name)
    assert info["nvcc"]["arch"] == info["tvm_target"]["arch"] and info["nvcc"]["cubin_bytes"] > 0
    other = "sm_80" if info["tvm_target"]["arch"] == "sm_90" else "sm_90"
    checked = cuda_target.nvcc_instructions(cuda_builds / name / info["source"], other)
    for result in (info["nvcc"], checked):
        assert result["ptx"]["dp4a"] > 0, result  # int8 dot products reach the GPU's dp4a
        if result["sass"] is not None:
            assert result["sass"]["IDP.4A"] > 0, result
    print(f"{name}: {info['nvcc']} / {checked}")


def test_a_build_that_fell_back_to_host_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tvm_bridge, "module_kinds", lambda executable: ["relax.VMExecutable", "llvm"])
    with pytest.raises(TargetError, match="no CUDA module"):
        build("cuda", tm.quantized_mlp(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None and tvm_bridge.cuda_available()


def test_running_without_a_gpu_explains_why(cuda_builds):
    if _gpu_present():
        pytest.skip("a GPU is present")
    runner = qcompiler.load(cuda_builds / "mlp-sm80")
    with pytest.raises(TargetError, match="needs an NVIDIA GPU"):
        runner.run(tm.random_feeds(tm.quantized_mlp()))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["attention-sm90", "mlp-sm80"])
def test_bit_exact_on_gpu(cuda_builds, name):
    if not _gpu_present():
        pytest.skip("no NVIDIA GPU on this machine (needs nvidia-smi and a CUDA device)")
    model = BUILDS[name][1]()
    feeds = tm.random_feeds(model)
    got = qcompiler.load(cuda_builds / name).run(feeds)
    for key, value in tm.reference(model, feeds).items():
        np.testing.assert_array_equal(got[key], value)
