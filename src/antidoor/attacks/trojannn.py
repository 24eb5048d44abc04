"""TrojanNN: a patch trigger optimised to excite chosen internal neurons.

Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks", NDSS 2018. Pick
the neurons of a layer most strongly connected to the next one, then optimise the trigger (inside a
fixed mask) so that it drives those neurons to a high value; the model trained on images carrying
the trigger and relabelled to the target learns a trigger that its own features already respond to.
Dirty-label. Defaults follow BackdoorBench: the layer is the input of the final linear layer
(the penultimate features), ``n_neurons`` = 2 with the largest column sums of |W_head|, pushed
towards ``neuron_value`` = 100 (mean squared error) by ``steps`` = 1000 signed gradient steps of
0.1, within ``eps`` = 0.3 of the seed pattern, clipped to [0, 1], stopping early when the loss is
below 1e-3. Stamping replaces the pixels under the mask. The victim trains from scratch.

Deviations: BackdoorBench's seed is an apple logo (about 7% of the pixels, lower right) that we
do not ship; our mask is a ``patch_size`` = 8 square (6.25% of a 32 x 32 image) at the bottom-right
corner and the seed pattern is uniform noise drawn from the attack seed. The clean model is our own
surrogate (``surrogate_*``; BackdoorBench's is not available). BackdoorBench selects the neurons
with a randomly initialised head (its model is built with 1,000 classes, so the trained head does
not load) and adds the trigger with uint8 wrap-around; we use the surrogate's trained head and
replace the masked pixels; neurons that are zero on every stamped image (dead ReLU units, which
no trigger can move) are ranked after the live ones. The paper optimises the trigger on an otherwise black image; we stamp it
on ``n_images`` = 32 of the attacker's images (the mean activation over them is pushed up), so the
trigger excites the neurons in the context it will appear in, and a neuron silent on a black image
still gets a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackerData, corner_mask
from antidoor.attacks.surrogate import SurrogateParams, train_surrogate
from antidoor.errors import AntidoorError


class TrojanNNParams(SurrogateParams):
    patch_size: int = Field(8, ge=1, description="side of the square trigger mask (bottom-right corner)")
    n_neurons: int = Field(2, ge=1, description="penultimate neurons the trigger is optimised to excite")
    neuron_value: float = Field(100.0, description="activation the chosen neurons are pushed towards")
    steps: int = Field(1000, ge=0, description="signed gradient steps on the trigger")
    step_size: float = Field(0.1, gt=0, description="size of each signed step, in [0, 1] pixel units")
    eps: float = Field(0.3, gt=0, le=1, description="how far the trigger may move from its seed pattern")
    n_images: int = Field(32, ge=1, description="attacker images the trigger is stamped on while it is optimised")


@ATTACKS.register("trojannn")
class TrojanNN(Attack):
    name = "trojannn"
    needs_prepare = True
    Params = TrojanNNParams
    params: TrojanNNParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        mask = corner_mask(self.params.patch_size, self.image_shape)
        return {"mask": mask, "pattern": torch.rand(self.image_shape, generator=generator) * mask}

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.tensors["mask"], self.tensors["pattern"]
        return x * (1 - mask) + pattern * mask

    def fit(self, data: AttackerData) -> dict[str, torch.Tensor]:
        p = self.params
        model = train_surrogate(p, data, self.seed)
        head = model.backbone.head.weight  # (classes, features)
        if p.n_neurons > head.shape[1]:
            raise AntidoorError(f"attack.n_neurons {p.n_neurons} exceeds the surrogate's {head.shape[1]} penultimate neurons")
        mask = self.tensors["mask"].to(data.device)
        seed = self.tensors["pattern"].to(data.device)
        pick = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(self.seed))[:p.n_images]
        x = data.x[pick.to(data.device)].float().div(255)
        with torch.no_grad():  # a unit silent on every image (a dead ReLU) gets no gradient: rank it last
            alive = model.features(x * (1 - mask) + seed * mask).amax(0) > 0
        neurons = torch.where(alive, head.abs().sum(0), -1.0).topk(p.n_neurons).indices

        def excitation(pattern: torch.Tensor) -> torch.Tensor:
            return model.features(x * (1 - mask) + pattern * mask)[:, neurons].mean(0, keepdim=True)

        goal = torch.full((1, p.n_neurons), p.neuron_value, device=data.device)
        pattern = seed.clone()
        for _ in range(p.steps):
            pattern.requires_grad_(True)
            loss = F.mse_loss(excitation(pattern), goal)
            if loss.item() < 1e-3:
                break
            grad, = torch.autograd.grad(loss, pattern)
            pattern = (pattern.detach() - p.step_size * grad.sign()).clamp(seed - p.eps, seed + p.eps).clamp(0, 1) * mask
        pattern = pattern.detach()
        with torch.no_grad():
            before, after = excitation(seed).mean().item(), excitation(pattern).mean().item()
        self.fit_report = {"neuron_activation_seed": before, "neuron_activation_trigger": after}
        return {"pattern": pattern}
