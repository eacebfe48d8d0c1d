"""Pipeline specs: typed options, canonical text that round-trips, helpful errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from qcompiler.errors import PipelineError
from qcompiler.pipeline import Pass, PassRegistry, Pipeline, default_registry, format_value, option


@dataclass(frozen=True)
class Demo(Pass):
    """A pass with one option of every supported type."""

    name = "demo"
    alpha: float = option(0.5, "a float")
    bits: int = option(8, "an int")
    method: Literal["minmax", "percentile"] = option("minmax", "a choice")
    enabled: bool = option(True, "a flag")
    label: str = option("x", "a string")
    names: tuple[str, ...] = option((), "a list")

    def run(self, model, ctx):
        return False


@dataclass(frozen=True)
class Other(Pass):
    """No options."""

    name = "other"

    def run(self, model, ctx):
        return False


REGISTRY = PassRegistry({"demo": Demo, "other": Other})


def parse(spec: str) -> Pipeline:
    return Pipeline.parse(spec, REGISTRY)


def test_options_are_typed():
    (p,) = parse("demo{alpha=0.25,bits=4,method=percentile,enabled=false,label=hello,names=a;b}").passes
    assert p == Demo(alpha=0.25, bits=4, method="percentile", enabled=False, label="hello", names=("a", "b"))


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("demo", "demo"),
        ("demo{alpha=0.5}", "demo"),  # defaults are dropped
        ("  demo { bits = 4 , alpha=1e-5 } , other ", "demo{alpha=1e-05,bits=4},other"),
        ("demo{names=only}", "demo{names=only;}"),
        ('demo{label="a,b {c}=d"}', 'demo{label="a,b {c}=d"}'),
        ('demo{label="say \\"hi\\""}', 'demo{label="say \\"hi\\""}'),
        ("demo{enabled=no,method=percentile},other,demo", "demo{method=percentile,enabled=false},other,demo"),
    ],
)
def test_canonical_round_trip(spec, canonical):
    pipeline = parse(spec)
    assert str(pipeline) == canonical
    assert parse(str(pipeline)) == pipeline  # str() parses back to an equal pipeline


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("dmeo", "unknown pass 'dmeo'; did you mean 'demo'?"),
        ("demo{alpah=0.1}", "has no option 'alpah'; did you mean 'alpha'?"),
        ("demo{bits=eight}", "expected an integer"),
        ("demo{method=percentil}", "did you mean 'percentile'?"),
        ("demo{enabled=maybe}", "expected true or false"),
        ("demo{alpha=0.1", "expected '}'"),
        ("demo,,other", "expected a pass name"),
        ("", "empty spec"),
        ("demo{alpha}", "expected '='"),
        ('demo{label="open}', "unterminated string"),
        ("demo{bits=1,bits=2}", "given twice"),
    ],
)
def test_errors_are_clear(spec, fragment):
    with pytest.raises(PipelineError) as info:
        parse(spec)
    assert fragment in str(info.value)


def test_format_value_quotes_only_when_needed():
    assert format_value("int8:per-channel") == "int8:per-channel"
    assert format_value("has space") == '"has space"'
    assert format_value(()) == '""'
    assert format_value(0.1) == "0.1"


def test_builtin_registry_comes_from_entry_points():
    registry = default_registry()
    for name in ("fold-constants", "eliminate-dead-code", "remove-identity", "fold-batchnorm", "quantize-weights"):
        assert name in registry
    spec = "fold-constants,remove-identity,quantize-weights{format=int4:per-group:64,keep_float=head*;}"
    assert str(Pipeline.parse(spec)) == spec


def test_invalid_option_value_checked_by_the_pass():
    with pytest.raises(PipelineError, match="bad quantization format"):
        Pipeline.parse("quantize-weights{format=int7}")
