"""Defenses: the five families and the registry :data:`DEFENSES`."""

from backdoorlab.defenses import bias_maps, neural_cleanse, pairwise, pattern_subtraction  # noqa: F401  (register the defenses)

from backdoorlab.defenses.base import (
    DEFENSES, FAMILIES, CleanseResult, Cleanser, Defense, DetectionResult, InputDetector, InspectionResult,
    Inspector, RepairResult, Repairer, RobustTrainer, RobustTrainResult, mad_anomaly_index,
)

__all__ = [
    "DEFENSES", "FAMILIES", "CleanseResult", "Cleanser", "Defense", "DetectionResult", "InputDetector",
    "InspectionResult", "Inspector", "RepairResult", "Repairer", "RobustTrainResult", "RobustTrainer",
    "mad_anomaly_index",
]

from backdoorlab.defenses import abl, pruning, strip  # noqa: E402,F401  (register the defenses)
from backdoorlab.defenses.strip import Guarded, Strip  # noqa: E402

__all__ += ["Guarded", "Strip"]
