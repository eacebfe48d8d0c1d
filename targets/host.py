"""The ``host`` target: this machine's CPU through TVM's LLVM backend, run in process.

The artifact is ``model.so`` (a Relax VM executable exported as a shared library:
kernels, constants and VM bytecode) plus ``README.md``. ``main`` takes the inputs
in manifest order and returns a tuple of the outputs in manifest order.

When the LLVM target's CPU has AVX-512 VNNI, every int8 matmul is a scheduled kernel
``qc_int8_*_vnni`` tensorized with ``vpdpbusd`` (u8 × s8, weights pre-packed at compile
time); the manifest's ``int8_dot_kernel`` says which (None: TVM's generic dense kernels).
Relax fuses the element-wise ops that follow such a kernel into it (its symbol is then
``fused_qc_int8_…``), and they run as its epilogue, tile by tile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from qcompiler.pipeline import option
from qcompiler.target import Capabilities, Runner, Target, io_specs

LIBRARY = "model.so"

_README = """\
# {target} artifact

`{library}` is a TVM {tvm} Relax VM executable for `{tvm_target}`.
Its function `main` takes the inputs below in order and returns a tuple of the outputs.

Inputs: {inputs}
Outputs: {outputs}

Run it with qcompiler:

    import qcompiler
    outputs = qcompiler.load("THIS_FOLDER").run({{"input_name": array}})

or with the TVM runtime alone (`pip install apache-tvm=={tvm}`):

    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module("{library}"), tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
"""


class TVMRunner(Runner):
    """Runs an exported Relax VM library in this process."""

    def __init__(self, library: Path, manifest: dict):
        super().__init__(io_specs(manifest["inputs"]), [o["name"] for o in manifest["outputs"]])
        from . import tvm_bridge

        self._module = tvm_bridge.VMModule(library)

    def _run(self, feeds):
        results = self._module([feeds[spec.name] for spec in self.inputs])
        return dict(zip(self.output_names, results))


def io_names(model: ir.Model) -> tuple[list[str], list[str]]:
    inputs = [v.name for v in model.graph.inputs if v.const_value is None]
    return inputs, [v.name for v in model.graph.outputs]


def write_readme(out_dir: Path, target: str, library: str, tvm_target: dict, model: ir.Model, extra: str = "") -> None:
    from importlib import metadata

    inputs, outputs = io_names(model)
    text = _README.format(
        target=target, library=library, tvm=metadata.version("apache-tvm"), tvm_target=tvm_target,
        inputs=", ".join(inputs), outputs=", ".join(outputs),
    )
    (out_dir / "README.md").write_text(text + extra)


def tuner_for(ctx, target: dict):
    """A :class:`~targets.tvm_bridge.tuning.Tuner` when the compile asked for tuning (``ctx.options["tuning"]``), else None.

    Measuring needs the target's core count: ``num-cores`` is set to this machine's when absent."""
    options = getattr(ctx, "options", {}).get("tuning") if ctx is not None else None
    if options is None:
        return None
    from .tvm_bridge.tuning import Tuner

    target.setdefault("num-cores", os.cpu_count() or 1)
    return Tuner(options, log=getattr(ctx, "log", lambda message: None))


@dataclass(frozen=True)
class HostTarget(Target):
    """This machine's CPU (LLVM with the detected -mcpu); runs in process."""

    name = "host"
    capabilities = Capabilities()
    tunable = True

    mcpu: str = option("", "LLVM CPU name, e.g. skylake-avx512 (empty: detect this machine's)")

    def tvm_target(self) -> dict:
        from . import tvm_bridge

        return {
            "kind": "llvm", "mtriple": tvm_bridge.host_triple(), "mcpu": self.mcpu or tvm_bridge.host_cpu(),
            "opt-level": tvm_bridge.LLVM_OPT_LEVEL,
        }

    def build(self, model: ir.Model, out_dir: Path, ctx) -> dict:
        from . import tvm_bridge

        target = self.tvm_target()
        dot = self.int8_dot(target)
        mod, lowering = tvm_bridge.lower_with_report(model, int8_dot=dot)
        tuner = tuner_for(ctx, target)
        executable = tvm_bridge.compile(mod, target, tune=tuner)
        tvm_bridge.export(executable, out_dir / LIBRARY)
        write_readme(out_dir, self.name, LIBRARY, target, model)
        info = {
            "library": LIBRARY, "tvm_target": target, "int8_dot_kernel": dot,
            "int8_matmul_kernels": lowering["int8_matmul_kernels"],
            "int8_matmul_fallback": lowering["int8_matmul_fallback"],
        }
        if tuner is not None:
            info["tuning"] = tuner.report
        return info

    @staticmethod
    def int8_dot(target: dict) -> str | None:
        """``"vnni"`` (scheduled ``vpdpbusd`` int8 matmul kernels) when the LLVM target's CPU
        has AVX-512 VNNI, else None (TVM's generic dense kernels)."""
        from . import tvm_bridge

        return "vnni" if tvm_bridge.llvm_has_feature(target, "avx512vnni") else None

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return TVMRunner(out_dir / manifest["target_info"]["library"], manifest)
