"""Defend: screen inputs at run time (:func:`guard`), repair a model (:func:`repair`), train
robustly on poisoned data (:func:`train_robust`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from backdoorlab.api._common import (
    DataLike, ModelLike, Report, defended, ground_truth, load_data, load_inputs, load_model, make_defense,
    method_name, subsample,
)
from backdoorlab.defenses.base import DetectionResult, InputDetector, Repairer, RepairResult, RobustTrainer, RobustTrainResult
from backdoorlab.errors import BackdoorLabError


# ----------------------------------------------------------------------------- guard
@dataclass(eq=False)
class GuardReport(Report):
    """An input detector's verdict on each input, and the guarded predictions (class K = trojaned).
    ``truth`` (``is_poison`` of the inputs, when they carried one) adds FRR / FAR / AUROC."""

    kind: ClassVar[str] = "guard"
    method: str
    detector: InputDetector
    detection: DetectionResult
    predictions: torch.Tensor
    trojaned_class: int
    seconds: float
    truth: torch.Tensor | None = None

    @property
    def flagged(self) -> torch.Tensor:
        return self.detection.flagged

    @property
    def scores(self) -> torch.Tensor:
        return self.detection.scores

    def _dict(self) -> dict[str, Any]:
        from backdoorlab import metrics as M

        det, n = self.detection, int(self.detection.flagged.numel())
        d: dict[str, Any] = {
            **self.detector.summary(det), "method": self.method, "num_inputs": n, "num_flagged": int(det.flagged.sum()),
            "threshold": det.threshold, "trojaned_class": self.trojaned_class,
            "inputs_per_second": n / max(self.seconds, 1e-9), "seconds": round(self.seconds, 3),
            "flagged": det.flagged.tolist(), "scores": [round(float(s), 6) for s in det.scores],
            "predictions": self.predictions.tolist(),
        }
        t = self.truth
        if t is not None:
            d.update(frr=M.frr(det.flagged[~t]), far=M.far(det.flagged[t]), auroc=M.auroc(det.scores, t),
                     num_trojaned=int(t.sum()))
        return d

    def csv(self) -> str:
        """``index,prediction,score,flagged``, one line per input."""
        det = self.detection
        lines = ["index,prediction,score,flagged"]
        lines += [f"{i},{int(p)},{float(s):.6f},{int(bool(f))}"
                  for i, (p, s, f) in enumerate(zip(self.predictions, det.scores, det.flagged))]
        return "\n".join(lines) + "\n"

    def figures(self) -> dict[str, bytes]:
        return self.detector.figures(self.detection, self.truth)

    def data_files(self) -> dict[str, bytes]:
        return {"guard.csv": self.csv().encode()}


def guard(model: ModelLike, clean: DataLike, inputs: DataLike | torch.Tensor, *, method: Any = "strip",
          clean_size: int | None = None, arch: str | None = None, save_threshold: str | Path | None = None,
          **params: Any) -> GuardReport:
    """Screen ``inputs`` with an input detector (default STRIP) fitted on the ``clean`` held-out
    images; the guarded prediction is class K for flagged inputs. ``inputs``: an npz (labels
    optional; ``is_poison`` = ground truth, for reporting only), folder, name, ImageSet or uint8
    tensor. ``params`` are the detector's (for STRIP: samples, frr, superimpose, threshold_rule, seed).
    ``save_threshold``: also write the fitted detector (its threshold and state) to this file, for
    :func:`load_detector` and ``backdoorlab serve --threshold``."""
    from backdoorlab.defenses import Guarded

    detector = make_defense(method, params, family="detector", where="guard")
    clean_set = load_data(clean, split="train")
    net = load_model(model, data=clean_set, arch=arch)
    clean_set = subsample(clean_set, clean_size)
    data, truth = load_inputs(inputs, clean_set.num_classes)
    if data.shape != clean_set.shape:
        raise BackdoorLabError(f"the inputs have images of shape {data.shape} but the clean images {clean_set.shape}; "
                               "use one image size")
    detector.fit(net, clean_set)
    if save_threshold is not None:
        save_detector(detector, save_threshold, model=net, clean=clean_set, method=method_name(detector, method))
    t0 = time.perf_counter()
    pred, det = Guarded(net, detector).guard(data.x)
    seconds = time.perf_counter() - t0
    return GuardReport(method_name(detector, method), detector, det, pred, clean_set.num_classes, seconds, truth)


# ----------------------------------------------------------------------------- a fitted detector on disk
DETECTOR_FORMAT = "backdoorlab-detector/1"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(data: Any) -> str:
    """sha256 of an image set's images and labels."""
    import hashlib

    h = hashlib.sha256()
    for t in (data.x, data.y):
        t = t.contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fitted_threshold(detector: InputDetector, probe: torch.Tensor) -> float:
    """The score threshold a fitted detector flags above, read from its own ``detect`` on a probe
    batch (detectors name it differently: STRIP ``threshold``, SCALE-UP ``decision_threshold``)."""
    return float(detector.detect(probe).threshold)


def detector_bytes(detector: InputDetector, *, model: nn.Module, clean: Any, method: str) -> bytes:
    """A fitted input detector as safetensors bytes: the detector's own state (e.g. STRIP's clean
    entropies) as tensors and JSON metadata (method, parameters, threshold, fingerprints of the
    model and clean set it was fitted on). Never a pickle."""
    import dataclasses
    import json

    from safetensors.torch import save

    tensors, extra = detector.fitted_state() if hasattr(detector, "fitted_state") else ({}, {})
    params = {f.name: getattr(detector, f.name) for f in dataclasses.fields(detector)} if dataclasses.is_dataclass(detector) else {}
    meta = {"format": DETECTOR_FORMAT, "method": method, "params": params, "threshold": fitted_threshold(detector, clean.x[:1]),
            "state": extra, "model_sha256": model_fingerprint(model), "clean_sha256": data_fingerprint(clean),
            "clean_size": len(clean), "image_shape": list(clean.shape), "num_classes": clean.num_classes}
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"backdoorlab": json.dumps(meta, sort_keys=True)})


def save_detector(detector: InputDetector, path: str | Path, *, model: nn.Module, clean: Any, method: str) -> Path:
    """Write :func:`detector_bytes` to ``path`` (``.safetensors``) atomically."""
    from backdoorlab.atomic import atomic_write_bytes

    path = Path(path)
    if path.suffix != ".safetensors":
        raise BackdoorLabError(f"--save-threshold {path}: name the file .safetensors")
    atomic_write_bytes(path, detector_bytes(detector, model=model, clean=clean, method=method))
    return path


def load_detector(path: str | Path | bytes, *, model: nn.Module, clean: Any) -> tuple[InputDetector, float, dict[str, Any]]:
    """A detector written by :func:`save_detector` (a file, or :func:`detector_bytes` itself),
    fitted on ``model`` and ``clean`` (which must be the ones it was saved with: their fingerprints
    are checked). Returns (detector, threshold, metadata). A detector with a ``restore`` hook
    (STRIP) is restored without scoring the clean set again; any other is fitted again and keeps
    the saved threshold."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load

    if isinstance(path, bytes):
        blob, path = path, Path("(in memory)")
    else:
        path = Path(path)
        if not path.is_file():
            raise BackdoorLabError(f"threshold file {path} does not exist; write one with backdoorlab guard --save-threshold")
        blob = path.read_bytes()
    try:
        tensors = load(blob)
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads((json.loads(blob[8:8 + n]).get("__metadata__") or {}).get("backdoorlab", "null"))
    except (SafetensorError, ValueError, OSError, AttributeError, UnicodeDecodeError) as exc:
        raise BackdoorLabError(f"threshold file {path} is not a backdoorlab detector file ({exc}); "
                               "write one with backdoorlab guard --save-threshold") from None
    if not isinstance(meta, dict) or meta.get("format") != DETECTOR_FORMAT:
        raise BackdoorLabError(f"threshold file {path} is not a backdoorlab detector file ({DETECTOR_FORMAT}); "
                               "write one with backdoorlab guard --save-threshold")
    if meta["clean_sha256"] != data_fingerprint(clean):
        raise BackdoorLabError(f"threshold file {path} was fitted on other clean images ({meta['clean_size']} images); "
                               "give the same --clean (and --clean-size) as guard --save-threshold had")
    if meta["model_sha256"] != model_fingerprint(model):
        raise BackdoorLabError(f"threshold file {path} was fitted on another model; give the same --model, or save "
                               "the threshold again")
    detector = make_defense(meta["method"], meta["params"], family="detector", where=f"threshold file {path.name}")
    if hasattr(detector, "restore"):
        detector.restore(model, clean, tensors, meta.get("state", {}))
    else:
        detector.fit(model, clean)
    return detector, float(meta["threshold"]), meta


# ----------------------------------------------------------------------------- repair
@dataclass(eq=False)
class RepairReport(Report):
    """The repaired model (``model``), its curve and the method's summary (CA / ASR before and after
    when evaluation sets were given)."""

    kind: ClassVar[str] = "repair"
    method: str
    repairer: Repairer
    result: RepairResult
    clean_size: int
    seconds: float

    @property
    def model(self) -> nn.Module:
        return self.result.model

    @property
    def curve(self) -> list[dict[str, float]]:
        return self.result.curve

    def _dict(self) -> dict[str, Any]:
        return {"method": self.method, "curve": self.result.curve, **self.repairer.summary(self.result),
                "clean_size": self.clean_size, "seconds": round(self.seconds, 3)}

    def figures(self) -> dict[str, bytes]:
        return self.repairer.figures(self.result)

    def save_model(self, path: str | Path) -> Path:
        """Write the repaired model in the format its file name asks for: ``.pt2`` a torch.export
        program (the default), ``.pt`` TorchScript, ``.safetensors`` backdoorlab weights (needs a
        registered architecture)."""
        from backdoorlab.models import export_model

        if Path(path).suffix == ".safetensors" and getattr(self.model, "spec", None) is None:
            raise BackdoorLabError("this model has no backdoorlab spec (a TorchScript or torch.export file); it cannot be "
                                   "written as safetensors: use a .pt2 or .pt name")
        return export_model(self.model, path)


def repair(model: ModelLike, clean: DataLike, *, method: Any = "fine-pruning", eval: DataLike | None = None,
           triggered: DataLike | None = None, clean_size: int | None = None, arch: str | None = None,
           **params: Any) -> RepairReport:
    """Repair a model on the defender's ``clean`` images with a repairer (fine-pruning, pruning,
    fine-tuning, nad, anp, i-bau, clp, nc-unlearning; a name or a built Repairer). Every one works
    on foreign models (TorchScript, torch.export) as on our architectures. ``eval`` (clean test images; an npz's test part) and
    ``triggered`` (triggered images labelled with the attacker's target) only add CA / ASR to the
    curve, through an evaluation callback; they never steer the repair."""
    from backdoorlab.evaluation import make_evaluator

    defense = make_defense(method, params, family="repairer")
    clean_set = load_data(clean, split="train")
    net = load_model(model, data=clean_set, arch=arch)
    clean_set = subsample(clean_set, clean_size)
    k = clean_set.num_classes
    eval_set = load_data(eval, split="auto", num_classes=k) if eval is not None else None
    trig_set = load_data(triggered, split="train", num_classes=k) if triggered is not None else None
    t0 = time.perf_counter()
    res = defense.repair(net, clean_set, evaluate=make_evaluator(eval_set, trig_set))
    return RepairReport(method_name(defense, method), defense, res, len(clean_set), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- train robustly
@dataclass(eq=False)
class RobustTrainReport(Report):
    """A model trained robustly on possibly poisoned data. ``isolated_indices`` index the given
    data set (file order); ``truth`` (its ``is_poison``, when known) adds the isolation precision,
    computed here from what the trainer isolated (the trainer never sees it)."""

    kind: ClassVar[str] = "train-robust"
    method: str
    arch: str
    trainer: RobustTrainer
    result: RobustTrainResult
    train_indices: torch.Tensor
    holdout_size: int
    clean_accuracy: float
    seconds: float
    truth: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self.result.model

    @property
    def isolated_indices(self) -> torch.Tensor:
        return self.train_indices[self.result.isolated_indices]

    def _dict(self) -> dict[str, Any]:
        isolated = self.isolated_indices
        d: dict[str, Any] = {
            **self.trainer.summary(self.result), "method": self.method, "model": self.arch,
            "isolated_indices": isolated.tolist(), "num_isolated": int(isolated.numel()),
            "clean_accuracy": self.clean_accuracy, "train_size": int(self.train_indices.numel()),
            "holdout_size": self.holdout_size, "seconds": round(self.seconds, 3), "phases": self.result.phases,
        }
        if self.truth is not None:
            from backdoorlab.evaluation import isolation_scores

            d.update(isolation_scores(self.result, self.truth[self.train_indices]))  # isolation_precision, ...
            d["num_poisoned"] = int(self.truth.sum())
        return d

    def figures(self) -> dict[str, bytes]:
        t = self.truth[self.train_indices] if self.truth is not None else None
        return self.trainer.figures(self.result, t)

    def export(self, path: str | Path) -> Path:
        """Write the trained model so that it loads without backdoorlab: ``.pt2`` a torch.export
        program (the default), ``.pt`` TorchScript (deprecated upstream)."""
        from backdoorlab.models import export_model

        return export_model(self.model, path)

    def save_weights(self, path: str | Path) -> Path:
        """Write backdoorlab safetensors weights."""
        from backdoorlab.models import save_model

        return save_model(self.model, path)


def train_robust(data: DataLike, *, model: str | nn.Module = "cnn", method: Any = "abl", holdout_fraction: float = 0.1,
                 seed: int = 0, **params: Any) -> RobustTrainReport:
    """Train ``model`` (an architecture name, or a freshly initialised module) on a possibly poisoned
    training set with a robust trainer (default ABL: isolate the suspected poisoned samples, train
    without them, unlearn them). A stratified ``holdout_fraction`` of the data is held out as the
    defender's clean set and to report clean accuracy. ``seed`` seeds the split, the initial weights
    and (when the method takes one) the training. ``is_poison`` of the data, when present, is ground
    truth used only to report the isolation precision."""
    from backdoorlab.data import stratified_indices
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import evaluate

    trainer = make_defense(method, params, family="robust-trainer", defaults={"seed": seed})
    if not 0.0 < holdout_fraction < 0.5:
        raise BackdoorLabError(f"holdout_fraction must lie in (0, 0.5); got {holdout_fraction}")
    full = load_data(data, split="train")
    truth = ground_truth(data, full)
    train_idx, hold_idx = stratified_indices(full.y, holdout_fraction, torch.Generator().manual_seed(seed))
    if hold_idx.numel() == 0 or train_idx.numel() < 2:
        raise BackdoorLabError(f"the data has {len(full)} images: too few to hold out {holdout_fraction:g} of them; give more data")
    seen = defended(full)
    train_set, holdout = seen.subset(train_idx, name="train"), seen.subset(hold_idx, name="holdout")
    torch.manual_seed(seed)
    net = build_model(ModelSpec(model, full.num_classes, full.shape)) if isinstance(model, str) else model
    arch = model if isinstance(model, str) else getattr(getattr(model, "spec", None), "name", type(model).__name__)
    t0 = time.perf_counter()
    res = trainer.train(net, train_set, clean=holdout)
    seconds = time.perf_counter() - t0
    return RobustTrainReport(method_name(trainer, method), arch, trainer, res, train_idx, len(holdout),
                             evaluate(res.model, holdout), seconds, truth)
