"""FT: plain fine-tuning on the defender's clean set (the weakest standard baseline).

Defaults from methods.md: SGD lr 0.01, momentum 0.9, weight decay 5e-4, 10 epochs, batch 128,
cosine schedule, crop-and-flip augmentation. (BackdoorBench's FT runs 100 epochs.) The last
model is returned.
"""

from __future__ import annotations

from pydantic import Field

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.models.registry import Classifier
from antidoor.train import TrainConfig, train


class FineTuneParams(TrainConfig):
    """The shared training recipe with fine-tuning defaults: 10 epochs and every batch kept."""

    epochs: int = Field(10, ge=1)
    drop_last: bool = False


@DEFENSES.register("ft")
class FineTune(Defense):
    name = "ft"
    Params = FineTuneParams
    params: FineTuneParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        self.note_full_batch(self.params.batch_size, len(data.x))
        train(model, data.x, data.y, self.params, seed=self.seed, hflip=data.hflip, description="FT",
              on_epoch_end=lambda epoch, _: self.report(epoch + 1, model))
        return model
