"""The ``cuda`` target: NVIDIA GPUs sm_80 (Ampere) and sm_90 (Hopper), dlight schedules.

A CUDA build without schedules silently yields host code, so the build asserts that a
``cuda`` module exists. The artifact holds ``model.cu`` (the generated kernels) and
``model.so`` (the Relax VM library with the CUDA module inside). Where ``nvcc`` is
installed the build also compiles ``model.cu`` to PTX for the arch and records which
int8 instructions it contains (``dp4a``, ``mma``). Running needs a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.pipeline import option
from qcompiler.target import Capabilities, Runner, io_specs

from .tvm_target import TVMTarget

SOURCE = "model.cu"
#: int8 instructions searched for in PTX (``dp4a.s32.s32``, ``mma.sync...s8``) and SASS.
_PTX_PATTERNS = {"dp4a": re.compile(r"\bdp4a\."), "mma": re.compile(r"\bmma\.sync\b|\bwgmma\.")}
_SASS_PATTERNS = {"IDP.4A": re.compile(r"\bIDP\.4A\b"), "IMMA": re.compile(r"\bIMMA\b")}

_README_GPU = """
## On the GPU

`model.so` contains the CUDA kernels ({arch}); run it where an NVIDIA GPU of that
architecture (or newer) and the CUDA driver are present:

    vm = relax.VirtualMachine(tvm.runtime.load_module("model.so"), tvm.cuda())

`model.cu` is the generated CUDA source: `nvcc -arch={arch} -cubin model.cu` compiles it.
"""


def nvcc_instructions(source: Path, arch: str, work: Path | None = None) -> dict:
    """Compile ``source`` with nvcc to a cubin and PTX for ``arch``; count int8 instructions.

    Returns ``{"arch", "cubin_bytes", "ptx": {...}, "sass": {...} or None}`` (SASS needs cuobjdump).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise TargetError("nvcc is not installed")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cubin, ptx = Path(tmp) / "m.cubin", Path(tmp) / "m.ptx"
        for flag, out in (("-cubin", cubin), ("-ptx", ptx)):
            done = subprocess.run([nvcc, f"-arch={arch}", flag, "-o", str(out), str(source)], capture_output=True, text=True)
            if done.returncode != 0:
                raise TargetError(f"nvcc -arch={arch} {flag} failed: {done.stderr.strip()[-400:]}")
        ptx_text = ptx.read_text()
        result = {
            "arch": arch,
            "cubin_bytes": cubin.stat().st_size,
            "ptx": {name: len(p.findall(ptx_text)) for name, p in _PTX_PATTERNS.items()},
            "sass": None,
        }
        tools = _cuda_binutils()
        if tools is not None:
            sass = subprocess.run([tools, "-sass", str(cubin)], capture_output=True, text=True, env=_binutils_env(tools)).stdout
            if sass.strip():
                result["sass"] = {name: len(p.findall(sass)) for name, p in _SASS_PATTERNS.items()}
        return result


def _cuda_binutils() -> str | None:
    """``cuobjdump`` on PATH, or from the ``nvidia-cuda-cuobjdump`` wheel (it needs ``nvdisasm`` too)."""
    found = shutil.which("cuobjdump")
    if found is not None:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            return str(candidate)
    return None


def _binutils_env(cuobjdump: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(cuobjdump).parent) + os.pathsep + env.get("PATH", "")
    return env


class CudaRunner(Runner):
    """Runs the library on the first CUDA GPU; explains itself where there is none."""

    def __init__(self, library: Path, manifest: dict):
        super().__init__(io_specs(manifest["inputs"]), [o["name"] for o in manifest["outputs"]])
        self.library = library
        self._module = None

    def _run(self, feeds):
        from . import tvm_bridge

        if self._module is None:
            if not tvm_bridge.cuda_available():
                raise TargetError("the cuda artifact needs an NVIDIA GPU and driver; none is available here")
            self._module = tvm_bridge.VMModule(self.library, device="cuda")
        results = self._module([feeds[spec.name] for spec in self.inputs])
        return dict(zip(self.output_names, results))


@dataclass(frozen=True)
class CudaTarget(TVMTarget):
    """NVIDIA GPU (sm_80 / sm_90) with dlight schedules; CUDA source + library in the artifact."""

    name = "cuda"
    capabilities = Capabilities(runnable_here=False)

    arch: Literal["sm_80", "sm_90"] = option("sm_90", "GPU architecture")

    def tvm_target(self) -> dict:
        return {"kind": "cuda", "arch": self.arch}

    gpu = True

    def describe(self, model: ir.Model, out_dir: Path, executable, target: dict, lowering: dict):
        from . import tvm_bridge

        kinds = tvm_bridge.module_kinds(executable)
        if "cuda" not in kinds:
            raise TargetError(f"the cuda build produced no CUDA module (modules: {kinds}): code fell back to the host")
        source = tvm_bridge.device_source(executable, "cuda")
        (out_dir / SOURCE).write_text(source)
        info = {"source": SOURCE, "kernels": len(re.findall(r"__global__", source))}
        if shutil.which("nvcc") is not None:
            info["nvcc"] = nvcc_instructions(out_dir / SOURCE, self.arch, work=out_dir.parent)
        return info, _README_GPU.format(arch=self.arch)

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return CudaRunner(out_dir / manifest["target_info"]["library"], manifest)
