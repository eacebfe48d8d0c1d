"""The ``arm-neon`` target: aarch64 Linux with NEON (optionally dotprod / i8mm).

The artifact: ``model.so`` (cross-compiled TVM Relax VM library), ``vm_runner`` (a
small native C++ program, ``targets/native/vm_runner.cc``) and ``lib/`` (the aarch64
TVM runtime it links). Copy the folder to an aarch64 Linux device and run
``./vm_runner model.so IO_DIR``; here the runner runs under ``qemu-aarch64`` with a
CPU model that has the selected extensions. With dotprod the manifest lists the
``sdot`` (and ``smmla`` with i8mm) count of every kernel, from the disassembly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.pipeline import option
from qcompiler.target import Capabilities, Runner, Target, io_specs

from . import aarch64_toolchain as tc
from .host import LIBRARY, write_readme

RUNNER = "vm_runner"
DOT_MNEMONICS = ("sdot", "udot", "usdot", "smmla", "ummla", "usmmla")
#: DLPack type codes of the runner's I/O format.
_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}

_DEVICE_README = """
## On an aarch64 Linux device

    IO=$(mktemp -d)   # inputs.txt: one line per input "code bits ndim dims..." (0 int, 1 uint, 2 float, 6 bool)
                      # in0.bin, in1.bin, ...: raw little-endian data, inputs in the order above
    ./vm_runner model.so $IO   # writes outputs.txt (same format) and out0.bin, out1.bin, ...

Needs CPU features: {features}. Under emulation on x86-64:

    qemu-aarch64 -L {sysroot} -cpu {cpu} ./vm_runner model.so $IO
"""


def default_qemu_cpu(features: list[str]) -> str:
    """A qemu CPU model with exactly the needed extensions (cortex-a53 has neither dotprod nor i8mm)."""
    if "i8mm" in features:
        return "max"
    if "dotprod" in features:
        return "neoverse-n1"
    return "cortex-a53"


class QemuRunner(Runner):
    """Runs the artifact's native runner under qemu-aarch64 (``cpu``: a qemu ``-cpu`` model)."""

    def __init__(self, out_dir: Path, manifest: dict, cpu: str | None = None):
        super().__init__(io_specs(manifest["inputs"]), [o["name"] for o in manifest["outputs"]])
        info = manifest["target_info"]
        self.out_dir = out_dir
        self.output_specs = io_specs(manifest["outputs"])
        self.cpu = cpu or os.environ.get("QCOMPILER_QEMU_CPU") or default_qemu_cpu(info["features"])
        self.runner = out_dir / info["runner"]
        self.library = out_dir / info["library"]

    def command(self, io_dir: Path) -> list[str]:
        return [tc.QEMU, "-L", tc.SYSROOT, "-cpu", self.cpu, str(self.runner), str(self.library), str(io_dir)]

    def _run(self, feeds):
        missing = tc.missing_tools(run=True)
        if missing:
            raise TargetError(f"cannot run the arm-neon artifact here: needs {', '.join(missing)}; {tc.SETUP_HINT}")
        with tempfile.TemporaryDirectory(prefix="qc-arm-") as tmp:
            io_dir = Path(tmp)
            lines = []
            for i, spec in enumerate(self.inputs):
                array = np.ascontiguousarray(feeds[spec.name])
                lines.append(" ".join(map(str, [_CODES[array.dtype.kind], array.dtype.itemsize * 8, array.ndim, *array.shape])))
                array.tofile(io_dir / f"in{i}.bin")
            (io_dir / "inputs.txt").write_text("\n".join(lines) + "\n")
            done = subprocess.run(self.command(io_dir), capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise TargetError(_describe_failure(done, self.cpu))
            return self._read_outputs(io_dir)

    def _read_outputs(self, io_dir: Path) -> dict[str, np.ndarray]:
        outputs = {}
        lines = (io_dir / "outputs.txt").read_text().splitlines()
        for i, (spec, line) in enumerate(zip(self.output_specs, lines)):
            fields = [int(f) for f in line.split()]
            shape = tuple(fields[3 : 3 + fields[2]])
            outputs[spec.name] = np.fromfile(io_dir / f"out{i}.bin", dtype=spec.dtype).reshape(shape)
        return outputs


def _describe_failure(done: subprocess.CompletedProcess, cpu: str) -> str:
    if done.returncode < 0 or done.returncode > 128:
        number = -done.returncode if done.returncode < 0 else done.returncode - 128
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        if name == "SIGILL":
            return f"the arm-neon artifact died with SIGILL under qemu -cpu {cpu}: that CPU lacks an instruction the build uses"
        return f"the arm-neon artifact died with {name} under qemu -cpu {cpu}"
    tail = (done.stderr or "").strip().splitlines()
    return f"the arm-neon runner failed (status {done.returncode}): {tail[-1] if tail else 'no message'}"


@dataclass(frozen=True)
class ArmNeonTarget(Target):
    """aarch64 Linux with NEON (+dotprod, +i8mm options); native runner, checked under qemu."""

    name = "arm-neon"
    capabilities = Capabilities()

    dotprod: bool = option(False, "use the Armv8.2 dot-product instructions (sdot/udot)")
    i8mm: bool = option(False, "use the Armv8.6 int8 matrix-multiply extension (smmla)")

    def features(self) -> list[str]:
        return ["neon"] + (["dotprod"] if self.dotprod else []) + (["i8mm"] if self.i8mm else [])

    def tvm_target(self) -> dict:
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": [f"+{f}" for f in self.features()]}

    def build(self, model: ir.Model, out_dir: Path, ctx) -> dict:
        from . import tvm_bridge

        tc.require_tools(run=False)
        runner = tc.native_runner()
        target = self.tvm_target()
        executable = tvm_bridge.compile(tvm_bridge.lower(model), target)
        tvm_bridge.export(executable, out_dir / LIBRARY, cc=tc.CXX)
        shutil.copyfile(runner, out_dir / RUNNER)
        os.chmod(out_dir / RUNNER, 0o755)
        (out_dir / "lib").mkdir()
        for lib in sorted(tc.runtime_libraries().glob("*.so")):
            shutil.copyfile(lib, out_dir / "lib" / lib.name)
        kernels = tc.kernel_functions(out_dir / LIBRARY)
        counts = tc.count_instructions(out_dir / LIBRARY, DOT_MNEMONICS)
        per_kernel = {k: counts.get(k, {}) for k in kernels}
        extra = _DEVICE_README.format(
            features=", ".join(self.features()), sysroot=tc.SYSROOT, cpu=default_qemu_cpu(self.features())
        )
        write_readme(out_dir, self.name, LIBRARY, target, model, extra)
        return {
            "library": LIBRARY,
            "runner": RUNNER,
            "runtime": [f"lib/{p.name}" for p in sorted((out_dir / "lib").iterdir())],
            "tvm_target": target,
            "features": self.features(),
            "dot_instructions": per_kernel,
            "matmul_kernel_sdot": {
                k: v.get("sdot", 0) for k, v in per_kernel.items() if any(w in k for w in ("dense", "matmul", "conv"))
            },
            "sdot_total": sum(c.get("sdot", 0) for c in per_kernel.values()),
            "smmla_total": sum(c.get("smmla", 0) for c in per_kernel.values()),
        }

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return QemuRunner(out_dir, manifest)
