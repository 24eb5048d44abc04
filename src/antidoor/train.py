"""The one training loop: data on the device, batched augmentation, channels_last, bf16 autocast.

Everything that fits a classifier (attacks, fine-tuning defenses, the retuning attack) goes
through :func:`batches` for its data and, for plain supervised training, :func:`train`.
:func:`prepare_model` also routes narrow strided 1x1 convolutions around a oneDNN kernel that
corrupts the heap (:func:`guard_onednn`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from antidoor.data.augment import Augment
from antidoor.errors import AntidoorError
from antidoor.precision import autocast
from antidoor.utils import generator_for, progress_bar

# (x float [0,1] on device, y, indices into the source tensor, generator) -> (x, y)
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


Schedule = Literal["cosine", "onecycle", "linear", "constant"]


class TrainConfig(BaseModel):
    """Optimiser, schedule and data-pipeline settings (BackdoorBench's CIFAR-10 recipe by default)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(128, ge=1, description="images per step (more than the data holds: one batch of all)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Adam: beta1)")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD only)")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Schedule = Field(
        "cosine", description="stepped per batch; linear: warm-up from 0 over `warmup` of the steps, then down to 0")
    warmup: float = Field(0.0, ge=0, lt=1, description="share of the steps spent warming up (schedule linear)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (poisoned labels included)")
    augment: bool = True
    crop_padding: int = Field(4, ge=0)
    drop_last: bool = True
    amp: bool = Field(True, description="bfloat16 autocast where the device runs it fast (CUDA; CPUs with AMX/AVX512-BF16)")
    channels_last: bool = True


def make_optimizer(params: list[nn.Parameter] | Iterator[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    total_steps = max(1, total_steps)
    for group in optimizer.param_groups:
        # An optimiser reused across calls (a defense's rounds) starts each call at its base rate: a cosine
        # schedule reads the current rate as its start and would otherwise begin where the last one ended, at 0.
        group["lr"] = group.get("initial_lr", group["lr"])
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps)
    if cfg.schedule == "linear":
        warm = max(1, round(cfg.warmup * total_steps)) if cfg.warmup > 0 else 0

        def triangle(step: int) -> float:  # factor of lr before step ``step + 1``
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, triangle)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# oneDNN's CPU kernel for the weight gradient of a strided 1x1 convolution writes past its workspace when the
# convolution has fewer input channels than the kernel's channel block (16 with AVX-512, 8 with AVX2): heap
# corruption, then a segfault or abort (here on 2 threads; the report, uxlfoundation/oneDNN#6035, has 1-thread
# crashes and silently wrong gradients too; torch 2.14.1). It is PreAct-ResNet18's downsampling
# shortcut at width <= 8. The workspace serves the stride alone, so such a convolution runs as what it computes:
# the input subsampled by the stride, then a unit-stride 1x1 convolution (the same numbers, another kernel).
_ONEDNN_CHANNEL_BLOCK = 16


class _SubsampledPointwiseConv2d(nn.Conv2d):
    """A strided 1x1 ``nn.Conv2d`` (no padding) computed on the CPU as subsampling + a unit-stride 1x1 convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, 1, 0, 1, self.groups)


def _onednn_unsafe(module: nn.Module) -> bool:
    """A plain strided 1x1 convolution without padding, narrower than oneDNN's channel block (see above)."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.padding in ((0, 0), "valid") and module.in_channels < _ONEDNN_CHANNEL_BLOCK)


def guard_onednn(model: nn.Module) -> nn.Module:
    """Route the strided 1x1 convolutions that crash oneDNN (see above) around its faulty kernel, in place.

    Same parameters, state dict and outputs (up to float rounding); only the module's class changes. Called
    by :func:`prepare_model`; call it yourself for a model you train on the CPU outside antidoor.
    """
    for module in model.modules():
        if _onednn_unsafe(module):
            module.__class__ = _SubsampledPointwiseConv2d
    return model


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """Move ``model`` to ``device``, in channels_last if asked, around oneDNN's faulty kernel (:func:`guard_onednn`)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return guard_onednn(model)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator, *,
            shuffle: bool = True, drop_last: bool = True, augment: Augment | None = None,
            before_augment: BatchHook | None = None, after_augment: BatchHook | None = None,
            channels_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of (x, y, idx) batches from uint8 images already on the device.

    Each batch is converted to float in [0, 1] once; the hooks (poisoning) run before or after
    the batched augmentation; ``idx`` are the batch's indices into ``images``.
    """
    n = len(images)
    order = torch.randperm(n, device=images.device, generator=generator) if shuffle else torch.arange(n, device=images.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x = images[idx].float().div_(255)
        y = labels[idx]
        if before_augment is not None:
            x, y = before_augment(x, y, idx, generator)
        if augment is not None:
            x = augment(x, generator)
        if after_augment is not None:
            x, y = after_augment(x, y, idx, generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y, idx


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)


def ensure_finite(loss: float, where: str, hint: str) -> None:
    """Stop a diverged run with a clear error instead of going on with (and saving) NaN weights.

    Called once per epoch with the epoch's summed loss, so it costs no extra device sync per step.
    """
    if not math.isfinite(loss):
        raise AntidoorError(f"{where}: the loss became {loss} (training diverged); {hint}")


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
          seed: int = 0, hflip: bool = True, before_augment: BatchHook | None = None,
          after_augment: BatchHook | None = None, description: str = "train",
          on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Supervised training with cross-entropy, in place; returns one stats dict per epoch.

    ``images`` are uint8 (N, C, H, W) on the model's device. The same seed gives the same
    weights on the CPU.
    """
    device = images.device
    prepare_model(model, device, cfg.channels_last)
    g = generator_for(device, seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    per_epoch = steps_per_epoch(len(images), cfg.batch_size, cfg.drop_last)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * per_epoch)
    augment = Augment(cfg.crop_padding, hflip) if cfg.augment else None
    history = []
    model.train()
    hint = ("`--preset fast` trains an accurate CIFAR-size model in minutes on a CPU" if device.type == "cpu" and cfg.epochs > 30
            else "fewer train.epochs or a smaller model.width shorten it")
    with progress_bar(cfg.epochs * per_epoch, description, hint) as advance:
        for epoch in range(cfg.epochs):
            t0, loss_sum, correct, seen = time.perf_counter(), torch.zeros((), device=device), torch.zeros((), device=device), 0
            for x, y, _ in batches(images, labels, cfg.batch_size, g, drop_last=cfg.drop_last, augment=augment,
                                   before_augment=before_augment, after_augment=after_augment,
                                   channels_last=cfg.channels_last):
                with autocast(device, cfg.amp):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                # accumulate on the device: no host sync per batch
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                advance(1, epoch=epoch + 1)
            stats = {"epoch": epoch + 1, "loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
                     "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            stats["images_per_s"] = seen / stats["seconds"]
            ensure_finite(stats["loss"], f"{description or 'training'}, epoch {epoch + 1} of {cfg.epochs}",
                          f"lower the learning rate (now {cfg.lr})")
            history.append(stats)
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
    model.eval()
    return history
