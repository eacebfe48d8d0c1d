"""The built-in integer ops, one module each (importing this package registers them)."""

from . import elementwise, layernorm, lookup, matmul, softmax, gelu  # noqa: F401
