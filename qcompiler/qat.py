"""Quantization-aware training (seed 003, Alg. 2) with the compiler's own quantizer.

``prepare`` puts fake quantization into a user's ``nn.Module`` where the compiler puts
it: the inputs, every activation that is not inside a linear group (a Conv/Linear output
read only by its ReLU/ReLU6 stays unquantized, as the integer op fuses them), per-channel
symmetric weights. The forward pass is ONNX ``QuantizeLinear``/``DequantizeLinear``
arithmetic, ``x̂ = (clamp(round_half_even(x / s) + z, qmin, qmax) − z)·s``, and the
backward pass is the straight-through estimator (gradient 1 where ``x`` is inside the
clamp, 0 outside). Train as usual; ``export`` goes through ``qcompiler.from_torch`` and
gives a fake-quant IR model (activation quantizers as Q/DQ pairs, weights as
``DequantizeLinear`` of their trained integers) that ``qcompiler.compile`` lowers with
the trained scales, no recalibration::

    model = qat.prepare(net, weights="int4:per-channel")
    qat.calibrate(model, batches)          # activation ranges (min/max), then frozen
    ... train model as usual ...
    qcompiler.compile(qat.export(model, example), "npu-sim", "out")

BatchNormalization after a convolution is folded into it first (eval statistics), as the
compiler's ``fold-batchnorm`` does. Data movement (pooling by max, flatten, reshape) and
average pooling keep their input's quantization, as the compiler's plan does.
"""

from __future__ import annotations

import operator

from .errors import UserError
from .quant import QFormat

#: Modules and functions whose output is their input's values rearranged (no new quantizer).
_MOVEMENT_MODULES = ("MaxPool1d", "MaxPool2d", "Flatten", "Identity", "Dropout", "Unflatten")
_MOVEMENT_FUNCTIONS = ("flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "max_pool2d",
                       "contiguous", "dropout", "getitem")
_ACTIVATIONS = ("ReLU", "ReLU6")


def _is_linear(module) -> bool:
    torch = _torch()
    return isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))


def _torch():
    import torch

    return torch


class _RoundSTE:
    """``round_half_even`` with a straight-through gradient."""

    @staticmethod
    def apply(x):
        return x + (_torch().round(x) - x).detach()


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int):
    """ONNX Q→DQ arithmetic (division by the scale, round half to even, clamp) with a
    straight-through gradient inside the clamp."""
    torch = _torch()
    q = _RoundSTE.apply(x / scale) + zero_point
    return (torch.clamp(q, qmin, qmax) - zero_point) * scale


def _activation_quantizer(fmt: QFormat):
    torch = _torch()

    class ActivationFakeQuant(torch.nn.Module):
        """Per-tensor fake quantization of an activation; range from :func:`calibrate`."""

        def __init__(self):
            super().__init__()
            self.qmin, self.qmax = fmt.qrange
            self.register_buffer("lo", torch.tensor(float("inf")))
            self.register_buffer("hi", torch.tensor(float("-inf")))
            self.observing = False

        def params(self):
            """``(scale, zero_point)`` as the compiler computes them for ``[lo, hi]``."""
            from .quant import qparams

            if not torch.isfinite(self.lo):
                raise UserError("qat: an activation quantizer has no range yet (run qat.calibrate first)")
            scale, zero = qparams(self.lo.item(), self.hi.item(), fmt)
            return float(scale), int(zero)

        def forward(self, x):
            if self.observing:
                self.lo = torch.minimum(self.lo, x.detach().min())
                self.hi = torch.maximum(self.hi, x.detach().max())
                return x
            scale, zero = self.params()
            return fake_quantize(x, scale, zero, self.qmin, self.qmax)

    return ActivationFakeQuant()


def _weight_quantizer(fmt: QFormat):
    torch = _torch()

    class WeightFakeQuant(torch.nn.Module):
        """Per-output-channel symmetric fake quantization of a weight (scale = max|W_c| / qmax,
        from the current weight at every step)."""

        def __init__(self):
            super().__init__()
            self.qmin, self.qmax = fmt.qrange

        def scale(self, w):
            amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
            scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
            return scale.reshape((-1,) + (1,) * (w.dim() - 1))

        def forward(self, w):
            return fake_quantize(w, self.scale(w), 0, self.qmin, self.qmax)

    return WeightFakeQuant()


def _fold_batchnorm(graph_module) -> None:
    """``Conv → BatchNorm`` (eval statistics) folded into the convolution's weight and bias."""
    torch = _torch()
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            continue
        source = node.args[0]
        conv = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d)) or len(source.users) != 1:
            continue
        with torch.no_grad():
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(factor.reshape((-1,) + (1,) * (conv.weight.dim() - 1)))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = torch.nn.Parameter(bn.bias + (bias - bn.running_mean) * factor)
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()


def _is_movement(node, modules) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]).__name__ in _MOVEMENT_MODULES
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return name in _MOVEMENT_FUNCTIONS or node.target is operator.getitem
    return False


def _fused_into_activation(node, modules) -> bool:
    """A Conv/Linear output read only by a ReLU/ReLU6: the integer op computes both."""
    if node.op != "call_module" or not _is_linear(modules[node.target]) or len(node.users) != 1:
        return False
    (user,) = node.users
    if user.op == "call_module":
        return type(modules[user.target]).__name__ in _ACTIVATIONS
    return user.op == "call_function" and getattr(user.target, "__name__", "") in ("relu", "relu6")


def prepare(model, example_inputs=None, *, weights: str = "int8:per-channel", activations: str = "int8:per-tensor:asym"):
    """A copy of ``model`` with the compiler's fake quantization (see the module docstring);
    ``calibrate`` it before training."""
    import copy

    import torch.fx

    weight_fmt, act_fmt = QFormat.parse(weights), QFormat.parse(activations)
    if weight_fmt.granularity != "per-channel" or not weight_fmt.symmetric:
        raise UserError(f"qat: weights must be symmetric per-channel (got {weight_fmt})")
    if act_fmt.granularity != "per-tensor" or act_fmt.bits != 8:
        raise UserError(f"qat: activations must be 8-bit per-tensor (got {act_fmt})")
    torch = _torch()
    try:
        traced = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError, AttributeError) as exc:  # data-dependent control flow
        raise UserError(f"qat: cannot trace {type(model).__name__} with torch.fx: {str(exc).splitlines()[0]}") from None
    _fold_batchnorm(traced)
    modules = dict(traced.named_modules())
    count = 0
    graph = traced.graph
    for node in list(graph.nodes):
        if node.op == "output" or node.op == "get_attr":
            continue
        if node.op != "placeholder" and (_is_movement(node, modules) or _fused_into_activation(node, modules)):
            continue
        quantizer_name = f"qat_activation_{count}"
        count += 1
        traced.add_submodule(quantizer_name, _activation_quantizer(act_fmt))
        with graph.inserting_after(node):
            quantized = graph.call_module(quantizer_name, (node,))
        node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
    graph.lint()
    traced.recompile()
    for module in modules.values():  # after placement: parametrizing changes the module classes
        if _is_linear(module):
            torch.nn.utils.parametrize.register_parametrization(module, "weight", _weight_quantizer(weight_fmt))
    traced.qat_weight_format = str(weight_fmt)
    return traced


def _activation_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "ActivationFakeQuant"]


def calibrate(model, batches) -> None:
    """Set every activation quantizer's range to the min/max over ``batches`` (each an input
    tensor or a tuple of them), in eval mode, then freeze it."""
    torch = _torch()
    quantizers = _activation_modules(model)
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.observing = True
    try:
        with torch.no_grad():
            for batch in batches:
                model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        for q in quantizers:
            q.observing = False
        model.train(was_training)


def _quantized_weights(model) -> list:
    """``(float weight on its grid, integers, per-channel scale)`` of every quantized layer."""
    torch = _torch()
    found = []
    for module in model.modules():
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            with torch.no_grad():
                raw = module.parametrizations.weight.original
                quantizer = module.parametrizations.weight[0]
                scale = quantizer.scale(raw)
                grid = module.weight.detach().numpy().astype("float32")
                ints = torch.round(raw / scale).clamp(quantizer.qmin, quantizer.qmax).numpy()
            found.append((grid, ints, scale.reshape(-1).numpy().astype("float32")))
    return found


def export(model, example_inputs, *, input_names=None, output_names=None):
    """The trained model as a fake-quant IR model for ``qcompiler.compile`` (no calibration):
    ``from_torch`` of the model with every activation quantizer as a Q/DQ pair, and every
    quantized layer's weight as ``DequantizeLinear`` of its integers with the trained
    per-channel scales (the exporter folds a constant weight's fake quantization into a
    float constant; its integers are put back here, found by value)."""
    import copy

    import numpy as np

    from .graph import NameFactory, const_array
    from .passes.weight_quant import dequantize_node
    from .quant import QuantizedTensor, storage_dtype
    from .torch_import import from_torch

    torch = _torch()
    weights = _quantized_weights(model)
    fmt = QFormat.parse(getattr(model, "qat_weight_format", "int8:per-channel"))
    plain = copy.deepcopy(model).eval()
    for module in list(plain.modules()):
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            torch.nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for q in _activation_modules(plain):
        scale, zero = q.params()
        q.forward = lambda x, s=scale, z=zero, lo=q.qmin, hi=q.qmax: torch.fake_quantize_per_tensor_affine(x, s, z, lo, hi)
    ir_model = from_torch(plain, example_inputs, input_names=input_names, output_names=output_names)
    names = NameFactory(ir_model.graph)
    placed = 0
    for node in list(ir_model.graph):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        value = const_array(node.inputs[1])
        if value is None:
            continue
        for grid, ints, scale in weights:
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _gemm_trans_b(node))
            expected = grid.reshape(grid.shape[0], -1).T if transposed else grid
            if value.shape == expected.shape and np.array_equal(value, expected):
                data = (ints.reshape(ints.shape[0], -1).T if transposed else ints).astype(storage_dtype(fmt.bits, True))
                tensor = QuantizedTensor(data, scale, np.zeros(scale.shape, data.dtype), axis=1 if transposed else 0)
                dq = dequantize_node(ir_model.graph, names, node.inputs[1].name or node.name, tensor)
                ir_model.graph.insert_before(node, dq)
                node.replace_input_with(1, dq.outputs[0])
                placed += 1
                break
    if placed != len(weights):
        raise UserError(f"qat: found {placed} of the {len(weights)} quantized weights in the export")
    if fmt.bits != 8:
        from .graph import ensure_opset

        ensure_opset(ir_model, 21)
    return ir_model


def _gemm_trans_b(node) -> bool:
    attr = node.attributes.get("transB")
    return attr is not None and attr.as_int() == 1


__all__ = ["calibrate", "export", "fake_quantize", "prepare"]
