"""whitened_cnn: the whitening layer decorrelates real image patches, stays fixed, and is saved."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from antidoor.models import build_model


def test_whitening_decorrelates_real_patches_and_is_fitted_on_normalised_images(bundled) -> None:
    model = build_model("whitened_cnn", 10, width=8, mean=bundled.mean, std=bundled.std)
    x = bundled.x_train[:2000]
    assert model.fit_to_data(x)
    z = (x.float() / 255 - model.mean) / model.std
    out = F.conv2d(z, model.backbone.whiten_weight)[:, :12]  # the +eigenvector half
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1).double())
    # channel i has variance lambda_i / (lambda_i + eps): 1 but for the eps that tames tiny eigenvalues
    patches = F.unfold(z, 2).transpose(1, 2).reshape(-1, 12).double()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T))
    assert torch.allclose(cov.diagonal(), eigenvalues / (eigenvalues + 5e-4), atol=1e-3)
    assert (cov.diagonal()[-6:] > 0.99).all()
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-3
    w = model.backbone.whiten_weight
    assert torch.equal(w[12:], -w[:12])


def test_whitening_weights_are_a_buffer_no_optimiser_moves_and_a_checkpoint_keeps(bundled) -> None:
    model = build_model("whitened_cnn", 10, width=4)
    model.fit_to_data(bundled.x_train[:200])
    before = model.backbone.whiten_weight.clone()
    assert "backbone.whiten_weight" in model.state_dict()
    assert all("whiten_weight" not in name for name, _ in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    F.cross_entropy(model(bundled.x_train[:8].float() / 255), bundled.y_train[:8]).backward()
    opt.step()
    assert torch.equal(model.backbone.whiten_weight, before)
    fresh = build_model("whitened_cnn", 10, width=4)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.backbone.whiten_weight, before)


def test_other_backbones_have_nothing_to_fit(bundled) -> None:
    model = build_model("small_cnn", 10, width=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.fit_to_data(bundled.x_train[:16])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
