"""Attacks: the registry :data:`ATTACKS`, :func:`poison` and :func:`poison_test`."""

from backdoorlab.attacks import badnets  # noqa: F401  (register the attacks)
from backdoorlab.attacks.base import ATTACKS, MODES, Attack, choose_indices, poison, poison_test

__all__ = ["ATTACKS", "MODES", "Attack", "choose_indices", "poison", "poison_test"]
