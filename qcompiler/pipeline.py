"""Passes, their typed options, and text pipelines that round-trip.

A pass is a frozen dataclass whose fields are its options::

    @dataclass(frozen=True)
    class SmoothQuant(Pass):
        "Migrate activation outliers into weights."
        name = "smooth-quant"
        alpha: float = option(0.5, "migration strength in [0, 1]")

        def run(self, model, ctx) -> bool: ...

A pipeline is text: ``fold-constants,smooth-quant{alpha=0.6},insert-fake-quant{bits=8}``.
``str(Pipeline.parse(spec))`` is the canonical spec: every pass with the options that
differ from their defaults, in declaration order; parsing it gives an equal pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from .errors import PipelineError
from .graph import STAGES
from .plugins import PASS_GROUP, load_entry_points

# -- passes and options -------------------------------------------------------------


def option(default: Any, help: str) -> Any:
    """Declare a pass option: its default and a one-line help text."""
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"help": help})


class Configurable:
    """A named thing with typed options (frozen dataclass fields): passes and targets."""

    #: Registered name used in specs (kebab-case).
    name: ClassVar[str] = ""

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        return [
            OptionSpec(f.name, hints[f.name], f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)
            if not f.name.startswith("_")
        ]

    def __str__(self) -> str:
        parts = []
        for spec in self.options():
            value = getattr(self, spec.name)
            if value != spec.default:
                parts.append(f"{spec.name}={format_value(value)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


@dataclasses.dataclass(frozen=True)
class Pass(Configurable):
    """Base class of every pass. Subclasses are frozen dataclasses; fields are options."""

    #: Stages the pass accepts as input.
    stages: ClassVar[tuple[str, ...]] = STAGES
    #: Stage the model is in after the pass (None: unchanged).
    produces: ClassVar[str | None] = None
    #: True if the pass keeps float outputs equal (up to rounding): the numeric-check
    #: instrument then reports max relative error; otherwise it reports SQNR.
    preserves_numerics: ClassVar[bool] = True
    #: Names of analyses that stay valid after this pass changes the model.
    preserves_analyses: ClassVar[frozenset[str]] = frozenset()
    #: Facts (:data:`qcompiler.qstate.FACTS`) the pass needs from the model or an earlier pass.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Facts the pass leaves in the model for later passes (and later compiles).
    provides: ClassVar[tuple[str, ...]] = ()

    def run(self, model, ctx) -> bool:  # pragma: no cover - abstract
        """Transform ``model`` in place; return True if anything changed."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any
    default: Any
    help: str

    def type_name(self) -> str:
        return _type_name(self.type)

    def parse(self, text: str) -> Any:
        return _coerce(text, self.type)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"{_type_name(typing.get_args(tp)[0])};..."
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}{_suggest(text, map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() == "none":
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(text, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(part, item) for part in text.split(";") if part != "")
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(text, 0)
        except ValueError:
            raise ValueError("expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if tp is str:
        return text
    raise TypeError(f"unsupported option type {tp!r}")


_BARE = re.compile(r'^[^,{}="\s]+$')


def format_value(value: Any) -> str:
    """Text of an option value that :func:`OptionSpec.parse` reads back to ``value``."""
    if isinstance(value, tuple):
        text = ";".join(_plain(v) for v in value) + (";" if len(value) == 1 else "")
    else:
        text = _plain(value)
    if _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "none"
    return str(value)


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


# -- registry ------------------------------------------------------------------------


class Registry:
    """Name -> class, for passes or targets (filled from entry points)."""

    kind = "item"
    error: type[Exception] = PipelineError

    def __init__(self, items: dict[str, type] | None = None):
        self._items: dict[str, type] = dict(items or {})

    def register(self, cls: type) -> type:
        if not cls.name:
            raise TypeError(f"{cls.__name__} has no 'name'")
        self._items[cls.name] = cls
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[type]:
        return iter(sorted(self._items.values(), key=lambda c: c.name))

    def get(self, name: str) -> type:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise self.error(
                f"unknown {self.kind} '{name}'{_suggest(name, self._items)} (known: {known})"
            ) from None


class PassRegistry(Registry):
    kind = "pass"


def default_registry() -> PassRegistry:
    """Every installed pass (built-ins and plugins, through the ``qcompiler.passes`` entry points)."""
    return PassRegistry(load_entry_points(PASS_GROUP, Pass))


# -- pipelines -----------------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    passes: list[Pass]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.passes + other.passes)

    @classmethod
    def parse(cls, spec: str, registry: PassRegistry | None = None) -> Pipeline:
        registry = registry or default_registry()
        return cls([_build_pass(item, registry, spec) for item in _Parser(spec).items()])


def _build_pass(item: tuple[str, list[tuple[str, str, int]], int], registry: Registry, spec: str) -> Configurable:
    name, raw_options, _ = item
    cls = registry.get(name)
    return build(cls, raw_options, registry.error)


def build(cls: type[Configurable], raw_options: list[tuple[str, str, int]], error: type[Exception] = PipelineError) -> Configurable:
    """Instantiate ``cls`` from ``(key, text, column)`` option triples, with clear errors."""
    name = cls.name
    specs = {o.name: o for o in cls.options()}
    values: dict[str, Any] = {}
    for key, text, _col in raw_options:
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise error(f"'{name}' has no option '{key}'{_suggest(key, specs)} (options: {known})")
        if key in values:
            raise error(f"'{name}': option '{key}' given twice")
        try:
            values[key] = specs[key].parse(text)
        except ValueError as exc:
            raise error(f"'{name}': option {key}={text!r}: {exc}") from None
    try:
        return cls(**values)
    except Exception as exc:  # a pass validating its options: every failure is the user's spec
        raise error(f"'{name}': {exc}") from None


class _Parser:
    """Tokenises ``name{k=v,...},name,...``; values may be double-quoted."""

    _NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
    error_class: type[Exception] = PipelineError

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, what: str) -> Exception:
        return self.error_class(f"spec: {what} at column {self.pos + 1} of {self.text!r}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = f"'{self.peek()}'" if self.peek() else "end of spec"
            raise self.error(f"expected '{char}', found {found}")
        self.pos += 1

    def name(self, what: str) -> str:
        self.skip_space()
        match = self._NAME.match(self.text, self.pos)
        if not match:
            found = f"'{self.peek()}'" if self.peek() else "end of spec"
            raise self.error(f"expected {what}, found {found}")
        self.pos = match.end()
        return match.group()

    def value(self) -> str:
        self.skip_space()
        if self.peek() == '"':
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                raise self.error("unterminated string")
            self.pos += 1
            return "".join(out)
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ',{}="' :
            self.pos += 1
        raw = self.text[start : self.pos].strip()
        if not raw:
            raise self.error("expected a value")
        return raw

    def items(self) -> list[tuple[str, list[tuple[str, str, int]], int]]:
        if not self.text.strip():
            raise self.error("empty spec")
        items = []
        while True:
            col = self.pos
            name = self.name("a pass name")
            options = []
            if self.peek() == "{":
                self.pos += 1
                if self.peek() != "}":
                    while True:
                        key_col = self.pos
                        key = self.name("an option name")
                        self.expect("=")
                        options.append((key, self.value(), key_col))
                        if self.peek() == ",":
                            self.pos += 1
                            continue
                        break
                self.expect("}")
            items.append((name, options, col))
            if self.peek() == "":
                return items
            self.expect(",")


def parse_pipeline(spec: str, registry: PassRegistry | None = None) -> Pipeline:
    return Pipeline.parse(spec, registry)


def parse_one(spec: str, registry: Registry) -> Configurable:
    """Parse a single ``name{k=v,...}`` item (e.g. a target spec)."""
    parser = _Parser(spec)
    parser.error_class = registry.error
    items = parser.items()
    if len(items) != 1:
        raise registry.error(f"expected one {registry.kind}, got {len(items)} in {spec!r}")
    return _build_pass(items[0], registry, spec)


def describe(cls: type[Configurable]) -> str:
    """Multi-line help: name, summary and options (for --list-passes / --list-targets)."""
    lines = [f"{cls.name}: {cls.summary()}"]
    for spec in cls.options():
        lines.append(
            f"    {spec.name}={format_value(spec.default)}  [{spec.type_name()}]  {spec.help}"
        )
    return "\n".join(lines)


