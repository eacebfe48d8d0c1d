"""Recurrent ops (LSTM, GRU, RNN) unrolled into MatMul and gate ops at import.

With a static sequence length ``S`` each recurrent node becomes the equations of the ONNX
specification, one step per time step, so that the result quantizes and lowers like any
other graph (per-channel int8 MatMuls, integer sigmoid/tanh, requantized products) on
every target. For direction ``d`` (forward steps ``t = 0..S-1``, reverse ``t = S-1..0``):

The input projection of all steps is one MatMul per gate, ``XW_g = X · W_gᵀ + b_g``
(``b_g``: the input bias plus the recurrent bias where it sits outside a product), then per
step (each gate's product ``H_{t-1} · R_gᵀ`` its own MatMul, so each gate quantizes with its
own scale):

- LSTM (gates i, o, f, c; ``f``, ``g``, ``h`` default sigmoid, tanh, tanh)::

    [i, o, f, c] = XW_t + H_{t-1} · R_dᵀ        (+ P_i ⊙ C_{t-1} on i, P_f ⊙ C_{t-1} on f)
    i = f(i), f = f(f) (or 1 − i with input_forget), c = g(c)
    C_t = f ⊙ C_{t-1} + i ⊙ c
    o = f(o + P_o ⊙ C_t),  H_t = o ⊙ h(C_t)

- GRU (gates z, r, h; ``f``, ``g`` default sigmoid, tanh)::

    z = f(XW_z + H_{t-1} · R_zᵀ),  r = f(XW_r + H_{t-1} · R_rᵀ)
    h = g(XW_h + (r ⊙ H_{t-1}) · R_hᵀ)                 linear_before_reset = 0
    h = g(XW_h + r ⊙ (H_{t-1} · R_hᵀ + Rb_h))           linear_before_reset = 1
    H_t = h + z ⊙ (H_{t-1} − h)                         (= (1 − z) ⊙ h + z ⊙ H_{t-1})

- RNN (``f`` default tanh): ``H_t = f(XW_t + H_{t-1} · R_dᵀ)``.

``clip`` clamps every pre-activation to ``[-clip, clip]``. Outputs: ``Y`` stacks ``H_t`` in
time order (``[S, D, N, H]``, or ``[N, S, D, H]`` with ``layout = 1``), ``Y_h``/``Y_c``
the last step's states. Constant weights are transposed and split here; computed ones by
Gather/Slice/Transpose nodes. ``sequence_lens`` must be absent or equal to ``S``
everywhere; anything else is refused with one line naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .errors import ShapeError, UnsupportedOpError
from .graph import NameFactory, add_initializer, const_array, node_label, static_shape

RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})

#: Gates and the default activations, per op.
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
#: Largest number of time steps unrolled (each step is a handful of nodes per direction).
MAX_STEPS = 4096


class _Emitter:
    """Builds float nodes before ``anchor``, each output typed and shaped."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, names: NameFactory, base: str):
        self.graph, self.anchor, self.names, self.base = graph, anchor, names, base
        self.nodes: list[ir.Node] = []
        self._small: dict[tuple, ir.Value] = {}

    def const(self, tag: str, array) -> ir.Value:
        """An initializer; small ones (indices, axes, scalars) are shared."""
        array = np.asarray(array)
        key = None
        if array.size <= 16:
            key = (tag, array.dtype.str, array.shape, array.tobytes())
            if key in self._small:
                return self._small[key]
        value = add_initializer(self.graph, self.names(f"{self.base}_{tag}"), array)
        if key is not None:
            self._small[key] = value
        return value

    def __call__(self, op: str, inputs, shape, attrs=None, *, dtype=ir.DataType.FLOAT, outputs: int = 1):
        node = ir.node(op, inputs, attrs or {}, name=self.names(f"{self.base}_{op}"), num_outputs=outputs)
        shapes = shape if outputs > 1 else [shape]
        for out, out_shape in zip(node.outputs, shapes):
            out.name = self.names(f"{self.base}_{op.lower()}")
            out.dtype = dtype
            out.shape = ir.Shape(out_shape)
        self.nodes.append(node)
        return list(node.outputs) if outputs > 1 else node.outputs[0]


def unroll_recurrent(model: ir.Model) -> int:
    """Replace every LSTM/GRU/RNN node of the main graph by its unrolled steps; returns
    how many were replaced."""
    graph = model.graph
    names = NameFactory(graph)
    count = 0
    for node in list(graph):
        if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
            _unroll(graph, node, names)
            count += 1
    return count


def _unroll(graph: ir.Graph, node: ir.Node, names: NameFactory) -> None:
    op, where = node.op_type, node_label(node)
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    x, w, r, b, seq_lens, init_h = inputs[:6]
    init_c, peep = (inputs[6], inputs[7]) if op == "LSTM" else (None, None)
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    hidden = int(attrs.get("hidden_size", 0))
    layout = int(attrs.get("layout", 0))
    direction = attrs.get("direction", "forward")
    directions = {"forward": ["forward"], "reverse": ["reverse"], "bidirectional": ["forward", "reverse"]}.get(direction)
    if directions is None:
        raise UnsupportedOpError(f"{where}: direction '{direction}' is not forward, reverse or bidirectional")

    x_shape = static_shape(x)
    if x_shape is None or len(x_shape) != 3:
        raise ShapeError(f"{where}: unrolling needs a static 3-D input shape (pin the model's inputs with --input-shape)")
    steps, batch, _ = (x_shape[1], x_shape[0], x_shape[2]) if layout else x_shape
    if steps > MAX_STEPS:
        raise UnsupportedOpError(f"{where}: {steps} time steps is more than the {MAX_STEPS} qcompiler unrolls")
    weights = _Weights({"W": w, "R": r, "B": b, "P": peep})
    if not hidden:
        hidden = static_shape(r)[-1]
    if seq_lens is not None:
        lengths = const_array(seq_lens)
        if lengths is not None and np.all(lengths == steps):
            seq_lens = None  # every sequence is full: no masking

    emit = _Emitter(graph, node, names, node.name or op.lower())
    activations = list(attrs.get("activations") or []) or _DEFAULT_ACTIVATIONS[op] * len(directions)
    per_dir = len(_DEFAULT_ACTIVATIONS[op])
    alphas = list(attrs.get("activation_alpha") or [])
    betas = list(attrs.get("activation_beta") or [])
    step = _Step(emit, op, hidden, batch, attrs, where)

    if layout:
        x = emit("Transpose", [x], [steps, batch, x_shape[2]], {"perm": [1, 0, 2]})
    ys, last_h, last_c = [], [], []
    for d, name in enumerate(directions):
        acts = [
            _activation(activations[d * per_dir + k], alphas, betas, where)
            for k in range(per_dir)
        ]
        h = _initial_state(emit, init_h, d, layout, batch, hidden, "h")
        c = _initial_state(emit, init_c, d, layout, batch, hidden, "c") if op == "LSTM" else None
        projected = step.project(x, d, weights, steps)
        order = range(steps) if name == "forward" else range(steps - 1, -1, -1)
        outs = {}
        for t in order:
            h_new, c_new = step(projected, t, h, c, d, weights, acts)
            if seq_lens is None:
                h, c, outs[t] = h_new, c_new, h_new
            else:
                h, c, outs[t] = _masked(emit, seq_lens, t, (h, h_new), (c, c_new), batch, hidden)
        stacked = emit("Concat", [outs[t] for t in range(steps)], [steps * batch, hidden], {"axis": 0})
        ys.append(emit("Reshape", [stacked, emit.const("y_shape", np.array([steps, 1, batch, hidden], np.int64))],
                       [steps, 1, batch, hidden]))
        last_h.append(h)
        last_c.append(c)

    results = [
        _join(emit, ys, [steps, len(directions), batch, hidden], 1, (2, 0, 1, 3) if layout else None),
        _join_states(emit, last_h, batch, hidden, layout),
        _join_states(emit, last_c, batch, hidden, layout) if op == "LSTM" else None,
    ]
    old, new = [], []
    for out, value in zip(node.outputs, results):
        if value is not None and (out.uses() or out.is_graph_output()):
            old.append(out)
            new.append(value)
    ir.convenience.replace_nodes_and_values(graph, node, [node], emit.nodes, old, new)


class _Weights:
    """The W, R, B, P inputs: numpy when constant (transposed and sliced here), else values
    sliced by emitted nodes. ``part`` returns ``X[d, start:stop]`` (transposed with ``t``)."""

    def __init__(self, values: dict):
        self.values = {k: v for k, v in values.items() if v is not None}
        self.arrays = {k: const_array(v) for k, v in self.values.items()}

    def __contains__(self, label: str) -> bool:
        return label in self.values

    def part(self, emit: _Emitter, label: str, d: int, start: int, stop: int, t: bool = False):
        array = self.arrays[label]
        if array is not None:
            piece = array[d, start:stop].astype(np.float32)
            return np.ascontiguousarray(piece.T) if t else piece
        value = self.values[label]
        rest = list(static_shape(value)[2:])
        row = emit("Gather", [value, emit.const("dir", np.array(d, np.int64))], [static_shape(value)[1]] + rest, {"axis": 0})
        ends = [emit.const("start", np.array([start], np.int64)), emit.const("stop", np.array([stop], np.int64)),
                emit.const("axis0", np.array([0], np.int64))]
        piece = emit("Slice", [row, *ends], [stop - start] + rest)
        if t:
            piece = emit("Transpose", [piece], rest[::-1] + [stop - start], {"perm": [1, 0]})
        return piece


def _value(emit: _Emitter, x, tag: str) -> ir.Value:
    return emit.const(tag, x) if isinstance(x, np.ndarray) else x


def _add(emit: _Emitter, a, b, shape):
    """``a + b`` for numpy arrays (folded here) or values (an Add node)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a + b
    return emit("Add", [_value(emit, a, "bias"), _value(emit, b, "bias")], shape)


class _Step:
    """One time step of an LSTM, GRU or RNN direction.

    Every gate has its own input projection and recurrent product: the gates' pre-activations
    have very different ranges (an LSTM's input gate saturates where its cell candidate does
    not), and one fused ``[N, G·H]`` tensor would give them one quantization scale."""

    def __init__(self, emit: _Emitter, op: str, hidden: int, batch: int, attrs: dict, where: str):
        self.emit, self.op, self.hidden, self.batch = emit, op, hidden, batch
        self.clip = attrs.get("clip")
        self.input_forget = bool(attrs.get("input_forget", 0))
        self.linear_before_reset = bool(attrs.get("linear_before_reset", 0))
        self._r: dict[int, list[ir.Value]] = {}
        self._rb: dict[int, ir.Value | None] = {}

    def project(self, x: ir.Value, d: int, weights: _Weights, steps: int) -> list[ir.Value]:
        """``XW_g = X · W_gᵀ + bias_g`` for all steps and each gate ``g``, ``[S, N, H]``; keeps
        ``R_gᵀ`` (and GRU's recurrent bias of h with ``linear_before_reset``) for the steps."""
        emit, hid, gates = self.emit, self.hidden, _GATES[self.op]
        gh = gates * hid
        self._r[d] = [_value(emit, weights.part(emit, "R", d, g * hid, (g + 1) * hid, t=True), f"R{d}_{g}_T")
                      for g in range(gates)]
        self._rb[d] = None
        projected = []
        for g in range(gates):
            rows = (g * hid, (g + 1) * hid)
            w_t = _value(emit, weights.part(emit, "W", d, *rows, t=True), f"W{d}_{g}_T")
            xw = emit("MatMul", [x, w_t], [steps, self.batch, hid])
            if "B" in weights:
                bias = weights.part(emit, "B", d, *rows)
                rec = weights.part(emit, "B", d, gh + rows[0], gh + rows[1])
                if self.op == "GRU" and self.linear_before_reset and g == 2:
                    self._rb[d] = _value(emit, rec, f"Rb{d}_h")  # multiplies with r inside the step
                else:
                    bias = _add(emit, bias, rec, [hid])
                if not (isinstance(bias, np.ndarray) and not np.any(bias)):
                    xw = emit("Add", [xw, _value(emit, bias, f"B{d}_{g}")], [steps, self.batch, hid])
            projected.append(xw)
        return projected

    def _pre(self, value: ir.Value) -> ir.Value:
        if self.clip is None:
            return value
        lo, hi = self.emit.const("clip_lo", np.float32(-self.clip)), self.emit.const("clip_hi", np.float32(self.clip))
        return self.emit("Clip", [value, lo, hi], [self.batch, self.hidden])

    def _recurrent(self, h: ir.Value, d: int, g: int) -> ir.Value | None:
        """``h · R_gᵀ``; None for a zero state (the first step from a zero initial state)."""
        if _is_zero(h):
            return None
        return self.emit("MatMul", [h, self._r[d][g]], [self.batch, self.hidden])

    def _sum(self, a: ir.Value | None, b: ir.Value | None) -> ir.Value | None:
        """``a + b`` where None is 0."""
        if a is None or b is None:
            return b if a is None else a
        return self.emit("Add", [a, b], [self.batch, self.hidden])

    def _product(self, a: ir.Value, b: ir.Value) -> ir.Value | None:
        """``a ⊙ b``; None when either is a zero constant."""
        if _is_zero(a) or _is_zero(b):
            return None
        return self.emit("Mul", [a, b], [self.batch, self.hidden])

    def __call__(self, projected, t, h, c, d, weights, acts):
        emit, shape = self.emit, [self.batch, self.hidden]
        index = emit.const("t", np.array(t, np.int64))
        xw_t = [emit("Gather", [xw, index], shape, {"axis": 0}) for xw in projected]
        if self.op == "RNN":
            pre = self._sum(xw_t[0], self._recurrent(h, d, 0))
            return acts[0](emit, self._pre(pre), shape), None
        if self.op == "GRU":
            return self._gru(xw_t, h, d, acts), None
        return self._lstm(xw_t, h, c, d, weights, acts)

    def _lstm(self, xw_t, h, c, d, weights, acts):
        emit, shape = self.emit, [self.batch, self.hidden]
        f_act, g_act, h_act = acts
        i_pre, o_pre, f_pre, c_pre = (self._sum(xw_t[g], self._recurrent(h, d, g)) for g in range(4))
        peep = "P" in weights
        if peep:
            p_i, p_o, p_f = (_value(emit, weights.part(emit, "P", d, k * self.hidden, (k + 1) * self.hidden), "P")
                             for k in range(3))
            i_pre = self._sum(i_pre, self._product(c, p_i))
            f_pre = self._sum(f_pre, self._product(c, p_f))
        i = f_act(emit, self._pre(i_pre), shape)
        if self.input_forget:
            f = emit("Sub", [emit.const("one", np.float32(1)), i], shape)
        else:
            f = f_act(emit, self._pre(f_pre), shape)
        cand = g_act(emit, self._pre(c_pre), shape)
        c_new = self._sum(self._product(f, c), emit("Mul", [i, cand], shape))
        if peep:
            o_pre = self._sum(o_pre, self._product(c_new, p_o))
        o = f_act(emit, self._pre(o_pre), shape)
        return emit("Mul", [o, h_act(emit, c_new, shape)], shape), c_new

    def _gru(self, xw_t, h, d, acts):
        emit, shape = self.emit, [self.batch, self.hidden]
        f_act, g_act = acts
        z = f_act(emit, self._pre(self._sum(xw_t[0], self._recurrent(h, d, 0))), shape)
        r = f_act(emit, self._pre(self._sum(xw_t[1], self._recurrent(h, d, 1))), shape)
        if self.linear_before_reset:
            hh = self._sum(self._recurrent(h, d, 2), self._rb[d])
            h_pre = self._sum(xw_t[2], None if hh is None else emit("Mul", [r, hh], shape))
        else:
            reset = self._product(r, h)
            h_pre = self._sum(xw_t[2], None if reset is None else self._recurrent(reset, d, 2))
        cand = g_act(emit, self._pre(h_pre), shape)
        return emit("Add", [cand, emit("Mul", [z, emit("Sub", [h, cand], shape)], shape)], shape)


def _masked(emit: _Emitter, seq_lens: ir.Value, t: int, h_pair, c_pair, batch: int, hidden: int):
    """Variable lengths: a sequence past its length keeps its state and outputs zeros
    (forward steps stop at ``len``; reverse steps start at ``len - 1``)."""
    shape = [batch, hidden]
    dtype = ir.DataType.BOOL
    live = emit("Less", [emit.const("t", np.array(t, seq_lens.dtype.numpy())), seq_lens], [batch], dtype=dtype)
    live = emit("Unsqueeze", [live, emit.const("axis1", np.array([1], np.int64))], [batch, 1], dtype=dtype)
    h = emit("Where", [live, h_pair[1], h_pair[0]], shape)
    c = emit("Where", [live, c_pair[1], c_pair[0]], shape) if c_pair[1] is not None else None
    out = emit("Where", [live, h_pair[1], emit.const("zero", np.float32(0))], shape)
    return h, c, out


def _is_zero(value: ir.Value | None) -> bool:
    array = const_array(value) if value is not None else None
    return array is not None and not np.any(array)


def _initial_state(emit: _Emitter, value, d: int, layout: int, batch: int, hidden: int, tag: str) -> ir.Value:
    """The direction's initial state; a constant stays a constant (a zero one then drops the
    first step's recurrent products instead of multiplying by zeros)."""
    if value is None:
        return emit.const(f"{tag}0", np.zeros((batch, hidden), np.float32))
    axis = 1 if layout else 0
    array = const_array(value)
    if array is not None:
        return emit.const(f"{tag}0_{d}", np.take(array, d, axis=axis).astype(np.float32))
    return emit("Gather", [value, emit.const("dir", np.array(d, np.int64))], [batch, hidden], {"axis": axis})


def _join(emit: _Emitter, parts, shape, axis: int, perm) -> ir.Value:
    joined = parts[0] if len(parts) == 1 else emit("Concat", parts, shape, {"axis": axis})
    if perm is not None:
        joined = emit("Transpose", [joined], [shape[p] for p in perm], {"perm": list(perm)})
    return joined


def _join_states(emit: _Emitter, states, batch: int, hidden: int, layout: int) -> ir.Value:
    dirs = len(states)
    stacked = [emit("Unsqueeze", [s, emit.const("axis0", np.array([0], np.int64))], [1, batch, hidden]) for s in states]
    return _join(emit, stacked, [dirs, batch, hidden], 0, (1, 0, 2) if layout else None)


def _activation(name: str, alphas: list, betas: list, where: str):
    """The activation ``name`` as a function emitting ONNX ops; consumes its alpha/beta
    from the attribute lists (in order, as the specification lays them out)."""
    key = name.lower()

    def take(values, default):
        return float(values.pop(0)) if values else default

    def unary(op, **attrs):
        return lambda emit, x, shape: emit(op, [x], shape, attrs)

    if key in ("sigmoid", "tanh", "relu", "softsign", "softplus"):
        return unary({"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softsign": "Softsign",
                      "softplus": "Softplus"}[key])
    if key == "leakyrelu":
        return unary("LeakyRelu", alpha=take(alphas, 0.01))
    if key == "thresholdedrelu":
        return unary("ThresholdedRelu", alpha=take(alphas, 1.0))
    if key == "elu":
        return unary("Elu", alpha=take(alphas, 1.0))
    if key == "hardsigmoid":
        return unary("HardSigmoid", alpha=take(alphas, 0.2), beta=take(betas, 0.5))
    if key in ("affine", "scaledtanh"):
        alpha, beta = np.float32(take(alphas, 1.0)), np.float32(take(betas, 0.0 if key == "affine" else 1.0))

        def scaled(emit, x, shape):
            if key == "affine":  # alpha·x + beta
                return emit("Add", [emit("Mul", [x, emit.const("alpha", alpha)], shape), emit.const("beta", beta)], shape)
            inner = emit("Tanh", [emit("Mul", [x, emit.const("beta", beta)], shape)], shape)
            return emit("Mul", [inner, emit.const("alpha", alpha)], shape)  # alpha·tanh(beta·x)

        return scaled
    raise UnsupportedOpError(f"{where}: activation '{name}' is not supported")
