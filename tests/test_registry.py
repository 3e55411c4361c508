import pytest

from backdoorlab.attacks import ATTACKS
from backdoorlab.data import DATASETS
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import MODELS
from backdoorlab.registry import Registry


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
