"""What antidoor offers, for ``antidoor list`` and ``antidoor describe NAME``: attacks, defenses, models,
each with its paper line and every parameter (default and meaning), read from the registries themselves."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from antidoor.errors import AntidoorError


def _first_line(obj: Any) -> str:
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else None  # a class's own docstring, else its module's
    doc = own or inspect.getdoc(sys.modules.get(obj.__module__)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def catalog() -> dict[str, dict[str, str]]:
    """``{"attacks": {name: summary}, "defenses": {...}, "models": {...}}``."""
    from antidoor.attacks import ATTACKS
    from antidoor.defenses import DEFENSES
    from antidoor.models import MODELS

    out = {"attacks": {n: _first_line(ATTACKS.get(n)) for n in ATTACKS},
           "defenses": {n: _first_line(DEFENSES.get(n)) for n in DEFENSES},
           "models": {n: _first_line(MODELS.get(n)) for n in MODELS}}
    out["models"]["torchvision:<arch>"] = "any torchvision classifier, random init (antidoor import loads your weights)"
    out["models"]["timm:<arch>"] = "any timm classifier, random init (needs the timm extra)"
    return out


def describe(name: str) -> dict[str, Any]:
    """An attack's or a defense's description and parameters (name, default, meaning), or a model's description."""
    from antidoor.attacks import ATTACKS
    from antidoor.defenses import DEFENSES
    from antidoor.models import MODELS

    for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES), ("model", MODELS)):
        if name in registry:
            obj = registry.get(name)
            module_doc = inspect.getdoc(sys.modules.get(obj.__module__)) or ""
            params = []
            if kind != "model":
                for key, f in obj.Params.model_fields.items():
                    default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
                    params.append({"name": key, "default": default, "description": f.description or ""})
            else:
                for key, p in inspect.signature(obj).parameters.items():
                    if key not in ("num_classes", "in_channels"):
                        params.append({"name": key, "default": repr(p.default), "description": ""})
            return {"kind": kind, "name": registry.canonical(name), "doc": module_doc, "params": params}
    names = [n for reg in (ATTACKS, DEFENSES, MODELS) for n in reg]
    raise AntidoorError(f"unknown attack, defense or model {name!r}; available: {', '.join(names)}")


__all__ = ["catalog", "describe"]
