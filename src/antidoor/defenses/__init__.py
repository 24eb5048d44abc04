"""Defense registry: one file per purification method (and the oracle reference EP)."""

from antidoor.defenses import anp, btidbf, ep, finetune, fp, fst, ftpam, ftsam, ibau, nad, pam, sau, saupam  # noqa: F401
from antidoor.defenses.base import DEFENSES, DefenderData, Defense, purify

__all__ = ["DEFENSES", "DefenderData", "Defense", "purify"]
