"""SSBA-style: a sample-specific, nearly invisible trigger from our own steganographic encoder.

After Li, Li, Wu, Li, He & Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers",
ICCV 2021 (SSBA). SSBA hides a fixed secret string in each poisoned image with a StegaStamp
encoder trained on the dataset; the residual differs from image to image, and the model learns to
read the hidden secret. Dirty-label; BackdoorBench swaps in pre-encoded images, pratio 0.1, target 0.

This is not SSBA's encoder, hence the name: neither StegaStamp's trained weights nor
BackdoorBench's encoded arrays are available, and StegaStamp (a U-Net encoder with a 100-bit BCH
secret, a spatial-transformer decoder, LPIPS and critic losses, a noise pipeline) is far too large
to train at this scale. :meth:`SSBAStyle.fit` trains a small encoder-decoder pair on the attacker's
data, as StegaStamp is trained: the encoder maps (image, secret) to a residual bounded by
``max_residual`` (eps * tanh, 0-255 scale), the decoder reads the secret back from the encoded image
(plus +-0.5/255 uniform noise, for 8-bit storage), loss = binary cross-entropy of the ``bits``
secret bits + ``lambda_image`` * mean squared residual (its weight ramped up from 0 over the first
half of training, as StegaStamp ramps its image losses, so the pair first learns to carry the
secret), with fresh random secrets every batch, Adam (``encoder_lr``, cosine schedule) for
``encoder_epochs``, on crop-and-flip augmented images. The attack then encodes one secret, drawn from the seed,
in every poisoned and test image: x' = clip(x + E(x, secret)). The encoder's weights and the secret
are the trigger tensors (the decoder is only needed to train it and is not kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from antidoor.attacks.base import ATTACKS, Attack, AttackerData, AttackParams
from antidoor.attacks.surrogate import call_with, init_module, tensors_of
from antidoor.data.augment import Augment
from antidoor.train import batches, steps_per_epoch
from antidoor.utils import generator_for, progress_bar


class SSBAStyleParams(AttackParams):
    bits: int = Field(32, ge=1, description="length of the hidden secret")
    max_residual: float = Field(12.0, gt=0, le=255, description="L-inf bound of the encoder's residual, 0-255 scale")
    encoder_width: int = Field(8, ge=1, description="channels of the encoder and decoder")
    encoder_epochs: int = Field(10, ge=1, description="epochs the encoder-decoder pair trains on the attacker's data")
    encoder_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the encoder and decoder")
    lambda_image: float = Field(10.0, ge=0, description="weight of the mean squared residual in the encoder's loss")


class StegoEncoder(nn.Module):
    """(image, +-1 secret) -> residual direction in [-1, 1].

    The secret becomes one image plane (a learned linear map), fed to the conv net with the image
    and also added to its output: from the first step the residual carries the secret, which the
    decoder can learn to read within a few hundred steps; the conv net learns to shape it to the image.
    """

    def __init__(self, c: int, h: int, w: int, bits: int, width: int) -> None:
        super().__init__()
        self.h, self.w = h, w
        self.secret = nn.Linear(bits, h * w)
        k = width
        self.net = nn.Sequential(
            nn.Conv2d(c + 1, k, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(k, k, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(k, k, 3, padding=4, dilation=4), nn.ReLU(inplace=True),
            nn.Conv2d(k, k, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(k, c, 1),
        )

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        plane = self.secret(secret).view(-1, 1, self.h, self.w).expand(len(x), -1, -1, -1)
        return torch.tanh(self.net(torch.cat([x, plane], 1)) + plane)


class StegoDecoder(nn.Module):
    def __init__(self, c: int, bits: int, width: int) -> None:
        super().__init__()
        k = width
        self.net = nn.Sequential(
            nn.Conv2d(c, k, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(k, 2 * k, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * k, 4 * k, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * k, bits),  # keeps where things are
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@ATTACKS.register("ssba_style")
class SSBAStyle(Attack):
    name = "ssba_style"
    needs_prepare = True
    Params = SSBAStyleParams
    params: SSBAStyleParams

    def _encoder(self) -> StegoEncoder:
        if not hasattr(self, "_enc"):  # a skeleton: its weights always come from self.tensors
            c, h, w = self.image_shape
            p = self.params
            self._enc = init_module(StegoEncoder, torch.Generator().manual_seed(self.seed), c, h, w, p.bits, p.encoder_width)
        return self._enc

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        secret = (torch.rand(self.params.bits, generator=generator) < 0.5).float()
        return {"secret": secret, **tensors_of(self._encoder(), "encoder")}

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        secret = self.tensors["secret"].to(x.dtype)[None] * 2 - 1
        with torch.no_grad():
            return self.params.max_residual / 255 * call_with(self._encoder(), self.tensors, "encoder", x, secret)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.residual(x)).clamp(0, 1)

    def fit(self, data: AttackerData) -> dict[str, torch.Tensor]:
        p = self.params
        c, h, w = self.image_shape
        device = data.device
        enc = init_module(StegoEncoder, torch.Generator().manual_seed(self.seed), c, h, w, p.bits, p.encoder_width).to(device)
        enc.load_state_dict({k[len("encoder."):]: v for k, v in self.tensors.items() if k.startswith("encoder.")})
        dec = init_module(StegoDecoder, torch.Generator().manual_seed(self.seed + 1), c, p.bits, p.encoder_width).to(device)
        enc.train()
        dec.train()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=p.encoder_lr)
        batch = min(128, len(data.x))
        per_epoch = steps_per_epoch(len(data.x), batch, True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, p.encoder_epochs * per_epoch))
        rng = generator_for(device, self.seed)
        augment = Augment(4, data.hflip)
        eps = p.max_residual / 255
        total, step = p.encoder_epochs * per_epoch, 0
        with progress_bar(total, "attack: SSBA-style encoder") as advance:
            for _ in range(p.encoder_epochs):
                for x, _, _ in batches(data.x, data.y, batch, rng, augment=augment, channels_last=False):
                    bits = (torch.rand(len(x), p.bits, device=device, generator=rng) < 0.5).float()
                    r = eps * enc(x, bits * 2 - 1)
                    noise = (torch.rand(x.shape, device=device, generator=rng) - 0.5) / 255
                    read = dec((x + r).clamp(0, 1) + noise)
                    ramp = min(1.0, 2 * step / total)  # as StegaStamp: secret first, image loss ramped in
                    loss = F.binary_cross_entropy_with_logits(read, bits) + ramp * p.lambda_image * r.pow(2).mean()
                    step += 1
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    advance(1)
        enc.eval()
        dec.eval()
        fitted = tensors_of(enc, "encoder")
        self.tensors = {**self.tensors, **fitted}
        x = data.x[:500].float().div(255)
        with torch.no_grad():
            encoded = self.apply(x)
            read = dec(encoded) > 0
            mse = (encoded - x).pow(2).mean().clamp_min(1e-12)
        # residual_spread: how much the residual varies between images (std across images, mean over pixels, 0-255)
        self.fit_report = {"bit_acc": (read == self.tensors["secret"].bool()).float().mean().item(),
                           "psnr_db": (10 * torch.log10(1 / mse)).item(),
                           "residual_spread": (encoded - x).std(0).mean().item() * 255}
        return fitted
