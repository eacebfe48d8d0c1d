"""The built-in integer ops, one module each (importing this package registers them)."""

from . import elementwise, gelu, interpolate, layernorm, lookup, matmul, rmsnorm, softmax  # noqa: F401
