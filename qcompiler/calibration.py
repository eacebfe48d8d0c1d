"""Calibration: statistics of every float activation, streamed over the calibration set.

For each tensor: exact min/max, an :class:`~qcompiler.histogram.AdaptiveHistogram`
(per tensor), per-channel min/max along the channel axis, and per-channel
histograms for the tensors that ask for them. Samples are processed one at a time,
so memory is bounded by the statistics, not the data, and results do not depend on
batching. Ranges for a quantization format come from :meth:`TensorStats.range` with
one of the methods: ``minmax``, ``percentile``, ``mse``, ``entropy``.

The model runs in onnxruntime when it holds only standard ONNX ops (graph
optimisations off so every intermediate keeps its name), else in the reference
interpreter.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from .histogram import AdaptiveHistogram, entropy_range, mse_range, percentile_range
from .passmanager import Analysis, PassContext
from .quant import QFormat

RANGE_METHODS = ("minmax", "percentile", "mse", "entropy")
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
_NCHW_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
             "GlobalMaxPool", "InstanceNormalization", "Resize", "DepthToSpace", "SpaceToDepth"}


@dataclasses.dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    channel_axis: int
    hist: AdaptiveHistogram
    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    channel_hist: AdaptiveHistogram | None = None

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float32)
        lo, hi = (float(value.min()), float(value.max())) if value.size else (0.0, 0.0)
        all_finite = math.isfinite(lo) and math.isfinite(hi)  # NaN or ±inf shows in the min or max
        finite = value if all_finite else value[np.isfinite(value)]
        if finite.size:
            if not all_finite:
                lo, hi = float(finite.min()), float(finite.max())
            self.min = min(self.min, lo)
            self.max = max(self.max, hi)
            self.hist.add(finite, lo, hi)
        self.count += value.size
        if value.ndim >= 1:
            moved = np.moveaxis(value, self.channel_axis, 0).reshape(value.shape[self.channel_axis], -1)
            safe = moved if all_finite else np.where(np.isfinite(moved), moved, 0.0)
            lo, hi = safe.min(axis=1), safe.max(axis=1)
            self.channel_min = lo if self.channel_min is None else np.minimum(self.channel_min, lo)
            self.channel_max = hi if self.channel_max is None else np.maximum(self.channel_max, hi)
            if self.channel_hist is not None:
                self.channel_hist.add(safe)

    def merge(self, other: TensorStats) -> None:
        """Add the statistics of other samples of the same tensor (exact, any order)."""
        self.count += other.count
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.hist.merge(other.hist)
        if other.channel_min is not None:
            self.channel_min = other.channel_min if self.channel_min is None else np.minimum(self.channel_min, other.channel_min)
            self.channel_max = other.channel_max if self.channel_max is None else np.maximum(self.channel_max, other.channel_max)
        if self.channel_hist is not None and other.channel_hist is not None:
            self.channel_hist.merge(other.channel_hist)

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if np.isfinite(self.min) else 0.0

    def channel_absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.channel_min), np.abs(self.channel_max))

    def range(self, method: str = "minmax", fmt: QFormat | None = None, percentile: float = 99.99) -> tuple[float, float]:
        """The per-tensor range ``(lo, hi)`` to quantize this tensor with ``fmt``."""
        fmt = fmt or QFormat()
        lo, hi = (self.min, self.max) if np.isfinite(self.min) else (0.0, 0.0)
        symmetric = fmt.symmetric
        if method == "minmax":
            if symmetric:
                return -self.absmax, self.absmax
            return lo, hi
        if method == "percentile":
            return percentile_range(self.hist, lo, hi, percentile, symmetric)
        if method == "mse":
            return mse_range(self.hist, lo, hi, fmt.bits, symmetric)
        if method == "entropy":
            one_sided = not symmetric and lo >= 0  # after ReLU/softmax: |x| is x, with 2^b levels
            _, amax = entropy_range(self.hist, lo, hi, fmt.bits + 1 if one_sided else fmt.bits)
            return (-amax, amax) if symmetric else (max(lo, -amax), min(hi, amax))
        raise ValueError(f"unknown range method {method!r}; methods are {', '.join(RANGE_METHODS)}")


def channel_axis_of(value: ir.Value) -> int:
    """NCHW tensors (read or written by conv-like ops) have channels on axis 1; others last."""
    rank = len(value.shape) if value.shape is not None else 0
    producer = value.producer()
    users = {use.node.op_type for use in value.uses()}
    if rank >= 3 and ((producer is not None and producer.op_type in _NCHW_OPS) or users & _NCHW_OPS):
        return 1
    return max(rank - 1, 0)


def activation_values(model: ir.Model) -> list[ir.Value]:
    """Float tensors computed from the inputs: graph inputs and node outputs (no constants)."""
    values = [v for v in model.graph.inputs if v.dtype in _FLOAT]
    for node in model.graph:
        if node.op_type == "Constant":
            continue
        values.extend(v for v in node.outputs if v.dtype in _FLOAT and v.const_value is None)
    return values


class _Runner:
    """Computes the named intermediates for one sample."""

    def __init__(self, model: ir.Model, names: list[str]):
        self.names = names
        self._session = None
        if all(node.domain in ("", "ai.onnx") for node in model.graph):
            self._session = self._ort_session(model, names)
        if self._session is None:
            from .interpreter import ReferenceInterpreter

            self._interpreter = ReferenceInterpreter(model)

    @staticmethod
    def _ort_session(model: ir.Model, names: list[str]):
        import onnxruntime as ort

        proto = ir.to_proto(model)
        existing = {o.name for o in proto.graph.output}
        for name in names:
            if name not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # an op ORT lacks: the reference interpreter handles everything we import
            return None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is not None:
            return dict(zip(self.names, self._session.run(self.names, feeds)))
        return self._interpreter.run(feeds, self.names)


@dataclasses.dataclass(frozen=True)
class ActivationStats(Analysis):
    """Statistics of every float activation over the calibration data (cached)."""

    name = "activation-stats"
    bins: int = 2048
    #: Tensors that also get per-channel histograms (for per-channel percentile/MSE).
    channel_histograms: frozenset[str] = frozenset()
    channel_bins: int = 256
    #: Use at most this many samples (None: all).
    max_samples: int | None = None

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[str, TensorStats]:
        data = ctx.require_calibration("calibration")
        layout = self.layout(model)
        stats = _empty_stats(layout)
        cluster = ctx.options.get("cluster")
        if cluster is not None and len(data) > 2 and cluster.workers > 1:
            return self._compute_on(cluster, model, data, layout)
        runner = _Runner(model, list(stats))
        for feeds in _progress(data, ctx, self.max_samples):
            for name, array in runner(feeds).items():
                stats[name].update(array)
        return stats

    def layout(self, model: ir.Model) -> dict[str, tuple]:
        """Per activation: ``(shape, channel axis, bins, channel bins or None, channels)``."""
        layout = {}
        for value in activation_values(model):
            axis = channel_axis_of(value)
            shape = tuple(int(d) if isinstance(d, int) else -1 for d in (value.shape or ()))
            channels = shape[axis] if shape and shape[axis] > 0 else 1
            layout[value.name] = (shape, axis, self.bins,
                                  self.channel_bins if value.name in self.channel_histograms else None, channels)
        return layout

    def _compute_on(self, cluster, model: ir.Model, data, layout) -> dict[str, TensorStats]:
        """The same statistics from shards of the samples on the cluster: the first sample
        here (it fixes every histogram's starting width), the rest in one shard per worker
        started at those widths, merged exactly (bit-identical to one process)."""
        from .cluster import shards

        samples = [feeds for feeds, _ in zip(data, range(self.max_samples or len(data)))]
        stats = _empty_stats(layout)
        first = _Runner(model, list(stats))(samples[0])
        for name, array in first.items():
            stats[name].update(array)
        widths = {name: (s.hist.width, s.channel_hist.width if s.channel_hist is not None else None)
                  for name, s in stats.items()}
        model_ref = cluster.put(ir.to_proto(model).SerializeToString())
        parts = shards(samples[1:], cluster.workers)
        jobs = [(i, [cluster.put(s) for s in part]) for i, part in enumerate(parts)]
        for shard in cluster.map(_shard_stats, jobs, model_ref, layout, widths):
            for name, other in shard.items():
                stats[name].merge(other)
        return stats


def _empty_stats(layout: dict[str, tuple], widths: dict | None = None) -> dict[str, TensorStats]:
    stats = {}
    for name, (shape, axis, bins, channel_bins, channels) in layout.items():
        width, channel_width = (widths or {}).get(name, (None, None))
        stats[name] = TensorStats(
            name, shape, axis, AdaptiveHistogram(bins, width=width),
            channel_hist=AdaptiveHistogram(channel_bins, channels, width=channel_width) if channel_bins else None,
        )
    return stats


def _shard_stats(job, model_bytes: bytes, layout: dict, widths: dict) -> dict[str, TensorStats]:
    """Statistics of one shard of samples (a cluster task)."""
    import ray

    from .cluster import fault_drill

    index, refs = job
    fault_drill("calibration", index)
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(model_bytes))
    stats = _empty_stats(layout, widths)
    runner = _Runner(model, list(stats))
    for feeds in ray.get(list(refs)):
        for name, array in runner(feeds).items():
            stats[name].update(array)
    return stats


def _progress(data, ctx: PassContext, limit: int | None) -> Iterator[dict[str, np.ndarray]]:
    total = len(data) if limit is None else min(limit, len(data))
    show = ctx.options.get("progress", False)
    iterator = iter(data)
    if show:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=total, desc="calibrating", unit="sample", file=sys.stderr, leave=False)
    for index, feeds in enumerate(iterator):
        if index >= total:
            break
        yield feeds
