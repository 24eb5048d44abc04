"""Results as a pandas DataFrame: ``antidoor.results.load(path)`` for a study or a stress run.

- a study folder (or its ``study.sqlite``): one row per measured model and seed, as ``antidoor results`` prints
  them (labels, status, error, seconds and every scalar metric; rates as fractions in [0, 1]);
- a stress folder (or its ``stress.json``): one row per stressed model, its summary and, for purified models,
  the verdict with its bootstrap intervals (``verdict``, ``confident``, ``p_asr_ci_low``, ``p_asr_ci_high``, ...).

pandas is an optional dependency: ``pip install 'antidoor[pandas]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from antidoor.errors import AntidoorError


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise AntidoorError("antidoor.results.load needs pandas (not installed): pip install 'antidoor[pandas]'") from None
    return pandas


def load(path: str | Path) -> Any:
    """A study's or a stress run's results as a ``pandas.DataFrame`` (see the module docstring)."""
    pd = _pandas()
    path = Path(path)
    stress = path / "stress.json" if path.is_dir() else path
    if stress.name == "stress.json" and stress.is_file():
        doc = json.loads(stress.read_text())
        rows = []
        for r in doc["table"]:
            v = doc.get("verdicts", {}).get(r["model"], {})
            extra = {k: v[k] for k in ("verdict", "confident", "p_ref", "p_ref_from") if k in v}
            for k in ("o_asr_ci", "p_asr_ci", "o_gap_ci", "p_gap_ci"):
                if k in v:
                    extra[f"{k}_low"], extra[f"{k}_high"] = v[k]
            rows.append({**r, **extra})
        return pd.DataFrame(rows)
    from antidoor.experiment import STORE_NAME, Store
    from antidoor.report.tables import result_rows

    store = path / STORE_NAME if path.is_dir() else path
    if not store.is_file() or store.suffix != ".sqlite":
        raise AntidoorError(f"{str(path)!r} is neither a study (folder with {STORE_NAME}, or the .sqlite) nor a stress "
                            "result (folder with stress.json, or the file)")
    with Store(store) as s:
        return pd.DataFrame(result_rows(s))


__all__ = ["load"]
