"""Attack registry: one file per poisoning attack."""

from antidoor.attacks import (  # noqa: F401  (registration)
    badnets,
    blended,
    input_aware,
    lc,
    lf,
    patch,
    sig,
    ssba_style,
    trojannn,
    wanet,
)
from antidoor.attacks.base import ATTACKS, Attack, AttackerData, AttackParams, create_attack

__all__ = ["ATTACKS", "Attack", "AttackParams", "AttackerData", "create_attack"]
