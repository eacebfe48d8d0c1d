"""The shared base of the TVM targets (host, arm-neon, cuda, npu-sim).

:class:`TVMTarget.build` is the one build flow: lower the IR to Relax, compile it (with
tuning where asked), export the library, write the README; the schedule fallbacks the
compile recorded go into the manifest (``schedule_fallbacks``) and the report. Targets
say what differs: the TVM target dict (:meth:`~TVMTarget.tvm_target`), the int8
dot-product kernels (:meth:`~TVMTarget.int8_dot`), how the library is exported, and
what else the artifact holds (:meth:`~TVMTarget.describe`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from qcompiler.target import Runner, Target, io_specs

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
class TVMTarget(Target):
    """Base of the targets that compile with TVM (see the module docstring)."""

    library: ClassVar[str] = LIBRARY
    #: dlight GPU schedules instead of qcompiler's CPU schedules.
    gpu: ClassVar[bool] = False

    def tvm_target(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def int8_dot(self, target: dict) -> str | None:
        """The scheduled int8 dot-product kernels to use (``vnni``, ``sdot``, ``neon``) or None."""
        return None

    def prepare(self) -> None:
        """Check what the build needs before any work (a cross compiler, ...)."""

    def export(self, executable, out_dir: Path) -> None:
        from . import tvm_bridge

        tvm_bridge.export(executable, out_dir / self.library)

    def describe(self, model: ir.Model, out_dir: Path, executable, target: dict, lowering: dict) -> tuple[dict[str, Any], str]:
        """Target-specific manifest entries and README text, after the library is written."""
        return {}, ""

    def build(self, model: ir.Model, out_dir: Path, ctx) -> dict:
        from . import tvm_bridge

        self.prepare()
        target = self.tvm_target()
        dot = self.int8_dot(target)
        mod, lowering = tvm_bridge.lower_with_report(model, int8_dot=dot)
        tuner = tuner_for(ctx, target) if self.tunable else None
        fallbacks = tvm_bridge.Fallbacks()
        executable = tvm_bridge.compile(mod, target, gpu_schedules=self.gpu, tune=tuner, fallbacks=fallbacks)
        self.export(executable, out_dir)
        extra, readme = self.describe(model, out_dir, executable, target, lowering)
        write_readme(out_dir, self.name, self.library, target, model, readme)
        info: dict[str, Any] = {
            "library": self.library, "tvm_target": target, "int8_dot_kernel": dot,
            "int8_matmul_kernels": lowering["int8_matmul_kernels"],
            "int8_matmul_fallback": lowering["int8_matmul_fallback"],
            "schedule_fallbacks": fallbacks.entries,
        }
        info.update(extra)
        if tuner is not None:
            info["tuning"] = tuner.report
        if ctx is not None and fallbacks:
            ctx.report["schedule_fallbacks"] = fallbacks.entries
            ctx.log(f"{self.name}: {len(fallbacks.entries)} kernel(s) got a simpler schedule than planned "
                    "(manifest: target_info.schedule_fallbacks)")
        return info

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return TVMRunner(out_dir / manifest["target_info"]["library"], manifest)
