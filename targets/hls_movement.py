"""C emitters of reductions, pooling and data movement (fpga-sim): strided copies, gathers,
padding, max pooling. Registered in :data:`hls_ops.EMITTERS` like the arithmetic emitters."""

from __future__ import annotations

import math

import numpy as np

from .hls_c import Layer, View, affine, broadcast_strides, c_int, strides
from .hls_ops import _axis, elementwise, emitter


# -- reductions and pooling ----------------------------------------------------------------------------


@emitter("ReduceSum")
def reduce_sum(layer: Layer) -> None:
    """``y = Σ_axes x`` accumulated in int64 and wrapped to the type (numpy ``sum(dtype=x.dtype)``)."""
    x, out = layer.input(0), layer.output()
    axes = layer.const(1, "axes")
    axes = list(axes.reshape(-1)) if axes is not None else list(layer.attr("axes", []) or [])
    rank = len(x.shape)
    if not axes:
        if layer.attr("noop_with_empty_axes", 0):
            elementwise(layer, [x], lambda v: v[0], depth=1)
            return
        axes = list(range(rank))
    axes = sorted({_axis(int(a), rank, layer) for a in axes})
    kept = [d for d in range(rank) if d not in axes]
    sx = strides(x.shape)
    kept_shape = [x.shape[d] for d in kept]
    red_shape = [x.shape[d] for d in axes]
    x_name = layer.ref(x)
    acc_bits = min(out.bits, x.bits + max(1, math.prod(red_shape) - 1).bit_length())
    lanes = max(1, min(layer.unroll, red_shape[-1] if red_shape else 1))

    def row(idx):
        layer.line("int64_t acc = 0;")

        def add(inner):
            layer.line(f"acc += (int64_t){x_name}[{inner[0]}];")
            layer.luts(acc_bits)

        layer.nest(red_shape, [View(x_name, [sx[d] for d in axes], idx[1])], add, depth=2 + max(0, lanes - 1).bit_length())
        layer.line(f"out0[{idx[0]}] = ({out.ctype})acc;")

    layer.nest(kept_shape, [View("out0", strides(kept_shape)), View(x_name, [sx[d] for d in kept])], row, pipeline=False)


def maxpool_geometry(x_shape, attrs: dict) -> tuple[list[int], list[int]]:
    """``(output spatial dims, begin pads)`` of MaxPool as ``onnx.reference`` computes them."""
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides_ = list(attrs.get("strides") or [1] * rank)
    dilations = list(attrs.get("dilations") or [1] * rank)
    pads = list(attrs.get("pads") or [0] * (2 * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    ceil_mode = int(attrs.get("ceil_mode", 0) or 0)
    spatial = list(x_shape[2:])
    out, heads = [], []
    for i in range(rank):
        effective = (kernel[i] - 1) * dilations[i] + 1
        total = spatial[i] + pads[i] + pads[i + rank] - effective
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-spatial[i] // strides_[i]) if auto_pad == "SAME_UPPER" else spatial[i] // strides_[i]
            heads.append(((o - 1) * strides_[i] + effective - spatial[i]) // 2)
        elif auto_pad == "VALID":
            o = -(-(spatial[i] - effective + 1) // strides_[i])
            heads.append(0)
        else:
            if ceil_mode:
                o = -(-total // strides_[i]) + 1
                if (o - 1) * strides_[i] >= spatial[i] + pads[i]:
                    o -= 1
            else:
                o = total // strides_[i] + 1
            heads.append(pads[i])
        out.append(o)
    return out, heads


@emitter("MaxPool")
def max_pool(layer: Layer) -> None:
    """``y = max`` over the window's positions inside the input (padding never wins; a
    window with none gives 0, as ``onnx.reference`` does). The output-pixel loop is
    pipelined; the window loops unroll into a comparator tree."""
    x, out = layer.input(0), layer.output()
    if len(layer.node.outputs) > 1 and layer.node.outputs[1].name:
        raise layer.fail("the Indices output of MaxPool is not supported")
    attrs = {name: layer.attr(name) for name in ("kernel_shape", "strides", "dilations", "pads", "auto_pad", "ceil_mode")}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    _, heads = maxpool_geometry(x.shape, attrs)
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides_ = list(attrs.get("strides") or [1] * rank)
    dilations = list(attrs.get("dilations") or [1] * rank)
    spatial, o_dims = list(x.shape[2:]), list(out.shape[2:])
    sx = strides(x.shape)
    nc = x.shape[0] * x.shape[1]
    x_name = layer.ref(x)
    views = [View("out0", [math.prod(o_dims)] + strides(o_dims)), View(x_name, [sx[1]] + [0] * rank)]

    def pixel(idx):
        o_vars = layer.loop_vars[1:]
        layer.line("int64_t best = 0;")
        layer.line("int found = 0;")
        for s in range(rank):
            layer.body.open(f"for (int k{s} = 0; k{s} < {kernel[s]}; k{s}++) {{")
            layer.line(f"int p{s} = {affine(o_vars[s], strides_[s], -heads[s])} + {affine(f'k{s}', dilations[s])};")
        cond = " && ".join(f"p{s} >= 0 && p{s} < {spatial[s]}" for s in range(rank))
        offset = " + ".join(affine(f"p{s}", sx[2 + s]) for s in range(rank))
        layer.body.open(f"if ({cond}) {{")
        layer.line(f"int64_t v = (int64_t){x_name}[{idx[1]} + {offset}];")
        layer.line("if (!found || v > best) best = v;")
        layer.line("found = 1;")
        layer.body.close()
        for _ in range(rank):
            layer.body.close()
        layer.line(f"out0[{idx[0]}] = ({out.ctype})(found ? best : 0);")
        layer.luts(math.prod(kernel) * (2 * x.bits + rank * 2 * 16))

    layer.nest([nc] + o_dims, views, pixel, depth=3 + math.prod(kernel).bit_length(), merge=False)


# -- data movement -------------------------------------------------------------------------------------


def _copy(layer: Layer, shape, dst: View, src: View) -> None:
    """A strided copy: one pipelined nest (address generation only)."""
    layer.nest(shape, [dst, src], lambda idx: layer.line(f"{dst.array}[{idx[0]}] = {src.array}[{idx[1]}];"), depth=2)


@emitter("Transpose")
def transpose(layer: Layer) -> None:
    x, out = layer.input(0), layer.output()
    perm = layer.attr("perm") or list(range(len(x.shape)))[::-1]
    sx = strides(x.shape)
    _copy(layer, out.shape, View("out0", strides(out.shape)), View(layer.ref(x), [sx[p] for p in perm]))


@emitter("Expand")
def expand(layer: Layer) -> None:
    x, out = layer.input(0), layer.output()
    _copy(layer, out.shape, View("out0", strides(out.shape)), View(layer.ref(x), broadcast_strides(x.shape, out.shape)))


@emitter("Concat")
def concat(layer: Layer) -> None:
    out = layer.output()
    axis = _axis(layer.attr("axis", 0), len(out.shape), layer)
    so = strides(out.shape)
    offset = 0
    for value in layer.node.inputs:
        part = layer.program.tensors[value.name]
        if part.size:
            _copy(layer, part.shape, View("out0", so, offset * so[axis]), View(layer.ref(part), strides(part.shape)))
        offset += part.shape[axis]


@emitter("Split")
def split(layer: Layer) -> None:
    x = layer.input(0)
    axis = _axis(layer.attr("axis", 0), len(x.shape), layer)
    sx = strides(x.shape)
    offset = 0
    for k, value in enumerate(layer.node.outputs):
        part = layer.program.tensors[value.name]
        if part.size:
            _copy(layer, part.shape, View(f"out{k}", strides(part.shape)), View(layer.ref(x), sx, offset * sx[axis]))
        offset += part.shape[axis]


@emitter("Slice")
def slice_(layer: Layer) -> None:
    """Strided copy: per axis ``(start, stop, step) = slice(s, e, st).indices(dim)`` (numpy's clamping)."""
    x, out = layer.input(0), layer.output()
    rank = len(x.shape)
    starts = list(layer.const(1, "starts").reshape(-1))
    ends = list(layer.const(2, "ends").reshape(-1))
    axes = layer.const(3, "axes")
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes.reshape(-1)]
    steps = layer.const(4, "steps")
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps.reshape(-1)]
    sx = strides(x.shape)
    base, view_strides = 0, list(sx)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, rank, layer)
        first, _, step = slice(int(start), int(end), step).indices(x.shape[axis])
        base += first * sx[axis]
        view_strides[axis] = step * sx[axis]
    _copy(layer, out.shape, View("out0", strides(out.shape)), View(layer.ref(x), view_strides, base))


@emitter("Gather")
def gather(layer: Layer) -> None:
    """``y[o, j, i] = data[o, index(ind[j]), i]`` (embedding lookups with run-time ids)."""
    data, ind = layer.input(0), layer.input(1)
    axis = _axis(layer.attr("axis", 0), len(data.shape), layer)
    outer, dim, inner = math.prod(data.shape[:axis]), data.shape[axis], math.prod(data.shape[axis + 1 :])
    count = ind.size
    shape = (outer, count, inner)
    views = [
        View("out0", [count * inner, inner, 1]),
        View(layer.ref(data), [dim * inner, 0, 1]),
        View(layer.ref(ind), [0, 1, 0]),
    ]

    def body(idx):
        layer.line(f"out0[{idx[0]}] = {views[1].array}[{idx[1]} + qc_index({views[2].array}[{idx[2]}], {dim})*{inner}];")
        layer.luts(64)

    layer.nest(shape, views, body, depth=3)


@emitter("GatherElements")
def gather_elements(layer: Layer) -> None:
    """``y[i] = data[i with i_axis ← index(ind[i])]``."""
    data, ind, out = layer.input(0), layer.input(1), layer.output()
    axis = _axis(layer.attr("axis", 0), len(data.shape), layer)
    sd = strides(data.shape)
    # indices read with broadcasting: the reference (take_along_axis) broadcasts them against the data
    ind_view = broadcast_strides(ind.shape, out.shape)
    data_view = [0 if d == axis else s for d, s in enumerate(broadcast_strides(data.shape, out.shape))]
    views = [View("out0", strides(out.shape)), View(layer.ref(data), data_view), View(layer.ref(ind), ind_view)]

    def body(idx):
        layer.line(
            f"out0[{idx[0]}] = {views[1].array}[{idx[1]} + qc_index({views[2].array}[{idx[2]}], {data.shape[axis]})*{sd[axis]}];"
        )
        layer.luts(64)

    layer.nest(out.shape, views, body, depth=3)


@emitter("GatherND")
def gather_nd(layer: Layer) -> None:
    """``y[b, p, :] = data[b, ind[b, p, 0], …, ind[b, p, r−1], :]`` with ``batch_dims = len(b)``."""
    data, ind = layer.input(0), layer.input(1)
    batch = int(layer.attr("batch_dims", 0))
    r = ind.shape[-1]
    sd, si = strides(data.shape), strides(ind.shape)
    slice_size = math.prod(data.shape[batch + r :])
    lead = list(ind.shape[:-1])
    shape = lead + [slice_size]
    data_view = [sd[d] if d < batch else 0 for d in range(len(lead))] + [1]
    views = [View("out0", strides(shape)), View(layer.ref(data), data_view), View(layer.ref(ind), si[:-1] + [0])]

    def body(idx):
        terms = [
            f"qc_index({views[2].array}[{idx[2]} + {j}], {data.shape[batch + j]})*{sd[batch + j]}" for j in range(r)
        ]
        layer.line(f"out0[{idx[0]}] = {views[1].array}[{' + '.join([idx[1]] + terms)}];")
        layer.luts(64 * r)

    layer.nest(shape, views, body, depth=3)


@emitter("Pad")
def pad(layer: Layer) -> None:
    """Per-axis source-index tables (``−1`` for a constant-filled position), one pipelined copy."""
    x, out = layer.input(0), layer.output()
    rank = len(x.shape)
    mode = layer.attr("mode", "constant")
    pads = layer.const(1, "pads")
    pads = [int(p) for p in (pads.reshape(-1) if pads is not None else layer.attr("pads", []))]
    value = layer.const(2, "constant value")
    fill = 0 if value is None or value.size == 0 else int(value.reshape(-1)[0])
    axes = layer.const(3, "axes")
    axes = list(range(rank)) if axes is None else [_axis(int(a), rank, layer) for a in axes.reshape(-1)]
    begin, end = [0] * rank, [0] * rank
    for k, axis in enumerate(axes):
        begin[axis], end[axis] = pads[k], pads[k + len(axes)]
    sx = strides(x.shape)
    maps = []
    for d in range(rank):
        dim, size = x.shape[d], out.shape[d]
        src = np.arange(size) - begin[d]
        if begin[d] == 0 and end[d] == 0:
            maps.append(None)
            continue
        if mode == "constant":
            src = np.where((src >= 0) & (src < dim), src, -1)
        elif mode == "edge":
            src = np.clip(src, 0, dim - 1)
        elif mode in ("reflect", "wrap") and begin[d] >= 0 and end[d] >= 0:
            src = np.pad(np.arange(dim), (begin[d], end[d]), mode=mode)
        else:
            raise layer.fail(f"mode '{mode}' with pads {pads} is not supported")
        maps.append(layer.table(f"pad{d}", src.astype(np.int32), 16))
    x_name = layer.ref(x)

    def body(idx):
        loop_vars = layer.loop_vars
        coords, checks = [], []
        for d in range(rank):
            if maps[d] is None:
                coords.append(affine(loop_vars[d], sx[d]))
                continue
            layer.line(f"int s{d} = {maps[d]}[{loop_vars[d]}];")
            coords.append(affine(f"s{d}", sx[d]))
            if mode == "constant":
                checks.append(f"s{d} >= 0")
        source = f"{x_name}[{' + '.join(coords) or '0'}]"
        if checks:
            layer.line(f"out0[{idx[0]}] = {' && '.join(checks)} ? {source} : ({out.ctype}){c_int(fill)};")
        else:
            layer.line(f"out0[{idx[0]}] = {source};")
        layer.luts(16 * rank + out.bits)

    layer.nest(out.shape, [View("out0", strides(out.shape))], body, depth=3, merge=False)
