"""JSON schemas of antidoor's files: the checkpoint sidecar (``checkpoint-sidecar``) and ``stress.json`` (``stress``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

NAMES = ("checkpoint-sidecar", "stress")


def schema(name: str) -> dict[str, Any]:
    """The JSON schema ``name`` (one of :data:`NAMES`) as a dict."""
    from antidoor.errors import AntidoorError

    if name not in NAMES:
        raise AntidoorError(f"unknown schema {name!r}; available: {', '.join(NAMES)}")
    return json.loads(resources.files(__package__).joinpath(f"{name}.schema.json").read_text())


__all__ = ["NAMES", "schema"]
