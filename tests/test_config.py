"""config.py: YAML files, --set overrides, precedence, refusal of unknown keys, and every key
reaching the code that uses it (checked where that is cheap)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from antidoor.attacks import ATTACKS
from antidoor.config import AttackRunConfig, DataConfig, EvaluateConfig, ModelConfig, build_config, parse_override, read_yaml
from antidoor.data import ImageData
from antidoor.errors import AntidoorError
from antidoor.pipeline import Scenario, new_model, train_attack
from antidoor.train import TrainConfig

ATTACK_NAMES = ", ".join(ATTACKS.names())  # every registered attack, as errors list them


def write_yaml(path: Path, obj: object) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def test_defaults() -> None:
    cfg = build_config(AttackRunConfig)
    assert cfg.attack == {"name": "badnets", "target": 0, "pratio": 0.1, "stage": "after_augment",
                          "patch_size": 3, "position": "bottom_right", "value": 1.0}
    assert cfg.model == ModelConfig(name="preact_resnet18", width=64)
    assert cfg.data == DataConfig() and cfg.data.name == "cifar10-mini"
    assert cfg.train == TrainConfig() and cfg.seed == 0 and cfg.device == "auto"


def test_yaml_then_set_then_explicit_options(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "study.yaml", {
        "data": {"clean_ratio": 0.1},
        "model": {"name": "small_cnn", "width": 16},
        "attack": {"name": "blended", "pratio": 0.05, "alpha": 0.3},
        "train": {"epochs": 7, "lr": 0.02},
        "seed": 3,
    })
    cfg = build_config(AttackRunConfig, path, ["attack.alpha=0.1", "train.lr=0.5", "seed=4"], train__lr=0.25, seed=None)
    assert cfg.data.clean_ratio == 0.1 and cfg.model.width == 16 and cfg.train.epochs == 7  # from the file
    assert cfg.attack["name"] == "blended" and cfg.attack["pratio"] == 0.05
    assert cfg.attack["alpha"] == 0.1  # --set beats the file
    assert cfg.seed == 4  # --set beats the file; an explicit option left out (None) changes nothing
    assert cfg.train.lr == 0.25  # an explicit CLI option beats --set


def test_base_is_below_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"model": {"width": 8}})
    cfg = build_config(AttackRunConfig, path, base={"model": {"name": "small_cnn", "width": 32}, "train": {"epochs": 2}})
    assert cfg.model.name == "small_cnn" and cfg.model.width == 8 and cfg.train.epochs == 2


@pytest.mark.parametrize(("overrides", "match"), [
    (["train.lrr=0.1"], "train.lrr: unknown key"),
    (["colour=red"], "colour: unknown key"),
    (["data.nmae=x"], "data.nmae: unknown key"),
    (["attack.alpha=0.1"], r"attack.alpha: unknown key \(attack 'badnets' takes: target, pratio, stage, patch_size"),
    (["attack.name=nope"], f"unknown attack 'nope'; available: {ATTACK_NAMES}"),
    (["model.name=nope"], "unknown model 'nope'; available: .*small_cnn"),
    (["attack.pratio=1.5"], "attack.pratio = 1.5"),
    (["train.epochs=0"], "train.epochs = 0"),
    (["train.optimizer=lbfgs"], "train.optimizer = 'lbfgs'"),
    (["data.clean_ratio=0"], "data.clean_ratio = 0"),
    (["model.width=wide"], "model.width = 'wide'"),
    (["attack.pratio"], "expected key=value"),
    (["=3"], "bad key"),
    (["train..lr=3"], "bad key"),
    (["seed=1", "seed.x=2"], "'seed' is a value, not a section"),
    # pydantic takes these as floats; torch would fail mid-run (1e300 cannot become a float32) or train on NaN
    (["train.lr=1e300"], r"train.lr = 1e\+300 is not a usable number; allowed: finite values within"),
    (["train.lr=inf"], "train.lr = inf is not a usable number"),
    (["train.weight_decay=1e39"], r"train.weight_decay = 1e\+39"),
])
def test_bad_overrides_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(AntidoorError, match=match):
        build_config(AttackRunConfig, overrides=overrides)


def test_numbers_beyond_float32_are_refused_in_studies_and_method_settings() -> None:
    """The same check guards a study's YAML and a defense's parameters, not only the single-run configs."""
    from antidoor.defenses.base import validate_defense_spec
    from antidoor.experiment import load_study

    with pytest.raises(AntidoorError, match=r"train.lr = 1e\+300 is not a usable number"):
        load_study(base={"name": "s", "train": {"lr": 1e300}})
    with pytest.raises(AntidoorError, match=r"defense.lr = 1e\+39 is not a usable number"):
        validate_defense_spec({"name": "sau", "lr": 1e39})
    with pytest.raises(AntidoorError, match=r"defense.bound = inf is not a usable number"):
        validate_defense_spec({"name": "sau", "bound": float("inf")})
    assert validate_defense_spec({"name": "sau", "lr": 3e38})["lr"] == 3e38  # within float32: allowed


def test_unknown_key_in_yaml_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 3, "warmup_epochs": 5}})
    with pytest.raises(AntidoorError, match=r"train\.warmup_epochs: unknown key"):
        build_config(AttackRunConfig, path)


def test_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(AntidoorError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [small_cnn,\n")
    with pytest.raises(AntidoorError, match="is not valid YAML"):
        read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(AntidoorError, match="must hold a mapping"):
        read_yaml(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}
    assert build_config(AttackRunConfig, empty) == build_config(AttackRunConfig)


def test_override_values_are_parsed_as_yaml() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=false") == (["a"], False)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a=[1, 2") == (["a"], "[1, 2")  # not YAML: kept as a string


def test_evaluate_config() -> None:
    cfg = build_config(EvaluateConfig, overrides=["attack.name=sig", "attack.delta=20"])
    assert cfg.attack["name"] == "sig" and cfg.attack["delta"] == 20
    with pytest.raises(AntidoorError, match="model: unknown key"):
        build_config(EvaluateConfig, overrides=["model.width=3"])


# --- every key reaches the code that uses it --------------------------------------------------


@pytest.fixture(scope="module")
def small(bundled: ImageData, subset: object) -> ImageData:
    return subset(bundled, 400, 200)


def test_data_keys_reach_the_splits_and_the_data(small: ImageData, bundled: ImageData) -> None:
    overrides = ["data.clean_ratio=0.1", "data.val_ratio=0.5", "data.hflip=false", "device=cpu"]
    cfg = build_config(AttackRunConfig, overrides=overrides)
    sc = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device, data=small)
    n_def = len(sc.splits.defender_train) + len(sc.splits.defender_val)
    assert 35 <= n_def <= 45 and abs(len(sc.splits.defender_val) - n_def / 2) <= 5
    # data.hflip reaches the dataset when it is loaded
    assert cfg.data.hflip is False
    loaded = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu")
    assert loaded.data.hflip is False and loaded.data.name == "cifar10-mini"
    assert torch.equal(loaded.data.x_test, bundled.x_test)
    assert loaded.describe()["config"]["clean_ratio"] == 0.1


def test_data_name_root_and_download_reach_the_loader(tmp_path: Path) -> None:
    cfg = build_config(AttackRunConfig, overrides=["data.name=mnist", f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(AntidoorError, match=f"dataset 'mnist' not found under {tmp_path}"):
        Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu")


def test_attack_params_and_seed_reach_the_attack(small: ImageData) -> None:
    cfg = build_config(AttackRunConfig, overrides=[
        "attack.patch_size=5", "attack.position=top_left", "attack.value=0.5", "attack.target=4", "attack.pratio=0.2",
        "attack.stage=before_augment", "seed=9"])
    sc = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu", data=small)
    atk = sc.attack
    assert atk.name == "badnets" and atk.target == 4 and atk.pratio == 0.2 and atk.seed == 9
    assert int(atk.tensors["mask"].sum()) == 25 and atk.tensors["mask"][0, 0, 0] == 1
    assert atk.tensors["pattern"].max() == 0.5
    assert len(sc.splits.poison) == 80
    hooks = sc.poison_hooks()
    assert hooks["before_augment"] is not None and hooks["after_augment"] is None
    blended = build_config(AttackRunConfig, overrides=["attack.name=blended", "attack.alpha=0.4"])
    assert Scenario.build(blended.data, blended.attack, 0, "cpu", data=small).attack.params.alpha == 0.4


def test_model_keys_reach_the_model(small: ImageData) -> None:
    cfg = build_config(AttackRunConfig, overrides=["model.name=vgg16_bn", "model.width=4"])
    sc = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu", data=small)
    model = new_model(sc, cfg.model.name, cfg.model.width)
    assert model.arch == {"name": "vgg16_bn", "num_classes": 10, "in_channels": 3, "kwargs": {"width": 4}}
    assert model.mean.flatten().tolist() == pytest.approx(list(small.mean))


def test_train_keys_reach_the_optimizer_and_loop(small: ImageData) -> None:
    cfg = build_config(AttackRunConfig, overrides=[
        "model.name=small_cnn", "model.width=4", "train.epochs=2", "train.lr=0.0123", "train.schedule=constant",
        "train.batch_size=100", "train.optimizer=adam", "device=cpu"])
    sc = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu", data=small)
    result = train_attack(cfg, sc)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(h["lr"] == 0.0123 for h in result.history)
    assert set(result.metrics) == {"clean_acc", "asr", "robust_acc"}


def test_device_key_is_checked() -> None:
    cfg = build_config(AttackRunConfig, overrides=["device=tpu"])
    with pytest.raises(AntidoorError, match="device 'tpu'"):
        Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
