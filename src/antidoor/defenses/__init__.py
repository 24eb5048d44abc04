"""Defense registry: one file per purification method (and the oracle reference EP)."""

from antidoor.defenses import btidbf, ep, finetune, ftpam, pam, sau, saupam  # noqa: F401  (registration)
from antidoor.defenses.base import DEFENSES, DefenderData, Defense, purify

__all__ = ["DEFENSES", "DefenderData", "Defense", "purify"]
