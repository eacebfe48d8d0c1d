"""The TVM backend: lower a qcompiler IR model to Relax, compile it, load what was built.

The only package that imports ``tvm`` (lazily: ``import qcompiler`` stays fast).

* :mod:`.lowering` — IR → Relax (:func:`lower`), the :func:`lowers` registry;
* :mod:`.integer_render` — integer ops rendered from their decompositions;
* :mod:`.standard_ops` — QuantizeLinear, DequantizeLinear, Cast, Gather;
* :mod:`.kernels` — hand-written kernels (int8 matmuls and convs, fused softmax);
* :mod:`.schedules` — Relax fusion and the default CPU schedule (fallbacks recorded);
* :mod:`.build` — :func:`compile`, :func:`export`, :class:`VMModule`;
* :mod:`.tuning` — MetaSchedule tuning with a database;
* :mod:`.adapter` — the private or unstable TVM APIs, in one place.
"""

from __future__ import annotations

from .adapter import host_cpu, host_triple, llvm_has_feature, make_target
from .build import LLVM_OPT_LEVEL, VMModule, assembly, compile, cuda_available, device_source, export, module_kinds
from .common import ELEMENT_WISE, SCHEDULED, host_array, relax_dtype
from .lowering import INT8_DOT, Lowerer, lower, lower_with_report
from .registry import LOWERINGS, lowers
from .schedules import Fallbacks, cpu_kernel_schedule, fuse, schedule_cpu
from . import standard_ops  # noqa: E402,F401 - registers the lowerings of the standard integer ops
from .kernels import conv, matmul, softmax  # noqa: E402,F401 - register the hand-written kernels

__all__ = [
    "ELEMENT_WISE", "INT8_DOT", "LLVM_OPT_LEVEL", "LOWERINGS", "SCHEDULED", "Fallbacks", "Lowerer", "VMModule", "assembly",
    "compile", "cpu_kernel_schedule", "cuda_available", "device_source", "export", "fuse", "host_array", "host_cpu",
    "host_triple", "llvm_has_feature", "lower", "lower_with_report", "lowers", "make_target", "module_kinds", "relax_dtype",
    "schedule_cpu",
]
