import pytest
import torch

from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import MODELS, ModelSpec, build_model, load_model, save_model


@pytest.mark.parametrize("name,shape", [("cnn", (1, 28, 28)), ("cnn", (1, 8, 8)), ("vgg-small", (3, 32, 32)),
                                        ("preact-resnet18", (3, 32, 32))])
def test_forward_features_last_conv(name, shape):
    kw = {"width": 8} if name == "preact-resnet18" else {}
    m = build_model(ModelSpec(name, 7, shape, kw)).eval()
    x = torch.rand(3, *shape)
    out = m(x)
    assert out.shape == (3, 7)
    f = m.features(x)
    assert f.dim() == 2 and f.shape[0] == 3
    assert torch.allclose(m.head(f), out, atol=1e-5)
    assert isinstance(dict(m.named_modules())[m.last_conv], torch.nn.Conv2d)


def test_safetensors_roundtrip(tmp_path):
    m = build_model(ModelSpec("cnn", 10, (1, 28, 28))).eval()
    p = save_model(m, tmp_path / "w.safetensors")
    m2 = load_model(p, num_classes=10, input_shape=(1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(BackdoorLabError, match="11 classes"):
        load_model(p, num_classes=11)
    with pytest.raises(BackdoorLabError, match=r"\(3, 32, 32\)"):
        load_model(p, input_shape=(3, 32, 32))


def test_corrupt_and_foreign_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(BackdoorLabError, match="not a valid safetensors"):
        load_model(bad, num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(BackdoorLabError, match="not found"):
        load_model(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    m = build_model(ModelSpec("cnn", 10, (1, 28, 28)))
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(plain))
    with pytest.raises(BackdoorLabError, match="name the architecture"):
        load_model(plain)
    assert load_model(plain, arch="cnn", num_classes=10, input_shape=(1, 28, 28)) is not None
    with pytest.raises(BackdoorLabError, match="do not fit"):
        load_model(plain, arch="vgg-small", num_classes=10, input_shape=(1, 28, 28))


def test_torchscript_foreign_model(tmp_path):
    m = build_model(ModelSpec("cnn", 10, (1, 28, 28))).eval()
    ts = torch.jit.trace(m, torch.rand(2, 1, 28, 28))
    p = tmp_path / "m.pt"
    ts.save(str(p))
    fm = load_model(p, num_classes=10, input_shape=(1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(fm(x), m(x), atol=1e-5)
    with pytest.raises(BackdoorLabError, match="the model has 10 outputs but the data's labels name only 5 classes"):
        load_model(p, num_classes=5, input_shape=(1, 28, 28))
    with pytest.raises(BackdoorLabError, match="exposes no features"):
        fm.features(x)


def test_unknown_model_param():
    with pytest.raises(BackdoorLabError, match="model.depth"):
        MODELS.build("cnn", {"num_classes": 10, "input_shape": (1, 28, 28), "depth": 3}, where="model")


def test_tune_allocator_applies_once_and_can_be_switched_off():
    import subprocess
    import sys

    code = "from backdoorlab.runtime import tune_allocator as t; print(t(), t())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    env = {**__import__("os").environ, "BACKDOORLAB_TUNE_MALLOC": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert off == ["False", "False"]
    if sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc":
        assert on == ["True", "True"]


def test_cnn_pools_before_relu_with_the_same_outputs():
    """The CNN's max-pool-before-ReLU order computes exactly relu-then-pool (they commute)."""
    import torch

    from backdoorlab.models import MODELS

    torch.manual_seed(0)
    m = MODELS.create("cnn").eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        h = m.pool(m.act(m.conv1(m.norm(x))))
        ref = m.fc2(m.act(m.fc1(torch.flatten(m.pool(m.act(m.conv2(h))), 1))))
        assert torch.equal(m(x), ref)
