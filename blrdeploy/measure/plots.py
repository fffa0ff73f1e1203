"""The figures blrdeploy writes (PNG, with matplotlib, the optional extra blrdeploy[plot]): the roofline of
``blrdeploy roofline --png`` and the loss curve of ``blrdeploy heal --plot``. Each is written atomically."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

from blrdeploy.files import atomic_file


def require_matplotlib(option: str) -> None:
    """A one-line error, before any work, when the figure asked for by ``option`` cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"{option} needs matplotlib: pip install matplotlib (or blrdeploy[plot])")


def _pyplot():
    # deferred: matplotlib is an optional extra (blrdeploy[plot]), needed for the figures only
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after choosing the file-only backend

    return plt


def _save(fig, plt, path: str | Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def roofline_png(rows: Sequence, device, path: str | Path) -> None:
    """Attainable FLOP/s against arithmetic intensity for ``device`` (a measure.devices.Device), one point per
    layer shape and token count (measure.roofline.Row) for dense, the PyTorch reference and our kernels."""
    plt = _pyplot()
    peak, bw = device.fp16_tflops * 1e12, device.bandwidth_gbs * 1e9
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lo, hi = 0.1, 1e5
    xs = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    ax.plot(xs, [min(peak, x * bw) / 1e12 for x in xs], color="black", lw=1.5, label=f"{device.name} roofline")
    marks = {"dense": ("o", "tab:gray", "dense"), "pytorch": ("s", "tab:red", "PyTorch BLR"),
             "kernels": ("^", "tab:blue", "our kernels")}  # fmt: skip
    for p, (marker, color, label) in marks.items():
        ai = [r.intensity[p] for r in rows]
        perf = [r.flops[p] / r.seconds[p] / 1e12 for r in rows]
        ax.scatter(ai, perf, marker=marker, color=color, s=18, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("predicted TFLOP/s")
    ax.set_title(f"{device.description}: {device.bandwidth_gbs:g} GB/s, {device.fp16_tflops:g} TFLOP/s fp16")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    _save(fig, plt, path)


def loss_curve_png(losses: Sequence[float], path: str | Path, title: str, ylabel: str) -> None:
    """Each step's loss (thin) and its running mean over a tenth of the steps (thick), log scale when it spans a
    decade."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", lw=0.6, alpha=0.5, label="step")
    window = max(1, len(losses) // 10)
    sums = list(itertools.accumulate(losses, initial=0.0))
    mean = [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(losses))]
    if window > 1:
        ax.plot(steps, mean, color="tab:blue", lw=2, label=f"mean of the last {window} steps")
    positive = [v for v in losses if v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    _save(fig, plt, path)
