"""backdoorlab's Python API: what the ``backdoorlab`` command does, as functions.

>>> from backdoorlab.api import audit, cleanse, load_data, load_model
>>> clean = load_data("clean.npz")                     # doctest: +SKIP
>>> model = load_model("model.pt", data=clean)         # doctest: +SKIP
>>> report = audit(model, clean)                       # doctest: +SKIP
>>> report.backdoored, report.flagged_pairs            # doctest: +SKIP
(True, [(0, 2)])

Models and data may be given as paths (safetensors, torch.export ``.pt2`` or TorchScript files;
.npz files, image folders, data set names) or as loaded objects (``torch.nn.Module``, :class:`ImageSet`). Each
function returns a typed result: the family's result from the defense (``.inspection``,
``.result``), the main facts as attributes, ``.to_dict()`` (JSON-ready, the keys of the command's
``--json``) and ``.write(folder)`` (the report folder: JSON, figures, data files; atomically).
Ground truth (``is_poison`` in an .npz, a PoisonedSet) is used only to report; no defense sees it.
Every path is checked by :mod:`backdoorlab.validate` before anything runs: bad input is one
:class:`~backdoorlab.errors.BackdoorLabError` naming the problem and the fix.
"""

from backdoorlab.api._common import json_ready, load_data, load_model, make_defense
from backdoorlab.api.defend import GuardReport, RepairReport, RobustTrainReport, guard, repair, train_robust
from backdoorlab.api.experiments import BenchReport, StoreReport, bench, report, run
from backdoorlab.api.inspection import (
    AuditReport, BiasMapsReport, CalibrationReport, CleanseReport, audit, bias_maps, calibrate, cleanse,
)

__all__ = [
    "AuditReport", "BenchReport", "BiasMapsReport", "CleanseReport", "GuardReport", "RepairReport",
    "RobustTrainReport", "StoreReport", "audit", "bench", "bias_maps", "calibrate", "CalibrationReport", "cleanse", "guard", "json_ready",
    "load_data", "load_model", "make_defense", "repair", "report", "run", "train_robust",
]
