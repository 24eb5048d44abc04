"""A fast, accurate VGG-like CNN with a patch-whitening first layer (the airbench class).

After Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (2024, arXiv:2404.00498), itself
after Page's ResNet-9 DAWNBench work: a fixed 2x2 whitening convolution, then three conv groups of
widths (w, 4w, 4w) = (64, 256, 256), each two 3x3 convolutions with batch norm and GELU and one 2x2
max-pool, then a global max-pool and a bias-free linear head scaled by 1/9. Trained with the
``fast`` preset (:mod:`antidoor.presets`): label smoothing, Nesterov SGD, a short linear warm-up and
decay, about ten epochs.

The whitening layer: the 2x2 patches of the (normalised) training images are decorrelated by their
covariance's eigenvectors, scaled by 1/sqrt(eigenvalue + eps), with both signs of each eigenvector
(2 * 12 = 24 channels for RGB). Its weights are a buffer, never trained (only its bias is), so they
are saved with the model and no defense or attack moves them. :meth:`WhitenedCNN.fit_whitening`
sets them from images; until then they are a fixed random projection (a model built to load a
checkpoint gets the recorded weights).

Deviations from the public recipe, each deliberate:
- Whitening statistics come from the training images *before* poisoning (see
  :func:`antidoor.pipeline.train_attack`): the layer describes the data, not the trigger, so a
  defender refitting it on clean data gets the same layer, and the backdoor must live in the trained
  layers that defenses act on.
- Batch norm before the max-pool (conv -> BN -> GELU -> pool), not after it: every BN then follows a
  convolution, so :func:`antidoor.models.frozen_copy` folds all of them (SAU's reference model runs
  without BN). BN weights train like any other parameter (the public recipe freezes them).
- No test-time augmentation: a flipped or shifted copy of a test image moves a corner trigger, so
  flip-TTA would lower asr for reasons that have nothing to do with the model. Evaluations see each
  test image once, as for every other model.
- No lookahead/EMA of the weights and no progressive freezing of the whitening bias: the model after
  the last step is the model (one less way for a defense's result to depend on the recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from antidoor.models.registry import MODELS

PATCH = 2
LOGIT_SCALE = 1 / 9  # keeps the initial logits small, as in the public recipe


class ConvGroup(nn.Sequential):
    """conv3x3 -> BN -> GELU -> max-pool 2 -> conv3x3 -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU(),
        )


class ScaledMaxPool(nn.AdaptiveMaxPool2d):
    """Global max-pool times a constant: the logit scale lives in the pooling, so the head is a plain
    linear layer and every "features -> pool -> head" split (BTI-DBF, FST) keeps the model's function."""

    def __init__(self, scale: float) -> None:
        super().__init__(1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class WhitenedCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        n_whiten = 2 * in_channels * PATCH * PATCH
        weight = torch.randn(n_whiten, in_channels, PATCH, PATCH) / (in_channels * PATCH * PATCH) ** 0.5
        self.register_buffer("whiten_weight", weight)  # fixed: set from data by fit_whitening, never trained
        self.whiten_bias = nn.Parameter(torch.zeros(n_whiten))
        self.features = nn.Sequential(
            ConvGroup(n_whiten, width), ConvGroup(width, 4 * width), ConvGroup(4 * width, 4 * width),
        )
        self.pool = ScaledMaxPool(LOGIT_SCALE)
        self.head = nn.Linear(4 * width, num_classes, bias=False)

    @torch.no_grad()
    def fit_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening weights from (normalised, float) images ``x`` of shape (N, C, H, W)."""
        c = x.shape[1]
        patches = F.unfold(x.float(), PATCH).transpose(1, 2).reshape(-1, c * PATCH * PATCH).double()
        cov = torch.cov(patches.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        scaled = eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]
        w = torch.cat([scaled, -scaled]).view(-1, c, PATCH, PATCH)
        self.whiten_weight.copy_(w.to(self.whiten_weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(F.conv2d(x, self.whiten_weight, self.whiten_bias))
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@MODELS.register("whitened_cnn")
def whitened_cnn(num_classes: int, in_channels: int = 3, width: int = 64) -> WhitenedCNN:
    return WhitenedCNN(num_classes, in_channels, width)
