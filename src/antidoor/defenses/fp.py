"""FP: Fine-Pruning.

Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018.

Backdoor neurons tend to stay dormant on clean inputs. With the channels of the last
convolutional layer (the inputs of the final linear layer, ``backbone.head``, after global
pooling: the same for every registered architecture):

1. Rank the channels by their mean activation on the defender's clean training images, lowest first.
2. Prune them cumulatively, ``ceil(prune_step * C)`` channels at a time, while the accuracy on the
   defender's *validation* images stays at least ``(1 - acc_ratio)`` times the unpruned model's;
   keep the largest pruning that met the criterion.
3. Fine-tune on the clean training images with the pruned channels held at zero.

Pruning a channel is masking its input to the linear head, so it is stored in the model itself as
zero columns of ``head.weight`` (kept zero after every fine-tuning step): the purified checkpoint
needs no mask. The last model is returned.

Defaults follow BackdoorBench: 1% of the channels per step, acc_ratio 0.1, SGD lr 0.01, momentum
0.9, weight decay 5e-4, cosine schedule, 100 fine-tuning epochs with crop-and-flip; batch 128 as
this project's FT (BackdoorBench: 256).

Deviations from BackdoorBench's code, and why:
- The stopping criterion is measured on the defender's validation split, never on test data.
- Each step prunes exactly its share of channels (the official loop prunes one fewer), and the
  kept mask is the last one that met the criterion (the official code keeps the one that broke it).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.defenses.finetune import FineTuneParams
from antidoor.defenses.tuning import tune
from antidoor.models.registry import Classifier
from antidoor.train import prepare_model


class FPParams(FineTuneParams):
    epochs: int = Field(100, ge=1, description="fine-tuning epochs after pruning")
    prune_step: float = Field(0.01, gt=0, le=1, description="share of the last-layer channels pruned per step")
    acc_ratio: float = Field(0.1, ge=0, lt=1, description="largest relative drop of validation accuracy allowed by pruning")


@torch.no_grad()
def mean_activations(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean penultimate activation per channel (the inputs of ``backbone.head``) over uint8 images."""
    model.eval()
    total = None
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().div_(255).contiguous(memory_format=torch.channels_last)
        s = model.features(x).float().sum(0)
        total = s if total is None else total + s
    assert total is not None
    return total / len(images)


@torch.no_grad()
def prune_dormant_channels(model: Classifier, data: DefenderData, prune_step: float, acc_ratio: float) -> torch.Tensor:
    """Steps 1-2: the channel mask (1 kept, 0 pruned), applied to ``head.weight`` in place."""
    head = model.backbone.head
    weight = head.weight.detach().clone()
    order = mean_activations(model, data.x).argsort()
    n = len(order)
    per_step = math.ceil(prune_step * n)
    floor = (1 - acc_ratio) * data.val_accuracy(model)
    mask = torch.ones(n, device=weight.device)
    for k in range(per_step, n, per_step):  # never all of them: the head would output its bias only
        trial = torch.ones_like(mask)
        trial[order[:k]] = 0
        head.weight.copy_(weight * trial)
        if data.val_accuracy(model) < floor:
            break
        mask = trial
    head.weight.copy_(weight * mask)
    return mask


@DEFENSES.register("fp")
class FinePruning(Defense):
    name = "fp"
    Params = FPParams
    params: FPParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        prepare_model(model, data.device, p.channels_last)
        mask = prune_dormant_channels(model, data, p.prune_step, p.acc_ratio)
        head_weight = model.backbone.head.weight

        def keep_pruned() -> None:
            with torch.no_grad():
                head_weight.mul_(mask)

        tune(model, data, p, seed=self.seed, after_step=keep_pruned,
             on_epoch_end=lambda epoch: self.report(epoch, model), description="FP")
        return model
