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

from dataclasses import dataclass

from qcompiler.pipeline import option
from qcompiler.target import Capabilities

from .tvm_target import LIBRARY, TVMRunner, TVMTarget, tuner_for, write_readme

__all__ = ["LIBRARY", "HostTarget", "TVMRunner", "tuner_for", "write_readme"]


@dataclass(frozen=True)
class HostTarget(TVMTarget):
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

    def int8_dot(self, target: dict) -> str | None:
        """``"vnni"`` (scheduled ``vpdpbusd`` int8 matmul kernels) when the LLVM target's CPU
        has AVX-512 VNNI, else None (TVM's generic dense kernels)."""
        from . import tvm_bridge

        return "vnni" if tvm_bridge.llvm_has_feature(target, "avx512vnni") else None
