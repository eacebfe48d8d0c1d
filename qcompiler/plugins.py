"""Discover passes, targets and integer ops through entry points (built-ins use the same groups).

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."qcompiler.passes"]
    my-pass = "my_package.module:MyPass"

A plugin that fails to load is an error naming the entry point, never skipped. Entry
points are read when asked for (no process-wide cache): a registry is an ordinary object
(:class:`qcompiler.pipeline.PassRegistry`, :class:`qcompiler.target.TargetRegistry`).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import UserError

PASS_GROUP = "qcompiler.passes"
TARGET_GROUP = "qcompiler.targets"


class PluginError(UserError):
    """An installed plugin could not be loaded."""


def load_entry_points(group: str, base: type) -> dict[str, type]:
    """``name → class`` of every entry point of ``group``; each must be a ``base`` subclass
    whose ``name`` is the entry point's."""
    found: dict[str, type] = {}
    for ep in entry_points(group=group):
        source = f"entry point '{ep.name} = {ep.value}'"
        if ep.dist is not None:
            source += f" of package {ep.dist.name}"
        try:
            cls = ep.load()
        except Exception as exc:
            raise PluginError(f"{source} failed to load: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{source} is not a {base.__name__} subclass")
        if cls.name != ep.name:
            raise PluginError(f"{source}: the class is named '{cls.name}', the entry point '{ep.name}'")
        if ep.name in found and found[ep.name] is not cls:
            raise PluginError(f"{source}: another plugin already registered '{ep.name}'")
        found[ep.name] = cls
    return found
