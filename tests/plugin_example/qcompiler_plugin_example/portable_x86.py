"""``x86-64-v2``: a target plugin — portable x86-64 code for machines without AVX-512.

A TVM target only says what differs from the shared build flow
(:class:`qcompiler.targets.tvm_target.TVMTarget`): here the LLVM target dict (a baseline
CPU model, so the library runs on any x86-64-v2 machine). Lowering, compilation,
export, the README, schedule-fallback records, the runner and the verification against
the reference interpreter come with the base class.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler.pipeline import option
from qcompiler.target import Capabilities
from qcompiler.targets.tvm_target import TVMTarget


@dataclass(frozen=True)
class PortableX86Target(TVMTarget):
    """Portable x86-64 (x86-64-v2 baseline, no AVX-512); runs in process."""

    name = "x86-64-v2"
    capabilities = Capabilities()

    threads: int = option(0, "worker threads the library may use (0: all cores)")

    def tvm_target(self) -> dict:
        from qcompiler.targets import tvm_bridge

        target = {"kind": "llvm", "mtriple": tvm_bridge.host_triple(), "mcpu": "x86-64-v2",
                  "opt-level": tvm_bridge.LLVM_OPT_LEVEL}
        if self.threads:
            target["num-cores"] = self.threads
        return target
