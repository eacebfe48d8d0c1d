"""The TVM APIs qcompiler uses that are private or unstable, in one place.

TVM 0.27's Python API moves between releases (Relay → Relax, ``tir`` → ``tirx``, dlight
→ ``s_tir.dlight``); everything below either reaches into a private name or depends on
an internal convention. When TVM is upgraded, this module is the one to re-check.

* the Relax ONNX frontend's per-op converters (``_get_convert_map``, ``_parse_attr``,
  ``onnx_input``): qcompiler lowers standard float ops through them one node at a time;
* dlight's ``normalize_prim_func`` (block analysis for the CPU schedule);
* LLVM codegen queries (host CPU, triple, target features);
* tensor intrinsics, defined from TVMScript text (``tvm.script.from_source``: parsing
  text needs no ``inspect.stack()`` walk, which made ``@T.prim_func`` definitions slow);
* dlight's GPU rules, applied to a view of the CUDA target without tensor cores (see
  :func:`gpu_default_schedule`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def frontend_converter(op_type: str, opset: int):
    """The Relax ONNX frontend's converter of ``op_type`` at ``opset`` (None if it has none)."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    converter = fe._get_convert_map().get(op_type)
    return None if converter is None else converter.get_converter(opset)


def convert_node(bb, node_proto, inputs: list, env: Mapping[str, Any], opset: int):
    """Convert one ONNX node with the frontend (``inputs``: Relax exprs or None)."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    convert = frontend_converter(node_proto.op_type, opset)
    attrs = fe.ONNXGraphImporter._parse_attr(None, node_proto.attribute)
    attrs["tvm_custom"] = {"name": node_proto.name, "num_outputs": len(node_proto.output)}
    args = fe.onnx_input()
    for value in inputs:
        args.append(value)
    return convert(bb, args, attrs, [dict(env), {}])


def normalize_prim_func(sch):
    """dlight's block analysis of a schedule's function (None if it cannot be normalised)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func as normalize

    return normalize(sch)


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver5``)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_triple() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def make_target(spec: Mapping[str, Any]):
    import tvm

    return tvm.target.Target(dict(spec))


def llvm_has_feature(target: Mapping[str, Any], feature: str) -> bool:
    """Whether an LLVM target dict's CPU (``mcpu`` and ``mattr``) has ``feature`` (e.g. ``avx512vnni``)."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, make_target(target)))
    except Exception:  # noqa: BLE001 - an LLVM without that architecture
        return False


def prim_func_from_text(source: str):
    """A PrimFunc from TVMScript text (``T`` is ``tvm.script.tirx``)."""
    from tvm.script import from_source

    return from_source(source)


def register_tensor_intrinsic(name: str, description: str, implementation: str) -> None:
    """Register a tensor intrinsic from the TVMScript text of its description and implementation."""
    import tvm

    tvm.s_tir.TensorIntrin.register(name, prim_func_from_text(description), prim_func_from_text(implementation), override=True)


#: The CUDA architecture dlight's rules are shown (no tensor cores: see :func:`gpu_default_schedule`).
SCHEDULE_ARCH_WITHOUT_TENSOR_CORES = "sm_61"


def gpu_default_schedule(mod, target):
    """dlight's default GPU schedules, SIMT only.

    TVM's int8 tensor-core rule does not build (an inject-software-pipeline check fails),
    so qcompiler never tensorizes on CUDA: nvcc turns the SIMT int8 products into ``dp4a``.
    dlight's Matmul rule, on sm_70 and newer, imports TVM's whole tensor-intrinsic library
    (hundreds of TVMScript functions: 20 s to minutes, depending on the process) before it
    reads the ``dlight.do_not_tensorize`` flag. The rules therefore see the target as
    sm_61: the same CUDA kind, thread and warp limits, no tensor cores. The kernels are
    then compiled for the real architecture.
    """
    import tvm
    from tvm.s_tir import dlight as dl

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            mod[gvar] = func.with_attr("dlight.do_not_tensorize", True)
    spec = dict(target.export()) if hasattr(target, "export") else dict(target)
    spec["arch"] = SCHEDULE_ARCH_WITHOUT_TENSOR_CORES
    spec.pop("keys", None)
    with make_target(spec):
        return dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
        )(mod)
