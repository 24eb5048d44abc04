"""What attacks that fit their trigger share: surrogate-model parameters and training, and small nets.

LC, LF and TrojanNN fit their trigger against a clean classifier; the official resources (an
adversarially trained ResNet-18 for LC, BackdoorBench's clean PreAct-ResNet-18 for LF and TrojanNN)
are not available, so the attacker trains its own surrogate on its own data (the training set it
poisons) with the shared trainer. Its size and length are parameters, so tests fit in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from antidoor.attacks.base import AttackerData, AttackParams
from antidoor.errors import AntidoorError
from antidoor.models import MODELS, Classifier, build_model
from antidoor.train import TrainConfig, train


class SurrogateParams(AttackParams):
    """Parameters of the attacker's own clean surrogate classifier."""

    surrogate_model: str = Field("small_cnn", description="architecture of the attacker's surrogate classifier")
    surrogate_width: int = Field(16, ge=1, description="channels of the surrogate's first stage")
    surrogate_epochs: int = Field(10, ge=1, description="epochs the surrogate trains on the attacker's data")
    surrogate_lr: float = Field(0.05, gt=0, description="SGD learning rate of the surrogate (cosine schedule)")

    @field_validator("surrogate_model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in MODELS:
            raise AntidoorError(f"attack.surrogate_model {v!r} is not a model; available: {', '.join(MODELS.names())}")
        return v


def surrogate_config(p: SurrogateParams, n: int) -> TrainConfig:
    return TrainConfig(epochs=p.surrogate_epochs, lr=p.surrogate_lr, batch_size=min(128, n))


def new_surrogate(p: SurrogateParams, data: AttackerData) -> Classifier:
    return build_model(p.surrogate_model, data.num_classes, data.x.shape[1], data.mean, data.std,
                       width=p.surrogate_width).to(data.device)


def train_surrogate(p: SurrogateParams, data: AttackerData, seed: int) -> Classifier:
    """A clean classifier trained on the attacker's data, frozen, in eval mode."""
    model = new_surrogate(p, data)
    train(model, data.x, data.y, surrogate_config(p, len(data.x)), seed=seed, hflip=data.hflip,
          description="attack: surrogate model")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Accuracy on uint8 images (the attacker's own data: a sanity figure for ``fit_report``)."""
    correct = sum(int((model(x[i:i + batch_size].float().div(255)).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def tensors_of(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers as detached trigger tensors under ``prefix.``."""
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def call_with(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, *args: torch.Tensor) -> torch.Tensor:
    """Run ``module`` (eval mode) with the weights stored in ``tensors`` under ``prefix.``."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return torch.func.functional_call(module, state, args)


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class EncoderDecoder(nn.Module):
    """Image-to-image net without skips: three down stages (``w, 2w, 4w`` channels, two conv blocks
    then max-pooling each), a middle block, three up stages (bilinear upsampling to the matching
    encoder size, two conv blocks), output in [0, 1]. Works for any image size."""

    def __init__(self, c_in: int, c_out: int, width: int) -> None:
        super().__init__()
        w = width
        chans = [c_in, w, 2 * w, 4 * w]
        self.down = nn.ModuleList(nn.Sequential(*conv_block(chans[i], chans[i + 1]), *conv_block(chans[i + 1], chans[i + 1]))
                                  for i in range(3))
        self.middle = nn.Sequential(*conv_block(4 * w, 4 * w))
        ups = [(4 * w, 2 * w), (2 * w, w), (w, w)]
        self.up = nn.ModuleList(nn.Sequential(*conv_block(a, a), *conv_block(a, b)) for a, b in ups)
        self.out = nn.Conv2d(w, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for stage in self.down:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.middle(x)
        for stage, size in zip(self.up, reversed(sizes), strict=True):
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return torch.tanh(self.out(x)) / 2 + 0.5


def init_module(factory: type[nn.Module], generator: torch.Generator, *args: int) -> nn.Module:
    """Build a module with weights drawn from ``generator`` (not the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return factory(*args).eval()
