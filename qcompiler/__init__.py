"""qcompiler: a quantization compiler for neural networks on edge hardware.

>>> import qcompiler
>>> model = qcompiler.load_onnx("model.onnx", input_shapes={"x": (1, 3, 32, 32)})
>>> qcompiler.compile(model, "reference", "out", preset="float")
>>> qcompiler.load("out").run({"x": x})

The public API is :data:`__all__` (documented in ``docs/api.md``); plugin authors also use
:mod:`qcompiler.integer` (integer ops) and :mod:`qcompiler.targets.tvm_target` (TVM targets).
Everything else may change between releases.
"""

from __future__ import annotations

import os

from .artifact import load
from .calibdata import CalibrationData
from .compiler import CompileResult, compile_model
from .decoder import compile_decoder
from .errors import QCompilerError, UserError
from .integer import IntegerOp
from .interpreter import ReferenceInterpreter
from .onnx_import import load_onnx
from .passmanager import Analysis, Instrument, PassContext, run_pipeline
from .pipeline import Pass, Pipeline, option
from .target import Capabilities, Runner, Target
from .torch_import import from_torch
from .verification import VerificationError

__version__ = "0.1.0"

__all__ = [
    "Analysis", "CalibrationData", "Capabilities", "CompileResult", "Instrument", "IntegerOp", "Pass", "PassContext",
    "Pipeline", "QCompilerError", "ReferenceInterpreter", "Runner", "Target", "UserError", "VerificationError", "compile",
    "compile_decoder", "compile_model", "from_torch", "load", "load_onnx", "option", "run_pipeline",
]


def compile(
    model,
    target: str,
    out_dir: str | os.PathLike,
    *,
    preset: str | None = None,
    pipeline: str | None = None,
    calib=None,
    input_shapes=None,
    input_values=None,
    **kwargs,
) -> CompileResult:
    """Compile an ONNX path or IR model for ``target`` (a target spec such as ``"host"``).

    ``calib`` is a path (``.npz`` or folder), a :class:`CalibrationData`, or a dict of
    arrays with a leading sample axis. ``input_values`` pins inputs to constants at import
    (``{"sr": 16000}``; control flow they decide is specialised). Without ``preset``/``pipeline`` the default is
    ``w8a8`` when calibration data is given, else data-free weight-only int8.
    """
    from .graph import get_stage
    from .pipeline import parse_one
    from .presets import choose
    from .target import default_targets

    import onnx_ir as ir

    if not isinstance(model, ir.Model):  # a path or an onnx.ModelProto
        model = load_onnx(model, input_shapes=input_shapes, input_values=input_values)
    if calib is not None and not isinstance(calib, CalibrationData):
        calib = CalibrationData.from_arrays(calib) if isinstance(calib, dict) else CalibrationData.from_path(calib)
    chosen, _ = choose(preset, pipeline, get_stage(model), calib is not None)
    return compile_model(model, parse_one(target, default_targets()), out_dir, pipeline=chosen, calibration=calib, **kwargs)
