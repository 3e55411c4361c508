"""Defenses: the five families and the registry :data:`DEFENSES`.

Every module of this folder is imported (:func:`backdoorlab.registry.discover`): a new defense is
one file here, or a plugin (see :mod:`backdoorlab.registry`).
"""

from backdoorlab.defenses.base import (  # first: every defense module imports it
    DEFENSES, FAMILIES, CleanseResult, Cleanser, Defense, DetectionResult, InputDetector, InspectionResult,
    Inspector, RepairResult, Repairer, RobustTrainer, RobustTrainResult, mad_anomaly_index,
)
from backdoorlab.registry import discover

discover(__name__)  # register the defenses: every module of this package

from backdoorlab.defenses.strip import Guarded, Strip  # noqa: E402

__all__ = [
    "DEFENSES", "FAMILIES", "CleanseResult", "Cleanser", "Defense", "DetectionResult", "Guarded", "InputDetector",
    "InspectionResult", "Inspector", "RepairResult", "Repairer", "RobustTrainResult", "RobustTrainer", "Strip",
    "mad_anomaly_index",
]
