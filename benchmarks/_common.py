"""Helpers shared by the benchmarks (not part of the library)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from backdoorlab.runtime import tune_allocator

tune_allocator()  # as the backdoorlab command and the grid workers do (src/backdoorlab/runtime.py)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BACKDOORLAB_SHARED", ROOT.parent / "shared" / "data"))


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu {platform.processor() or platform.machine()}")


def need_shared() -> Path:
    if not SHARED_DATA.is_dir():
        print(f"skipped: {SHARED_DATA} is absent (set BACKDOORLAB_SHARED)")
        sys.exit(0)
    return SHARED_DATA
