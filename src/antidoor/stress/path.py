"""The backdoor-connected path: how far from the backdoored weights does a purified model really sit?

Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense",
NeurIPS 2024, Section 4 (linear mode connectivity). Along

    theta(t) = (1 - t) * theta_purified + t * theta_backdoored,   t in [0, 1] (21 points by default),

measure ``clean_acc`` and ``asr`` (and the "backdoor error" 1 - asr). A superficial purification sits
next to the backdoored solution: its asr climbs back as soon as t leaves 0. A deep one (EP, PAM)
keeps asr low far along the path.

BatchNorm buffers: interpolated running statistics do not describe the interpolated network, so by
default (``bn="reestimate"``) they are re-estimated at every point from the defender's clean images
(one pass, cumulative average, on the device; never the test split). ``bn="interpolate"``
interpolates them like the weights; then the endpoints are exactly the two models. Integer buffers
(``num_batches_tracked``) are taken from the purified model. One working copy of the model is
updated in place at every point: no per-point copies and no data reloading.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from antidoor.defenses.base import DefenderData
from antidoor.errors import AntidoorError
from antidoor.metrics import Evaluator
from antidoor.precision import autocast

BNMode = Literal["reestimate", "interpolate"]


class PathConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: int = Field(21, ge=2, description="evenly spaced t in [0, 1], both ends included")
    bn: BNMode = Field("reestimate", description="BatchNorm buffers: re-estimated on the defender's clean data, or interpolated")
    batch_size: int = Field(512, ge=1, description="batch size of the BatchNorm re-estimation pass")
    test_images: int | None = Field(None, ge=10, description="test images (a fixed stratified subset) measured at each "
                                    "point; null: the whole split (the two end models are always measured on it)")


@dataclass
class PathResult:
    t: list[float]
    clean_acc: list[float]
    asr: list[float]
    robust_acc: list[float]
    bn: str
    endpoints: dict[str, dict[str, float]] = field(default_factory=dict)  # the two models' own metrics
    seconds: float = 0.0

    @property
    def backdoor_error(self) -> list[float]:
        return [1 - a for a in self.asr]

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "clean_acc": self.clean_acc, "asr": self.asr, "backdoor_error": self.backdoor_error,
                "robust_acc": self.robust_acc, "bn": self.bn, "endpoints": self.endpoints, "seconds": self.seconds}


def _describe(model: nn.Module) -> str:
    arch = getattr(model, "arch", None)
    if not arch:
        return type(model).__name__
    kwargs = ", ".join(f"{k} {v}" for k, v in arch.get("kwargs", {}).items())
    return f"{arch['name']} ({arch['num_classes']} classes, {arch['in_channels']} channels{', ' + kwargs if kwargs else ''})"


def check_same_architecture(a: nn.Module, b: nn.Module, names: tuple[str, str] = ("purified", "backdoored")) -> None:
    """Refuse, with a clear message, two models whose weights cannot be interpolated."""
    arch_a, arch_b = getattr(a, "arch", None), getattr(b, "arch", None)
    if arch_a is not None and arch_b is not None and arch_a != arch_b:
        raise AntidoorError(f"cannot interpolate: the {names[0]} model is {_describe(a)} but the {names[1]} model is "
                            f"{_describe(b)}; the path needs two models of the same architecture and class count")
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb):
        diff = sorted(set(sa) ^ set(sb))[:3]
        raise AntidoorError(f"cannot interpolate: the {names[0]} and {names[1]} models have different layers (e.g. {diff})")
    for k, v in sa.items():
        if v.shape != sb[k].shape:
            raise AntidoorError(f"cannot interpolate: tensor {k!r} is {tuple(v.shape)} in the {names[0]} model and "
                                f"{tuple(sb[k].shape)} in the {names[1]} model (different architecture or class count)")


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 512, amp: bool = True) -> None:
    """Recompute every BatchNorm layer's running statistics from ``images`` (uint8, on the model's
    device) in one pass, as a cumulative average over the batches. Other layers stay in eval mode."""
    layers = _bn_layers(model)
    if not layers:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    device = images.device
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().div_(255).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            model(x)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def backdoor_path(purified: nn.Module, backdoored: nn.Module, clean_images: torch.Tensor | DefenderData, evaluator: Evaluator,
                  points: int = 21, bn: BNMode = "reestimate", batch_size: int = 512,
                  test_images: int | None = None) -> PathResult:
    """clean_acc and asr at ``points`` evenly spaced models between ``purified`` (t = 0) and ``backdoored`` (t = 1).

    ``clean_images``: the defender's clean images (uint8 N x C x H x W) for the BatchNorm
    re-estimation, or their :class:`DefenderData` (its training and validation images are used).
    ``test_images``: measure the points on a fixed stratified subset of the test split of that size.

    >>> path = backdoor_path(purified, backdoored, defender.x, scenario.evaluator)
    >>> path.asr[0], path.asr[-1]
    """
    if points < 2:
        raise AntidoorError(f"path.points must be at least 2 (both ends), got {points}")
    if bn not in ("reestimate", "interpolate"):
        raise AntidoorError(f"path.bn {bn!r} is not a BatchNorm mode; allowed: reestimate, interpolate")
    if evaluator.attack is None:
        raise AntidoorError("the backdoor-connected path needs an evaluator with an attack "
                            "(asr cannot be measured without a trigger)")
    check_same_architecture(purified, backdoored)
    if isinstance(clean_images, DefenderData):
        clean_images = torch.cat([clean_images.x, clean_images.x_val])
    device = clean_images.device
    if bn == "reestimate" and len(clean_images) == 0:
        raise AntidoorError("BatchNorm re-estimation needs the defender's clean images, got none")
    t0 = time.perf_counter()
    endpoints = {"purified": evaluator(purified.to(device)), "backdoored": evaluator(backdoored.to(device))}
    point_eval = evaluator.subset(test_images)
    work = copy.deepcopy(purified).to(device)
    src = {k: v.detach() for k, v in purified.state_dict().items()}
    dst = {k: v.detach() for k, v in backdoored.state_dict().items()}
    bn_buffers = {f"{name}.{b}" for name, m in work.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in ("running_mean", "running_var")}
    state = work.state_dict()
    result = PathResult([], [], [], [], bn, endpoints)
    for i in range(points):
        t = i / (points - 1)
        with torch.no_grad():
            for k, v in state.items():
                if not v.is_floating_point():
                    continue  # num_batches_tracked: the purified model's
                v.copy_(torch.lerp(src[k], dst[k], t))
        if bn == "reestimate" and bn_buffers:
            reestimate_bn(work, clean_images, batch_size)
        m = point_eval(work)
        result.t.append(round(t, 6))
        result.clean_acc.append(m["clean_acc"])
        result.asr.append(m["asr"])
        result.robust_acc.append(m["robust_acc"])
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


__all__ = ["PathConfig", "PathResult", "backdoor_path", "check_same_architecture", "reestimate_bn"]
