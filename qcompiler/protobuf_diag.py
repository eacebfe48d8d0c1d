"""Say where a damaged ONNX protobuf goes wrong (byte offset and field).

The protobuf runtime only reports "Error parsing message". Walking the wire format
of ``ModelProto`` and its ``GraphProto`` is enough to name the field that is cut
short or malformed, which is what a user needs to know about a truncated download.
"""

from __future__ import annotations

_MODEL_FIELDS = {
    1: "ir_version", 2: "producer_name", 3: "producer_version", 4: "domain",
    5: "model_version", 6: "doc_string", 7: "graph", 8: "opset_import",
    14: "metadata_props", 20: "training_info", 25: "functions", 26: "configuration",
}
_GRAPH_FIELDS = {
    1: "node", 2: "name", 5: "initializer", 10: "doc_string", 11: "input", 12: "output",
    13: "value_info", 14: "quantization_annotation", 15: "sparse_initializer",
    16: "metadata_props",
}


class _Damage(Exception):
    def __init__(self, offset: int, what: str):
        super().__init__(what)
        self.offset = offset
        self.what = what


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    start = pos
    while True:
        if pos >= end:
            raise _Damage(start, "a varint runs past the end of the data")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Damage(start, "a varint is longer than 10 bytes")


def _fields(data: bytes, pos: int, end: int, names: dict[int, str], prefix: str = ""):
    """Yield ``(name, payload_start, payload_end)`` of each length-delimited field."""
    while pos < end:
        tag_at = pos
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        name = prefix + names.get(number, f"field {number}")
        if number == 0:
            raise _Damage(tag_at, "field number 0 is invalid")
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _Damage(tag_at, f"'{name}' needs {size} bytes, {end - pos} remain")
            pos += size
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _Damage(
                    tag_at, f"'{name}' declares {length} bytes but only {end - pos} remain"
                )
            yield name, pos, pos + length
            pos += length
        else:
            raise _Damage(tag_at, f"'{name}' has invalid wire type {wire}")


def diagnose(data: bytes) -> str | None:
    """A one-line description of where ``data`` stops being a valid ModelProto, or None."""
    try:
        for name, start, end in _fields(data, 0, len(data), _MODEL_FIELDS):
            if name == "graph":
                for _ in _fields(data, start, end, _GRAPH_FIELDS, prefix="graph."):
                    pass
    except _Damage as damage:
        return f"at byte {damage.offset}: {damage.what}"
    return None
