"""PNG plots of a stress run (matplotlib, Agg backend), returned as bytes for atomic writing."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from antidoor.stress.path import PathResult
    from antidoor.stress.retune import RAResult


def _pyplot():  # matplotlib.pyplot, imported late: Agg set first
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def ra_curve_png(results: dict[str, RAResult], title: str = "retuning attack") -> bytes:
    """asr (mean over seeds, band: ± one std) after each retuning epoch, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, res in results.items():
        s = res.summary()
        epochs = list(range(len(s["asr_curve_mean"])))
        mean = [100 * v for v in s["asr_curve_mean"]]
        std = [100 * v for v in s["asr_curve_std"]]
        n = len(s["seeds"])
        line, = ax.plot(epochs, mean, marker="o", label=f"{name} ({n} seed{'s' if n > 1 else ''})")
        ax.fill_between(epochs, [m - d for m, d in zip(mean, std, strict=True)],
                        [m + d for m, d in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("retuning epoch (0 = before RA)")
    ax.set_ylabel("asr (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def path_png(results: dict[str, PathResult], title: str = "backdoor-connected path") -> bytes:
    """clean_acc and asr along t (0 = purified, 1 = backdoored), one line per model."""
    plt = _pyplot()
    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(10, 4.0), sharex=True)
    bn = {r.bn for r in results.values()}
    for name, res in results.items():
        line, = ax_acc.plot(res.t, [100 * v for v in res.clean_acc], marker=".", label=name)
        ax_asr.plot(res.t, [100 * v for v in res.asr], marker=".", label=name, color=line.get_color())
        if res.endpoints and res.bn == "reestimate":  # the two models' own numbers (their own BatchNorm statistics)
            for ax, key in ((ax_acc, "clean_acc"), (ax_asr, "asr")):
                ax.scatter([res.t[0], res.t[-1]], [100 * res.endpoints["purified"][key], 100 * res.endpoints["backdoored"][key]],
                           marker="x", s=40, color=line.get_color(), zorder=3)
    for ax, label in ((ax_acc, "clean_acc (%)"), (ax_asr, "asr (%)")):
        ax.set_xlabel("t  (0 = purified, 1 = backdoored)")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    ax_asr.legend(fontsize=8)
    note = "; x: the models' own statistics" if "reestimate" in bn else ""
    fig.suptitle(f"{title} (BatchNorm statistics: {', '.join(sorted(bn))}{note})")
    return _png(fig)


__all__ = ["path_png", "ra_curve_png"]
