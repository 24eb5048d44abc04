"""The metrics, named as methods.md defines them.

- ``clean_acc``: accuracy on the clean test set.
- ``asr``: share of *non-target-class* test images that, with the trigger, are classified as the target.
- ``robust_acc``: accuracy on those same triggered images against their true labels.
- ``der``: (max(0, asr_before - asr_after) - max(0, acc_before - acc_after) + 1) / 2.
"""

from __future__ import annotations

import torch
from torch import nn

from antidoor.attacks.base import Attack, NoAttack
from antidoor.errors import AntidoorError
from antidoor.precision import autocast
from antidoor.utils import warn


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512, amp: bool = True) -> torch.Tensor:
    """Predicted classes for uint8 (or float [0, 1]) images, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        with autocast(device, amp):
            out.append(model(x.contiguous(memory_format=torch.channels_last)).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


class Evaluator:
    """Holds the clean and the triggered test images, built once, to measure any number of models.

    The triggered set holds only non-target-class images, quantised to uint8 like a stored image.
    """

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor, attack: Attack | None = None, batch_size: int = 512) -> None:
        self.x, self.y = x_test, y_test
        self.attack = None if attack is None or isinstance(attack, NoAttack) else attack
        self.batch_size = batch_size
        if self.attack is not None:
            if not self.attack.prepared:
                warn(f"attack {self.attack.name!r} has not been fitted (Attack.prepare); measuring its initial, unfitted trigger")
            keep = y_test != self.attack.target
            if not keep.any():
                raise AntidoorError(f"every test image belongs to the target class {self.attack.target}, "
                                    "so asr cannot be measured; use test data with other classes")
            self.y_bd = y_test[keep]
            kept = x_test[keep]
            self.x_bd = torch.cat([self.attack.apply_uint8(kept[i:i + batch_size]) for i in range(0, len(kept), batch_size)])

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.measure(model)[0]

    def subset(self, count: int | None, seed: int = 0) -> Evaluator:
        """An evaluator on a fixed, class-stratified ``count`` of the test images (itself when ``count`` is
        None or not smaller than the test split): for curves, where the whole split would cost more than
        it tells. Headline numbers are measured on the whole split."""
        from antidoor.data.splits import stratified_subset

        if count is None or count >= len(self.y):
            return self
        idx = stratified_subset(self.y.cpu(), 0.0, torch.Generator().manual_seed(seed), count=count).sort().values
        idx = idx.to(self.y.device)
        return Evaluator(self.x[idx], self.y[idx], self.attack, self.batch_size)

    def measure(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
        """The metrics and, per triggered test image, whether it went to the target (a bool CPU tensor;
        None without an attack): what a bootstrap over test images resamples."""
        result = {"clean_acc": (predict(model, self.x, self.batch_size) == self.y.to(_device(model))).float().mean().item()}
        if self.attack is None:
            return result, None
        pred = predict(model, self.x_bd, self.batch_size)
        hits = pred == self.attack.target
        result["asr"] = hits.float().mean().item()
        result["robust_acc"] = (pred == self.y_bd.to(pred.device)).float().mean().item()
        return result, hits.cpu()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, attack: Attack | None = None) -> dict[str, float]:
    """clean_acc, and asr and robust_acc when an attack is given (see the module docstring)."""
    return Evaluator(x_test, y_test, attack)(model)


def der(before: dict[str, float], after: dict[str, float]) -> float:
    """Defense effectiveness rate: asr reduction minus clean-accuracy loss, mapped to [0, 1]."""
    asr_drop = max(0.0, before["asr"] - after["asr"])
    acc_drop = max(0.0, before["clean_acc"] - after["clean_acc"])
    return (asr_drop - acc_drop + 1) / 2
