"""FT-SAM: fine-tuning with sharpness-aware minimisation.

Zhu, Wei, Zha & Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023.

Fine-tune the backdoored model on the defender's clean images with SAM (:class:`antidoor.optim.SAM`):
each step takes the gradient at the worst point within radius rho (adaptive: scaled by |w|, ASAM)
and applies it at the current weights. The paper finds that backdoor-related neurons have larger
weight norms and that this update shrinks them, which plain fine-tuning barely does. Loss:
cross-entropy with label smoothing. The last model is returned.

Defaults from BackdoorBench: 100 epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4, rho 2.0,
adaptive SAM on (its ``--adaptive`` is a store_false flag, so it is on unless given), label
smoothing 0.1, crop-and-flip; batch 128 as this project's FT (BackdoorBench: 256). The defender's
clean set is already class-balanced (a stratified split), as BackdoorBench's 250 images per class are.

Deviation: BackdoorBench steps its cosine schedule per batch with T_max 100, so the learning rate
cycles (every 20 epochs on 2,500 images) instead of decaying once; here the cosine schedule spans the
whole run. The second (perturbed) forward of each step does not update the BatchNorm running
statistics (see :mod:`antidoor.defenses.tuning`).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.defenses.finetune import FineTuneParams
from antidoor.defenses.tuning import tune
from antidoor.models.registry import Classifier
from antidoor.optim import SAM
from antidoor.train import make_optimizer, prepare_model


class FTSAMParams(FineTuneParams):
    epochs: int = Field(100, ge=1)
    rho: float = Field(2.0, ge=0, description="SAM neighbourhood radius")
    adaptive: bool = Field(True, description="adaptive SAM (ASAM): the radius scales with |w|")
    label_smoothing: float = Field(0.1, ge=0, lt=1)


@DEFENSES.register("ft-sam", aliases=("ftsam",))
class FTSAM(Defense):
    name = "ft-sam"
    Params = FTSAMParams
    params: FTSAMParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        prepare_model(model, data.device, p.channels_last)
        optimizer = SAM(make_optimizer(model.parameters(), p), rho=p.rho, adaptive=p.adaptive)
        tune(model, data, p, seed=self.seed, optimizer=optimizer,
             loss_fn=lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=p.label_smoothing),
             on_epoch_end=lambda epoch: self.report(epoch, model), description="FT-SAM")
        return model
