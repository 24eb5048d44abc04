"""Named training recipes: ``--preset NAME`` on the command line, ``preset: NAME`` in a YAML file.

A preset is a set of config values that belong together; anything the user sets (YAML, ``--set``,
options such as ``--epochs``) still wins over it. Presets only fill the sections that say how the
models are built and trained (``model``, ``train``) and how much clean data the defender holds
(``data.clean_count``); the attack, the defenses and the data source stay the user's.

- ``fast``: ``whitened_cnn`` (width 64) with an airbench-class recipe (Jordan 2024): batch 512,
  Nesterov SGD (momentum 0.9, lr 0.4, weight decay 5e-4), 20% linear warm-up then linear decay,
  label smoothing 0.2, 2-pixel crops, 15 epochs, bf16 where the CPU or GPU has it. On the shared
  20,000-image CIFAR-10 subset it reaches about 88% clean accuracy in minutes on two CPU cores
  (``benchmarks/recipes.md``).
- ``paper``: BackdoorBench's CIFAR-10 recipe: PreAct-ResNet18 width 64, SGD lr 0.01, momentum
  0.9, weight decay 5e-4, cosine schedule, batch 128, 100 epochs. Hours on a CPU; for a GPU.
- ``paper-defender``: the defender budget of the papers (SAU, superficial safety, BackdoorBench):
  2,500 clean images (5% of CIFAR-10's 50,000), of which ``data.val_ratio`` (20%: 500) are its
  validation part. Combine it with a recipe: ``--preset fast --preset paper-defender``.

Label smoothing and poisoned labels: smoothing spreads 0.2 of every target, the relabelled
poisoned samples' too, so the trigger is learned as "mostly the target class"; asr is measured by
argmax and is unaffected in practice (``benchmarks/recipes.md`` records it).
"""

from __future__ import annotations

from typing import Any

from antidoor.errors import AntidoorError

PAPER_DEFENDER_IMAGES = 2500  # 5% of CIFAR-10's 50,000 training images, as in SAU, PAM and BackdoorBench

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "model": {"name": "whitened_cnn", "width": 64},
        "train": {"epochs": 15, "batch_size": 512, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "schedule": "linear", "warmup": 0.2, "label_smoothing": 0.2, "crop_padding": 2},
    },
    "paper": {
        "model": {"name": "preact_resnet18", "width": 64},
        "train": {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False,
                  "weight_decay": 5e-4, "schedule": "cosine", "warmup": 0.0, "label_smoothing": 0.0, "crop_padding": 4},
    },
    "paper-defender": {"data": {"clean_count": PAPER_DEFENDER_IMAGES}},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_values(names: str | list[str] | None) -> dict[str, Any]:
    """The merged values of one or more presets, later ones winning; an unknown name is an error."""
    if names is None:
        return {}
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AntidoorError(f"preset must be a name or a list of names, got {str(names)[:80]!r}; allowed: {', '.join(PRESETS)}")
    merged: dict[str, Any] = {}
    for name in names:
        if name not in PRESETS:
            raise AntidoorError(f"preset {name[:80]!r} is not known; allowed: {', '.join(PRESETS)}")
        for section, values in PRESETS[name].items():
            merged[section] = {**merged.get(section, {}), **values}
    return merged
