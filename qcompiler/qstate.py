"""Quantization state that passes hand to each other, carried by the model itself.

Passes never leave state in the context for later passes: what one provides and another
needs travels with the model, so any stage's output can be compiled again.

* **activation plan** (``qcompiler.activation_plan``, JSON in the model's metadata): per
  quantized activation, the tensor whose parameters it shares, its format and its
  calibrated range at 8 and 16 bits (``allocate-bits`` switches widths with it);
* **float reference** (the model before ``insert-fake-quant``; ``allocate-bits`` measures
  against it): in memory in ``model.meta``; saved next to a fake-quant model as
  ``<name>.float.onnx`` and named in its metadata (``qcompiler.float_reference``), read
  back by :func:`attach_companions` when that model is imported;
* **fake-quant snapshot** (the QDQ model a lowering started from, written as
  ``model.qdq.onnx``): in memory in ``model.meta``.

Passes declare the facts they need and provide (:data:`FACTS`); :func:`missing_facts`
checks a whole pipeline before it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

#: Facts passes provide and require, with how a user gets them.
FACTS = {
    "calibration": "calibration data (pass --calib DATA)",
    "float-reference": "the float reference model",
    "activation-plan": "the activation plan (calibrated ranges of every quantized activation)",
}

PLAN_KEY = "qcompiler.activation_plan"
FLOAT_REFERENCE_KEY = "qcompiler.float_reference"
_FLOAT_META = "qcompiler.float_reference_model"
_FAKEQUANT_META = "qcompiler.fakequant_model"

#: Models above this size are saved with their tensors in a ``.data`` file beside them
#: (protobuf cannot hold a message over 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30


# -- the activation plan -----------------------------------------------------------------------


def set_activation_plan(model: ir.Model, plan: dict[str, dict[str, Any]]) -> None:
    """``plan``: tensor → ``{"group": tensor, "format": "int8:per-tensor:asym", "ranges": {bits: [lo, hi]}}``."""
    model.metadata_props[PLAN_KEY] = json.dumps(plan, sort_keys=True, separators=(",", ":"))


def activation_plan(model: ir.Model) -> dict[str, dict[str, Any]] | None:
    text = model.metadata_props.get(PLAN_KEY)
    if not text:
        return None
    plan = json.loads(text)
    for entry in plan.values():
        entry["ranges"] = {int(bits): tuple(r) for bits, r in entry["ranges"].items()}
    return plan


# -- the float reference ----------------------------------------------------------------------


def set_float_reference(model: ir.Model, proto: onnx.ModelProto) -> None:
    model.meta[_FLOAT_META] = proto


def float_reference(model: ir.Model) -> onnx.ModelProto | None:
    return model.meta.get(_FLOAT_META)


# -- the fake-quant snapshot -------------------------------------------------------------------


def set_fakequant_snapshot(model: ir.Model, proto: onnx.ModelProto) -> None:
    model.meta[_FAKEQUANT_META] = proto


def fakequant_snapshot(model: ir.Model) -> onnx.ModelProto | None:
    return model.meta.get(_FAKEQUANT_META)


# -- facts --------------------------------------------------------------------------------------


def model_facts(model: ir.Model) -> set[str]:
    """The facts a model carries."""
    facts = set()
    if float_reference(model) is not None:
        facts.add("float-reference")
    if PLAN_KEY in model.metadata_props:
        facts.add("activation-plan")
    return facts


# -- files ----------------------------------------------------------------------------------------


def save_model(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``proto`` deterministically; a large model keeps its tensors in ``<name>.data``.
    Returns the files written."""
    path = Path(path)
    if proto.ByteSize() < EXTERNAL_DATA_BYTES:
        path.write_bytes(proto.SerializeToString(deterministic=True))
        return [path]
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    data = path.name + ".data"
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [path, path.with_name(data)]


def save_fakequant(proto: onnx.ModelProto, float_proto: onnx.ModelProto | None, path: Path) -> list[Path]:
    """Write a fake-quant model and, when known, its float reference beside it
    (``model.qdq.onnx`` → ``model.qdq.float.onnx``, named in the QDQ model's metadata)."""
    path = Path(path)
    written = []
    if float_proto is not None:
        reference = path.with_name(path.name.removesuffix(".onnx") + ".float.onnx")
        written += save_model(float_proto, reference)
        proto = _with_metadata(proto, {FLOAT_REFERENCE_KEY: reference.name})
    return save_model(proto, path) + written


def _with_metadata(proto: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    props = {p.key: p.value for p in copy.metadata_props}
    props.update(entries)
    del copy.metadata_props[:]
    for key in sorted(props):
        copy.metadata_props.add(key=key, value=props[key])
    return copy


def attach_companions(model: ir.Model, source: Path) -> None:
    """After importing ``source``: load the float reference its metadata names (a file
    beside it). A missing file leaves the fact absent; passes that need it say so."""
    name = model.metadata_props.get(FLOAT_REFERENCE_KEY)
    if not name:
        return
    path = Path(source).parent / Path(name).name
    if path.is_file():
        proto = onnx.load(str(path), load_external_data=True)
        set_float_reference(model, proto)
