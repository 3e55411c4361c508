"""Name -> factory registries shared by the CLI, configs and the Python API, and how they are filled.

>>> from backdoorlab.registry import Registry
>>> R: Registry[type] = Registry("widget")
>>> @R.register("box", "a box")
... class Box:
...     def __init__(self, size: int = 1): self.size = size
>>> R.create("box", size=3).size
3

Where the entries come from (nobody lists modules by hand):

- **Built-in methods.** ``attacks/``, ``defenses/``, ``models/`` and ``data/`` call :func:`discover` on
  themselves in their ``__init__``: every module of the package is imported (``pkgutil``, recursively,
  in name order; modules and sub-packages whose name starts with ``_`` are skipped), and its
  ``@REGISTRY.register(name)`` decorators run. A new attack or defense is one file dropped in the
  folder.
- **Plugins** (methods defined outside the package, registered the same way: subclass the family base,
  decorate with ``@ATTACKS.register("name")`` / ``@DEFENSES.register("name")`` / ...):

  * the environment variable ``BACKDOORLAB_PLUGINS``: comma-separated module or package names,
    importable from ``sys.path`` / ``PYTHONPATH``; a package is walked like the built-ins, e.g.
    ``BACKDOORLAB_PLUGINS=myplugins,other.module backdoorlab list``;
  * the entry-point group ``backdoorlab.plugins`` of installed distributions, e.g. in a plugin's
    ``pyproject.toml``: ``[project.entry-points."backdoorlab.plugins"] mine = "mymethods"``. The value
    names a module or package (walked); ``"module:function"`` also calls ``function()``.

  Plugins are imported once, lazily, when any registry is first listed or looked up (``names``,
  ``get``, ``in``, iteration, ``create`` / ``build``): so ``backdoorlab list``, config validation, grid
  checks, the report and every grid worker (spawned processes and Ray tasks inherit the environment
  and look the methods up by name) all see them. A change of ``BACKDOORLAB_PLUGINS`` in a running
  process is picked up at the next lookup; :func:`load_plugins` loads eagerly (and rescans the entry
  points); :func:`plugins` lists what was loaded. A plugin that fails to import is one
  :class:`~backdoorlab.errors.BackdoorLabError` naming the module and the import error (raised again at
  each lookup until it is fixed).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Generic, Iterator, TypeVar

from backdoorlab.errors import BackdoorLabError, format_validation_error

T = TypeVar("T")

PLUGINS_ENV = "BACKDOORLAB_PLUGINS"
ENTRY_POINT_GROUP = "backdoorlab.plugins"


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
                old = self._entries[name].factory
                raise RuntimeError(f"{self.kind} {name!r} is registered twice: by {_where(old)} and by {_where(factory)}")
            doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(name, factory, doc)
            return factory

        return deco

    def names(self) -> list[str]:
        _ensure_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _ensure_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter([self._entries[n] for n in self.names()])

    def get(self, name: str) -> Entry[T]:
        _ensure_plugins()
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


def _where(factory: Any) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


# ----------------------------------------------------------------------------- discovery
def _walk(package: ModuleType, load: Callable[[str], ModuleType]) -> list[str]:
    """Import (with ``load``) every public module under ``package``, recursively, in name order."""
    out: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        name = f"{package.__name__}.{info.name}"
        module = load(name)
        out.append(name)
        if info.ispkg:
            out += _walk(module, load)
    return out


def discover(package: str | ModuleType) -> list[str]:
    """Import every module of ``package`` (recursively, in name order, skipping ``_private`` names) so
    their ``register`` decorators run; returns the module names. A plain module is just imported.

    Safe to call from the package's own ``__init__`` (the package is then partly initialised: import
    what its modules need from it, e.g. the base module, before calling this)."""
    global _discovering
    pkg = importlib.import_module(package) if isinstance(package, str) else package
    if not hasattr(pkg, "__path__"):
        return []
    _discovering += 1  # lookups while the built-ins import load no plugin (it would see a half-built package)
    try:
        return _walk(pkg, importlib.import_module)
    finally:
        _discovering -= 1


# ----------------------------------------------------------------------------- plugins
_lock = threading.RLock()
_loading_thread: int | None = None  # the thread importing plugins (its own lookups must not recurse)
_env_loaded: str | None = None  # the BACKDOORLAB_PLUGINS value last loaded completely
_entry_points_loaded = False
_loaded: dict[str, str] = {}  # plugin module -> where it was named
_called: set[str] = set()  # entry points "module:function" whose function ran
_discovering = 0  # > 0 while discover() imports a package's modules


def plugins() -> dict[str, str]:
    """The plugin modules loaded so far, each with where it was named (env var or entry point)."""
    return dict(_loaded)


def plugin_names(value: str | None = None) -> list[str]:
    """The module names in ``BACKDOORLAB_PLUGINS`` (or ``value``), in order, without duplicates."""
    raw = os.environ.get(PLUGINS_ENV, "") if value is None else value
    out: list[str] = []
    for part in raw.split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


def _ensure_plugins() -> None:
    if _discovering or _loading_thread == threading.get_ident():
        return  # a built-in or a plugin looks a registry up while it is imported
    if _entry_points_loaded and os.environ.get(PLUGINS_ENV, "") == _env_loaded:
        return
    load_plugins(rescan=False)


def _import_plugin(name: str, origin: str) -> ModuleType:
    """Import plugin ``name`` (and walk it when it is a package); a failure is one clear error."""

    def load(module: str) -> ModuleType:
        try:
            return importlib.import_module(module)
        except Exception as exc:
            what = f"plugin {name!r}" if module == name else f"module {module!r} of plugin {name!r}"
            raise BackdoorLabError(
                f"{what} (named in {origin}) failed to import: {type(exc).__name__}: {exc}"
            ) from exc

    module = load(name)
    if hasattr(module, "__path__"):
        _walk(module, load)
    _loaded.setdefault(name, origin)
    return module


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    seen: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(f"{ep.name}={ep.value}", ep)  # a distribution found twice on sys.path counts once
    return [seen[k] for k in sorted(seen)]


def load_plugins(rescan: bool = True) -> list[str]:
    """Import the plugins named by ``BACKDOORLAB_PLUGINS`` and the ``backdoorlab.plugins`` entry
    points (modules already imported are not imported again). ``rescan=False``: the entry points
    only the first time. Returns the plugin modules loaded so far."""
    global _loading_thread, _env_loaded, _entry_points_loaded
    with _lock:
        if _loading_thread == threading.get_ident():
            return list(_loaded)
        _loading_thread = threading.get_ident()
        try:
            env = os.environ.get(PLUGINS_ENV, "")
            for name in plugin_names(env):
                _import_plugin(name, f"${PLUGINS_ENV}={env}")
            _env_loaded = env
            if rescan or not _entry_points_loaded:
                for ep in _entry_points():
                    origin = f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP})"
                    _import_plugin(ep.module, origin)
                    if ep.attr and ep.value not in _called:
                        _called.add(ep.value)
                        try:
                            obj = ep.load()
                            if callable(obj):
                                obj()
                        except BackdoorLabError:
                            raise
                        except Exception as exc:
                            raise BackdoorLabError(f"plugin {ep.value!r} (named in {origin}) failed to load: "
                                                   f"{type(exc).__name__}: {exc}") from exc
                _entry_points_loaded = True
        finally:
            _loading_thread = None
        return list(_loaded)


__all__ = ["ENTRY_POINT_GROUP", "PLUGINS_ENV", "Entry", "Registry", "discover", "load_plugins", "plugin_names", "plugins"]
