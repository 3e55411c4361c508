from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backdoorlab.types import ImageSet

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def tiny() -> ImageSet:
    """Synthetic 3-class grey 12x12 images, 20 per class."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (60, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(3).repeat_interleave(20)
    return ImageSet(x, y, 3, name="tiny")


@pytest.fixture
def tiny_rgb() -> ImageSet:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.arange(4).repeat_interleave(10)
    return ImageSet(x, y, 4, name="tiny-rgb")


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    """One results store shared by the tests that train (victims are cached there)."""
    return tmp_path_factory.mktemp("store")
