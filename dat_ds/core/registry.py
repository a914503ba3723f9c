"""Name -> factory registries (attacks, objectives, models, optimizers, compressors).

A duplicate name is a programming error; an unknown name is a user error that lists what exists.
Kinds with static names in ``core/names.py`` refuse a dat-ds registration missing there, so the
torch-free name lists the CLI validates with cannot drift from what is really registered.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from . import names as _names
from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, static: tuple[str, ...] | None = None):
        self.kind = kind
        self.static = static if static is not None else _names.STATIC.get(kind)
        self._items: dict[str, T] = {}

    def register(self, name: str, *, plugin: bool | None = None) -> Callable[[T], T]:
        """Register under ``name``. ``plugin`` (default: registered from outside the dat_ds package) may
        add a name missing from the static list; dat-ds's own names must be listed there."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            if self.static is not None and name not in self.static:
                outside = not str(getattr(obj, "__module__", "") or "").startswith("dat_ds.")
                if not (plugin if plugin is not None else outside):
                    raise KeyError(f"{self.kind} {name!r} is not listed in dat_ds/core/names.py; add it there")
                _names.PLUGINS.setdefault(self.kind, set()).add(name)
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(_names.unknown_message(self.kind, name, self._items)) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def builtin_names(self) -> list[str]:
        """The registered names that are not plugins (what ``core/names.py`` must list)."""
        plugins = _names.PLUGINS.get(self.kind, set())
        return sorted(n for n in self._items if n not in plugins)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
