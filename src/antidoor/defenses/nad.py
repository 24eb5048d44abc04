"""NAD: Neural Attention Distillation.

Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
Neural Networks", ICLR 2021.

1. Teacher: a copy of the backdoored model fine-tuned on the defender's clean images
   (``teacher_epochs`` epochs of the recipe below with a cosine schedule, like FT).
2. Student: the backdoored model, fine-tuned for ``epochs`` on the same images with
   ``CE(f(x), y) + beta_1 AT(a_1) + beta_2 AT(a_2)``, where for the feature maps a (B, C, H, W)
   of the student and the frozen teacher at one layer::

       A(a)     = normalise_L2(sum_c |a_c|^p)          (a spatial attention map per image)
       AT(a)    = mean((A(a_student) - A(a_teacher))^2)

3. The student after the last epoch is the result.

Which layers: the outputs of the last two stages, found generically for every architecture: the
last two spatial resolutions (larger than 1x1) that the network's feature maps take, and at each,
the outermost module producing it, last in forward order (``layer3``/``layer4`` in the ResNets,
the last ReLU at 8x8 and the final pooled 4x4 map in small_cnn, the last ReLUs at 4x4 and 2x2 in
VGG-16). :func:`attention_layers` returns their names.

Defaults from BackdoorBench: teacher 10 epochs, student 10 epochs at a constant lr 0.01 (SGD,
momentum 0.9, weight decay 5e-4), beta_1 500 (layer3), beta_2 1000 (layer4), p 2, crop-and-flip;
batch 128 as this project's FT (BackdoorBench: 256).

Deviation: BackdoorBench adds a third term (beta_3 1000) on the globally pooled output. That map is
1x1, so after L2 normalisation it is 1 for student and teacher alike and the term is always zero:
we leave it out rather than carry a parameter that cannot change anything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from antidoor.defenses.base import DEFENSES, DefenderData, Defense
from antidoor.defenses.finetune import FineTuneParams
from antidoor.defenses.tuning import tune
from antidoor.models.registry import Classifier


class NADParams(FineTuneParams):
    epochs: int = Field(10, ge=1, description="student epochs")
    schedule: Literal["cosine", "onecycle", "constant"] = Field("constant", description="student schedule (per batch)")
    teacher_epochs: int = Field(10, ge=1, description="fine-tuning epochs of the teacher (cosine schedule)")
    beta_1: float = Field(500.0, ge=0, description="weight of the attention loss at the second-to-last stage")
    beta_2: float = Field(1000.0, ge=0, description="weight of the attention loss at the last stage")
    power: float = Field(2.0, gt=0, description="p of the attention map sum_c |a_c|^p")


@torch.no_grad()
def attention_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs end the last two stages (see the module docstring)."""
    seen: list[tuple[str, tuple[int, int]]] = []

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-2] * out.shape[-1] > 1:
                seen.append((name, (out.shape[-2], out.shape[-1])))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    sizes = list(dict.fromkeys(size for _, size in seen))  # in order of first appearance
    names = []
    for size in sizes[-2:]:
        candidates = [name for name, s in seen if s == size]
        depth = min(name.count(".") for name in candidates)
        names.append([name for name in candidates if name.count(".") == depth][-1])
    return names


def attention_map(a: torch.Tensor, power: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the channel sum of |a|^p, L2-normalised per image."""
    return F.normalize(a.float().abs().pow(power).sum(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float) -> torch.Tensor:
    return (attention_map(student, power) - attention_map(teacher, power)).pow(2).mean()


class _Taps:
    """Forward hooks that keep the latest outputs of the named modules."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            self.out[name] = out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@DEFENSES.register("nad")
class NAD(Defense):
    name = "nad"
    Params = NADParams
    params: NADParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        teacher = copy.deepcopy(model)
        tune(teacher, data, p.model_copy(update={"epochs": p.teacher_epochs, "schedule": "cosine"}), seed=self.seed,
             description="NAD teacher")
        teacher.requires_grad_(False).eval()
        layers = attention_layers(model.to(data.device), data.x[:2].float().div(255))
        student_taps, teacher_taps = _Taps(model, layers), _Taps(teacher, layers)
        betas = (p.beta_1, p.beta_2)[-len(layers):]

        def loss_fn(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher(x)
            loss = F.cross_entropy(student(x), y)
            for name, beta in zip(layers, betas, strict=True):
                loss = loss + beta * attention_loss(student_taps.out[name], teacher_taps.out[name], p.power)
            return loss

        try:
            tune(model, data, p, seed=self.seed, loss_fn=loss_fn,
                 on_epoch_end=lambda epoch: self.report(epoch, model), description="NAD student")
        finally:
            student_taps.remove()
            teacher_taps.remove()
        return model
