"""A newcomer's path: `antidoor list` and `describe`, and an example in every command's --help."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from antidoor.attacks import ATTACKS
from antidoor.cli import app
from antidoor.defenses import DEFENSES
from antidoor.models import MODELS

COMMANDS = ["attack", "evaluate", "purify", "demo", "stress", "import", "grid", "results", "report", "list", "describe"]


def test_list_names_every_registered_method(run_cli):
    res = run_cli("list")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout.splitlines()[-1])
    assert listed["attacks"] == ATTACKS.names() and listed["defenses"] == DEFENSES.names()
    assert listed["models"] == [*MODELS.names(), "torchvision:<arch>", "timm:<arch>"]
    assert "SAU: Shared Adversarial Unlearning." in res.stderr and "No trigger" in res.stderr


def test_describe_gives_parameters_and_defaults(run_cli):
    res = run_cli("describe", "sau")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout.splitlines()[-1])
    params = {p["name"]: p["default"] for p in d["params"]}
    assert d["kind"] == "defense" and params["rounds"] == "100" and "Shared Adversarial Unlearning" in d["doc"]
    assert "unknown attack, defense or model 'sauu'" in run_cli("describe", "sauu").error_line()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Example: antidoor " in res.output
