"""Is this model backdoored, and which training samples are poisoned: :func:`audit` (seed 000's
pairwise trigger scan, optionally followed by cleansing), :func:`cleanse` and :func:`bias_maps`."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from backdoorlab.api._common import (
    DataLike, ModelLike, Report, defended, ground_truth, load_data, load_model, make_defense, method_name,
    model_and_data, pairs,
)
from backdoorlab.defenses.base import Cleanser, CleanseResult, InspectionResult, Inspector
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


class _Verdict:
    """The model-level verdict of an inspection result."""

    inspection: InspectionResult

    @property
    def backdoored(self) -> bool:
        return bool(self.inspection.backdoored)

    @property
    def flagged_pairs(self) -> list[tuple[int, int]]:
        """Flagged (source, target) pairs, most suspicious first."""
        return pairs(self.inspection.flagged_pairs)

    @property
    def flagged_targets(self) -> list[int]:
        return [int(t) for t in self.inspection.flagged_targets]

    @property
    def max_anomaly(self) -> float:
        return self.inspection.max_anomaly


# ----------------------------------------------------------------------------- cleanse
@dataclass(eq=False)
class CleanseReport(Report):
    """The training samples a cleanser flagged, with corrected labels. ``truth`` (``is_poison`` of
    the training set, when it carried one) only adds TPR / FPR / precision to :meth:`to_dict`."""

    kind: ClassVar[str] = "cleanse"
    method: str
    cleanser: Cleanser
    result: CleanseResult
    data: ImageSet
    seconds: float
    truth: torch.Tensor | None = None
    trained_model: dict[str, Any] | None = None  # the model trained on ``data`` when none was given

    @property
    def flagged(self) -> torch.Tensor:
        """(N,) bool: flagged as poisoned."""
        return self.result.flagged

    @property
    def flagged_indices(self) -> list[int]:
        return torch.nonzero(self.result.flagged).flatten().tolist()

    @property
    def corrected_labels(self) -> torch.Tensor:
        """(N,) labels after correction (unchanged for samples not flagged)."""
        return self.result.corrected_labels

    def cleaned(self, drop: bool = False) -> ImageSet:
        """The training set with corrected labels, or (``drop=True``) without the flagged samples."""
        if drop:
            return self.data.subset(torch.nonzero(~self.result.flagged).flatten(), name=f"{self.data.name} cleansed")
        return ImageSet(self.data.x, self.result.corrected_labels.clone(), self.data.num_classes, self.data.class_names,
                        f"{self.data.name} relabelled")

    def audit_fields(self) -> dict[str, Any]:
        idx = self.flagged_indices
        return {"flagged_indices": idx, "corrected_labels": self.result.corrected_labels[idx].tolist(),
                "threshold": float(self.result.threshold)}

    def _dict(self) -> dict[str, Any]:
        d = {**self.cleanser.summary(self.result), "method": self.method, "num_flagged": len(self.flagged_indices),
             **self.audit_fields(), "seconds": round(self.seconds, 3)}
        if self.trained_model is not None:
            d["trained_model"] = self.trained_model
        if self.truth is not None:
            from backdoorlab.evaluation import Applied, Truth, score

            m = score(Applied(self.cleanser, self.result, self.seconds), Truth(is_poison=self.truth))
            d.update({k: v for k, v in m.items() if k not in ("seconds", "flagged")})
        return d

    def figures(self) -> dict[str, bytes]:
        return self.cleanser.figures(self.result, self.truth)

    def data_files(self) -> dict[str, bytes]:
        """``flagged.csv`` (index, label, corrected label, score of each flagged sample) and
        ``cleanse.npz`` (flagged, scores, corrected_labels of every sample)."""
        import numpy as np

        c, y = self.result, self.data.y
        lines = ["index,label,corrected_label,score"] + [
            f"{i},{int(y[i])},{int(c.corrected_labels[i])},{float(c.scores[i]):.6f}" for i in self.flagged_indices]
        buf = io.BytesIO()
        np.savez(buf, flagged=c.flagged.numpy(), scores=c.scores.numpy(), corrected_labels=c.corrected_labels.numpy())
        return {"flagged.csv": ("\n".join(lines) + "\n").encode(), "cleanse.npz": buf.getvalue()}


def cleanse(train: DataLike, model: ModelLike | None = None, *, method: Any = "pattern-subtraction",
            clean: DataLike | None = None, inspection: InspectionResult | AuditReport | None = None, seed: int = 0,
            arch: str | None = None, train_arch: str = "cnn", train_epochs: int = 4, **params: Any) -> CleanseReport:
    """Flag the poisoned samples of a training set (.npz / folder / name / ImageSet) and correct
    their labels with a cleanser (``method``: a name, or a built Cleanser). ``model`` is the model
    trained on that set; without one, a ``train_arch`` model is trained on it (``train_epochs``,
    ``seed``) and the report says so (``trained_model``). ``inspection``: an earlier audit (or its
    InspectionResult) the cleanser builds on; without it, a cleanser that needs one runs its own
    scan on ``clean``. ``params`` are the method's parameters."""
    t0 = time.perf_counter()
    cl = make_defense(method, params, family="cleanser", defaults={"seed": seed})
    data, truth = _training_set(train)
    clean_set = load_data(clean, split="auto") if clean is not None else None
    _check_same_task(data, clean_set)
    trained = None
    if model is None:
        model, trained = _train_on(data, train_arch, train_epochs, seed)
        t0 = time.perf_counter()  # ``seconds`` is the cleanser's; the training has its own
    net = load_model(model, data=data, arch=arch)
    if isinstance(inspection, AuditReport):
        inspection = inspection.inspection
    report = _cleanse(cl, method, data, truth, net, clean_set, inspection, t0)
    report.trained_model = trained
    return report


def _train_on(data: ImageSet, arch: str, epochs: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """A ``arch`` model trained on the training set itself (the cleansers' model when none is given)."""
    import logging

    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import TrainConfig, evaluate, train

    if epochs < 1:
        raise BackdoorLabError(f"train_epochs must be at least 1; got {epochs}")
    logging.getLogger(__name__).info("no model given: training a %s on the %d training images (%d epochs, seed %d)",
                                     arch, len(data), epochs, seed)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = build_model(ModelSpec(arch, data.num_classes, data.shape))
    train(net, defended(data), TrainConfig(epochs=epochs), seed=seed)
    net.eval()
    return net, {"arch": arch, "epochs": epochs, "seed": seed, "train_accuracy": evaluate(net, data),
                 "seconds": round(time.perf_counter() - t0, 3)}


def _training_set(train: DataLike) -> tuple[ImageSet, torch.Tensor | None]:
    """A training set to cleanse and its ground truth (``is_poison``, when it carries one)."""
    data = load_data(train, split="train")
    return data, ground_truth(train, data, "train")


def _check_same_task(data: ImageSet, clean_set: ImageSet | None) -> None:
    if clean_set is not None and (data.shape != clean_set.shape or data.num_classes != clean_set.num_classes):
        raise BackdoorLabError(f"the training images {data.shape} / {data.num_classes} classes differ from the clean "
                               f"images {clean_set.shape} / {clean_set.num_classes} classes; give sets of one task")


def _cleanse(cl: Any, method: Any, data: ImageSet, truth: torch.Tensor | None, net: Any, clean_set: ImageSet | None,
             inspection: InspectionResult | None, t0: float) -> CleanseReport:
    seen = defended(data)
    res = cl.cleanse(net, seen, clean=clean_set, inspection=inspection)
    return CleanseReport(method_name(cl, method), cl, res, seen, time.perf_counter() - t0, truth)


# ----------------------------------------------------------------------------- audit
@dataclass(eq=False)
class AuditReport(_Verdict, Report):
    """Seed 000's audit: the pairwise scan's verdict (``backdoored``, ``flagged_pairs``,
    ``flagged_targets``, the full ``inspection``), and ``cleanse`` when a training set was given."""

    kind: ClassVar[str] = "audit"
    inspection: InspectionResult
    inspector: Inspector
    seconds: float
    cleanse: CleanseReport | None = None

    def _dict(self) -> dict[str, Any]:
        d = {**self.inspector.summary(self.inspection), "backdoored": self.backdoored,
             "flagged_pairs": [list(p) for p in self.flagged_pairs], "flagged_targets": self.flagged_targets,
             "anomaly_index": self.max_anomaly}
        if self.cleanse is not None:
            fields = self.cleanse.audit_fields()
            d.update(fields)
            d["cleanse"] = {k: v for k, v in self.cleanse._dict().items() if k not in fields}
        d["seconds"] = round(self.seconds, 3)
        return d

    def figures(self) -> dict[str, bytes]:
        figs = self.inspector.figures(self.inspection)
        if self.cleanse is not None:
            figs.update(self.cleanse.figures())
        return figs

    def data_files(self) -> dict[str, bytes]:
        return self.cleanse.data_files() if self.cleanse is not None else {}


def audit(model: ModelLike, clean: DataLike, *, train: DataLike | None = None, pi: float = 0.9,
          images_per_class: int = 100, statistic: str = "min-norm", technique: int = 2, relabel: str = "auto",
          seed: int = 0, arch: str | None = None, calibration: Any = None, every_pair: bool = False) -> AuditReport:
    """Is this model backdoored? Reverse-engineer a trigger for every (source, target) pair on the
    clean images (an npz's test split when it has one) and flag the outliers; with ``train``, flag
    the poisoned training samples and correct their labels (pattern subtraction). ``calibration``:
    a file written by :func:`calibrate` (clean models of the same data): each pair is then compared
    with the same pair in those clean models, with the thresholds fitted there. ``every_pair``: scan
    all K(K-1) pairs even above the scan's budget (many classes: see the pairwise inspector's ``budget``)."""
    t0 = time.perf_counter()
    # every parameter is checked before anything is loaded (the cleanser's too, used only with ``train``)
    insp = make_defense("pairwise", {"pi": pi, "images_per_class": images_per_class, "statistic": statistic,
                                     "seed": seed, "calibration": None if calibration is None else str(calibration),
                                     **({"budget": None} if every_pair else {})},
                        family="inspector", where="audit")
    cl = make_defense("pattern-subtraction", {"technique": technique, "relabel": relabel, "seed": seed},
                      family="cleanser", where="audit")
    net, clean_set = model_and_data(model, clean, split="auto", arch=arch)
    loaded = _training_set(train) if train is not None else None  # a bad training set is refused before the scan
    if loaded is not None:
        _check_same_task(loaded[0], clean_set)
    res = insp.inspect(net, clean_set)
    found = None
    if loaded is not None:
        found = _cleanse(cl, cl, loaded[0], loaded[1], net, clean_set, res, time.perf_counter())
    return AuditReport(res, insp, time.perf_counter() - t0, found)


# ----------------------------------------------------------------------------- calibration
@dataclass(eq=False)
class CalibrationReport(Report):
    """A null of the pairwise scan fitted on clean models (:mod:`backdoorlab.defenses._pair_null`);
    ``path`` the calibration file (give it to :func:`audit`)."""

    kind: ClassVar[str] = "calibration"
    null: Any
    path: Any
    per_model: list[dict[str, Any]]
    seconds: float

    def _dict(self) -> dict[str, Any]:
        return {"calibration": str(self.path), "inspector": self.null.FOR, "models": self.null.n_models,
                "num_classes": self.null.num_classes, "input_shape": list(self.null.input_shape),
                "pair_threshold": self.null.threshold if self.null.FOR == "pairwise" else None,
                "target_threshold": self.null.target_threshold, "threshold_source": self.null.describe(),
                "per_model": self.per_model, "seconds": round(self.seconds, 3)}


def calibrate(models: list[ModelLike], clean: DataLike, out: Any, *, pi: float = 0.9, images_per_class: int | None = None,
              seed: int = 0, arch: str | None = None, every_pair: bool = False,
              inspector: str = "pairwise") -> CalibrationReport:
    """Fit an inspector's null on clean ``models`` (3 or more, all of the same data as ``clean``)
    and write it to ``out`` (safetensors). ``inspector``: ``pairwise`` (the pairwise scan, for
    :func:`audit`'s ``calibration``) or ``neural-cleanse`` (its mask norms, for its ``calibration``
    setting). Each model is scanned as the suspect will be (same ``pi``, ``images_per_class``,
    ``seed``; ``images_per_class`` None: the inspector's default): use the same settings then."""
    from pathlib import Path

    from backdoorlab.defenses._pair_null import fit, fit_targets

    t0 = time.perf_counter()
    models = list(models)
    if inspector not in ("pairwise", "neural-cleanse"):
        raise BackdoorLabError(f"calibrate fits the pairwise or the neural-cleanse inspector, not {inspector!r}; "
                               "give --inspector pairwise or --inspector neural-cleanse")
    if len(models) < 3:
        raise BackdoorLabError(f"calibration needs at least 3 clean models (got {len(models)}); give more --model")
    ipc = {} if images_per_class is None else {"images_per_class": images_per_class}
    if inspector == "pairwise":
        params = {"pi": pi, **ipc, "seed": seed, **({"budget": None} if every_pair else {})}
    else:
        params = {**ipc, "seed": seed}
    insp = make_defense(inspector, params, family="inspector", where="calibrate")
    clean_set = load_data(clean, split="auto")
    nets = [load_model(m, data=clean_set, arch=arch) for m in models]  # every model checked before the first scan
    norms, reached, per_model = [], [], []
    for m, net in zip(models, nets):
        t1 = time.perf_counter()
        if inspector == "pairwise":
            est = insp.estimate(net, clean_set)
        else:
            res = insp.inspect(net, clean_set)
            est = {"norms": res.scores, "reached": res.details["reached"]}
        norms.append(est["norms"])
        reached.append(est["reached"])
        per_model.append({"model": str(m) if not hasattr(m, "forward") else type(m).__name__,
                          "seconds": round(time.perf_counter() - t1, 3)})
    source = f"{len(models)} models on {clean_set.num_classes} classes"
    archs = [getattr(getattr(net, "spec", None), "name", None) or "unknown" for net in nets]
    null = (fit if inspector == "pairwise" else fit_targets)(norms, reached, clean_set.shape, source=source,
                                                             scan=insp.scan_settings(), architectures=archs)
    path = null.save(Path(out))
    return CalibrationReport(null, path, per_model, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- bias maps
@dataclass(eq=False)
class BiasMapsReport(_Verdict, Report):
    """Seed 002's adversarial bias-map comparison: verdict, per-class statistics, figures."""

    kind: ClassVar[str] = "biasmaps"
    inspection: InspectionResult
    inspector: Inspector
    seconds: float

    def _dict(self) -> dict[str, Any]:
        return {"backdoored": self.backdoored, "flagged_classes": self.flagged_targets,
                "flagged_pairs": [list(p) for p in self.flagged_pairs], **self.inspector.summary(self.inspection),
                "seconds": round(self.seconds, 3)}

    def figures(self) -> dict[str, bytes]:
        return self.inspector.figures(self.inspection)


def bias_maps(model: ModelLike, clean: DataLike, *, reference: ModelLike | None = None, arch: str | None = None,
              reference_arch: str | None = None, **params: Any) -> BiasMapsReport:
    """Is this model backdoored? Compare its adversarial bias maps (mean I-FGSM images per class and
    per pair) with a clean ``reference`` model's (without one, each class with the others).
    ``params`` are the ``bias-maps`` defense's (inputs, eps, iterations, samples_per_class, ...)."""
    t0 = time.perf_counter()
    insp = make_defense("bias-maps", params, family="inspector", where="biasmaps")
    net, clean_set = model_and_data(model, clean, split="auto", arch=arch)
    ref = None
    if reference is not None:
        try:
            ref = load_model(reference, data=clean_set, arch=reference_arch)
        except BackdoorLabError as exc:
            raise BackdoorLabError(f"reference {reference}: {exc}; the reference must be a model of the same task as "
                                   "the suspect (same classes, same image shape)") from None
    res = insp.inspect(net, clean_set, reference=ref)
    return BiasMapsReport(res, insp, time.perf_counter() - t0)
