"""data/splits.py (who sees which training image) and data/augment.py (batched crop and flip)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from antidoor.config import DataConfig
from antidoor.data import Augment, ImageData, Splits, make_splits, stratified_subset
from antidoor.data.augment import random_crop, random_hflip
from antidoor.errors import AntidoorError
from antidoor.pipeline import Scenario

# --- splits -----------------------------------------------------------------------------------


def _split(labels: torch.Tensor, **kw: object) -> tuple[Splits, str | None]:
    args = {"clean_ratio": 0.05, "val_ratio": 0.2, "pratio": 0.1, "target": 0, "clean_label": False, "seed": 0, **kw}
    return make_splits(labels, **args)


def test_defender_data_is_disjoint_from_poison_and_stratified(bundled: ImageData) -> None:
    y = bundled.y_train
    splits, note = _split(y)
    assert note is None
    train, val, poison = splits.defender_train, splits.defender_val, splits.poison
    for t in (train, val, poison):
        assert t.dtype == torch.int64 and torch.equal(t, t.sort().values) and len(t.unique()) == len(t)
    assert not torch.isin(train, val).any()
    assert not torch.isin(poison, train).any() and not torch.isin(poison, val).any()
    # 5% of 500 per class = 25 per class, a fifth of which (5 per class) is validation
    assert torch.bincount(y[train], minlength=10).tolist() == [20] * 10
    assert torch.bincount(y[val], minlength=10).tolist() == [5] * 10
    assert len(poison) == 500
    # dirty-label poison comes from every class, the target included (as in BackdoorBench)
    assert (torch.bincount(y[poison], minlength=10) > 0).all()


def test_splits_are_seeded(bundled: ImageData) -> None:
    a, _ = _split(bundled.y_train, seed=3)
    b, _ = _split(bundled.y_train, seed=3)
    c, _ = _split(bundled.y_train, seed=4)
    for k in a.tensors():
        assert torch.equal(a.tensors()[k], b.tensors()[k])
    assert not torch.equal(a.poison, c.poison) and not torch.equal(a.defender_train, c.defender_train)


def test_clean_label_poisons_only_target_class(bundled: ImageData) -> None:
    y = bundled.y_train
    splits, note = _split(y, pratio=0.05, target=3, clean_label=True)
    assert note is None
    assert len(splits.poison) == 250 and (y[splits.poison] == 3).all()
    assert not torch.isin(splits.poison, torch.cat([splits.defender_train, splits.defender_val])).any()


def test_clean_label_with_too_few_target_images_poisons_all_and_says_so(bundled: ImageData) -> None:
    y = bundled.y_train
    splits, note = _split(y, pratio=0.2, target=3, clean_label=True)
    # 500 cat images, 25 of them the defender's: all 475 others are poisoned instead of the 1,000 asked for
    assert len(splits.poison) == 475 and (y[splits.poison] == 3).all()
    assert note is not None and "1000" in note and "475" in note and "effective pratio 0.0950" in note


def test_sig_scenario_records_the_note(bundled: ImageData, subset: object, capsys: pytest.CaptureFixture[str]) -> None:
    data = subset(bundled, 1000, 100)
    scenario = Scenario.build(DataConfig(), {"name": "sig", "pratio": 0.2, "target": 2}, seed=0, device="cpu", data=data)
    y = data.y_train
    assert (y[scenario.splits.poison] == 2).all()
    assert len(scenario.splits.poison) == int((y == 2).sum()) - int((y[scenario.splits.defender_train] == 2).sum()) \
        - int((y[scenario.splits.defender_val] == 2).sum())
    assert len(scenario.notes) == 1 and "clean-label attack" in scenario.notes[0]
    assert scenario.describe()["notes"] == scenario.notes
    assert "clean-label attack" in capsys.readouterr().err


def test_dirty_label_pratio_beyond_what_is_left_is_refused(bundled: ImageData) -> None:
    with pytest.raises(AntidoorError, match=r"attack\.pratio 0\.99 asks for 4950 poisoned images"):
        _split(bundled.y_train, pratio=0.99)


def test_val_ratio_that_leaves_no_defender_training_images(bundled: ImageData) -> None:
    # one clean image per class: validation takes each, and a lower val_ratio cannot change that (issue 17 #12)
    with pytest.raises(AntidoorError, match=r"\(10 of 5000 training images\) leaves no training images once validation is "
                                            r"held out; a lower val_ratio would not help: raise data\.clean_ratio"):
        _split(bundled.y_train, clean_ratio=0.0001)
    # two per class, both held out by val_ratio 0.99: here a lower val_ratio is the fix
    with pytest.raises(AntidoorError, match=r"; lower data\.val_ratio \(0\.99\)$"):
        _split(bundled.y_train, clean_ratio=0.004, val_ratio=0.99)


def test_zero_pratio_poisons_nothing(bundled: ImageData) -> None:
    splits, _ = _split(bundled.y_train, pratio=0.0)
    assert len(splits.poison) == 0


def test_stratified_subset(bundled: ImageData) -> None:
    y = bundled.y_train
    g = torch.Generator().manual_seed(0)
    picked = stratified_subset(y, 0.1, g)
    assert torch.bincount(y[picked]).tolist() == [50] * 10
    among = torch.arange(0, 5000, 7)
    inside = stratified_subset(y, 0.001, g, among=among)
    assert torch.isin(inside, among).all()
    assert sorted(y[inside].tolist()) == list(range(10)), "at least one per class"


def test_splits_tensor_round_trip(bundled: ImageData) -> None:
    splits, _ = _split(bundled.y_train)
    again = Splits.from_tensors(splits.tensors())
    assert again is not None
    assert all(torch.equal(getattr(again, k), getattr(splits, k)) for k in ("defender_train", "defender_val", "poison"))
    assert Splits.from_tensors({"split.poison": splits.poison}) is None


# --- augmentation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(bundled: ImageData) -> torch.Tensor:
    return bundled.x_train[::79][:48].float().div(255)  # 48 real images of every class


def _offsets(original: torch.Tensor, cropped: torch.Tensor, padding: int) -> list[tuple[int, int]]:
    """Every offset at which ``cropped`` is a crop of the zero-padded ``original``."""
    padded = F.pad(original, (padding,) * 4)
    h, w = original.shape[-2:]
    return [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], cropped)]


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_equals_a_manual_crop_of_the_zero_padded_image(batch: torch.Tensor, padding: int) -> None:
    out = random_crop(batch, padding, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    found = [_offsets(x, o, padding) for x, o in zip(batch, out, strict=True)]
    assert all(found), "each output must be a crop of its own zero-padded input"
    distinct = {f[0] for f in found}
    assert len(distinct) > 5, "offsets are drawn per sample"
    assert any(dy != padding or dx != padding for dy, dx in distinct)


def test_crop_of_non_square_grayscale(bundled: ImageData) -> None:
    x = bundled.x_train[:6, :1, :, :20].float().div(255)  # real pixels, 1 x 32 x 20
    out = random_crop(x, 3, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert all(_offsets(a, b, 3) for a, b in zip(x, out, strict=True))


def test_crop_with_padding_zero_is_identity(batch: torch.Tensor) -> None:
    assert torch.equal(random_crop(batch, 0, torch.Generator().manual_seed(0)), batch)
    assert torch.equal(Augment(padding=0, hflip=False)(batch, torch.Generator().manual_seed(0)), batch)


def test_flip_only_when_allowed(batch: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(Augment(padding=0, hflip=False)(batch, g), batch)
    out = Augment(padding=0, hflip=True)(batch, g)
    flipped = torch.tensor([torch.equal(o, x.flip(2)) for o, x in zip(out, batch, strict=True)])
    kept = torch.tensor([torch.equal(o, x) for o, x in zip(out, batch, strict=True)])
    assert (flipped | kept).all()
    assert flipped.any() and kept.any()
    assert torch.equal(random_hflip(batch, g, p=0.0), batch)
    assert torch.equal(random_hflip(batch, g, p=1.0), batch.flip(3))


def test_crop_and_flip_together(batch: torch.Tensor) -> None:
    out = Augment(padding=2, hflip=True)(batch, torch.Generator().manual_seed(2))
    assert out.shape == batch.shape
    for x, o in zip(batch, out, strict=True):
        assert _offsets(x, o, 2) or _offsets(x, o.flip(2), 2)


def test_augment_is_reproducible(batch: torch.Tensor) -> None:
    aug = Augment(padding=4, hflip=True)
    a = aug(batch, torch.Generator().manual_seed(9))
    b = aug(batch, torch.Generator().manual_seed(9))
    c = aug(batch, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
