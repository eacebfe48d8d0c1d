"""HLS-style C for integer-stage models: tensors, loop nests, layers and the program.

The generated program is plain C99 that gcc runs as a C simulation and that an HLS
tool can take as it is: one ``static void`` function per layer (ONNX node), weights
and tables as ``static const`` arrays, a top function ``qc_top`` with static
buffers, ``#pragma HLS`` directives on the loops, and no dynamic allocation.

Each tensor is a flat C array in row-major order. Every loop nest is written as
"views" (base index + one stride per loop dimension) so broadcasting, transposes,
slices and concatenation are all the same strided loop; adjacent dimensions that
every view walks contiguously are merged into one loop. The op emitters live in
:mod:`hls_ops`; this module knows nothing about op semantics.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qcompiler.errors import TargetError
from qcompiler.graph import node_label

from .fpga_resources import LayerCost

if TYPE_CHECKING:
    from .hls_program import Program

# -- types and literals -------------------------------------------------------------------

CTYPES = {
    np.dtype(np.int8): "int8_t",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.int16): "int16_t",
    np.dtype(np.uint16): "uint16_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.uint64): "uint64_t",
    np.dtype(np.bool_): "uint8_t",  # 0 or 1, one byte (numpy's bool layout)
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}


def ctype(dtype: np.dtype) -> str:
    return CTYPES[np.dtype(dtype)]


def int_bounds(dtype: np.dtype) -> tuple[int, int]:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 0, 1
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def c_int(value: int) -> str:
    """A C literal for any int64/uint64 value (INT64_MIN cannot be written directly)."""
    value = int(value)
    if value == -(2**63):
        return "(-9223372036854775807LL - 1)"
    if -(2**31) <= value < 2**31:
        return str(value)
    if value < 2**63:
        return f"{value}LL"
    return f"{value}ULL"


def c_float(value: float, dtype=np.float32) -> str:
    """An exact C literal (hex float) for a float32/float64 value."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite constant {value}")
    text = value.hex()
    return text + ("f" if np.dtype(dtype) == np.float32 else "")


def c_array_init(values: np.ndarray, per_line: int = 24) -> str:
    """The ``{...}`` initializer of a flat array, ``per_line`` values a line."""
    flat = np.ascontiguousarray(values).ravel()
    if flat.dtype == np.bool_:
        flat = flat.astype(np.uint8)
    if flat.dtype.kind == "f":
        items = [c_float(v, flat.dtype) for v in flat.tolist()]
    elif flat.dtype == np.int64 and flat.size and flat.min() == -(2**63):
        items = [c_int(v) for v in flat.tolist()]
    elif flat.dtype == np.uint64 and flat.size and flat.max() >= 2**63:
        items = [c_int(v) for v in flat.tolist()]
    else:
        items = list(map(str, flat.tolist()))
    rows = (", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line))
    return "{\n    " + ",\n    ".join(rows) + "\n}"


#: 8-bit arrays at least this long are written as string literals (gcc parses them ~10× faster).
STRING_LITERAL_MIN = 4096
_SAFE = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#%&'()*+,-./:;<=>[]^_{|}~")
_BYTE_TEXT = np.array([chr(v) if v in _SAFE else f"\\{v:03o}" for v in range(256)], dtype=object)


def c_string_init(values: np.ndarray, per_line: int = 48) -> str:
    """An 8-bit array as adjacent string literals: C99 lets a character array be initialised by a
    string exactly as long as the array (the terminating NUL is dropped). Three-digit octal
    escapes; no ``?`` (trigraphs)."""
    data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    pieces = _BYTE_TEXT[data]
    lines = ('    "' + "".join(pieces[i : i + per_line]) + '"' for i in range(0, data.size, per_line))
    return "\n".join(lines)


def comment_text(text: str) -> str:
    """An ONNX name made safe inside a C comment."""
    return "".join(c if c.isprintable() else "?" for c in text).replace("*/", "*_/").replace("/*", "/_*")


def identifier(text: str, limit: int = 40) -> str:
    """A C identifier fragment from an ONNX name."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", text or "")[:limit].strip("_")
    return ident or "v"


# -- tensors --------------------------------------------------------------------------------


@dataclass
class Tensor:
    """A value of the graph as the C program sees it."""

    name: str
    dtype: np.dtype  # storage dtype (int4 is stored in int8_t)
    shape: tuple[int, ...]
    bits: int  # logical width: 4 for int4, 1 for bool
    const: np.ndarray | None = None  # compile-time value (storage dtype); None if computed at run time

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ctype(self) -> str:
        return ctype(self.dtype)

    @property
    def is_const(self) -> bool:
        return self.const is not None


def strides(shape: Sequence[int]) -> list[int]:
    out, step = [], 1
    for dim in reversed(shape):
        out.append(step)
        step *= dim
    return out[::-1]


def broadcast_strides(shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Strides that read a tensor of ``shape`` broadcast (numpy rules) to ``out_shape``."""
    own = strides(shape)
    pad = len(out_shape) - len(shape)
    result = [0] * pad
    for dim, step in zip(shape, own):
        result.append(0 if dim == 1 else step)
    return result


def collapse(shape: Sequence[int], stride_sets: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop unit dimensions and merge neighbours that every view walks contiguously."""
    merged: list[tuple[int, list[int]]] = []
    for axis, dim in enumerate(shape):
        if dim == 1:
            continue
        column = [s[axis] for s in stride_sets]
        if merged:
            prev_dim, prev = merged[-1]
            if all(p == c * dim for p, c in zip(prev, column)):
                merged[-1] = (prev_dim * dim, column)
                continue
        merged.append((dim, column))
    return [d for d, _ in merged], [[col[k] for _, col in merged] for k in range(len(stride_sets))]


def affine(var: str, step: int, offset: int | str = 0) -> str:
    """``var·step + offset`` as short C text."""
    text = "" if var == "0" or step == 0 else var if step == 1 else f"{var}*{step}" if step > 0 else f"{var}*({step})"
    if isinstance(offset, str):
        return f"{text} + {offset}" if text else offset
    if offset == 0:
        return text or "0"
    if not text:
        return str(offset)
    return f"{text} + {offset}" if offset > 0 else f"{text} - {-offset}"


def minus(value: str, zero_point: int) -> str:
    """``value − zero_point`` as C text (parenthesised)."""
    if zero_point == 0:
        return value
    return f"({value} - {zero_point})" if zero_point > 0 else f"({value} + {-zero_point})"


def index_expr(base: str | int, loop_vars: Sequence[str], steps: Sequence[int]) -> str:
    """``base + Σ var·stride`` as C text (zero strides and a zero base dropped)."""
    terms = [] if str(base) in ("", "0") else [str(base)]
    for var, step in zip(loop_vars, steps):
        if step == 0 or var == "0":
            continue
        terms.append(var if step == 1 else f"{var}*{step}" if step > 0 else f"{var}*({step})")
    return " + ".join(terms) or "0"


@dataclass
class View:
    """``array[base + Σ i_d·strides[d]]`` over the dimensions of a loop nest."""

    array: str
    strides: list[int]
    base: str | int = 0


# -- code writer -----------------------------------------------------------------------------


class CodeWriter:
    def __init__(self, level: int = 0):
        self.lines: list[str] = []
        self.level = level

    def line(self, text: str = "") -> None:
        self.lines.append(("    " * self.level + text) if text else "")

    def open(self, text: str) -> None:
        self.line(text)
        self.level += 1

    def close(self, text: str = "}") -> None:
        self.level -= 1
        self.line(text)

    def text(self) -> str:
        return "\n".join(self.lines)


# -- one layer ------------------------------------------------------------------------------------


class Layer:
    """Builds the C function of one node and records its cost.

    Dynamic inputs become ``const T inK[]`` parameters, outputs ``T outK[]``; constant
    inputs are file-scope ``static const`` arrays (or literals when used as scalars).
    """

    def __init__(self, program: Program, index: int, node: ir.Node):
        self.program = program
        self.index = index
        self.node = node
        self.label = node_label(node)
        self.unroll = program.unroll
        self.function = f"layer_{index}_{identifier(node.name or node.op_type)}"
        self.body = CodeWriter(1)
        self.head: list[str] = []  # pragmas and local declarations at the top of the function
        self.cost = LayerCost()
        self.lanes = 1
        self.max_lanes = 1
        self.loop_vars: list[str] = []
        self._vars = itertools.count()
        self._trips = [1]  # trip counts of the enclosing non-pipelined loops
        self.params: list[tuple[str, Tensor, bool]] = []  # (C name, tensor, is_output)
        self._param_of: dict[str, str] = {}
        seen = set()
        for value in node.inputs:
            if value is None or value.name in seen:
                continue
            tensor = program.tensors[value.name]
            seen.add(value.name)
            if not tensor.is_const:
                name = f"in{len(self._param_of)}"
                self._param_of[value.name] = name
                self.params.append((name, tensor, False))
        for k, value in enumerate(node.outputs):
            if not value.name:  # an optional output left out
                continue
            tensor = program.tensors[value.name]
            self.params.append((f"out{k}", tensor, True))
            self._param_of.setdefault(value.name, f"out{k}")

    # -- access to the node ---------------------------------------------------------------------

    def fail(self, message: str) -> TargetError:
        return TargetError(f"target 'fpga-sim': {self.label}: {message}")

    def input(self, i: int) -> Tensor | None:
        if i >= len(self.node.inputs) or self.node.inputs[i] is None or not self.node.inputs[i].name:
            return None
        return self.program.tensors[self.node.inputs[i].name]

    def output(self, i: int = 0) -> Tensor:
        return self.program.tensors[self.node.outputs[i].name]

    def attr(self, name: str, default=None):
        attr = self.node.attributes.get(name)
        if attr is None:
            return default
        value = attr.value
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, Sequence) and not isinstance(value, str):
            value = list(value)
        return value

    def const(self, i: int, what: str = "") -> np.ndarray | None:
        """Compile-time value of input ``i`` (None if absent); refuses a run-time value."""
        tensor = self.input(i)
        if tensor is None:
            return None
        if not tensor.is_const:
            raise self.fail(f"input {i} ('{tensor.name}'{', ' + what if what else ''}) must be a compile-time constant")
        return tensor.const

    def scalar(self, i: int, default: int = 0, what: str = "") -> int:
        value = self.const(i, what)
        if value is None:
            return default
        if value.size != 1:
            raise self.fail(f"input {i} ('{self.input(i).name}') must be a scalar, it has shape {list(value.shape)}")
        return int(value.reshape(-1)[0])

    def ref(self, tensor: Tensor) -> str:
        """The C name of ``tensor`` inside this function."""
        if tensor.is_const:
            name = self.program.const_array(tensor.name, tensor.const, tensor.bits)
            self.own(name, tensor.size, tensor.bits)
            return name
        return self._param_of[tensor.name]

    def own(self, name: str, elements: int, bits: int, banks: int = 1) -> None:
        """Count a constant array in this layer's memory (the first layer that reads it)."""
        if name not in self.program.owned:
            self.program.owned.add(name)
            self.cost.rom(name, elements, bits, banks)

    def table(self, hint: str, values: np.ndarray, bits: int, lanes: int = 1) -> str:
        """A constant table (ROM) of this layer: one copy per two lanes (dual-port)."""
        name = self.program.const_array(f"t{self.index}_{hint}", values, bits, dedupe=False)
        self.own(name, values.size, bits, banks=max(1, math.ceil(lanes / 2)))
        return name

    def partition(self, array: str, factor: int) -> None:
        """Cyclic partition of a constant array so ``2·factor`` lanes read it each cycle."""
        if factor > 1:
            self.head.append(f"#pragma HLS ARRAY_PARTITION variable={array} cyclic factor={factor} dim=1")
            if array in self.cost.arrays:
                self.cost.arrays[array][2] = max(self.cost.arrays[array][2], factor)

    def local(self, declaration: str) -> None:
        self.head.append(declaration)

    # -- code ------------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        self.body.line(text)

    def fresh(self) -> str:
        return f"i{next(self._vars)}"

    def nest(
        self,
        shape: Sequence[int],
        views: Sequence[View],
        body: Callable[[list[str]], None],
        *,
        pipeline: bool = True,
        depth: int = 2,
        merge: bool = True,
    ) -> None:
        """A loop nest over ``shape``; ``body`` gets each view's index expression.

        A pipelined nest puts ``PIPELINE II=1`` (and ``UNROLL factor=lanes``) on its
        innermost loop and costs ``outer · ⌈inner / lanes⌉ + depth`` cycles per entry
        (the nest is perfect, so the HLS tool flattens it). A non-pipelined nest
        multiplies the cost of what runs inside it by its trip count.
        """
        if math.prod(shape) == 0:
            self.line("/* empty: nothing to compute */")
            return
        if merge:
            dims, steps = collapse(shape, [v.strides for v in views])
        else:  # the body needs one variable per dimension ("0" for a dimension of size 1)
            dims, steps = list(shape), [list(v.strides) for v in views]
        names = [self.fresh() if dim != 1 or merge else "0" for dim in dims]
        saved_vars, self.loop_vars = self.loop_vars, names
        steps = [[st for st, name in zip(col, names) if name != "0"] for col in steps]
        dims = [dim for dim, name in zip(dims, names) if name != "0"]
        loop_vars = [name for name in names if name != "0"]
        for var, dim in zip(loop_vars, dims):
            self.body.open(f"for (int {var} = 0; {var} < {dim}; {var}++) {{")
        if not dims:  # a single iteration: keep its declarations in their own scope
            self.body.open("{")
        trips = math.prod(dims)
        saved_lanes = self.lanes
        if pipeline:
            inner = dims[-1] if dims else 1
            lanes = max(1, min(self.unroll, inner))
            if dims:
                self.line("#pragma HLS PIPELINE II=1")
                if lanes > 1:
                    self.line(f"#pragma HLS UNROLL factor={lanes}")
            self.lanes = lanes
            self.max_lanes = max(self.max_lanes, lanes)
            cycles = (trips // inner) * math.ceil(inner / lanes) + depth
            self.cost.cycles += math.prod(self._trips) * cycles
        else:
            self.lanes = 1
            self._trips.append(trips)
        self.cost.loops(dims)
        body([index_expr(v.base, loop_vars, s) for v, s in zip(views, steps)])
        if not pipeline:
            self._trips.pop()
        self.lanes = saved_lanes
        self.loop_vars = saved_vars
        for _ in dims or [1]:
            self.body.close()

    def cycles(self, count: int) -> None:
        """Cycles spent outside pipelined loops (per entry of the enclosing loops)."""
        self.cost.cycles += math.prod(self._trips) * count

    # -- cost shorthands (per lane of the current nest unless ``count`` is given) ------------------

    def mul(self, a_bits: int, b_bits: int, count: int | None = None) -> None:
        self.cost.mul(a_bits, b_bits, self.lanes if count is None else count)

    def luts(self, per_lane: int, count: int | None = None) -> None:
        self.cost.lut += per_lane * (self.lanes if count is None else count)

    # -- assembly --------------------------------------------------------------------------------

    def source(self) -> str:
        params = ", ".join(
            f"{'' if out else 'const '}{t.ctype} {name}[{max(t.size, 1)}]" for name, t, out in self.params
        )
        inputs = ", ".join(
            f"{v.name}{list(self.program.tensors[v.name].shape)}" for v in self.node.inputs if v is not None and v.name
        )
        outputs = ", ".join(f"{v.name}{list(self.program.tensors[v.name].shape)}" for v in self.node.outputs if v.name)
        header = f"/* {comment_text(f'{self.label}: {inputs} -> {outputs}')} */"
        lines = [header, f"static void {self.function}({params})", "{"]
        lines += ["    " + h for h in self.head]
        lines += self.body.lines
        lines.append("}")
        return "\n".join(lines)
