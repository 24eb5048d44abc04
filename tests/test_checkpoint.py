"""checkpoint.py: safetensors + JSON sidecar round trips; loading never unpickles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from antidoor.checkpoint import load_checkpoint, save_checkpoint, sidecar_path
from antidoor.data import ImageData
from antidoor.errors import AntidoorError
from antidoor.metrics import predict
from antidoor.models import build_model
from conftest import E2E_RECIPE


def _copy(saved: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(saved, dest / saved.name)
    shutil.copy(sidecar_path(saved), dest / sidecar_path(saved).name)
    return dest / saved.name


def test_round_trip_predictions_attack_and_splits(badnets_run: object, saved_run: Path) -> None:
    res, data = badnets_run.result, badnets_run.data
    ckpt = load_checkpoint(saved_run)
    assert not ckpt.model.training
    assert torch.equal(predict(ckpt.model, data.x_test), predict(res.model, data.x_test))
    for k, v in res.model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v), k
    # the attack with identical trigger tensors and parameters
    atk = res.scenario.attack
    assert ckpt.attack is not None and ckpt.attack.spec() == atk.spec()
    assert ckpt.attack.tensors.keys() == atk.tensors.keys()
    assert all(torch.equal(ckpt.attack.tensors[k], v) for k, v in atk.tensors.items())
    x = data.x_test[:32].float() / 255
    assert torch.equal(ckpt.attack.apply(x), atk.apply(x))
    # the splits
    assert ckpt.splits is not None
    for k, v in res.scenario.splits.tensors().items():
        assert torch.equal(ckpt.splits.tensors()[k], v), k
    # the sidecar
    meta = ckpt.meta
    assert meta["format"] == "antidoor-checkpoint" and meta["format_version"] == 1
    assert meta["arch"] == {"name": "small_cnn", "num_classes": 10, "in_channels": 3, "kwargs": {"width": E2E_RECIPE["width"]}}
    assert meta["metrics"] == res.metrics and meta["seed"] == 0 and meta["classes"] == data.classes
    assert meta["mean"] == pytest.approx(list(data.mean)) and meta["dataset"]["image_shape"] == [3, 32, 32]
    assert {"antidoor", "torch", "torchvision", "python", "cpu", "cpu_bf16"} <= set(meta["versions"])
    assert meta["versions"]["cpu_bf16"] in ("amx", "avx512_bf16", "none")
    assert ckpt.extra == {}


def test_file_layout(saved_run: Path) -> None:
    tensors = load_file(saved_run)
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"model", "trigger", "split"}
    assert {"trigger.mask", "trigger.pattern", "split.poison", "split.defender_train", "split.defender_val"} <= set(tensors)
    json.loads(sidecar_path(saved_run).read_text())


def test_checkpoint_without_attack_or_splits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("vgg16_bn", 5, in_channels=1, width=4).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"note": "plain"})
    ckpt = load_checkpoint(path)
    assert ckpt.attack is None and ckpt.splits is None and ckpt.meta["note"] == "plain"
    x = torch.rand(3, 1, 28, 28)  # shape test only
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), model(x))


def test_save_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(AntidoorError, match=r"must end in \.safetensors"):
        save_checkpoint(tmp_path / "m.pt", build_model("small_cnn", 10, width=4), {})


def test_plain_state_dict_pt_loads_with_weights_only(bundled: ImageData, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("small_cnn", 10, width=4, mean=bundled.mean, std=bundled.std).eval()
    save_checkpoint(tmp_path / "m.safetensors", model, {})  # writes the sidecar m.json
    (tmp_path / "m.safetensors").unlink()
    for suffix in (".pt", ".pth"):
        torch.save(model.state_dict(), tmp_path / f"m{suffix}")
        ckpt = load_checkpoint(tmp_path / f"m{suffix}")
        assert torch.equal(predict(ckpt.model, bundled.x_test[:64]), predict(model, bundled.x_test[:64]))


class _RunsCode:
    """Unpickling this object runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    model = build_model("small_cnn", 10, width=4)
    save_checkpoint(tmp_path / "evil.safetensors", model, {})  # a valid sidecar beside it
    state = {**model.state_dict(), "payload": _RunsCode(marker)}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(AntidoorError, match=r"refusing to load .*pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # the same file really does run code when unpickled without protection: the test above means something
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_pt_that_is_not_a_state_dict(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.safetensors", build_model("small_cnn", 10, width=4), {})
    torch.save([torch.zeros(2)], tmp_path / "m.pt")
    with pytest.raises(AntidoorError, match="must hold a dict of tensors"):
        load_checkpoint(tmp_path / "m.pt")
    torch.save({"epoch": 3}, tmp_path / "m.pt")
    with pytest.raises(AntidoorError, match=r"must hold a dict of tensors .*its entry 'epoch' is of type int$"):
        load_checkpoint(tmp_path / "m.pt")
    # a training checkpoint: the error says where its weights are and how to save them alone
    weights = build_model("small_cnn", 10, width=4).state_dict()
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "m.pt")
    with pytest.raises(AntidoorError, match=r"entry 'epoch' is of type int; its weights look nested under 'state_dict': "
                                            r"save that entry alone, torch.save\(checkpoint\['state_dict'\], path\)"):
        load_checkpoint(tmp_path / "m.pt")
    torch.save(weights, tmp_path / "m.pt")  # done as it says: loads
    assert load_checkpoint(tmp_path / "m.pt").model is not None


@pytest.mark.parametrize("corruption", ["empty", "garbage", "truncated", "bad_header"])
def test_corrupt_safetensors(corruption: str, saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    data = path.read_bytes()
    payload = {"empty": b"", "garbage": os.urandom(4096), "truncated": data[: len(data) // 2],
               "bad_header": (20).to_bytes(8, "little") + b'{"not": "a tensor"}!' + data[28:]}[corruption]
    path.write_bytes(payload)
    with pytest.raises(AntidoorError, match="is not a valid safetensors file"):
        load_checkpoint(path)


def test_corrupt_pt(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.safetensors", build_model("small_cnn", 10, width=4), {})
    torch.save(build_model("small_cnn", 10, width=4).state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:500])
    with pytest.raises(AntidoorError, match=r"m\.pt"):
        load_checkpoint(tmp_path / "m.pt")


def test_shape_mismatch_names_the_tensor(saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    tensors = load_file(path)
    tensors["model.backbone.head.weight"] = tensors["model.backbone.head.weight"][:, :5].contiguous()
    save_file(tensors, path)
    expects = f"expects \\(10, {4 * E2E_RECIPE['width']}\\)"
    with pytest.raises(AntidoorError, match=r"tensor 'backbone.head.weight' has shape \(10, 5\).*" + expects):
        load_checkpoint(path)


def test_missing_or_unexpected_weights(saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    tensors = load_file(path)
    del tensors["model.backbone.head.bias"]
    tensors["model.backbone.extra"] = torch.zeros(1)
    save_file(tensors, path)
    with pytest.raises(AntidoorError, match=r"does not match architecture 'small_cnn'.*backbone.head.bias.*backbone.extra"):
        load_checkpoint(path)


def test_sidecar_for_another_architecture(saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    meta = json.loads(sidecar_path(path).read_text())
    meta["arch"]["kwargs"]["width"] = 2 * E2E_RECIPE["width"]
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(AntidoorError, match=r"has shape .* architecture 'small_cnn' expects"):
        load_checkpoint(path)


def test_trigger_tensor_mismatch(saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    tensors = load_file(path)
    tensors["trigger.mask"] = torch.zeros(1, 8, 8)
    save_file(tensors, path)
    with pytest.raises(AntidoorError, match="trigger tensor 'mask' has shape"):
        load_checkpoint(path)


def test_missing_checkpoint_or_sidecar(saved_run: Path, tmp_path: Path) -> None:
    with pytest.raises(AntidoorError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    path = tmp_path / saved_run.name
    shutil.copy(saved_run, path)
    with pytest.raises(AntidoorError, match=r"has no sidecar .*model.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("sidecar", ["{not json", "{}", '{"arch": {"name": "small_cnn"}}', "[1, 2]"])
def test_broken_sidecar(sidecar: str, saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    sidecar_path(path).write_text(sidecar)
    with pytest.raises(AntidoorError, match="sidecar"):
        load_checkpoint(path)


def test_sidecar_with_unknown_model(saved_run: Path, tmp_path: Path) -> None:
    path = _copy(saved_run, tmp_path)
    meta = json.loads(sidecar_path(path).read_text())
    meta["arch"]["name"] = "transformer9000"
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(AntidoorError, match="unknown model 'transformer9000'"):
        load_checkpoint(path)


def test_unknown_file_type(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"onnx")
    with pytest.raises(AntidoorError, match=r"unknown file type '\.onnx'"):
        load_checkpoint(path)


def test_save_is_atomic_and_overwrites(saved_run: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(saved_run)
    out = tmp_path / "again" / "model.safetensors"
    save_checkpoint(out, ckpt.model, {"k": 1}, ckpt.attack, ckpt.splits)
    save_checkpoint(out, ckpt.model, {"k": 2}, ckpt.attack, ckpt.splits)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.safetensors"]
    assert load_checkpoint(out).meta["k"] == 2
