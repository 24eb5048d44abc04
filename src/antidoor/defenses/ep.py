"""EP (exact purification): the oracle reference of the superficial-safety paper.

Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense",
NeurIPS 2024. Fine-tunes the backdoored model on the clean set plus the real poisoned training
samples *with their true labels*, so the model is shown exactly what the trigger must not mean.
It needs the trigger and the poisoned samples, so it is a reference, not a practical defense (and
not the pruning method BackdoorBench also calls EP). Same recipe as FT (SGD lr 0.01, 10 epochs,
augmentation); :func:`antidoor.purify` refuses it clearly when the poisoned samples are unknown.
"""

from __future__ import annotations

import torch

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.defenses.finetune import FineTuneParams
from antidoor.models.registry import Classifier
from antidoor.train import train


@DEFENSES.register("ep")
class ExactPurification(Defense):
    name = "ep"
    Params = FineTuneParams
    params: FineTuneParams
    needs_poisoned = True

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        assert data.poisoned_x is not None and data.poisoned_y is not None  # checked by antidoor.purify
        x = torch.cat([data.x, data.poisoned_x])
        y = torch.cat([data.y, data.poisoned_y])
        self.note_full_batch(self.params.batch_size, len(x))
        train(model, x, y, self.params, seed=self.seed, hflip=data.hflip, description="EP",
              on_epoch_end=lambda epoch, _: self.report(epoch + 1, model))
        return model
