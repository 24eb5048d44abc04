"""Studies at scale: a study config, its stages, the grid runner and its backends, the SQLite store.

Names are imported lazily, so ``antidoor.experiment.store`` opens a store without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GridSummary": "runner", "run_grid": "runner", "STORE_NAME": "stages", "Stage": "stages", "plan": "stages",
    "Metric": "store", "Artifact": "store", "Store": "store", "StudyConfig": "study", "load_study": "study",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"antidoor.experiment.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'antidoor.experiment' has no attribute {name!r}")
