"""The one place that says which operators qcompiler accepts.

The importer refuses any node outside :data:`SUPPORTED_OPS`; the ONNX conformance
test (``tests/test_onnx_conformance.py``) runs every ONNX node test built only
from these ops through the importer and the reference interpreter.
``If``/``Loop``/``Scan`` and ``LSTM``/``GRU``/``RNN`` are accepted here and specialised
or unrolled at import (:mod:`qcompiler.specialize`).
"""

from __future__ import annotations

import onnx.defs

#: Domain of qcompiler's own integer operators (Requantize, IntSoftmax, ...).
QC_DOMAIN = "qcompiler"
QC_DOMAIN_VERSION = 1

#: Oldest default-domain opset we import directly; older models are upgraded to it.
MIN_OPSET = 13
#: Newest default-domain opset: whatever the installed ``onnx`` knows.
MAX_OPSET = onnx.defs.onnx_opset_version()

_DEFAULT_DOMAIN_OPS = """
Abs Acos Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization BitShift Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvInteger ConvTranspose
Cos CumSum DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu
Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GRU
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid
HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LpNormalization LSTM MatMul MatMulInteger Max MaxPool Mean Min Mish Mod
Mul Neg Not Or Pad Pow PRelu QLinearConv QLinearMatMul QuantizeLinear Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize RMSNormalization RNN Round Scan ScatterElements ScatterND Selu Shape Sigmoid Sign Sin
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
"""

#: Standard (default-domain) op types the importer accepts. Integer ops (the ``qcompiler``
#: domain and plugins' domains) are whatever :mod:`qcompiler.integer` has registered.
SUPPORTED_OPS: dict[str, frozenset[str]] = {"": frozenset(_DEFAULT_DOMAIN_OPS.split())}



