"""FT-PAM: plain fine-tuning (FT's recipe) with every step a PAM step.

Min, Qin, Zhang, Shen & Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense", NeurIPS 2024 (arXiv 2410.09838): PAM is an optimiser, so it composes with any
fine-tuning based defense. Here the defense is FT (cross-entropy on the defender's clean set, SGD lr
0.01, momentum 0.9, weight decay 5e-4, 10 epochs, batch 128, cosine schedule, crop and flip) and
the optimiser is wrapped in :class:`antidoor.optim.PAM` anchored at the model given to the defense
(the backdoored weights). With ``rho: 0`` it is FT, step for step; ``rho: auto`` (the default) chooses
rho on the defender's validation data (:class:`antidoor.defenses.pam.PathAware`).
"""

from __future__ import annotations

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.defenses.finetune import FineTuneParams
from antidoor.defenses.pam import PAMSettings, PathAware
from antidoor.defenses.tuning import tune
from antidoor.models.registry import Classifier
from antidoor.train import make_optimizer, prepare_model


class FTPAMParams(FineTuneParams, PAMSettings):
    """FT's recipe plus ``rho`` and ``rho_mode``."""


@DEFENSES.register("ft-pam")
class FTPAM(PathAware, Defense):
    name = "ft-pam"
    Params = FTPAMParams
    params: FTPAMParams

    def purify_at_rho(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        prepare_model(model, data.device, p.channels_last)
        optimizer = self.path_aware(make_optimizer(model.parameters(), p), model.parameters())  # anchor: the input weights
        tune(model, data, p, seed=self.seed, optimizer=optimizer, on_epoch_end=lambda epoch: self.report(epoch, model),
             description="FT-PAM")
        return model
