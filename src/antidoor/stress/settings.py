"""The stress suite's settings, apart from the suite itself so that configs can name them.

:mod:`antidoor.config` (the run configs) and :mod:`antidoor.experiment.study` take these; the suite
(:mod:`antidoor.stress.suite`) runs them and needs the pipeline, which needs the configs: keeping the
settings here keeps the layers pointing down (config -> stress.settings, never config -> suite).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from antidoor.stress.guards import GuardConfig
from antidoor.stress.inverted import InversionConfig
from antidoor.stress.path import PathConfig
from antidoor.stress.qra import QRAConfig
from antidoor.stress.retune import RAConfig
from antidoor.stress.verdict import VerdictConfig


class ModelStressConfig(BaseModel):
    """What every stressed model goes through: RA; QRA and the path for purified ones (and EP).
    ``qra: null`` or ``path: null`` leaves a part out. A study's ``stress:`` section is this."""

    model_config = ConfigDict(extra="forbid")
    ra: RAConfig = RAConfig()
    qra: QRAConfig | None = QRAConfig()
    path: PathConfig | None = PathConfig()


class StressConfig(ModelStressConfig):
    """What ``antidoor stress`` runs: :class:`ModelStressConfig` plus the EP reference it may purify itself."""

    ep: bool = Field(True, description="also stress EP (oracle; purified from the backdoored model) when its poisoned "
                                       "samples are recorded and no EP model is given")
    ep_params: dict[str, Any] = Field(default_factory=dict, description="parameters of that EP (default: FT's recipe)")
    guards: GuardConfig = GuardConfig()
    verdict: VerdictConfig = VerdictConfig()
    inversion: InversionConfig | None = Field(None, description="trigger unknown: recover one from the backdoored "
                                                                "model (BTI-DBF inversion); null: the given trigger")
