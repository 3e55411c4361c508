"""Attacks: the registry :data:`ATTACKS`, :func:`poison` and :func:`poison_test`.

Data-poisoning attacks (:class:`Attack`): badnets, blend, multiplicative, sig, clean-label,
random-position, wanet. Training-time attacks (:class:`TrainingAttack`): input-aware, pruning-aware.
Every module of this folder is imported (:func:`backdoorlab.registry.discover`): a new attack is one
file here, or a plugin (see :mod:`backdoorlab.registry`).
"""

from backdoorlab.attacks.base import (
    ATTACKS, DATA_KINDS, MODES, Attack, TrainedVictim, TrainingAttack, apply_attack_defaults, attack_defaults,
    choose_indices, data_kind, is_training_attack, poison, poison_test, triggered_test_set,
)
from backdoorlab.registry import discover

discover(__name__)  # register the attacks: every module of this package

__all__ = ["ATTACKS", "DATA_KINDS", "MODES", "Attack", "TrainedVictim", "TrainingAttack", "apply_attack_defaults",
           "attack_defaults", "choose_indices", "data_kind", "is_training_attack", "poison", "poison_test",
           "triggered_test_set"]
