"""Attack registry: one file per poisoning attack."""

from antidoor.attacks import badnets, blended, sig, wanet  # noqa: F401  (registration)
from antidoor.attacks.base import ATTACKS, Attack, AttackParams, create_attack

__all__ = ["ATTACKS", "Attack", "AttackParams", "create_attack"]
