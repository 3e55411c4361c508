"""Attacks: the registry :data:`ATTACKS`, :func:`poison` and :func:`poison_test`.

Data-poisoning attacks (:class:`Attack`): badnets, blend, multiplicative, sig, clean-label,
random-position, wanet. Training-time attacks (:class:`TrainingAttack`): input-aware, pruning-aware.
"""

from backdoorlab.attacks import (  # noqa: F401  (register the attacks)
    badnets, blend, clean_label, input_aware, multiplicative, pruning_aware, random_position, sig, wanet,
)
from backdoorlab.attacks.base import (
    ATTACKS, MODES, Attack, TrainedVictim, TrainingAttack, choose_indices, is_training_attack, poison, poison_test,
    triggered_test_set,
)

__all__ = ["ATTACKS", "MODES", "Attack", "TrainedVictim", "TrainingAttack", "choose_indices", "is_training_attack",
           "poison", "poison_test", "triggered_test_set"]
