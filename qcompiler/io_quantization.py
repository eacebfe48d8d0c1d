"""Integer graph inputs/outputs (set by the ``integer-io`` pass): their quantization.

Recorded in the model's metadata (``qcompiler.integer_io``: name → scale, zero point,
dtype) so that the manifest, the build verification and runners can quantize float
data for those inputs (``q = clamp(round_half_even(x / s) + z)``) and read the outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

INTEGER_IO_KEY = "qcompiler.integer_io"


def integer_io(model: ir.Model) -> dict[str, dict]:
    """``{name: {"scale", "zero_point", "dtype"}}`` of the model's integer inputs/outputs."""
    text = model.metadata_props.get(INTEGER_IO_KEY)
    return json.loads(text) if text else {}


def quantize_array(x: np.ndarray, params: Mapping) -> np.ndarray:
    dtype = np.dtype(params["dtype"])
    q = np.rint(np.asarray(x, np.float32) / np.float32(params["scale"])) + params["zero_point"]
    return np.clip(q, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


def quantize_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with float arrays for integer inputs quantized with their parameters."""
    out = dict(feeds)
    for name, params in integer_io(model).items():
        if name in out and np.asarray(out[name]).dtype.kind == "f":
            out[name] = quantize_array(out[name], params)
    return out
