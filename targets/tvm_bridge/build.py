"""Compile a lowered module, export it, and run what was built.

* :func:`compile` runs Relax's fusion, qcompiler's kernel schedules (VNNI epilogues, the
  default CPU schedule), optional MetaSchedule tuning, dlight GPU schedules, then
  ``tvm.compile``; schedule fallbacks are recorded, never silent;
* :func:`export` writes the shared library (optionally with a cross compiler);
* :class:`VMModule` loads a library into the Relax VM and runs it on numpy arrays.
"""

from __future__ import annotations

import threading

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.errors import TargetError

from . import adapter
from .common import host_array
from .common import tvm as common_tvm
from .kernels.vnni import schedule_dot_kernels
from .schedules import Fallbacks, _reason, fuse, schedule_cpu


#: LLVM optimisation level for CPU kernels unless the target dict sets ``opt-level``: on MiniLM
#: -O3 took 2-3× longer to compile (mostly the int64 elementwise kernels) for no measured speed-up.
LLVM_OPT_LEVEL = 2


def compile(mod, target: Mapping[str, Any], *, gpu_schedules: bool = False, disable_assert: bool = False, tune=None,
            fallbacks: Fallbacks | None = None):
    """``tvm.compile`` a lowered module for ``target`` (a JSON-style target dict).

    ``tune`` (CPU only): a callable ``(fused_module, tvm_target) -> fused_module``, e.g. a
    :class:`targets.tvm_bridge.tuning.Tuner`, run after fusion and before the default CPU schedule
    (which leaves the kernels it marks ``SCHEDULED`` alone). ``fallbacks`` collects every
    kernel that got a simpler schedule than planned (a list the caller puts in the manifest)."""
    tvm, _ = common_tvm()
    fallbacks = fallbacks if fallbacks is not None else Fallbacks()
    target = dict(target)
    if target.get("kind") == "llvm":
        target.setdefault("opt-level", LLVM_OPT_LEVEL)
    tgt = adapter.make_target(target)
    config = {"tirx.disable_assert": True} if disable_assert else {}
    with tvm.transform.PassContext(opt_level=3, config=config):
        mod = fuse(mod)
        if target.get("kind") == "llvm":
            with tgt:
                mod = schedule_dot_kernels(mod, fallbacks)  # the int8 products, with their fused epilogues
        if tune is not None and target.get("kind") == "llvm" and not gpu_schedules:
            mod = tune(mod, tgt)
        if gpu_schedules:
            return tvm.compile(adapter.gpu_default_schedule(mod, tgt), target=tgt)
        if target.get("kind") != "llvm":
            return tvm.compile(mod, target=tgt)
        # CPU: scheduled kernels; LLVM code generation rejects a few vectorised forms
        # (e.g. some boolean vector selects), so fall back to scalar inner loops, then
        # to TVM's default loops, rather than fail the build.
        attempts = []
        for vectorize in (True, False):
            with tgt:
                scheduled = schedule_cpu(mod, vectorize=vectorize, fallbacks=fallbacks)
            try:
                executable = tvm.compile(scheduled, target=tgt)
            except Exception as exc:  # noqa: BLE001 - retried with a simpler schedule below
                attempts.append(_reason(exc))
                continue
            if attempts:
                fallbacks.add("*", "vectorised CPU schedule", "scalar inner loops", attempts[0])
            return executable
        fallbacks.add("*", "CPU schedule", "TVM's default loops", attempts[-1])
        return tvm.compile(mod, target=tgt)


def export(executable, path: Path, *, cc: str | None = None, options: Sequence[str] = ()) -> None:
    """Write the compiled module as a shared library (optionally with a cross compiler)."""
    kwargs: dict[str, Any] = {}
    if cc is not None:
        kwargs["cc"] = cc
    if options:
        kwargs["options"] = list(options)
    executable.export_library(str(path), **kwargs)


def module_kinds(executable) -> list[str]:
    """Kinds of every runtime module inside a compiled executable (``llvm``, ``cuda``, ...)."""
    seen: list[str] = []
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        seen.append(str(mod.kind))
        stack.extend(mod.imports)
    return seen


def device_source(executable, kind: str) -> str:
    """Source of the first imported module of ``kind`` (``cuda`` gives the .cu text, ``c`` C)."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if str(mod.kind) == kind:
            return str(mod.inspect_source())
        stack.extend(mod.imports)
    raise TargetError(f"the build holds no '{kind}' module: a schedule is missing, code fell back to the host")


def assembly(executable, fmt: str = "s") -> str:
    """Assembly of the LLVM module inside an executable."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if str(mod.kind) == "llvm":
            return str(mod.inspect_source(fmt))
        stack.extend(mod.imports)
    return ""


def cuda_available() -> bool:
    tvm, _ = common_tvm()
    return bool(tvm.cuda(0).exist)


def _copied(tensor) -> np.ndarray:
    """A numpy copy of a CPU tensor (through DLPack; ``numpy()`` for what DLPack does not carry)."""
    try:
        return np.from_dlpack(tensor).copy()
    except (TypeError, BufferError, RuntimeError, ValueError):
        return tensor.numpy()


class VMModule:
    """A compiled library loaded into the Relax VM (``device``: ``cpu`` or ``cuda``); call with numpy arrays."""

    def __init__(self, library: Path | str | None = None, *, executable=None, device: str = "cpu"):
        tvm, relax = common_tvm()
        lib = executable if executable is not None else tvm.runtime.load_module(str(library))
        self._tvm = tvm
        self._device = tvm.cuda(0) if device == "cuda" else tvm.cpu()
        self._vm = relax.VirtualMachine(lib, self._device)
        self._main = self._vm["main"]
        self._local = threading.local()  # input tensors allocated once per thread, refilled per call

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Inputs are copied into tensors allocated once (per thread and input layout; on the
        CPU through numpy views of them, one ``memcpy`` each), outputs copied out of the VM's
        tensors: the per-call cost is the copies, not tensor allocation or conversion."""
        arrays = [host_array(a) for a in arrays]
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        local = self._local
        if getattr(local, "key", None) != key:
            empty = self._tvm.runtime.empty
            local.buffers = [empty(a.shape, str(a.dtype), self._device) for a in arrays]
            local.views = [np.from_dlpack(b) for b in local.buffers] if self._device.dlpack_device_type() == 1 else None
            local.key = key
        if local.views is not None:
            for view, array in zip(local.views, arrays):
                np.copyto(view, array)
        else:
            for buffer, array in zip(local.buffers, arrays):
                buffer.copyfrom(np.ascontiguousarray(array))
        result = self._main(*local.buffers)
        if local.views is not None:
            return [_copied(t) for t in result]
        return [t.numpy() for t in result]
