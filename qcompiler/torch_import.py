"""Import a PyTorch module: ``torch.export`` (through the dynamo ONNX exporter) → IR.

The exporter builds the model in onnx-ir directly; it then goes through the same
checks as an ONNX file, so every model reaches the passes the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import onnx_ir as ir

from .errors import UnsupportedOpError
from .onnx_import import import_proto


def from_torch(
    module,
    example_inputs: Sequence | object,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
) -> ir.Model:
    """Export ``module`` with ``torch.export`` at the shapes of ``example_inputs`` and import it.

    The module is put in eval mode; shapes are static (those of the examples).
    """
    import torch

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                dynamo=True,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # torch.export reports unsupported Python/ops this way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedOpError(f"torch.export could not capture the module: {first}") from None
    return import_proto(program.model_proto, source=type(module).__name__)
