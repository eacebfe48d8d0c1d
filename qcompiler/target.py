"""Targets: what a backend can execute, how it builds an artifact, how it runs one.

A target is a frozen dataclass (its fields are target options, written like pass
options: ``arm-neon{dotprod=true}``) with:

* ``capabilities`` — what graphs it executes (integer-only? which bit widths?);
* ``legalize`` — a pipeline spec run after the user's pipeline;
* ``check(model)`` — raise :class:`TargetError` naming the first node it cannot run;
* ``build(model, out_dir, ctx)`` — write the artifact's files, return manifest extras;
* ``load(out_dir, manifest)`` — a :class:`Runner`, where one exists on this machine.

Targets register through the ``qcompiler.targets`` entry-point group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from .calibdata import InputSpec
from .errors import InputError, TargetError
from .pipeline import Configurable, Registry
from .plugins import TARGET_GROUP, load_entry_points


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a target can execute."""

    #: Every op between the quantized inputs and the dequantized outputs must be integer.
    integer_only: bool = False
    weight_bits: frozenset[int] = frozenset({4, 8, 16})
    activation_bits: frozenset[int] = frozenset({8, 16})
    granularities: frozenset[str] = frozenset({"per-tensor", "per-channel", "per-group"})
    #: Runs float graphs (the float preset, weight-only quantization).
    runs_float: bool = True
    #: Runs on this machine (else ``load()`` gives a runner that explains why not).
    runnable_here: bool = True
    #: Weights must be symmetric (zero point 0).
    symmetric_weights: bool = False
    #: Activations may be rescaled per channel (a product by a constant vector as one
    #: requantize); else such products are integer multiplies by an int16 constant.
    per_channel_activation_scale: bool = True

    def fit_weights(self, fmt):
        """``(format, note)``: the weight format this target takes closest to ``fmt`` (the
        granularity it has, the nearest width it has, symmetric if it must be); ``note``
        says what changed (None if nothing did)."""
        changes = {}
        if fmt.granularity not in self.granularities:
            changes["granularity"] = "per-channel" if "per-channel" in self.granularities else "per-tensor"
        if fmt.bits not in self.weight_bits:
            wider = sorted(b for b in self.weight_bits if b > fmt.bits)
            changes["bits"] = wider[0] if wider else max(self.weight_bits)
        if self.symmetric_weights and not fmt.symmetric:
            changes["symmetric"] = True
        if not changes:
            return fmt, None
        fitted = dataclasses.replace(fmt, **changes)
        return fitted, f"{fitted} instead of {fmt}"

    def describe(self) -> str:
        parts = ["integer-only" if self.integer_only else "float and integer"]
        parts.append("weights " + "/".join(f"int{b}" for b in sorted(self.weight_bits)))
        parts.append("activations " + "/".join(f"int{b}" for b in sorted(self.activation_bits)))
        return ", ".join(parts)


class Runner:
    """Executes a built artifact: ``run({input: array}) -> {output: array}``."""

    def __init__(self, inputs: list[InputSpec], output_names: list[str]):
        self.inputs = inputs
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self.check_feeds(feeds))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(feeds) == len(self.inputs):  # the common case, checked without building sets
            checked = {}
            for spec in self.inputs:
                array = feeds.get(spec.name)
                if (type(array) is not np.ndarray or array.dtype != spec.dtype or array.shape != spec.shape
                        or not array.flags.c_contiguous or (spec.valid_range is not None and array.size)):
                    break
                checked[spec.name] = array
            else:
                return checked
        expected = {spec.name for spec in self.inputs}
        unknown = sorted(set(feeds) - expected)
        if unknown:
            raise InputError(f"unknown input '{unknown[0]}'; inputs are {sorted(expected)}")
        checked = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"missing input '{spec.name}'")
            array = np.asarray(feeds[spec.name])
            if array.dtype != spec.dtype:
                raise InputError(f"input '{spec.name}' has dtype {array.dtype}, expected {spec.dtype}")
            if tuple(array.shape) != spec.shape:
                raise InputError(
                    f"input '{spec.name}' has shape {list(array.shape)}, expected {list(spec.shape)}"
                )
            if spec.valid_range is not None and array.size:
                _check_range(spec, array)
            checked[spec.name] = np.ascontiguousarray(array)
        return checked


def _check_range(spec: InputSpec, array: np.ndarray) -> None:
    lo, hi = spec.valid_range
    bad = (array < lo) | (array > hi)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"input '{spec.name}' holds {array[where]} at {list(where)}, outside [{lo}, {hi}]: {spec.range_reason}"
        )


@dataclasses.dataclass(frozen=True)
class Target(Configurable):
    """Base class of every target."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Pipeline spec appended after the user's pipeline ("" for none).
    legalize: ClassVar[str] = ""
    #: Whether ``build`` honours ``ctx.options["tuning"]`` (``qcompile --tune``: MetaSchedule
    #: tuning of the CPU kernels, see :mod:`targets.tvm_bridge.tuning`).
    tunable: ClassVar[bool] = False

    def check(self, model: ir.Model) -> None:
        """Raise :class:`TargetError` if this target cannot execute ``model``."""
        if self.capabilities.integer_only:
            from .integer_check import first_float_compute

            offender = first_float_compute(model)
            if offender is not None:
                raise TargetError(f"target '{self.name}' runs integer-only graphs, but {offender}")

    def build(self, model: ir.Model, out_dir: Path, ctx) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def load(cls, out_dir: Path, manifest: dict) -> Runner:  # pragma: no cover
        raise NotImplementedError


class TargetRegistry(Registry):
    kind = "target"
    error = TargetError


def default_targets() -> TargetRegistry:
    """Every installed target (built-ins and plugins, through the ``qcompiler.targets`` entry points)."""
    return TargetRegistry(load_entry_points(TARGET_GROUP, Target))


def io_specs(entries: list[dict]) -> list[InputSpec]:
    """InputSpecs from a manifest's ``inputs``/``outputs`` list."""
    specs = []
    for e in entries:
        valid = e.get("valid_range")
        bounds = (int(valid["min"]), int(valid["max"])) if valid else None
        specs.append(InputSpec(e["name"], tuple(e["shape"]), np.dtype(e["dtype"]), bounds, valid["reason"] if valid else ""))
    return specs
