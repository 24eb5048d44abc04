"""The report's plots, as PNG bytes (matplotlib, no display needed).

- :func:`defenses_compared`: clean_acc and asr of the clean reference, the backdoored model and
  each defense, mean over seeds (error bars: sd), one panel per (dataset, model, attack).
- :func:`asr_after_retuning`: asr right after purification (``o_asr``, the row's ``asr``) next to
  ``p_asr`` after the retuning attack, when the store holds ``p_asr``.
- :func:`curves`: every curve family in the store (``curve``: a defense's rounds; ``path``: the
  backdoor-connected path over t; ``retune``: the retuning attack's epochs), mean over seeds.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

FAMILY_TITLES = {
    "curve": "during purification (per round or epoch, test split, observed only)",
    "path": "backdoor-connected path (t = 0: purified, t = 1: backdoored)",
    "retune": "retuning attack (per epoch, mean over its seeds)",
    "train": "training",
}
MAX_PANELS = 12


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _grid(n: int, width: float = 5.0, height: float = 3.4) -> tuple[Any, list[Any]]:
    plt = _pyplot()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _panel_key(r: dict[str, Any]) -> str:
    return f"{r['attack']} on {r['dataset']} ({r['model']})"


def _grouped_bars(agg: list[dict[str, Any]], present: str, bars: tuple[tuple[str, str, str], ...], title: str) -> bytes | None:
    """A panel per (dataset, model, attack) of the rows that have ``present``; per row, one bar per
    ``(metric, label, color)`` of ``bars`` (mean, error bar: its ``_sd``)."""
    panels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in agg:
        if r.get(present) is not None:
            panels[_panel_key(r)].append(r)
    if not panels:
        return None
    keys = list(panels)[:MAX_PANELS]
    fig, axes = _grid(len(keys))
    width = 0.8 / len(bars)
    for ax, key in zip(axes, keys, strict=True):
        rows = panels[key]
        xs = range(len(rows))
        for i, (metric, label, color) in enumerate(bars):
            offset = (i - (len(bars) - 1) / 2) * width
            ax.bar([x + offset for x in xs], [100 * (r.get(metric) or 0.0) for r in rows], width,
                   yerr=[100 * (r.get(f"{metric}_sd") or 0.0) for r in rows], label=label, color=color, capsize=2)
        ax.set_xticks(list(xs), [str(r["defense"]) for r in rows], rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_xlabel("defense")
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, y=1.02)
    return _png(fig)


def defenses_compared(agg: list[dict[str, Any]]) -> bytes | None:
    """Grouped bars of clean_acc and asr per model (aggregated rows from ``tables.aggregate``)."""
    return _grouped_bars(agg, "clean_acc", (("clean_acc", "clean_acc", "#4477aa"), ("asr", "asr", "#cc3311")),
                         "defenses compared (mean over seeds; error bars: sd)")


def asr_after_retuning(agg: list[dict[str, Any]]) -> bytes | None:
    """o_asr (right after purification) against p_asr (after the retuning attack), when recorded."""
    return _grouped_bars(agg, "p_asr", (("asr", "o_asr", "#ee7733"), ("p_asr", "p_asr", "#aa3377")),
                         "asr after retuning: o_asr (after purification) vs p_asr (after the retuning attack)")


RATES = ("asr", "clean_acc", "robust_acc", "p_asr")  # curves of rates are drawn in percent


def curves(points: list[dict[str, Any]], skip: tuple[str, ...] = ("train",)) -> dict[str, bytes]:
    """One figure per curve family: a panel per (metric, attack), a line per defense, mean over seeds."""
    families: dict[str, dict[tuple, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for p in points:
        if p["family"] in skip or p["value"] is None:
            continue
        panel = (p["metric"], _panel_key(p))
        families[p["family"]][(panel, p["defense"])][p["step"]].append(p["value"])
    out = {}
    for family, lines in families.items():
        panels = list(dict.fromkeys(panel for panel, _ in lines))[:MAX_PANELS]
        fig, axes = _grid(len(panels), 4.5, 3.2)
        for ax, panel in zip(axes, panels, strict=True):
            metric, where = panel
            rate = metric in RATES
            for (pan, defense), series in lines.items():
                if pan != panel:
                    continue
                steps = sorted(series)
                ax.plot(steps, [(100 if rate else 1) * sum(series[s]) / len(series[s]) for s in steps], marker="o",
                        markersize=3, label=str(defense))
            ax.set_title(f"{metric}\n{where}", fontsize=8)
            ax.set_xlabel({"path": "t (0: purified, 1: backdoored)", "retune": "epoch (0: before the retuning attack)"}
                          .get(family, "step"))
            ax.set_ylabel(f"{metric} (%)" if rate else metric)
            if rate:
                ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{family}: {FAMILY_TITLES.get(family, family)}", y=1.02)
        out[family] = _png(fig)
    return out
