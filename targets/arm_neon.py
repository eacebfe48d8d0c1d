"""The ``arm-neon`` target: aarch64 Linux with NEON (optionally dotprod / i8mm).

The artifact: ``model.so`` (cross-compiled TVM Relax VM library), ``vm_runner`` (a
small native C++ program, ``targets/native/vm_runner.cc``) and ``lib/`` (the aarch64
TVM runtime it links). Copy the folder to an aarch64 Linux device and run
``./vm_runner model.so IO_DIR``; here the runner runs under ``qemu-aarch64`` with a
CPU model that has the selected extensions. Every int8 × int8 matmul (and group-1 int8
conv, lowered to im2col + dense) is a scheduled kernel ``qc_int8_*`` tensorized with the 4×4 ``sdot`` intrinsic (``dotprod``) or its
NEON ``smull``/``saddlp`` equivalent; the manifest lists each kernel with the nodes it
computes and its ``sdot`` count from the disassembly (and every kernel's dot-product
instruction counts).
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
from qcompiler.target import Capabilities, Runner, io_specs

from . import aarch64_toolchain as tc
from .tvm_target import LIBRARY, TVMTarget

RUNNER = "vm_runner"
DOT_MNEMONICS = ("sdot", "udot", "usdot", "smmla", "ummla", "usmmla")
#: DLPack type codes of the runner's I/O format.
_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}

_DEVICE_README = """
## On an aarch64 Linux device

    IO=$(mktemp -d)   # inputs.txt: one line per input "code bits ndim dims..." (0 int, 1 uint, 2 float, 6 bool)
                      # in0.bin, in1.bin, ...: raw little-endian data, inputs in the order above
    ./vm_runner model.so $IO   # writes outputs.txt (same format) and out0.bin, out1.bin, ...
    ./vm_runner model.so $IO N # N runs in one process: $IO/0 ... $IO/N-1, each laid out as above

It prints "run I MICROSECONDS" per run (the call of `main` alone).

Needs CPU features: {features}. Under emulation on x86-64:

    qemu-aarch64 -L {sysroot} -cpu {cpu} ./vm_runner model.so $IO
"""


def _kernel_name(symbol: str) -> str:
    """A PrimFunc's name from its symbol (TVM emits the body as ``<name>_compute_``)."""
    return symbol[: -len("_compute_")] if symbol.endswith("_compute_") else symbol


def _kernel_counts(name: str, counts: dict) -> dict[str, int]:
    """Dot-product instruction counts of a kernel, its wrapper and its body together."""
    total: dict[str, int] = {}
    for symbol in (name, f"{name}_compute_"):
        for mnemonic, n in counts.get(symbol, {}).items():
            total[mnemonic] = total.get(mnemonic, 0) + n
    return total


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
        self.last_run_us: list[int] = []

    def command(self, io_dir: Path, count: int | None = None) -> list[str]:
        cmd = [tc.QEMU, "-L", tc.SYSROOT, "-cpu", self.cpu, str(self.runner), str(self.library), str(io_dir)]
        return cmd + ([str(count)] if count is not None else [])

    def _run(self, feeds):
        return self.run_many([feeds])[0]

    def run_many(self, batch) -> list[dict[str, np.ndarray]]:
        """Run several input sets in one emulator process (the library is loaded once).

        ``self.last_run_us`` then holds the wall time of each call of ``main`` (µs, emulated).
        """
        missing = tc.missing_tools(run=True)
        if missing:
            raise TargetError(f"cannot run the arm-neon artifact here: needs {', '.join(missing)}; {tc.SETUP_HINT}")
        batch = [self.check_feeds(feeds) for feeds in batch]
        with tempfile.TemporaryDirectory(prefix="qc-arm-") as tmp:
            for index, feeds in enumerate(batch):
                io_dir = Path(tmp, str(index))
                io_dir.mkdir()
                lines = []
                for i, spec in enumerate(self.inputs):
                    array = np.ascontiguousarray(feeds[spec.name])
                    lines.append(" ".join(map(str, [_CODES[array.dtype.kind], array.dtype.itemsize * 8, array.ndim, *array.shape])))
                    array.tofile(io_dir / f"in{i}.bin")
                (io_dir / "inputs.txt").write_text("\n".join(lines) + "\n")
            done = subprocess.run(self.command(Path(tmp), len(batch)), capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise TargetError(_describe_failure(done, self.cpu))
            self.last_run_us = [int(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("run ")]
            return [self._read_outputs(Path(tmp, str(index))) for index in range(len(batch))]

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
class ArmNeonTarget(TVMTarget):
    """aarch64 Linux with NEON (+dotprod, +i8mm options); native runner, checked under qemu."""

    name = "arm-neon"
    capabilities = Capabilities()

    dotprod: bool = option(False, "use the Armv8.2 dot-product instructions (sdot/udot)")
    i8mm: bool = option(False, "use the Armv8.6 int8 matrix-multiply extension (smmla)")

    def features(self) -> list[str]:
        return ["neon"] + (["dotprod"] if self.dotprod else []) + (["i8mm"] if self.i8mm else [])

    def tvm_target(self) -> dict:
        from .tvm_bridge import LLVM_OPT_LEVEL

        return {
            "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": [f"+{f}" for f in self.features()],
            "opt-level": LLVM_OPT_LEVEL,
        }

    def int8_dot(self, target: dict) -> str:
        return "sdot" if self.dotprod else "neon"

    def prepare(self) -> None:
        tc.require_tools(run=False)

    def export(self, executable, out_dir: Path) -> None:
        from . import tvm_bridge

        tvm_bridge.export(executable, out_dir / LIBRARY, cc=tc.CXX)
        shutil.copyfile(tc.native_runner(), out_dir / RUNNER)
        os.chmod(out_dir / RUNNER, 0o755)
        (out_dir / "lib").mkdir()
        for lib in sorted(tc.runtime_libraries().glob("*.so")):
            shutil.copyfile(lib, out_dir / "lib" / lib.name)

    def describe(self, model: ir.Model, out_dir: Path, executable, target: dict, lowering: dict):
        kernels = tc.kernel_functions(out_dir / LIBRARY)
        counts = tc.count_instructions(out_dir / LIBRARY, DOT_MNEMONICS)
        per_kernel = {k: counts.get(k, {}) for k in kernels}
        int8 = {
            name: {"nodes": nodes, **_kernel_counts(name, counts)}
            for name, nodes in lowering["int8_matmul_kernels"].items()
        }
        other = {
            k: v for k, v in per_kernel.items()
            if any(w in k for w in ("dense", "matmul", "conv")) and _kernel_name(k) not in int8
        }
        readme = _DEVICE_README.format(
            features=", ".join(self.features()), sysroot=tc.SYSROOT, cpu=default_qemu_cpu(self.features())
        )
        return {
            "runner": RUNNER,
            "runtime": [f"lib/{p.name}" for p in sorted((out_dir / "lib").iterdir())],
            "features": self.features(),
            "int8_matmul_kernels": int8,
            "matmul_kernel_sdot": {name: entry.get("sdot", 0) for name, entry in int8.items()},
            "other_matmul_kernels": other,
            "dot_instructions": per_kernel,
            "sdot_total": sum(c.get("sdot", 0) for c in per_kernel.values()),
            "smmla_total": sum(c.get("smmla", 0) for c in per_kernel.values()),
        }, readme

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return QemuRunner(out_dir, manifest)
