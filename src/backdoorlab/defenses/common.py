"""Helpers shared by defenses: per-class clean image selection and frozen-model evaluation."""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


def images_per_class(clean: ImageSet, n: int, generator: torch.Generator) -> torch.Tensor:
    """float (K, n', C, H, W): ``n' = min(n, smallest class count)`` random clean images of each class.

    Raises when a class has no clean image (naming it): a defense that reasons about every class
    cannot do without one.
    """
    counts = clean.class_counts()
    empty = [clean.class_names[c] for c in range(clean.num_classes) if int(counts[c]) == 0]
    if empty:
        raise BackdoorLabError(f"the clean set has no image of class(es) {', '.join(map(str, empty))}; "
                               "give a clean set with images of every class")
    m = min(n, int(counts.min()))
    if m < n:
        log.warning("using %d clean images per class (the smallest class has %d; %d asked)", m, m, n)
    out = []
    for c in range(clean.num_classes):
        idx = torch.nonzero(clean.y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)[:m]]
        out.append(clean.float_batch(idx))
    return torch.stack(out)


def check_model_matches(model: nn.Module, data: ImageSet) -> None:
    """The model must accept the data's image shape and output one logit per class."""
    k = getattr(model, "num_classes", None)
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(shape) != tuple(data.shape):
        raise BackdoorLabError(f"the model expects images of shape {tuple(shape)} (C,H,W) but the data has {data.shape}")
    if k is not None and k != data.num_classes:
        raise BackdoorLabError(f"the model has {k} outputs but the data has {data.num_classes} classes")


@contextmanager
def frozen(model: nn.Module):
    """Eval mode, no parameter gradients (input gradients only), and channels_last memory format for
    a model with convolutions (the format the defenses feed their inputs in: a contiguous model
    with channels_last inputs runs ~1.25x slower on CPU); restores the previous state, parameter
    tensors included. For read-only use: an in-place change to a parameter inside the block is
    made on the channels_last copy and is dropped on exit."""
    from backdoorlab.train import _memory_format

    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    datas = [p.data for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        model.to(memory_format=_memory_format(model, True))
    except (RuntimeError, TypeError, AttributeError):  # e.g. a TorchScript model: keep its format
        pass
    try:
        yield model
    finally:
        for p, f, d in zip(params, flags, datas):
            p.data = d
            p.requires_grad_(f)
        model.train(was_training)


def bf16_supported(model: nn.Module) -> bool:
    """True when ``model`` runs on a CPU whose oneDNN has native bfloat16 (AVX512-BF16 / AMX)."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_context(model: nn.Module, precision: str):
    """Autocast context for a defense's forward passes: ``"fp32"`` (none), ``"bf16"`` (CPU bfloat16
    autocast; an error where the CPU has no native bfloat16), ``"auto"`` (bf16 where native, else fp32).
    Patterns and losses stay in float32; only the model's matrix products run in bfloat16."""
    if precision == "fp32":
        return nullcontext()
    native = bf16_supported(model)
    if precision == "bf16" and not native:
        raise BackdoorLabError("precision 'bf16' needs a model on a CPU with native bfloat16 (AVX512-BF16 or AMX); "
                               "use precision 'fp32' or 'auto'")
    if not native:
        return nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def checked_logits(logits: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise BackdoorLabError("the model produced NaN or infinite logits; check the model file and input range [0, 1]")
    return logits
