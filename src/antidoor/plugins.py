"""A user's own attacks (or defenses, models): a Python file that registers them, loaded when the user names it.

``antidoor --plugin my_attack.py attack --attack my_trigger ...`` imports ``my_attack.py`` before the command
runs. This RUNS THE FILE'S CODE, with your permissions: name only files you wrote or trust. antidoor never
imports a module that was not named explicitly (``--plugin`` or ``antidoor.plugins.load_plugin``).

A plugin is ordinary code against the registries, e.g. an attack in a dozen lines::

    import torch
    from pydantic import Field
    from antidoor.attacks import ATTACKS, Attack, AttackParams

    class StripeParams(AttackParams):
        row: int = Field(0, ge=0, description="which image row turns white")

    @ATTACKS.register("stripe")
    class Stripe(Attack):
        name = "stripe"
        Params = StripeParams

        def stamp(self, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[..., self.params.row, :] = 1.0
            return x

A checkpoint made with a plugin's attack records the attack's name; loading it again needs the same ``--plugin``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from antidoor.errors import AntidoorError


def load_plugin(path: str | Path) -> ModuleType:
    """Import the Python file ``path`` (running its code) so that what it registers becomes available."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise AntidoorError(f"--plugin {str(path)!r}: expected an existing .py file")
    name = f"antidoor_plugin_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AntidoorError(f"--plugin {str(path)!r}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except AntidoorError:
        raise
    except Exception as e:  # the user's code: say where it failed, in one line
        del sys.modules[name]
        raise AntidoorError(f"--plugin {str(path)!r} failed while importing: {type(e).__name__}: {e}") from None
    return module


__all__ = ["load_plugin"]
