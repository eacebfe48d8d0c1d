"""Say where a damaged ONNX protobuf goes wrong (byte offset and field path).

The protobuf runtime only reports "Error parsing message" (and silently drops fields
whose wire type does not match the schema). Walking the wire format against the
message descriptors of ``onnx.ModelProto`` names the innermost field that is cut
short or malformed, e.g. ``graph.initializer[0].raw_data``, which is what a user
needs to know about a truncated download or a corrupted file. The walk never
copies payloads and is bounded by the size of the data (and a nesting limit).
"""

from __future__ import annotations

import onnx
from google.protobuf.descriptor import FieldDescriptor

#: protobuf's own default recursion limit.
MAX_DEPTH = 100

_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 5: "32-bit"}
_VARINT_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
}
_FIXED64_TYPES = {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE}
_FIXED32_TYPES = {FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_FLOAT}


class _Damage(Exception):
    def __init__(self, offset: int, what: str):
        super().__init__(what)
        self.offset = offset
        self.what = what


def _varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value, shift = 0, 0
    start = pos
    while True:
        if pos >= end:
            where = "the data ends" if end == len(data) else "its message ends"
            raise _Damage(start, f"{what}: {where} inside a varint{_hint(data, end)}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Damage(start, f"{what}: a varint is longer than 10 bytes")


def _hint(data: bytes, end: int) -> str:
    return " (truncated file?)" if end == len(data) else ""


def _expected_wire(field: FieldDescriptor) -> int:
    if field.type in _VARINT_TYPES:
        return 0
    if field.type in _FIXED64_TYPES:
        return 1
    if field.type in _FIXED32_TYPES:
        return 5
    return 2  # strings, bytes, messages


def _walk(data: bytes, pos: int, end: int, desc, prefix: str, depth: int) -> None:
    """Check the fields of one message (``desc``) in ``data[pos:end]``; raise _Damage."""
    counts: dict[int, int] = {}
    while pos < end:
        tag_at = pos
        tag, pos = _varint(data, pos, end, f"a field tag in '{prefix[:-1]}'" if prefix else "a field tag")
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Damage(tag_at, f"field number 0 is invalid{' in ' + repr(prefix[:-1]) if prefix else ''}")
        field = desc.fields_by_number.get(number) if desc is not None else None
        if field is None:  # unknown fields are allowed (newer writers); skip them
            name = f"{prefix}field {number}"
        else:
            index = counts.get(number, 0)
            counts[number] = index + 1
            name = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
        if wire not in _WIRE_NAMES:
            raise _Damage(tag_at, f"'{name}' has invalid wire type {wire}")
        expected = _expected_wire(field) if field is not None else wire
        packed = wire == 2 and expected != 2 and field.is_repeated
        if wire != expected and not packed:
            raise _Damage(
                tag_at,
                f"'{name}' is encoded as {_WIRE_NAMES[wire]}, the ONNX schema says {_WIRE_NAMES[expected]}",
            )
        if wire == 0:
            _, pos = _varint(data, pos, end, f"'{name}'")
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _Damage(tag_at, f"'{name}' needs {size} bytes, {end - pos} remain{_hint(data, end)}")
            pos += size
        else:
            length, pos = _varint(data, pos, end, f"the length of '{name}'")
            payload_end = pos + length
            is_message = field is not None and field.type == FieldDescriptor.TYPE_MESSAGE
            if is_message and depth >= MAX_DEPTH:
                raise _Damage(tag_at, f"'{name}' is nested more than {MAX_DEPTH} levels deep")
            if payload_end > end:
                if is_message and end == len(data):  # name the innermost field the cut goes through
                    _walk(data, pos, end, field.message_type, name + ".", depth + 1)
                raise _Damage(
                    tag_at, f"'{name}' declares {length} bytes but only {end - pos} remain{_hint(data, end)}"
                )
            if is_message:
                _walk(data, pos, payload_end, field.message_type, name + ".", depth + 1)
            elif field is not None and field.type == FieldDescriptor.TYPE_STRING:
                try:  # the runtime would hand out bytes (or fail) for these later
                    data[pos:payload_end].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _Damage(pos + exc.start, f"'{name}' is not valid UTF-8 text") from None
            elif packed:
                if (expected == 1 and length % 8) or (expected == 5 and length % 4):
                    size = 8 if expected == 1 else 4
                    raise _Damage(tag_at, f"'{name}' holds {length} bytes, not a multiple of {size}")
                if expected == 0 and length and data[payload_end - 1] & 0x80:
                    raise _Damage(payload_end - 1, f"'{name}': the packed varints are cut short")
            pos = payload_end


def diagnose(data: bytes) -> str | None:
    """A one-line description of where ``data`` stops being a valid ModelProto, or None."""
    try:
        _walk(data, 0, len(data), onnx.ModelProto.DESCRIPTOR, "", 0)
    except _Damage as damage:
        what = damage.what
        if len(what) > 300:  # field paths of deeply nested graphs
            what = what[:120] + " ... " + what[-150:]
        return f"at byte {damage.offset}: {what}"
    return None
