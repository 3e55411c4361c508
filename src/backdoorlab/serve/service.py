"""The guarded model as a service object: load once, answer batches of uint8 images.

:meth:`GuardService.guard` gives, for inputs (B, C, H, W) uint8, exactly what ``backdoorlab guard``
(:class:`~backdoorlab.defenses.Guarded`) gives on the same inputs and threshold: the model's class,
or K for inputs whose detector score is above the threshold. The detector's draws depend on each
input alone (STRIP seeds its blends from the input's pixels), so the answer to an input does not
depend on which other inputs share its batch.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backdoorlab.defenses.base import InputDetector
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GuardService:
    """A model guarded by a fitted input detector. ``threshold``: flagged when score > threshold."""

    model: nn.Module
    detector: InputDetector
    threshold: float
    clean: ImageSet
    method: str
    threshold_source: str
    startup_seconds: float = 0.0
    info_extra: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] | None = None  # the files it was built from (a worker process rebuilds it from them)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: Any, clean: Any, *, detector: str | None = None, params: dict[str, Any] | None = None,
              threshold_file: str | Path | bytes | None = None, clean_size: int | None = None, arch: str | None = None,
              seed: int = 0) -> "GuardService":
        """Load ``model`` and the ``clean`` held-out images (paths or objects, as the API takes them);
        restore the detector from ``threshold_file`` (written by ``guard --save-threshold``, or its
        bytes) or build
        ``detector`` (default strip) with ``params`` and fit it on the clean images."""
        from backdoorlab.api._common import load_data, load_model, make_defense, method_name, subsample
        from backdoorlab.api.defend import fitted_threshold, load_detector

        t0 = time.perf_counter()
        clean_set = load_data(clean, split="train")
        net = load_model(model, data=clean_set, arch=arch).eval()
        clean_set = subsample(clean_set, clean_size)
        params = dict(params or {})
        if threshold_file is not None:
            det, threshold, meta = load_detector(threshold_file, model=net, clean=clean_set)
            for k, v in params.items():
                if meta["params"].get(k) != v:
                    raise BackdoorLabError(f"--{k.replace('_', '-')} {v} differs from the threshold file's {k} "
                                           f"{meta['params'].get(k)}; drop the option or save the threshold again")
            if detector is not None and detector != meta["method"]:
                raise BackdoorLabError(f"--detector {detector} differs from the threshold file's method {meta['method']}; "
                                       "drop --detector or save the threshold again with guard --method")
            name = meta["method"]
            source = "sent by the server" if isinstance(threshold_file, bytes) else f"file {Path(threshold_file).name}"
        else:
            name = detector or "strip"
            det = make_defense(name, params, family="detector", where="--detector", option="--detector",
                               defaults={"seed": seed})
            det.fit(net, clean_set)
            threshold, source = fitted_threshold(det, clean_set.x[:1]), f"fitted at start-up on {len(clean_set)} clean images"
            name = method_name(det, name)
        svc = cls(net, det, threshold, clean_set, name, source, time.perf_counter() - t0)
        if isinstance(model, (str, Path)) and isinstance(clean, (str, Path)):
            svc.sources = {"model": str(model), "clean": str(clean), "clean_size": clean_size, "arch": arch}
        svc.guard(clean_set.x[:2])  # warm up (first calls of a traced model are slow)
        log.info("guarded model ready in %.1f s: %s, threshold %.4f (%s)", time.perf_counter() - t0, name, threshold, source)
        return svc

    # ------------------------------------------------------------------ facts
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.clean.shape)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self.clean.num_classes

    @property
    def trojaned_class(self) -> int:
        return self.clean.num_classes

    def info(self) -> dict[str, Any]:
        det = self.detector
        d: dict[str, Any] = {
            "method": self.method, "threshold": self.threshold, "threshold_source": self.threshold_source,
            "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            "trojaned_class": self.trojaned_class, "clean_size": len(self.clean),
            "startup_seconds": round(self.startup_seconds, 3),
        }
        if hasattr(det, "samples"):
            d["samples"] = det.samples
        if hasattr(det, "entropy_threshold"):
            d["entropy_threshold"] = -self.threshold  # STRIP: score = -entropy
        return d

    # ------------------------------------------------------------------ answering
    @torch.inference_mode()
    def guard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predictions (B,) in 0..K, scores (B,), flagged (B,)) for uint8 images (B, C, H, W)."""
        from backdoorlab.train import predict_logits

        pred = predict_logits(self.model, x).argmax(1)
        scores = self.detector.score(x).float()
        flagged = scores > self.threshold
        pred[flagged] = self.trojaned_class
        return pred, scores, flagged

    def worker_spec(self, threads: int) -> Any:
        """What a worker process needs to rebuild this service (:mod:`backdoorlab.serve.worker`):
        the files it was built from and the fitted detector as bytes."""
        from backdoorlab.api.defend import detector_bytes
        from backdoorlab.serve.worker import WorkerSpec

        if self.sources is None:
            raise BackdoorLabError("a model worker process rebuilds the service from files: build it from a model "
                                   "file and a clean set path or name (or serve in a thread)")
        blob = detector_bytes(self.detector, model=self.model, clean=self.clean, method=self.method)
        return WorkerSpec(detector=blob, threads=threads, **self.sources)

    def results(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """The JSON answer for a batch: one dict per input, in order."""
        return self.answers(*self.guard(x))

    def answers(self, pred: torch.Tensor, scores: torch.Tensor, flagged: torch.Tensor) -> list[dict[str, Any]]:
        """One JSON dict per input from :meth:`guard`'s tensors."""
        return [{"prediction": int(p), "trojaned": bool(f), "score": float(s), "threshold": self.threshold}
                for p, s, f in zip(pred.tolist(), scores.tolist(), flagged.tolist())]

    def explain(self, x: torch.Tensor) -> dict[str, Any]:
        """One image (1, C, H, W): its answer, and the superimposed copies the detector scored (PNG
        base64) when the detector shows them (STRIP)."""
        out: dict[str, Any] = {**self.results(x)[0], "input_png": png_base64(x[0].float() / 255.0)}
        if hasattr(self.detector, "entropy_threshold"):
            out["entropy"], out["entropy_threshold"] = -out["score"], -self.threshold
        copies = getattr(self.detector, "superimposed", None)
        out["copies"] = [png_base64(c.clamp(0.0, 1.0)) for c in copies(x)[0]] if copies is not None else []
        return out

    def sample_png(self, index: int) -> bytes:
        """Clean held-out image ``index`` as PNG bytes (for trying the page)."""
        if not 0 <= index < len(self.clean):
            raise BackdoorLabError(f"sample {index} does not exist: the clean set has {len(self.clean)} images (0..{len(self.clean) - 1})")
        return png_bytes(self.clean.x[index].float() / 255.0)


def png_bytes(img: torch.Tensor) -> bytes:
    """A float image (C, H, W) in [0, 1] as PNG bytes (grey or RGB)."""
    from PIL import Image

    a = img.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(a[..., 0], mode="L") if a.shape[2] == 1 else Image.fromarray(a, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def png_base64(img: torch.Tensor) -> str:
    return base64.b64encode(png_bytes(img)).decode()
