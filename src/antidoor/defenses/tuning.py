"""The fine-tuning loop of the tuning-based defenses (FP, NAD, FT-SAM, FST): one place for the chores.

Like :func:`antidoor.train.train` (data on the device, batched augmentation, channels_last, AMP on
CUDA, the schedule stepped per batch) but with a defense's own loss, optimiser and per-step
constraint. The step goes through ``optimizer.step(closure)``, so optimisers that evaluate the
loss more than once (SAM) work unchanged; every evaluation after the first in a step runs with the
BatchNorm running statistics frozen, so they are updated once per batch, from the real weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from antidoor.data.augment import Augment
from antidoor.defenses.base import DefenderData
from antidoor.precision import autocast
from antidoor.train import (
    TrainConfig,
    batches,
    ensure_finite,
    make_optimizer,
    make_scheduler,
    prepare_model,
    steps_per_epoch,
)
from antidoor.utils import generator_for, progress_bar

# (model, x float [0, 1], y) -> scalar loss
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalise with the batch's statistics but do not update their running ones."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved, strict=True):
            m.momentum = momentum


def tune(model: nn.Module, data: DefenderData, cfg: TrainConfig, *, seed: int, loss_fn: LossFn = cross_entropy,
         optimizer: torch.optim.Optimizer | None = None, after_step: Callable[[], None] | None = None,
         on_epoch_end: Callable[[int], None] | None = None, description: str = "tune") -> None:
    """Fine-tune ``model`` in place on the defender's clean training images (never the validation part).

    ``optimizer`` defaults to the one ``cfg`` describes; ``after_step`` runs after every optimiser
    step (projections, masks); ``on_epoch_end(epoch)`` counts epochs from 1.
    """
    device = data.device
    prepare_model(model, device, cfg.channels_last)
    g = generator_for(device, seed)
    optimizer = optimizer if optimizer is not None else make_optimizer(model.parameters(), cfg)
    per_epoch = steps_per_epoch(len(data.x), cfg.batch_size, cfg.drop_last)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * per_epoch)
    augment = Augment(cfg.crop_padding, data.hflip) if cfg.augment else None
    model.train()
    with progress_bar(cfg.epochs * per_epoch, description) as advance:
        for epoch in range(cfg.epochs):
            total = torch.zeros((), device=device)
            for x, y, _ in batches(data.x, data.y, cfg.batch_size, g, drop_last=cfg.drop_last, augment=augment,
                                   channels_last=cfg.channels_last):
                calls = 0

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    nonlocal calls
                    calls += 1
                    optimizer.zero_grad(set_to_none=True)
                    with frozen_bn_statistics(model) if calls > 1 else contextlib.nullcontext(), autocast(device, cfg.amp):
                        loss = loss_fn(model, x, y)
                    loss.backward()
                    return loss

                loss = optimizer.step(closure)
                if loss is not None:
                    total += loss.detach().float()
                scheduler.step()
                if after_step is not None:
                    after_step()
                advance(1, epoch=epoch + 1)
            ensure_finite(total.item(), f"{description}, epoch {epoch + 1} of {cfg.epochs}",
                          f"lower the defense's learning rate (now {cfg.lr})")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    model.eval()
