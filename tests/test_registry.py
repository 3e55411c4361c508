import importlib
import os
import sys
from pathlib import Path

import pytest

from backdoorlab import registry
from backdoorlab.attacks import ATTACKS
from backdoorlab.data import DATASETS
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import MODELS
from backdoorlab.registry import PLUGINS_ENV, Registry, discover, load_plugins, plugin_names, plugins


def test_unknown_name_lists_known():
    with pytest.raises(BackdoorLabError, match="known: .*badnets"):
        ATTACKS.create("nope")
    with pytest.raises(BackdoorLabError, match="mnist5k"):
        DATASETS.get("imagenet")
    with pytest.raises(BackdoorLabError, match="cnn"):
        MODELS.get("resnet9000")


def test_unknown_and_invalid_parameters_name_the_key():
    with pytest.raises(BackdoorLabError, match=r"attack\.sizee: unknown parameter"):
        ATTACKS.build("badnets", {"sizee": 2}, where="attack")
    with pytest.raises(BackdoorLabError, match=r"attack\.rate|attack\.value"):
        ATTACKS.build("badnets", {"value": 2.0}, where="attack")


def test_register_twice_and_create():
    r: Registry[object] = Registry("thing")

    @r.register("a", "an a")
    class A:
        def __init__(self, n: int = 1):
            self.n = n

    assert r.create("a", n=4).n == 4
    assert r.names() == ["a"] and "a" in r and r.get("a").description == "an a"
    with pytest.raises(RuntimeError):
        r.register("a")(A)


def test_registries_have_the_foundation_entries():
    assert {"mnist5k", "digits", "mnist", "cifar10", "gtsrb", "npz", "folder"} <= set(DATASETS.names())
    assert {"cnn", "vgg-small", "preact-resnet18"} <= set(MODELS.names())
    assert "badnets" in ATTACKS


# ----------------------------------------------------------------------------- discovery and plugins
def _package(root: Path, name: str, files: dict[str, str]) -> None:
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.fixture
def forget(monkeypatch):
    """Forget the modules a test imports from its temporary folder."""
    names: list[str] = []
    yield names
    for m in list(sys.modules):
        if any(m == n or m.startswith(n + ".") for n in names):
            del sys.modules[m]
    importlib.invalidate_caches()


def test_builtin_packages_import_every_module_of_their_folder():
    import backdoorlab.attacks
    import backdoorlab.data
    import backdoorlab.defenses
    import backdoorlab.models

    for pkg in (backdoorlab.attacks, backdoorlab.defenses, backdoorlab.models, backdoorlab.data):
        for f in Path(pkg.__file__).parent.glob("*.py"):
            if not f.name.startswith("_"):
                assert f"{pkg.__name__}.{f.stem}" in sys.modules, f"{f} was not imported by {pkg.__name__}"
    assert {"input-aware", "pruning-aware", "wanet"} <= set(ATTACKS.names())
    from backdoorlab.defenses import DEFENSES

    assert {"abl", "bias-maps", "pairwise", "pattern-subtraction", "strip", "pruning"} <= set(DEFENSES.names())


def test_discover_walks_a_package_in_order_and_skips_private_names(tmp_path, monkeypatch, forget):
    forget.append("walkpkg_t")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = "from backdoorlab.registry import Registry\nR = Registry('thing')\nORDER = []\n"
    rec = "from walkpkg_t.base import R, ORDER\nORDER.append(__name__)\nR.register({n!r})(lambda: {n!r})\n"
    _package(tmp_path, "walkpkg_t", {"base.py": reg, "b_one.py": rec.format(n="one"), "a_two.py": rec.format(n="two"),
                                     "sub/__init__.py": "", "sub/deep.py": rec.format(n="deep"),
                                     "_private.py": "raise RuntimeError('a private module is not imported')"})
    names = discover("walkpkg_t")
    assert names == ["walkpkg_t.a_two", "walkpkg_t.b_one", "walkpkg_t.base", "walkpkg_t.sub", "walkpkg_t.sub.deep"]
    base = sys.modules["walkpkg_t.base"]
    assert base.R.names() == ["deep", "one", "two"] and base.ORDER == names[:2] + names[-1:]
    assert discover("walkpkg_t") == names and base.R.names() == ["deep", "one", "two"]  # idempotent
    assert discover("backdoorlab.errors") == []  # a plain module: nothing to walk


def test_env_plugins_load_lazily_once_and_follow_the_variable(tmp_path, monkeypatch, forget):
    forget += ["envplug_a_t", "envplug_b_t"]
    monkeypatch.syspath_prepend(str(tmp_path))
    count = "import builtins\nbuiltins.__dict__.setdefault('_bdl_plug_t', []).append(__name__)\n"
    _package(tmp_path, "envplug_a_t", {"one.py": count, "two.py": count})
    (tmp_path / "envplug_b_t.py").write_text(count)
    import builtins

    monkeypatch.setattr(builtins, "_bdl_plug_t", [], raising=False)
    monkeypatch.setenv(PLUGINS_ENV, " envplug_a_t , envplug_b_t,envplug_a_t")
    assert plugin_names() == ["envplug_a_t", "envplug_b_t"]
    assert "envplug_a_t" not in sys.modules  # nothing happens before a registry is used
    assert "badnets" in ATTACKS  # the first lookup loads them (a package is walked)
    assert sorted(builtins._bdl_plug_t) == ["envplug_a_t.one", "envplug_a_t.two", "envplug_b_t"]
    ATTACKS.names(), MODELS.get("cnn"), DATASETS.names()
    assert len(builtins._bdl_plug_t) == 3  # once
    assert {"envplug_a_t", "envplug_b_t"} <= set(plugins())
    monkeypatch.setenv(PLUGINS_ENV, "")
    assert "badnets" in ATTACKS


def test_a_plugin_that_fails_to_import_names_the_module_and_the_error(tmp_path, monkeypatch, forget):
    forget.append("badplug_t")
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "badplug_t", {"fine.py": "", "broken.py": "import no_such_dependency_t\n"})
    monkeypatch.setenv(PLUGINS_ENV, "no_such_plugin_t")
    with pytest.raises(BackdoorLabError, match=r"plugin 'no_such_plugin_t' \(named in \$BACKDOORLAB_PLUGINS=.*\) "
                                                r"failed to import: ModuleNotFoundError"):
        ATTACKS.get("badnets")
    with pytest.raises(BackdoorLabError, match="no_such_plugin_t"):  # again at the next lookup, until fixed
        ATTACKS.names()
    monkeypatch.setenv(PLUGINS_ENV, "badplug_t")
    with pytest.raises(BackdoorLabError, match=r"module 'badplug_t.broken' of plugin 'badplug_t' .* "
                                                r"ModuleNotFoundError: No module named 'no_such_dependency_t'"):
        load_plugins()
    monkeypatch.setenv(PLUGINS_ENV, "")
    assert "badnets" in ATTACKS  # fixed


def test_entry_point_plugins(tmp_path, monkeypatch, forget):
    forget.append("epplug_t")
    dist = tmp_path / "epplug_t-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epplug-t\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[backdoorlab.plugins]\nmine = epplug_t.hook:register\n")
    _package(tmp_path, "epplug_t", {"hook.py": "CALLS = []\ndef register():\n    CALLS.append(1)\n",
                                    "methods.py": "LOADED = True\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins()
    assert "epplug_t.hook" in plugins() and sys.modules["epplug_t.hook"].CALLS == [1]
    load_plugins()
    ATTACKS.names()
    assert sys.modules["epplug_t.hook"].CALLS == [1]  # loaded and called once


def test_plugins_documented():
    doc = registry.__doc__
    assert PLUGINS_ENV in doc and registry.ENTRY_POINT_GROUP in doc and "discover" in doc
    assert os.environ.get(PLUGINS_ENV, "") == ""  # the tests above left the environment alone
