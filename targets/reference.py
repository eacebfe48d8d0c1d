"""The ``reference`` target: the reference interpreter itself, on the final IR.

Useful to check a pipeline end to end without a compiler, and the baseline every
other target is compared with. The artifact is the IR as ``model.onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from qcompiler.interpreter import ReferenceInterpreter
from qcompiler.target import Runner, Target, io_specs


class ReferenceRunner(Runner):
    def __init__(self, model_path: Path, manifest: dict):
        super().__init__(io_specs(manifest["inputs"]), [o["name"] for o in manifest["outputs"]])
        self.interpreter = ReferenceInterpreter(onnx.load(model_path))

    def _run(self, feeds):
        return self.interpreter.run(feeds)


@dataclass(frozen=True)
class ReferenceTarget(Target):
    """Run the IR with qcompiler's numpy reference interpreter (any stage)."""

    name = "reference"

    def build(self, model: ir.Model, out_dir: Path, ctx) -> dict:
        proto = ir.to_proto(model)
        (out_dir / "model.onnx").write_bytes(proto.SerializeToString(deterministic=True))
        return {"model": "model.onnx"}

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:
        return ReferenceRunner(out_dir / manifest["target_info"]["model"], manifest)
