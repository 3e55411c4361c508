"""Training and evaluation over in-memory tensors.

``train(model, data, cfg)`` runs plain supervised training with the :class:`TensorLoader`
(SGD or Adam, cosine / step / constant schedule, weight decay, optional label smoothing,
batch-level augmentation) and returns a :class:`History`. Deterministic given ``cfg.seed``
(and the thread count). Progress goes to callbacks; the library itself is silent.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from backdoorlab.data.loader import Augment, TensorLoader
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Training hyper-parameters (validated; used as the ``train`` section of experiment YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(4, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant", "linear"] = "cosine"
    step_size: int = Field(30, ge=1, description="epochs between lr drops (x0.1) for schedule 'step'")
    warmup: float = Field(0.3, ge=0, le=100, description="epochs of linear learning-rate warm-up from 0 (0: none; without it "
                          "the small CNN at lr 0.05 can collapse to one class, e.g. blend on full MNIST)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    crop_padding: int = Field(0, ge=0, description="random crop after this many zero pixels of padding (0: off)")
    flip: bool = Field(False, description="random horizontal flip (never for digits or signs)")
    channels_last: bool = Field(True, description="channels_last memory format (2-3x faster convolutions on CPU)")
    eval_batch_size: int = Field(1024, ge=1)
    decoupled_weight_decay: bool = Field(False, description="weight decay as a per-step shrink by weight_decay x the "
                                         "schedule's factor, whatever the learning rate (airbench's convention)")
    lookahead: bool = Field(False, description="airbench's lookahead: every 5 steps an EMA of the weights (decay "
                            "0.95^5 x progress^3) is copied back; the final weights are the EMA")
    autocast: Literal["off", "auto", "bf16"] = Field("off", description="bfloat16 autocast of the training forward "
                                                     "pass: auto = where the CPU runs bf16 natively (AMX / AVX-512 BF16)")

    def at_lr(self, lr: float, **update) -> "TrainConfig":
        """This config at learning rate ``lr`` (and ``update``). A decoupled decay is a per-step shrink
        sized for this config's rate; it scales with the new rate, as a decay tied to the rate would
        (kept as is, a recipe's 0.2% per step swamps a 3,000x smaller fine-tuning rate: docs/abl.md)."""
        if self.decoupled_weight_decay:
            update.setdefault("weight_decay", self.weight_decay * lr / self.lr)
        return self.model_copy(update={**update, "lr": lr})


def checked_train_config(where: str, settings: dict) -> TrainConfig:
    """``TrainConfig(**settings)``, its validation errors as one :class:`BackdoorLabError` naming ``where``
    (a method's recipe option, e.g. ``"abl: recipe"``)."""
    try:
        return TrainConfig(**settings)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BackdoorLabError(f"{where} is not a valid train section ({problems}); its keys are those of an "
                               "experiment's train section (backdoorlab.train.TrainConfig)") from None


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    lr: float
    seconds: float
    images_per_second: float


@dataclass
class History:
    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)

    def as_dict(self) -> dict:
        return {"epochs": [e.__dict__ for e in self.epochs], "seconds": self.seconds}


class Callback(Protocol):
    def __call__(self, event: str, **info) -> None: ...


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _memory_format(model: nn.Module, on: bool) -> torch.memory_format:
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if on and has_conv else torch.contiguous_format


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled rate ``lr`` on every group, times the group's ``lr_scale`` (see :func:`make_optimizer`)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model: nn.Module, cfg: TrainConfig, params=None) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``. A model with ``param_groups()`` (dicts of ``params`` and
    ``lr_scale``) gets one group each; the trainer multiplies the scheduled rate by ``lr_scale``.
    With ``decoupled_weight_decay`` a group's decay is ``weight_decay / (lr x lr_scale)``, so that
    the step shrinks the weights by ``weight_decay`` x the schedule's factor in every group."""
    if params is None and hasattr(model, "param_groups") and callable(model.param_groups):
        groups = [dict(g) for g in model.param_groups() if g["params"]]
    else:
        groups = [{"params": list(model.parameters()) if params is None else list(params), "lr_scale": 1.0}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        wd = cfg.weight_decay / (cfg.lr * g["lr_scale"]) if cfg.decoupled_weight_decay else cfg.weight_decay
        g["weight_decay"] = wd
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def bf16_autocast_supported() -> bool:
    """True where oneDNN runs bfloat16 natively (AMX or AVX-512 BF16) and is allowed to (an
    ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` below that turns it off: bf16 would then be
    emulated, slower than fp32)."""
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX"))
    except (AttributeError, RuntimeError):  # an older torch or a build without oneDNN
        return False


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training run (None: fp32)."""
    if cfg.autocast == "off" or device.type != "cpu":
        return None
    if cfg.autocast == "bf16" or bf16_autocast_supported():
        return torch.bfloat16
    log.info("autocast auto: this CPU has no native bfloat16; training in float32")
    return None


class Lookahead:
    """airbench's lookahead: every ``every`` steps the slow weights (an EMA of the float state)
    move toward the fast ones with decay ``0.95^every x (step / total)^3`` and are copied back."""

    def __init__(self, model: nn.Module, every: int = 5) -> None:
        self.every = every
        self.fast = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.fast]

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        if step % self.every and step != total:
            return
        decay = 1.0 if step == total else 0.95 ** self.every * (step / total) ** 3
        torch._foreach_lerp_(self.slow, self.fast, 1.0 - decay)
        torch._foreach_copy_(self.fast, self.slow)


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    warm = cfg.warmup * steps_per_epoch
    if warm > 0 and step < warm:
        return _scheduled(cfg, step, total_steps, steps_per_epoch) * (step + 1) / warm
    return _scheduled(cfg, step, total_steps, steps_per_epoch)


def _scheduled(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / max(1, total_steps)))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** ((step // max(1, steps_per_epoch)) // cfg.step_size))
    if cfg.schedule == "linear":  # flat during the warm-up, then down to 0 at the end
        warm = cfg.warmup * steps_per_epoch
        return cfg.lr if step < warm else cfg.lr * max(0.0, (total_steps - step) / max(1.0, total_steps - warm))
    return cfg.lr


def train(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    callbacks: tuple[Callback, ...] = (),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    transform=None,
    transform_first: bool = False,
) -> History:
    """Train ``model`` in place on ``data``; returns the per-epoch :class:`History`.

    ``transform(x, y, idx) -> (x, y)`` (optional) edits each float batch after augmentation, or
    before it with ``transform_first`` (training-time attacks use it). ``loss_fn`` defaults to cross-entropy with ``cfg.label_smoothing``.
    """
    if len(data) == 0:
        raise BackdoorLabError("cannot train on an empty data set")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    device = model_device(model)
    fmt = _memory_format(model, cfg.channels_last)
    model.to(memory_format=fmt)
    loader = TensorLoader(data.x, data.y, cfg.batch_size, shuffle=True, generator=g,
                          augment=Augment(cfg.crop_padding, cfg.flip), transform=transform,
                          transform_first=transform_first)
    if hasattr(model, "init_from_data") and callable(model.init_from_data):  # data-dependent init (fastnet's
        # whitening); the model does it once only, so fine-tuning a trained model keeps it
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:5000]
        model.init_from_data(data.float_batch(idx).to(device))
    opt = make_optimizer(model, cfg)
    amp = autocast_dtype(cfg, device)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
    steps_per_epoch = len(loader)
    total = steps_per_epoch * cfg.epochs
    hist = History()
    step = 0
    lookahead = Lookahead(model) if cfg.lookahead else None
    for cb in callbacks:
        cb("train_start", total_steps=total, epochs=cfg.epochs)
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        seen = 0
        for xb, yb in loader:
            lr = lr_at(cfg, step, total, steps_per_epoch)
            set_lr(opt, lr)
            xb = xb.to(device, non_blocking=True).contiguous(memory_format=fmt)
            yb = yb.to(device, non_blocking=True)
            if amp is None:
                logits = model(xb)
                loss = loss_fn(logits, yb)
            else:
                with torch.autocast(device.type, dtype=amp):
                    logits = model(xb)
                logits = logits.float()
                loss = loss_fn(logits, yb)
            if not torch.isfinite(loss):
                raise BackdoorLabError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if lookahead is not None:
                lookahead.step(step + 1, total)
            with torch.no_grad():
                loss_sum += loss.detach().double() * yb.shape[0]
                correct += (logits.argmax(1) == yb).sum()
            seen += yb.shape[0]
            step += 1
            for cb in callbacks:
                cb("step", step=step, total_steps=total, epoch=epoch)
        dt = time.perf_counter() - t0
        stats = EpochStats(epoch + 1, float(loss_sum) / seen, int(correct) / seen, lr, dt, seen / dt)
        hist.epochs.append(stats)
        log.info("epoch %d/%d loss %.4f acc %.4f (%.1fs, %.0f img/s)", epoch + 1, cfg.epochs,
                 stats.loss, stats.train_accuracy, dt, stats.images_per_second)
        for cb in callbacks:
            cb("epoch_end", stats=stats)
    model.eval()
    return hist


@torch.no_grad()
def recalibrate_bn(net: nn.Module, data: ImageSet, *, n: int | None = None, batch_size: int = 256, seed: int = 0) -> int:
    """Re-estimate the batch-norm running statistics of ``net`` on ``n`` images of ``data`` (all if
    None; a seeded random subset otherwise) as a cumulative average, no augmentation, and leave it in
    eval mode; torch.optim.swa_utils.update_bn does the same over a DataLoader. For weights that moved
    since the statistics were averaged (a generator trained quickly, a model fine-tuned on few images
    with a high batch-norm momentum). Returns the number of layers re-estimated (0: no batch norm, e.g. a
    TorchScript model, whose modules are not ``nn`` batch norms)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    idx = torch.arange(len(data)) if n is None else torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    device = model_device(net)
    net.train()
    try:
        for s in range(0, idx.numel(), batch_size):
            net(data.float_batch(idx[s:s + batch_size]).to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        net.eval()
    return len(bns)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, K) for uint8 (N, C, H, W) or float [0, 1] images, in batches, on the model's device."""
    model.eval()
    device = model_device(model)
    fmt = _memory_format(model, True)
    outs = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
        outs.append(model(xb.to(device).contiguous(memory_format=fmt)).float().cpu())
    if not outs:
        return torch.empty(0, 0)
    logits = torch.cat(outs)
    if not torch.isfinite(logits).all():
        raise BackdoorLabError("the model produced NaN or infinite logits; check the model file and input range [0, 1]")
    return logits


def predict(model: nn.Module, data: ImageSet | torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels (N,) int64."""
    x = data.x if isinstance(data, ImageSet) else data
    return predict_logits(model, x, batch_size).argmax(1)


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> float:
    """Accuracy of ``model`` on ``data`` (labels as given: for a triggered set this is the ASR)."""
    from backdoorlab.metrics import accuracy

    return accuracy(predict(model, data, batch_size), data.y)
