"""RobustTrainer ``abl``: Anti-Backdoor Learning, a clean model trained on poisoned data.

Paper: Y. Li, X. Lyu, N. Koren, L. Lyu, B. Li, X. Ma, "Anti-Backdoor Learning: Training Clean
Models on Poisoned Data", NeurIPS 2021 (arXiv:2110.11571). Seed 003 (Rangaraju, Dulam, Gajula)
applies it to clean-label, SIG and input-aware attacks.

Backdoor samples are learned much faster than clean ones. ABL uses that twice:

1. **Isolation** (``isolation_epochs`` = T_iso): train with the local gradient ascent (LGA) loss
   ``sign(l - gamma) * l``: a loss below ``gamma`` is pushed back up, so clean samples hover near
   ``gamma`` while backdoor samples, learned faster, drop below it and stay lowest. Then the
   ``isolation_ratio`` (p, default 1%) lowest-loss training samples are isolated.
2. **Training on the rest** (``epochs - isolation_epochs`` more epochs, cross-entropy, cosine
   schedule) continues from the isolation model, without the isolated samples.
3. **Unlearning** (``unlearning_epochs``): the isolated samples are unlearned with a small
   learning rate, which breaks the trigger -> target correlation, while each step also descends
   on a batch of the rest (the paper's equation 5, ``E_rest[l] - E_isolated[l]``). Accuracy on the
   defender's clean held-out set is measured after every epoch; an epoch within ``tolerance`` of
   the accuracy before unlearning is kept (``keep``, below; epoch 0, no unlearning, at worst).

``train(model, data, *, clean=None, evaluate=None)`` trains ``model`` (freshly initialised,
modified in place and returned) on ``data`` (the possibly poisoned training set, no ground truth).
``clean`` is the defender's clean held-out set for the unlearning check (without it unlearning
runs all its epochs). ``evaluate(model)`` (optional) reports CA / ASR after each phase into
``phases``; it never changes what ABL does. The runner scores the isolation precision from
``isolated_indices`` afterwards; ABL never sees which samples are poisoned.

Deviations, and why:
- *Epochs scaled for CPU.* The paper trains 20 isolation epochs, 60 more, then 20 unlearning
  epochs (ResNet on CIFAR-10, GPU); defaults here are 5 / 5 / 10 for the small CNN on MNIST.
- *LGA on the batch-mean loss* (``lga``), as in the authors' code; the paper's equation 3 is per
  sample (``"sample"``), which also pushes the backdoor samples back up and separates worse.
- *gamma 0.2, not 0.5.* gamma must sit below the clean training loss during isolation; on MNIST
  that loss falls under 0.5 in the first epoch, and every later step is then an ascent step.
- *Isolation score* (``isolation_score``). Under LGA the losses oscillate around ``gamma``, so the
  paper's ranking after the last epoch (``"last"``) is unreliable; the default ranks by the median
  of ``passes_per_epoch`` loss passes per isolation epoch, after a burn-in epoch (``"mean"``: their
  mean).
- *Unlearning objective* (``unlearning_loss``, ``unlearning``). The authors' ascent on ``-l`` of
  the isolated set (``"ce-ascent"``, ``"ascent"``, lr 5e-4) vanishes at saturation on the MNIST CNN
  and runs away at larger rates. The default minimises the bounded unlikelihood ``-log(1 - p_y)``
  (as a logsumexp, which keeps its gradient at float32 saturation) jointly with a descent on the
  rest (``"joint"``, equation 5), so the target class survives. ``ascent_bound`` bounds ce-ascent.
- *Relearning the rest, choosing the epoch* (``rest_steps``, ``keep``). ``rest_steps`` descent
  steps on the rest follow each unlearning step (a pure isolated set would erase the target
  class). ``keep="unlearned"`` keeps, among epochs within ``tolerance``, the one whose isolated
  labels are least predicted (among those predicted at most at chance, 1/K: the best held-out
  accuracy); no ground truth needed. ``"latest"``: the latest epoch within tolerance.
- ``relearn_exclude`` (0.2, our addition). The poison not isolated ranks just above the isolated
  share and would re-teach the trigger, so the joint descent skips that share of the next-lowest
  scores (still trained on in phase 2, not unlearned). 0 is the paper's equation 5.
- ``recipe`` (our addition): the victim's own training settings (keys of an experiment's ``train``
  section, e.g. fastnet's lookahead, bf16 autocast, decoupled weight decay, warm-up, schedule) for
  phases 1 and 2, so that ABL trains the model as its owner would; isolation keeps a constant rate.
  With ``autocast`` the per-sample loss passes and the unlearning steps run under it too. A
  decoupled weight decay (a shrink per step, sized for ``lr``) scales down with ``unlearning_lr``.
- *Unlearning loop* on :class:`~backdoorlab.data.loader.TensorLoader`, not
  :func:`~backdoorlab.train.train`: it pairs two loaders, keeps the best epoch and keeps BatchNorm
  in eval mode (its statistics would drift to the 1% isolated set; the authors' code does not).

Measurements: docs/abl.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._abl_losses import (  # noqa: F401  (lga_loss, per_sample_loss, unlearning_loss: public here)
    _accuracies, _endless, _more_unlearned, lga_loss, per_sample_loss, unlearning_loss,
)
from backdoorlab.defenses.base import DEFENSES, Evaluate, RobustTrainer, RobustTrainResult
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


@DEFENSES.register("abl", "Anti-Backdoor Learning (Li et al. 2021): LGA isolation of the lowest-loss samples, "
                          "training on the rest, unlearning the isolated ones")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ABL(RobustTrainer):
    """Anti-Backdoor Learning; see the module docstring. The result holds the per-phase figures
    (``phases``), the per-sample loss traces (``loss_traces`` float (T_iso, N)), the isolation
    ranking (``sample_scores``, the negated isolation loss) and, in ``details``, the unlearning curve."""

    report_keys = ("num_isolated",)

    gamma: float = Field(0.2, description="LGA loss floor gamma (> 0; the paper's 0.5 is for CIFAR-10 losses)")
    isolation_ratio: float = Field(0.01, description="share p of the training set isolated, in (0, 0.5]")
    isolation_epochs: int = Field(5, description="T_iso: epochs of LGA training before isolating (>= 1)")
    epochs: int = Field(10, description="total training epochs, isolation included (>= isolation_epochs)")
    unlearning_epochs: int = Field(10, ge=0, le=1000, description="epochs of unlearning (passes over the isolated set)")
    lga: Literal["batch", "sample"] = Field("batch", description="LGA on the batch-mean loss (authors' code) or per sample (paper eq. 3)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10, description="learning rate of isolation and training")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    unlearning: Literal["joint", "ascent"] = Field("joint", description="joint: descend on the rest while unlearning the "
                                                  "isolated set (paper eq. 5); ascent: the isolated set alone (authors' code)")
    unlearning_loss: Literal["ce-ascent", "unlikelihood"] = Field("unlikelihood", description="ce-ascent: minimise -l "
                                                                 "(the paper); unlikelihood: minimise -log(1 - p_y)")
    unlearning_optimizer: Literal["sgd", "adam"] = "sgd"
    ascent_bound: Optional[float] = Field(None, gt=0, description="an isolated sample whose loss exceeds this no longer "
                                                                  "pushes (bounds the ascent; None: unbounded, the paper)")
    unlearning_lr: float = Field(5e-3, gt=0, le=1, description="peak learning rate of the unlearning phase (cosine; small)")
    rest_steps: int = Field(4, ge=1, le=100, description="joint unlearning: optimiser steps on batches of the rest per "
                                                      "unlearning step (the first one shares the step, eq. 5)")
    relearn_exclude: float = Field(0.2, ge=0, lt=1, description="joint unlearning: share of the training set, the "
                                   "lowest isolation scores after the isolated ones, left out of the descent on the rest")
    keep: Literal["unlearned", "latest"] = Field("unlearned", description="unlearning epoch kept among those within "
                                                  "tolerance: lowest accuracy on the isolated samples (below chance: best "
                                                  "held-out accuracy), or the latest")
    unlearning_batch_size: int = Field(32, ge=1, description="isolated samples per unlearning step")
    tolerance: float = Field(0.03, ge=0, le=1, description="largest held-out accuracy drop accepted while unlearning")
    crop_padding: int = Field(0, ge=0, description="random crop augmentation (0: off)")
    flip: bool = False
    isolation_score: Literal["median", "mean", "last"] = Field("median", description="rank samples by the median (or mean) "
                                                              "of their loss over the passes after the first isolation "
                                                              "epoch, or by their loss after the last epoch (last: the paper)")
    passes_per_epoch: int = Field(4, ge=1, le=100, description="per-sample loss passes per isolation epoch (evenly spaced; "
                                                               "the last at the end of the epoch) for the isolation score")
    eval_batch_size: int = Field(1024, ge=1)
    recipe: dict[str, Any] = Field(default_factory=dict, description="training settings of phases 1 and 2 beyond "
                                   "ABL's own fields: keys of an experiment's train section, e.g. {lookahead: true, "
                                   "autocast: auto, decoupled_weight_decay: true, warmup: 1, schedule: linear}")
    seed: int = Field(0, ge=0)

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise BackdoorLabError(f"abl: gamma must be > 0 (the LGA loss floor; the paper uses 0.5); got {self.gamma}")
        if not 0 < self.isolation_ratio <= 0.5:
            raise BackdoorLabError(f"abl: isolation_ratio must lie in (0, 0.5] (the share of samples isolated; "
                                   f"the paper isolates 0.01); got {self.isolation_ratio}")
        if self.isolation_epochs < 1:
            raise BackdoorLabError(f"abl: isolation_epochs must be >= 1; got {self.isolation_epochs}")
        if self.isolation_epochs > self.epochs:
            raise BackdoorLabError(f"abl: isolation_epochs ({self.isolation_epochs}) is larger than the total epochs "
                                   f"({self.epochs}); raise epochs to at least {self.isolation_epochs} or lower isolation_epochs")
        if self.isolation_ratio + self.relearn_exclude >= 1:
            raise BackdoorLabError(f"abl: isolation_ratio ({self.isolation_ratio:g}) + relearn_exclude ({self.relearn_exclude:g}) "
                                   f"must stay below 1, or no sample is left to relearn from; lower relearn_exclude")
        if self.epochs > 10_000:
            raise BackdoorLabError(f"abl: epochs must be <= 10000; got {self.epochs}")
        own = sorted(set(self.recipe) & (_OWN_TRAIN_FIELDS | {"epochs"}))
        if own:
            raise BackdoorLabError(f"abl: recipe sets {', '.join(own)}, which ABL sets itself; give "
                                   f"{' and '.join(k if k != 'epochs' else 'epochs / isolation_epochs' for k in own)} "
                                   "as abl's own parameters instead")
        self._train_config(1, "cosine")  # a bad recipe: one clear error now

    def describe(self) -> str:
        return (f"abl(gamma {self.gamma:g}, p {self.isolation_ratio:g}, T_iso {self.isolation_epochs}, "
                f"{self.epochs} epochs, {self.unlearning_epochs} unlearning)")

    def _train_config(self, epochs: int, schedule: str):
        from backdoorlab.train import checked_train_config

        # the phases were measured without warm-up (docs/abl.md); a recipe may add one. The recipe's
        # schedule is phase 2's: isolation keeps a constant rate.
        extra = {"warmup": 0.0, **self.recipe, **({"schedule": "constant"} if schedule == "constant" else {})}
        return checked_train_config("abl: recipe", {
            "schedule": schedule, **extra, "epochs": epochs, "batch_size": self.batch_size, "optimizer": self.optimizer,
            "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay, "crop_padding": self.crop_padding,
            "flip": self.flip, "eval_batch_size": self.eval_batch_size})

    def _unlearning_config(self):
        """The unlearning phase's training settings: phase 2's at ``unlearning_lr``. A recipe's
        decoupled weight decay (a per-step shrink by ``weight_decay``, sized for ``lr``) shrinks by
        ``weight_decay x unlearning_lr / lr`` per step here, as a decay tied to the rate would
        (kept per step, it swamps the small unlearning steps: docs/abl.md)."""
        cfg = self._train_config(self.unlearning_epochs, "cosine")
        return cfg.at_lr(self.unlearning_lr, optimizer=self.unlearning_optimizer)

    def _autocast(self, model: nn.Module):
        """A factory of the recipe's autocast context (bf16 where the CPU runs it natively) for loss passes
        and unlearning steps; resolved once per run, not per batch."""
        from backdoorlab.train import autocast_dtype, model_device

        device = model_device(model)
        amp = autocast_dtype(self._train_config(1, "cosine"), device)
        return (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    def train(self, model: nn.Module, data: ImageSet, *, clean: ImageSet | None = None,
              evaluate: Evaluate | None = None, callbacks: tuple = ()) -> RobustTrainResult:
        from backdoorlab.train import train

        n = len(data)
        _check_inputs(model, data, clean)
        k = int(round(self.isolation_ratio * n))
        if k < 1:
            raise BackdoorLabError(f"abl: isolating {self.isolation_ratio:g} of {n} samples isolates none; "
                                   f"raise isolation_ratio to at least {1 / n:.3g} or give more data")
        k_out = int(round(self.relearn_exclude * n)) if self.unlearning == "joint" else 0
        if k + k_out >= n:
            raise BackdoorLabError(f"abl: isolation_ratio {self.isolation_ratio:g} + relearn_exclude {self.relearn_exclude:g} "
                                   f"leave none of the {n} samples to relearn from; lower relearn_exclude")
        sets: dict[str, Any] = {"holdout_accuracy": clean, "evaluate": evaluate}
        bs = self.eval_batch_size
        t_start = time.perf_counter()
        phases: dict[str, dict[str, float]] = {}

        # 1. isolation: LGA training, per-sample losses after every epoch
        passes: list[tuple[float, torch.Tensor]] = []  # (epoch, losses) every 1/passes_per_epoch epoch (the score)
        amp = self._autocast(model)
        record = self._pass_recorder(model, data, bs, amp, passes)

        gamma, per_sample = self.gamma, self.lga == "sample"
        t0 = time.perf_counter()
        hist_iso = train(model, data, self._train_config(self.isolation_epochs, "constant"), seed=self.seed,
                         loss_fn=lambda logits, y: lga_loss(logits, y, gamma, per_sample),
                         callbacks=(record, *callbacks))
        losses = self._isolation_score(passes)
        order = torch.argsort(losses, stable=True)
        isolated, rest = order[:k].sort().values, order[k:].sort().values
        phases["isolation"] = {**_accuracies(model, sets, bs), "seconds": time.perf_counter() - t0,
                               "loss_threshold": float(losses[order[k - 1]])}
        log.info("abl: isolated %d of %d samples (loss <= %.4g); %s", k, n, phases["isolation"]["loss_threshold"],
                 _fmt(phases["isolation"]))

        # 2. training on the rest
        t0 = time.perf_counter()
        remaining = self.epochs - self.isolation_epochs
        hist_train = None
        if remaining > 0:
            hist_train = train(model, data.subset(rest, name=f"{data.name} without isolated"),
                               self._train_config(remaining, "cosine"), seed=self.seed + 1, callbacks=tuple(callbacks))
        phases["training"] = {**_accuracies(model, sets, bs), "seconds": time.perf_counter() - t0}
        log.info("abl: trained %d more epochs on the %d remaining samples; %s", remaining, len(rest), _fmt(phases["training"]))

        # 3. unlearning: gradient ascent on the isolated samples, checked on the clean held-out set
        t0 = time.perf_counter()
        relearn = order[k + k_out:].sort().values
        curve = self._unlearn(model, data.subset(isolated, name="isolated"),
                              data.subset(relearn, name="rest") if self.unlearning == "joint" else None, sets, bs, amp)
        phases["unlearning"] = {**curve[-1]["metrics"], "seconds": time.perf_counter() - t0,
                                "epochs_kept": float(curve[-1]["epoch"])}
        log.info("abl: unlearned for %d of %d epochs; %s", curve[-1]["epoch"], self.unlearning_epochs, _fmt(phases["unlearning"]))
        model.eval()

        details: dict[str, Any] = {
            "method": "abl", "params": {k_: getattr(self, k_) for k_ in self.__dataclass_fields__},
            "isolated": k, "isolation_losses": losses, "excluded": order[k:k + k_out].sort().values,
            "unlearning_curve": [{"epoch": float(r["epoch"]), "accepted": float(r["accepted"]), **r["metrics"]}
                                 for r in curve[:-1]],
            "history": {"isolation": hist_iso.as_dict(), "training": hist_train.as_dict() if hist_train else None},
            "seconds": time.perf_counter() - t_start,
        }
        traces = torch.stack([loss for epoch, loss in passes if epoch.is_integer()])  # at each epoch's end (the figure)
        return RobustTrainResult(model, isolated, sample_scores=-losses, loss_traces=traces, phases=phases, details=details)

    # ---- report hooks
    def figures(self, result: RobustTrainResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        from backdoorlab.plots_abl import loss_traces

        tr = result.loss_traces
        if tr is None or tr.dim() != 2 or tr.shape[0] == 0:
            return {}
        known = truth is not None
        groups = truth if known else torch.isin(torch.arange(tr.shape[1]), result.isolated_indices)
        return {"loss_traces": loss_traces(tr, groups, gamma=self.gamma, title=self.describe(),
                                           labels=("clean samples", "poisoned samples") if known else
                                           ("kept samples", "isolated samples"))}

    def metrics(self, result: RobustTrainResult) -> dict[str, float]:
        return {"num_isolated": float(result.isolated_indices.numel())}

    def summary(self, result: RobustTrainResult) -> dict[str, Any]:
        return {"phases": result.phases, "num_isolated": int(result.isolated_indices.numel()),
                "unlearning_curve": result.details.get("unlearning_curve", [])}

    def _pass_recorder(self, model: nn.Module, data: ImageSet, bs: int, amp, passes: list[tuple[float, torch.Tensor]]):
        """The isolation phase's training callback: appends ``(epoch, per-sample losses)`` to ``passes``
        every 1/``passes_per_epoch`` epoch within an epoch and at each epoch's end (whole epochs as
        ``float(n)``), under the recipe's autocast ``amp``."""
        spe, every, ends = [1], [1], [0]  # steps per epoch, steps between passes, epochs ended

        def record(event: str, **info: Any) -> None:
            if event == "train_start":
                spe[0] = max(1, info["total_steps"] // max(1, info["epochs"]))
                every[0] = max(1, spe[0] // self.passes_per_epoch)
            elif event == "step" and 0 < (info["step"] % spe[0]) and (info["step"] % spe[0]) % every[0] == 0 \
                    and (info["step"] % spe[0]) + every[0] <= spe[0]:  # within the epoch; its end is recorded below
                with amp():
                    passes.append((info["step"] / spe[0], per_sample_loss(model, data, bs)))
                model.train()  # the pass switched to eval mode mid-epoch
            elif event == "epoch_end":
                ends[0] += 1
                with amp():
                    passes.append((float(ends[0]), per_sample_loss(model, data, bs)))

        return record

    def _isolation_score(self, passes: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
        """Each sample's isolation score (lower = more likely poisoned) from the loss passes."""
        if self.isolation_score == "last":
            return passes[-1][1]
        # the first epoch is burn-in: the backdoor is not learned yet, poisoned samples still have high losses
        kept = [loss for epoch, loss in passes if epoch > 1] if self.isolation_epochs > 1 else [loss for _, loss in passes]
        stacked = torch.stack(kept)
        return stacked.median(0).values if self.isolation_score == "median" else stacked.mean(0)

    def _unlearn(self, model: nn.Module, isolated: ImageSet, rest: ImageSet | None, sets: dict[str, Optional[ImageSet]],
                 bs: int, amp=contextlib.nullcontext) -> list[dict[str, Any]]:
        """Gradient ascent on ``isolated`` for up to ``unlearning_epochs`` epochs, in place; with ``rest``,
        each step also descends on a batch of it (loss ``l(rest) - l(isolated)``). Returns one row per
        epoch run (epoch, accepted, metrics incl. ``isolated_accuracy``) and, last, the kept state's
        row (the model is left in that state)."""
        from backdoorlab.data.loader import Augment, TensorLoader
        from backdoorlab.train import _memory_format, lr_at, make_optimizer, model_device, set_lr

        def measure() -> dict[str, float]:
            return {**_accuracies(model, sets, bs), **_accuracies(model, {"isolated_accuracy": isolated}, bs)}

        before = measure()
        rows: list[dict[str, Any]] = [{"epoch": 0, "accepted": True, "metrics": before}]
        if self.unlearning_epochs == 0:
            return rows + [rows[0]]
        device = model_device(model)
        fmt = _memory_format(model, True)
        g = torch.Generator().manual_seed(self.seed + 2)
        loader = TensorLoader(isolated.x, isolated.y, self.unlearning_batch_size, shuffle=True, generator=g,
                              augment=Augment(self.crop_padding, self.flip))
        rest_batches = _endless(TensorLoader(rest.x, rest.y, self.batch_size, shuffle=True, generator=g,
                                             augment=Augment(self.crop_padding, self.flip))) if rest is not None else None
        cfg = self._unlearning_config()
        opt = make_optimizer(model, cfg)
        total, step = len(loader) * self.unlearning_epochs, 0
        kept = (0, copy.deepcopy(model.state_dict()), before)
        base = before.get("holdout_accuracy")
        chance = 1.0 / max(1, isolated.num_classes)
        for epoch in range(1, self.unlearning_epochs + 1):
            model.train()
            for m in model.modules():  # BatchNorm statistics stay those of the clean-ish training
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            for xb, yb in loader:
                set_lr(opt, lr_at(cfg, step, total, len(loader)))  # keeps a model's own lr_scale groups (fastnet)
                step += 1
                xb = xb.to(device).contiguous(memory_format=fmt)
                with amp():
                    logits = model(xb)
                loss = unlearning_loss(logits.float(), yb.to(device), self.unlearning_loss, self.ascent_bound)
                if rest_batches is not None:
                    xr, yr = next(rest_batches)
                    with amp():
                        logits = model(xr.to(device).contiguous(memory_format=fmt))
                    loss = loss + F.cross_entropy(logits.float(), yr.to(device))
                if not torch.isfinite(loss):
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for _ in range(self.rest_steps - 1 if rest_batches is not None else 0):  # relearn the clean classes
                    xr, yr = next(rest_batches)
                    with amp():
                        logits = model(xr.to(device).contiguous(memory_format=fmt))
                    loss = F.cross_entropy(logits.float(), yr.to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(q).all()) for q in model.parameters())
            m_ = measure() if finite else {}
            ok = finite and (base is None or base - m_["holdout_accuracy"] <= self.tolerance + 1e-12)
            if not finite:
                log.warning("abl: unlearning diverged at epoch %d (non-finite loss); keeping epoch %d", epoch, kept[0])
            rows.append({"epoch": epoch, "accepted": ok, "metrics": m_})
            log.info("abl: unlearning epoch %d: %s%s", epoch, _fmt(m_), "" if ok else " (not kept: held-out accuracy dropped)")
            if not finite:
                break
            # kept: the epoch within tolerance where the isolated samples' labels are least predicted (``unlearned``;
            # the remaining poison in the rest re-teaches the trigger later), or the latest one within tolerance
            if ok and (self.keep == "latest" or _more_unlearned(m_, kept[2], chance)):
                kept = (epoch, copy.deepcopy(model.state_dict()), m_)
        model.load_state_dict(kept[1])
        model.eval()
        return rows + [{"epoch": kept[0], "accepted": True, "metrics": kept[2]}]


# TrainConfig fields that ABL's own parameters set (a recipe may not)
_OWN_TRAIN_FIELDS = frozenset({"batch_size", "optimizer", "lr", "momentum", "weight_decay", "crop_padding", "flip",
                               "eval_batch_size"})


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "seconds")


def _check_inputs(model: nn.Module, data: ImageSet, clean: ImageSet | None) -> None:
    if not isinstance(data, ImageSet):
        raise BackdoorLabError(f"abl: the training set must be an ImageSet; got {type(data).__name__}")
    if len(data) < 2:
        raise BackdoorLabError(f"abl: the training set has {len(data)} image(s); ABL needs a training set to isolate from")
    if isinstance(model, torch.jit.ScriptModule) or not any(True for _ in model.parameters()):
        raise BackdoorLabError("abl trains the model: give a registered architecture (built with build_model), "
                               "not a TorchScript file")
    k = getattr(model, "num_classes", None)
    shape = getattr(model, "input_shape", None)
    for what, d in (("training set", data), ("clean held-out set", clean)):
        if d is None:
            continue
        if k is not None and d.num_classes != k:
            raise BackdoorLabError(f"abl: the {what} has {d.num_classes} classes but the model has {k} outputs")
        if shape is not None and tuple(d.shape) != tuple(shape):
            raise BackdoorLabError(f"abl: the {what} has images of shape {d.shape} but the model expects {tuple(shape)}")
