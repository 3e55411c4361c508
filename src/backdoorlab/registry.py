"""Small name -> factory registries shared by the CLI, configs and the Python API.

>>> from backdoorlab.registry import Registry
>>> R: Registry[type] = Registry("widget")
>>> @R.register("box", "a box")
... class Box:
...     def __init__(self, size: int = 1): self.size = size
>>> R.create("box", size=3).size
3
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from backdoorlab.errors import BackdoorLabError, format_validation_error

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    description: str


class Registry(Generic[T]):
    """Maps a name to a factory (a class or a function) and a one-line description."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "") -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(name, factory, doc)
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise BackdoorLabError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def parameters(self, name: str) -> list[str]:
        """Names of the parameters the factory accepts."""
        sig = inspect.signature(self.get(name).factory)
        return [p for p in sig.parameters if p not in ("self",)]

    def create(self, name: str, /, **params: Any) -> T:
        """Build ``name`` with ``params``; unknown or invalid parameters are one clear error."""
        return self.build(name, params, where=f"{self.kind} {name!r}")

    def build(self, name: str, params: dict[str, Any], *, where: str) -> T:
        """Like :meth:`create`; error messages name keys as ``where.key`` (e.g. ``attack.size``)."""
        entry = self.get(name)
        known = self.parameters(name)
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise BackdoorLabError(
                f"{', '.join(f'{where}.{k}' for k in unknown)}: unknown parameter of {self.kind} {name!r}; "
                f"its parameters: {', '.join(known) or '(none)'}"
            )
        try:
            return entry.factory(**params)
        except BackdoorLabError:
            raise
        except (TypeError, ValueError) as exc:  # pydantic ValidationError is a ValueError
            raise BackdoorLabError(format_validation_error(exc, where)) from exc
