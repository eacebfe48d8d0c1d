"""Discover passes and targets through entry points (built-ins use the same groups).

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."qcompiler.passes"]
    my-pass = "my_package.module:MyPass"

A plugin that fails to import is an error naming the entry point, never skipped.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from .errors import UserError

PASS_GROUP = "qcompiler.passes"
TARGET_GROUP = "qcompiler.targets"


class PluginError(UserError):
    """An installed plugin could not be loaded."""


def _load(group: str, base: type) -> dict[str, type]:
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


@functools.cache
def load_passes() -> dict[str, type]:
    from .pipeline import Pass

    return _load(PASS_GROUP, Pass)


@functools.cache
def load_targets() -> dict[str, type]:
    from .target import Target

    return _load(TARGET_GROUP, Target)
