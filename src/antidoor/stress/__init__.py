"""Post-purification robustness: is a purification deep or superficial?

- :func:`retuning_attack` (RA): fine-tune on a few poisoned samples; ``o_asr`` -> ``p_asr``.
- :func:`qra`: a learned input perturbation that reactivates the backdoor (``qra_asr_purified`` vs ``qra_asr_clean``).
- :func:`backdoor_path`: clean_acc and asr along the line from the purified to the backdoored weights.
- :func:`run_stress` / :func:`write_report`: all three with the clean, backdoored and EP references
  (:func:`stress_model`: one model's share, as a study's ``stress`` stage runs it).
"""

from antidoor.stress.path import PathConfig, PathResult, backdoor_path, check_same_architecture, reestimate_bn
from antidoor.stress.qra import PerturbationGenerator, QRAConfig, QRAData, QRAResult, make_qra_data, perturb, qra
from antidoor.stress.retune import RAConfig, RAData, RAResult, RARun, make_ra_data, retuning_attack
from antidoor.stress.settings import ModelStressConfig, StressConfig

# the suite needs the pipeline, which needs antidoor.config, which needs the settings above: it is
# imported on first use, so that importing any stress module never drags the pipeline in
_SUITE = {"ModelStress", "StressResult", "markdown", "qra_data_for", "ra_data_for", "run_stress", "stress_model", "write_report"}


def __getattr__(name: str) -> object:
    if name in _SUITE:
        from antidoor.stress import suite

        return getattr(suite, name)
    raise AttributeError(f"module 'antidoor.stress' has no attribute {name!r}")


__all__ = [
    "ModelStress", "ModelStressConfig", "PathConfig", "PathResult", "PerturbationGenerator", "QRAConfig", "QRAData",
    "QRAResult", "RAConfig", "RAData", "RAResult", "RARun", "StressConfig", "StressResult", "backdoor_path",
    "check_same_architecture", "make_qra_data", "make_ra_data", "markdown", "perturb", "qra", "qra_data_for", "ra_data_for",
    "reestimate_bn", "retuning_attack", "run_stress", "stress_model", "write_report",
]
