"""train.py: the batch iterator, optimiser and schedule factories and the training loop (on real images)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from antidoor.data import Augment, ImageData
from antidoor.models import build_model
from antidoor.precision import autocast
from antidoor.train import (
    TrainConfig,
    _SubsampledPointwiseConv2d,
    batches,
    guard_onednn,
    make_optimizer,
    make_scheduler,
    prepare_model,
    steps_per_epoch,
    train,
)


@pytest.fixture(scope="module")
def images(bundled: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(0, 5000, 25)  # 200 real images, 20 per class
    return bundled.x_train[idx], bundled.y_train[idx]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=10, width=4)


# --- batches ----------------------------------------------------------------------------------


def test_batches_in_order_without_shuffle(images: tuple) -> None:
    x, y = images
    out = list(batches(x, y, 64, torch.Generator().manual_seed(0), shuffle=False, drop_last=False, channels_last=False))
    assert [len(b[0]) for b in out] == [64, 64, 64, 8]
    xb, yb, idx = out[1]
    assert torch.equal(idx, torch.arange(64, 128))
    assert torch.equal(xb, x[64:128].float() / 255) and torch.equal(yb, y[64:128])


def test_batches_shuffle_and_drop_last(images: tuple) -> None:
    x, y = images
    out = list(batches(x, y, 64, torch.Generator().manual_seed(0)))
    assert [len(b[0]) for b in out] == [64, 64, 64]
    seen = torch.cat([b[2] for b in out])
    assert len(seen.unique()) == 192 and not torch.equal(seen, torch.arange(192))
    for xb, yb, idx in out:
        assert torch.equal(yb, y[idx]) and torch.equal(xb, x[idx].float() / 255)
        assert xb.is_contiguous(memory_format=torch.channels_last)
    # fewer images than a batch: one short batch even with drop_last
    assert [len(b[0]) for b in batches(x[:10], y[:10], 64, torch.Generator().manual_seed(0))] == [10]


def test_batch_hooks_run_around_augmentation(images: tuple) -> None:
    x, y = images
    calls: list[str] = []

    def before(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple:
        calls.append("before")
        assert torch.equal(xb, x[idx].float() / 255), "before_augment sees the raw images"
        return xb, torch.zeros_like(yb)

    def after(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple:
        calls.append("after")
        assert not torch.equal(xb, x[idx].float() / 255), "after_augment sees augmented images"
        assert (yb == 0).all(), "labels from the first hook reach the second"
        return xb, yb + 1

    g = torch.Generator().manual_seed(0)
    out = list(batches(x, y, 100, g, augment=Augment(4, True), before_augment=before, after_augment=after))
    assert calls == ["before", "after", "before", "after"]
    assert all((b[1] == 1).all() for b in out)


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(200, 64, True) == 3
    assert steps_per_epoch(200, 64, False) == 4
    assert steps_per_epoch(10, 64, True) == 1


# --- optimiser, schedule, autocast ------------------------------------------------------------


def test_optimizer_gets_every_setting() -> None:
    model = tiny_model()
    sgd = make_optimizer(model.parameters(), TrainConfig(optimizer="sgd", lr=0.123, momentum=0.8, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.123, 0.8, 1e-3)
    adam = make_optimizer(model.parameters(), TrainConfig(optimizer="adam", lr=0.002, momentum=0.7, weight_decay=0.0))
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["betas"] == (0.7, 0.999) and adam.param_groups[0]["lr"] == 0.002


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "linear", "constant"])
def test_schedules(schedule: str) -> None:
    cfg = TrainConfig(lr=0.1, schedule=schedule, warmup=0.2)
    opt = make_optimizer(tiny_model().parameters(), cfg)
    lrs = _rates(opt, cfg, 20)
    if schedule == "constant":
        assert lrs == [0.1] * 20
    elif schedule == "cosine":
        assert lrs[-1] < 1e-6 and all(a >= b for a, b in itertools.pairwise(lrs))
    else:
        assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01 and lrs.index(max(lrs)) > 0


def _rates(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> list[float]:
    """The learning rate after each of ``steps`` steps of a fresh schedule of ``cfg`` on ``opt``."""
    sched = make_scheduler(opt, cfg, total_steps=steps)
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "linear", "constant"])
def test_an_optimizer_reused_by_a_second_schedule_restarts_at_its_base_rate(schedule: str) -> None:
    # BTI-DBF and PAM keep one optimiser across rounds and build a schedule per round: round 2 must not
    # start where round 1's cosine ended (lr 0), which is what CosineAnnealingLR does with a reused optimiser
    cfg = TrainConfig(lr=0.1, schedule=schedule, warmup=0.2)
    opt = make_optimizer(tiny_model().parameters(), cfg)
    rounds = [_rates(opt, cfg, 10) for _ in range(2)]
    assert rounds[1] == pytest.approx(rounds[0])
    assert max(rounds[1]) > 0.05


def test_autocast_runs_bf16_where_the_cpu_has_it_and_float32_elsewhere(monkeypatch, capsys) -> None:
    from antidoor import precision

    cpu = torch.device("cpu")
    x, w = torch.rand(4, 8), torch.rand(8, 3)
    monkeypatch.delenv("ANTIDOOR_AMP", raising=False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    with autocast(cpu, True):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(cpu, False):
        assert (x @ w).dtype == torch.float32
    assert isinstance(autocast(torch.device("cuda"), False), contextlib.nullcontext)
    monkeypatch.setenv("ANTIDOOR_AMP", "off")  # the global switch wins over every config's amp: true
    assert not precision.amp_active(cpu, True)
    with autocast(cpu, True):
        assert (x @ w).dtype == torch.float32
    monkeypatch.delenv("ANTIDOOR_AMP")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision, "_noted", set())
    with autocast(cpu, True):
        assert (x @ w).dtype == torch.float32
    autocast(cpu, True)
    assert capsys.readouterr().err.count("no fast bf16") == 1, "the float32 fallback is said once, not per call"


def test_cpu_bf16_probe_matches_the_cpu_flags() -> None:
    from antidoor.precision import cpu_has_fast_bf16

    flags = set(open("/proc/cpuinfo").read().split()) if __import__("os").path.exists("/proc/cpuinfo") else set()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert cpu_has_fast_bf16() == bool(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    cfg = TrainConfig(lr=0.4, schedule="linear", warmup=0.2)
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    sched = make_scheduler(opt, cfg, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05])


def test_prepare_model_channels_last() -> None:
    model = prepare_model(tiny_model(), torch.device("cpu"), channels_last=True)
    conv = model.backbone.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    plain = prepare_model(tiny_model(), torch.device("cpu"), channels_last=False)
    assert plain.backbone.features[0].weight.is_contiguous()


def test_guard_routes_narrow_strided_pointwise_convs_around_onednn(bundled: ImageData) -> None:
    """PreAct-ResNet18 at width 4: its two narrow shortcuts (4 and 8 input channels) are rerouted, the same numbers."""
    torch.manual_seed(0)
    model = build_model("preact_resnet18", num_classes=10, width=4).eval()
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_model(prepare_model(model, torch.device("cpu")), torch.device("cpu"))  # idempotent
    guarded = [name for name, m in model.named_modules() if isinstance(m, _SubsampledPointwiseConv2d)]
    assert guarded == ["backbone.layer2.0.shortcut", "backbone.layer3.0.shortcut"]  # layer4's has 16: left alone
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = bundled.x_test[:64].float().div(255)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), reference(x), atol=1e-5)
    convs = guard_onednn(nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, padding=1), nn.Conv2d(4, 8, 1, stride=2, padding="valid")))
    assert [type(c) for c in convs] == [nn.Conv2d, _SubsampledPointwiseConv2d]  # padded: not the faulty pattern
    x = torch.rand(2, 4, 9, 9)  # an odd size: the subsampled input keeps the strided convolution's output size
    assert torch.allclose(convs[1](x), F.conv2d(x, convs[1].weight, convs[1].bias, stride=2), atol=1e-6)


_NARROW_PREACT_ON_TWO_THREADS = """
import torch
from antidoor.data import load_dataset
from antidoor.models import build_model
from antidoor.train import TrainConfig, train
data = load_dataset("cifar10-mini")
torch.manual_seed(0)
model = build_model("preact_resnet18", num_classes=10, width=4)
train(model, data.x_train[:381], data.y_train[:381], TrainConfig(epochs=1, batch_size=127, lr=0.01), seed=0)
print("trained")
"""


def test_narrow_preact_resnet_trains_in_channels_last_on_two_threads() -> None:
    """Without the guard this run dies in oneDNN's 1x1 weight-gradient kernel (heap corruption: rc -11 or -6).

    In a subprocess, so that a crash fails this test instead of killing the suite; glibc's checking
    allocator (where the system has it) turns a silent overrun into an abort.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_CHECK_": "3"}
    debug_malloc = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    if os.path.exists(debug_malloc):
        env["LD_PRELOAD"] = debug_malloc
    done = subprocess.run([sys.executable, "-c", _NARROW_PREACT_ON_TWO_THREADS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "trained"


# --- the training loop ------------------------------------------------------------------------


def _train(images: tuple, seed: int = 0, **cfg: object) -> tuple[nn.Module, list[dict]]:
    model = tiny_model(seed)
    settings = {"epochs": 2, "batch_size": 50, "lr": 0.05, **cfg}
    history = train(model, *images, TrainConfig(**settings), seed=seed)
    return model, history


def test_train_history_and_mode(images: tuple) -> None:
    model, history = _train(images, epochs=3, schedule="constant", lr=0.07)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["lr"] == 0.07 for h in history)
    assert all(0 <= h["train_acc"] <= 1 and h["loss"] > 0 and h["images_per_s"] > 0 for h in history)
    assert not model.training


def test_a_diverging_run_stops_with_a_clear_error(images: tuple) -> None:
    from antidoor.errors import AntidoorError

    with pytest.raises(AntidoorError, match=r"epoch \d+ of 3: the loss became (nan|inf).*lower the learning rate \(now 1e\+30\)"):
        _train(images, epochs=3, lr=1e30, schedule="constant")


def test_train_learns_on_real_images(images: tuple) -> None:
    """Without augmentation a small model fits 200 real images better and better.

    Measured over seeds 0-3: the loss falls from ~2.36 to 1.85-1.93, train_acc rises by 0.17-0.30.
    """
    _, history = _train(images, epochs=8, augment=False, lr=0.05, batch_size=25)
    assert history[-1]["loss"] < history[0]["loss"] - 0.2
    assert history[-1]["train_acc"] > history[0]["train_acc"] + 0.05


def test_train_is_deterministic_on_cpu(images: tuple) -> None:
    a, ha = _train(images, seed=1)
    b, hb = _train(images, seed=1)
    c, hc = _train(images, seed=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items() if v.is_floating_point())
    assert [h["loss"] for h in ha] != [h["loss"] for h in hc]


def test_train_settings_reach_the_loop(images: tuple) -> None:
    x, y = images
    sizes: list[int] = []
    seen_before: list[torch.Tensor] = []

    def before(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple:
        seen_before.append(xb.clone())
        return xb, yb

    def after(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple:
        sizes.append(len(xb))
        assert torch.equal(xb, seen_before[-1]) == (not augment), "train.augment switches augmentation"
        return xb, yb

    for augment, drop_last, expected in ((True, True, [64, 64, 64] * 2), (False, False, [64, 64, 64, 8] * 2)):
        sizes.clear()
        cfg = TrainConfig(epochs=2, batch_size=64, drop_last=drop_last, augment=augment, lr=0.01)
        train(tiny_model(), x, y, cfg, before_augment=before, after_augment=after)
        assert sizes == expected

    epochs_seen: list[int] = []
    train(tiny_model(), x, y, TrainConfig(epochs=2, batch_size=100), on_epoch_end=lambda e, s: epochs_seen.append(e))
    assert epochs_seen == [0, 1]


def test_crop_padding_zero_and_no_flip_leave_images_as_they_are(images: tuple) -> None:
    x, y = images
    diffs: list[bool] = []
    raw: dict[int, torch.Tensor] = {}

    def before(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple:
        raw[0] = xb.clone()
        return xb, yb

    def after(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple:
        diffs.append(not torch.equal(xb, raw[0]))
        return xb, yb

    cfg = TrainConfig(epochs=1, batch_size=100, crop_padding=0)
    train(tiny_model(), x, y, cfg, hflip=False, before_augment=before, after_augment=after)
    assert diffs == [False, False]
    train(tiny_model(), x, y, cfg, hflip=True, before_augment=before, after_augment=after)
    assert diffs[2:] == [True, True]


def test_train_config_refuses_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        TrainConfig(epochz=3)
    with pytest.raises(ValueError):
        TrainConfig(lr=0)
    with pytest.raises(ValueError):
        TrainConfig(optimizer="lbfgs")
