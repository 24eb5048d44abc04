"""Who sees which training images: the defender's clean set (and its validation part) and the
attacker's poisoned indices, disjoint by construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from antidoor.data.dataset import ImageData
from antidoor.errors import AntidoorError


@dataclass
class Splits:
    """Index tensors into the training set (int64, sorted).

    ``defender_train`` and ``defender_val`` are the defender's clean data (a class-stratified
    fraction of the training set, never poisoned); ``poison`` are the images the attacker poisons.
    The model is trained on the whole training set, poisoned indices included.
    """

    defender_train: torch.Tensor
    defender_val: torch.Tensor
    poison: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"split.defender_train": self.defender_train, "split.defender_val": self.defender_val, "split.poison": self.poison}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Splits | None:
        try:
            return cls(tensors["split.defender_train"], tensors["split.defender_val"], tensors["split.poison"])
        except KeyError:
            return None


def stratified_subset(labels: torch.Tensor, fraction: float, generator: torch.Generator,
                      among: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """A seeded, class-stratified ``fraction`` of ``among`` (default: all indices); at least one per class.

    With ``count``, exactly ``count`` indices instead: each class gets its share of ``count`` in
    proportion to its size (largest remainders take the rounding), capped at what the class has.
    """
    among = torch.arange(len(labels)) if among is None else among
    classes, sizes = labels[among].unique(return_counts=True)
    if count is None:
        quota = [max(1, round(fraction * int(n))) for n in sizes]
    else:
        exact = sizes.double() * count / len(among)
        quota = exact.floor().long()
        by_remainder = (exact - quota).argsort(descending=True, stable=True)
        quota[by_remainder[:count - int(quota.sum())]] += 1
        quota = quota.clamp_max(sizes).tolist()
    picked = []
    for c, k in zip(classes.tolist(), quota, strict=True):
        members = among[labels[among] == c]
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picked).sort().values


def make_splits(labels: torch.Tensor, *, clean_ratio: float, val_ratio: float, pratio: float, target: int,
                clean_label: bool, seed: int, clean_count: int | None = None) -> tuple[Splits, str | None]:
    """Draw the defender's data first, then the poisoned indices from what is left.

    Dirty-label attacks poison ``round(pratio * N)`` images of any class (target included, as in
    BackdoorBench); clean-label attacks only target-class images. Returns the splits and a note when
    a clean-label attack had fewer target images than asked for (then all of them are poisoned).
    ``clean_count`` gives the defender that many images instead of ``clean_ratio`` of them.
    """
    labels = labels.cpu()
    if clean_count is not None and clean_count >= len(labels):
        raise AntidoorError(f"data.clean_count {clean_count} asks for as many clean images as the training set has "
                            f"({len(labels)}); allowed: 2 to {len(labels) - 1}")
    g = torch.Generator().manual_seed(seed)
    defender = stratified_subset(labels, clean_ratio, g, count=clean_count)
    val = stratified_subset(labels, val_ratio, g, among=defender)
    train = defender[~torch.isin(defender, val)]
    if len(train) == 0:
        # validation takes at least one image per class: a lower val_ratio helps only where a class has two or more
        helps = bool((torch.bincount(labels[defender]) >= 2).any())
        hint = (f"lower data.val_ratio ({val_ratio})" if helps else
                f"a lower val_ratio would not help: raise data.clean_ratio ({clean_ratio}) or use more training images")
        raise AntidoorError(f"the defender's clean share ({len(defender)} of {len(labels)} training images) leaves no "
                            f"training images once validation is held out; {hint}")
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[defender] = False
    if clean_label:
        rest &= labels == target
    candidates = rest.nonzero().flatten()
    wanted = round(pratio * len(labels))
    note = None
    if wanted > len(candidates):
        if not clean_label:  # cannot happen for pratio < 1 - clean_ratio, but say so clearly
            raise AntidoorError(f"attack.pratio {pratio} asks for {wanted} poisoned images but only {len(candidates)} "
                                "lie outside the defender's data")
        note = (f"clean-label attack: pratio {pratio} asks for {wanted} target-class images; {len(candidates)} lie outside "
                f"the defender's data, so all of them are poisoned (effective pratio {len(candidates) / len(labels):.4f})")
        wanted = len(candidates)
    poison = candidates[torch.randperm(len(candidates), generator=g)[:wanted]].sort().values
    return Splits(train, val, poison), note


def check_split_tensors(splits: Splits, where: str, n_train: int | None = None) -> None:
    """Recorded split indices as a defense may trust them: 1-D integer tensors of distinct indices in
    ``[0, n_train)`` (when known), the defender's train, validation and the poisoned sets pairwise disjoint
    (a defender set overlapping the poisoned one would hand the defense the attacker's images)."""
    parts = {"defender_train": splits.defender_train, "defender_val": splits.defender_val, "poison": splits.poison}
    for name, t in parts.items():
        if t.ndim != 1 or t.dtype not in (torch.int64, torch.int32):
            raise AntidoorError(f"{where}: split.{name} must be a 1-D tensor of integer indices, "
                                f"got {t.dtype} of shape {tuple(t.shape)}")
        if len(t) and (int(t.min()) < 0 or (n_train is not None and int(t.max()) >= n_train)):
            allowed = f"0..{n_train - 1}" if n_train is not None else ">= 0"
            raise AntidoorError(f"{where}: split.{name} holds indices {int(t.min())}..{int(t.max())}; allowed: {allowed} "
                                "(the checkpoint's training set)")
        if len(t.unique()) != len(t):
            raise AntidoorError(f"{where}: split.{name} repeats indices")
    for a, b in (("defender_train", "defender_val"), ("defender_train", "poison"), ("defender_val", "poison")):
        shared = int(torch.isin(parts[a].long(), parts[b].long()).sum())
        if shared:
            raise AntidoorError(f"{where}: split.{a} and split.{b} share {shared} indices; they must be disjoint")
    for name in ("defender_train", "defender_val"):
        if len(parts[name]) == 0:
            raise AntidoorError(f"{where}: split.{name} is empty; the defender needs clean images")


def data_subset(data: ImageData, n_train: int | None, n_test: int | None, name: str) -> ImageData:
    """A study's real subset of ``data``: a seeded, class-stratified ~``n_train`` training and ~``n_test``
    test images (None: all). The subset belongs to the data definition, not to a run: fixed seeds (0 for
    the training images, 1 for the test images), the same for every seed of a study and for every
    command that rebuilds it from a checkpoint."""
    if n_train is None and n_test is None:
        return data

    def pick(y: torch.Tensor, n: int | None, salt: int) -> torch.Tensor:
        if n is None or n >= len(y):
            return torch.arange(len(y))
        return stratified_subset(y.cpu(), n / len(y), torch.Generator().manual_seed(salt))

    tr, te = pick(data.y_train, n_train, 0), pick(data.y_test, n_test, 1)
    source = {**data.source, "subset": {"n_train": len(tr), "n_test": len(te), "stratified": True}}
    return ImageData(name, data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], data.classes,
                     hflip=data.hflip, source=source)

