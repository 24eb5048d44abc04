"""Models from elsewhere: namespaced torchvision/timm architectures, ``antidoor import`` with its errors,
the published JSON schemas, and a model trained outside antidoor audited with the CLI in two commands."""

from __future__ import annotations

import json

import pytest
import torch

from antidoor.checkpoint import load_checkpoint
from antidoor.errors import AntidoorError
from antidoor.importer import ImportedModel, import_model
from antidoor.models import build_model, wrap
from antidoor.schemas import schema
from conftest import invoke_main

CIFAR = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}


def test_namespaced_names_never_collide_with_antidoors_own():
    tv, own = build_model("torchvision:resnet18", 10), build_model("resnet18", 10, width=8)
    assert tv.backbone.net.conv1.weight.shape == (64, 3, 7, 7) and own.backbone.conv1.weight.shape == (8, 3, 3, 3)
    x = torch.zeros(2, 3, 32, 32)
    assert tv(x).shape == (2, 10) and tv.features(x).shape == (2, 512) and tv.backbone.head.out_features == 10
    assert "backbone.head.weight" not in tv.state_dict()  # head is a view, the network's own keys stay
    for bad, match in (("torchvision:nope", "unknown model 'torchvision:nope'"), ("keras:resnet", "torchvision:<arch> or timm")):
        with pytest.raises(AntidoorError, match=match):
            build_model(bad, 10)


def test_timm_model_imports():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model = wrap(net, CIFAR["mean"], CIFAR["std"], arch="timm:resnet18")
    assert model.arch["name"] == "timm:resnet18" and model.arch["num_classes"] == 10
    rebuilt = build_model("timm:resnet18", 10, 3, CIFAR["mean"], CIFAR["std"])
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_import_names_the_first_mismatch(tmp_path):
    import torchvision

    path = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    spec = {"num_classes": 10, **CIFAR}
    model = import_model(path, ImportedModel(name="torchvision:resnet18", **spec))
    assert torch.equal(model.backbone.net.fc.bias, torch.load(path, weights_only=True)["fc.bias"])
    with pytest.raises(AntidoorError, match=r"tensor 'conv1.weight' has shape \(64, 3, 7, 7\), architecture 'resnet18' .* "
                                            r"expects \(64, 3, 3, 3\); antidoor's resnet18.* torchvision:<arch>"):
        import_model(path, ImportedModel(name="resnet18", **spec, kwargs={"width": 64}))
    with pytest.raises(AntidoorError, match=r"tensor 'fc.weight' has shape \(10, 512\).* 100 classes expects \(100, 512\)"):
        import_model(path, ImportedModel(name="torchvision:resnet18", **{**spec, "num_classes": 100}))
    state = torch.load(path, weights_only=True)
    del state["layer1.0.conv1.weight"]
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel's prefix is fine, a missing tensor is not
    with pytest.raises(AntidoorError, match=r"expects weight 'layer1.0.conv1.weight' \(64, 64, 3, 3\), which the file lacks"):
        import_model(path, ImportedModel(name="torchvision:resnet18", **spec))


def test_cli_import_then_stress_in_two_commands(run_cli, badnets_run, clean_run, tmp_path):
    """Plain state dicts of networks trained and purified 'outside' (antidoor's small_cnn backbones saved with
    torch.save, as any training script would): import all three, then stress."""
    from antidoor.defenses import purify

    jsonschema = pytest.importorskip("jsonschema")
    sc = badnets_run.result.scenario
    ft = purify(badnets_run.result.model, sc.defender_data(), "ft", epochs=2, batch_size=50)
    for name, m in (("bd", badnets_run.result.model), ("ft", ft), ("clean", clean_run.result.model)):
        torch.save(m.backbone.state_dict(), tmp_path / f"{name}.pt")
    mean, std = (",".join(map(str, badnets_run.data.mean)), ",".join(map(str, badnets_run.data.std)))
    res = run_cli("import", *(tmp_path / f"{n}.pt" for n in ("bd", "ft", "clean")), "--arch", "small_cnn",
                  "--set", "model.kwargs.width=16", "--num-classes", "10", "--mean", mean, "--std", std,
                  "--attack", "badnets", "--target", "0", "--out", tmp_path / "imported", "--quiet")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.splitlines()[-1])["metrics"]
    assert metrics[0]["asr"] > 0.9 and metrics[2]["asr"] < 0.5
    sidecar = json.loads((tmp_path / "imported" / "bd.json").read_text())
    jsonschema.validate(sidecar, schema("checkpoint-sidecar"))
    assert load_checkpoint(tmp_path / "imported" / "bd.safetensors").attack.name == "badnets"
    out = tmp_path / "stress"
    (tmp_path / "poisoned.txt").write_text(" ".join(str(i) for i in range(0, 5000, 250)))  # the attacker's, as indices
    res = run_cli("stress", tmp_path / "imported" / "ft.safetensors", "--backdoored", tmp_path / "imported" / "bd.safetensors",
                  "--clean-ref", tmp_path / "imported" / "clean.safetensors", "--poisoned-indices", tmp_path / "poisoned.txt",
                  "--set", "ra.seeds=[0]", "--set", "ra.epochs=1", "--set", "qra=null", "--set", "path=null",
                  "--set", "ep=false", "--device", "cpu", "--out", out)
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "stress.json").read_text())
    assert doc["data"]["ra_set"]["poisoned_from"] == "recorded poisoned training samples"
    assert {c["name"]: c["ok"] for c in doc["checks"]}["poisoned_samples"]
    jsonschema.validate(doc, schema("stress"))
    assert doc["verdicts"]["ft"]["verdict"] in ("not purified", "superficial", "deep")


@pytest.mark.parametrize("case", ["pickle", "shape", "mean", "no mean", "training checkpoint"])
def test_cli_import_bad_input_is_one_line(run_cli, tmp_path, case):
    import torchvision

    good = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), good)
    evil = tmp_path / "evil.pt"
    torch.save({"x": object}, evil)
    args = {"pickle": [evil, "--arch", "torchvision:resnet18", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"],
            "shape": [good, "--arch", "resnet18", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"],
            "mean": [good, "--arch", "torchvision:resnet18", "--mean", "0.5;0.5", "--std", "0.5,0.5,0.5"],
            "no mean": [good, "--arch", "torchvision:resnet18"],
            "training checkpoint": [tmp_path / "train.pt", "--arch", "torchvision:resnet18", "--mean", "0.5,0.5,0.5",
                                    "--std", "0.5,0.5,0.5"]}[case]
    torch.save({"epoch": 5, "state_dict": torch.load(good, weights_only=True)}, tmp_path / "train.pt")
    run = run_cli if case == "pickle" else invoke_main  # the refusal to unpickle through a real subprocess
    line = run("import", *args, "--num-classes", "10", "--out", tmp_path / "out").error_line()
    assert {"pickle": "refusing to load", "shape": "conv1.weight", "mean": "--mean '0.5;0.5'",
            "no mean": "model.mean: required, not given; model.std: required, not given",
            "training checkpoint": "its weights look nested under 'state_dict'"}[case] in line
