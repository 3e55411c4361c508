import numpy as np
import pytest
import torch

from backdoorlab.data import DATASETS, Augment, TensorLoader, load_source, make_splits, random_crop, to_imageset
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

from conftest import SHARED_DATA


def test_mnist5k_embedded():
    raw = load_source("mnist5k")
    assert raw.train.x.shape == (5000, 1, 28, 28) and raw.train.x.dtype == torch.uint8
    assert raw.train.class_counts().tolist() == [500] * 10 and raw.test is None


def test_digits():
    raw = load_source("digits")
    assert raw.train.shape == (1, 8, 8) and raw.train.num_classes == 10 and int(raw.train.x.max()) == 255


def test_to_imageset_shapes_and_errors():
    s = to_imageset(np.zeros((4, 5, 6, 3), np.uint8), np.array([0, 1, 2, 1]), name="t")
    assert s.x.shape == (4, 3, 5, 6) and s.num_classes == 3
    with pytest.raises(BackdoorLabError, match="uint8"):
        to_imageset(np.zeros((4, 5, 6), np.float32), np.zeros(4, int), name="t")
    with pytest.raises(BackdoorLabError, match="one label per image"):
        to_imageset(np.zeros((4, 5, 6), np.uint8), np.zeros(3, int), name="t")
    with pytest.raises(BackdoorLabError, match=r"\(N,H,W\)"):
        to_imageset(np.zeros((4, 5, 6, 7), np.uint8), np.zeros(4, int), name="t")
    with pytest.raises(BackdoorLabError, match="0..2"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), 3)


def test_npz_source(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    raw = load_source("npz", path=str(tmp_path / "a.npz"))
    assert raw.train.x.shape == (30, 1, 8, 8) and raw.test is None and raw.train.num_classes == 3
    np.savez(tmp_path / "b.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    raw = load_source("npz", path=str(tmp_path / "b.npz"))
    assert len(raw.test) == 6
    np.savez(tmp_path / "c.npz", images=x)
    with pytest.raises(BackdoorLabError, match=r"missing key\(s\) \['x', 'y'\]"):
        load_source("npz", path=str(tmp_path / "c.npz"))
    with pytest.raises(BackdoorLabError, match="file not found"):
        load_source("npz", path=str(tmp_path / "nope.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(BackdoorLabError, match="is a text file, not an .npz file"):
        load_source("npz", path=str(tmp_path / "bad.npz"))


def test_folder_source(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    raw = load_source("folder", path=str(tmp_path), image_size=8)
    assert raw.train.x.shape == (6, 3, 8, 8) and raw.train.class_names == ("cat", "dog")


def test_missing_torchvision_files_name_what_is_expected(tmp_path):
    with pytest.raises(BackdoorLabError, match="MNIST/raw"):
        load_source("mnist", root=str(tmp_path))
    with pytest.raises(BackdoorLabError, match="cifar-10-batches-py"):
        load_source("cifar10", root=str(tmp_path))


def test_splits_stratified_disjoint_deterministic():
    raw = load_source("mnist5k")
    s1 = make_splits(raw.train, None, seed=3)
    s2 = make_splits(raw.train, None, seed=3)
    assert s1.summary() == {"train": 3800, "test": 1000, "holdout": 200}
    assert s1.test.class_counts().tolist() == [100] * 10
    assert s1.holdout.class_counts().tolist() == [20] * 10
    assert torch.equal(s1.train.x, s2.train.x) and torch.equal(s1.holdout.y, s2.holdout.y)
    s3 = make_splits(raw.train, None, seed=4)
    assert not torch.equal(s1.test.x, s3.test.x)
    # disjoint: compare image bytes (all 5,000 mnist5k images are distinct)
    rows = lambda s: {bytes(r) for r in s.x.flatten(1).numpy()}
    assert not (rows(s1.train) & rows(s1.test)) and not (rows(s1.train) & rows(s1.holdout))
    small = make_splits(raw.train, None, seed=0, train_size=950, test_size=200)
    assert abs(len(small.train) - 950) <= 10 and len(small.test) == 200


def test_loader_covers_every_sample_once_per_epoch(tiny):
    ld = TensorLoader(tiny.x, torch.arange(len(tiny)), batch_size=7, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([yb for _, yb in ld])
    assert sorted(seen.tolist()) == list(range(len(tiny))) and len(ld) == 9
    xb, _ = next(iter(ld))
    assert xb.dtype == torch.float32 and 0 <= float(xb.min()) and float(xb.max()) <= 1


def test_random_crop_matches_manual_crop():
    x = torch.rand(5, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 5, (5,), generator=g)
    left = torch.randint(0, 5, (5,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, top[i]:top[i] + 6, left[i]:left[i] + 6])
    flipped = Augment(0, True)(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))


# --- the real data sets in ../shared/data, through the npz source -------------------------------
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (shared data sets not provided)")


@pytest.mark.parametrize("first", [False, True])
def test_loader_transform_runs_before_or_after_the_flips(first):
    """``transform_first``: the transform's output is augmented (a training-time attack's triggered images
    are flipped like any image); otherwise the transform sees augmented images and its edit stays put."""
    x = torch.zeros(64, 1, 4, 4, dtype=torch.uint8)

    def mark_left_column(xb, yb, idx):
        xb = xb.clone()
        xb[..., 0] = 1.0
        return xb, yb

    ld = TensorLoader(x, torch.zeros(64, dtype=torch.int64), batch_size=64, augment=Augment(0, True),
                      generator=torch.Generator().manual_seed(0), transform=mark_left_column, transform_first=first)
    xb, _ = next(iter(ld))
    left, right = xb[:, 0, :, 0].amin(1) == 1, xb[:, 0, :, -1].amin(1) == 1
    assert bool((left ^ right).all())  # one column marked per image, either way
    if first:
        assert 16 <= int(right.sum()) <= 48  # about half the images were flipped after the mark
    else:
        assert int(right.sum()) == 0


@needs_shared
def test_shared_mnist_npz():
    raw = load_source("npz", path=str(SHARED_DATA / "mnist" / "mnist.npz"))
    assert raw.train.x.shape == (60000, 1, 28, 28) and len(raw.test) == 10000
    assert raw.test.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    same = load_source("mnist", root=str(SHARED_DATA))
    assert torch.equal(same.test.x, raw.test.x)


@needs_shared
def test_shared_cifar10_and_gtsrb_npz():
    c = load_source("npz", path=str(SHARED_DATA / "cifar10" / "cifar10_train_subset_jpeg.npz"),
                    test_path=str(SHARED_DATA / "cifar10" / "cifar10_test_jpeg.npz"))
    assert c.train.x.shape == (10000, 3, 32, 32) and c.train.class_names[0] == "airplane" and len(c.test) == 10000
    g = load_source("gtsrb", root=str(SHARED_DATA))
    assert g.train.num_classes == 43 and g.train.x.shape == (3921, 3, 32, 32) and len(g.test) == 6315
