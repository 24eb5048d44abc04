"""FST: Feature Shift Tuning.

Min, Qin, Zhang, Shen & Cheng, "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023.

Plain fine-tuning barely moves the features when the head stays close to its backdoored value.
FST re-initialises the linear head (weight and bias ~ U(-1/sqrt(d), 1/sqrt(d)), d its input size)
and fine-tunes *all* layers with

    CE(f(x), y) + alpha * <W, W_orig>          (W_orig: the backdoored head's weight, fixed)

which pushes the new head away from the old one, so the features must shift. After every step W is
rescaled to the Frobenius norm of W_orig, so the penalty cannot be lowered by shrinking W. The last
model is returned.

Defaults from the authors' README (``stable_backdoor_purification``): alpha 0.1 (their code's
default is 0.2), SGD lr 0.01, momentum 0.9, no weight decay, 10 epochs, batch 128, cosine schedule
(per epoch there, per batch here), crop-and-flip augmentation, every batch kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.defenses.finetune import FineTuneParams
from antidoor.defenses.tuning import tune
from antidoor.models.registry import Classifier
from antidoor.train import prepare_model
from antidoor.utils import generator_for


class FSTParams(FineTuneParams):
    weight_decay: float = Field(0.0, ge=0)
    alpha: float = Field(0.1, ge=0, description="weight of the inner product <W, W_orig> with the original head")


@torch.no_grad()
def reinitialise_head(head: nn.Linear, g: torch.Generator) -> None:
    bound = 1 / math.sqrt(head.in_features)
    head.weight.uniform_(-bound, bound, generator=g)
    if head.bias is not None:
        head.bias.uniform_(-bound, bound, generator=g)


@DEFENSES.register("fst")
class FST(Defense):
    name = "fst"
    Params = FSTParams
    params: FSTParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        prepare_model(model, data.device, p.channels_last)
        head: nn.Linear = model.backbone.head
        w_orig = head.weight.detach().clone()
        norm_orig = w_orig.norm()
        reinitialise_head(head, generator_for(data.device, self.seed))

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(m(x), y) + p.alpha * (head.weight * w_orig).sum()

        def keep_norm() -> None:
            with torch.no_grad():
                head.weight.mul_(norm_orig / head.weight.norm())

        tune(model, data, p, seed=self.seed, loss_fn=loss_fn, after_step=keep_norm,
             on_epoch_end=lambda epoch: self.report(epoch, model), description="FST")
        return model
