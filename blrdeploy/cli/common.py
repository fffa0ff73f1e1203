"""What every command shares: one-line errors, --json output, option checks and the progress bars on stderr.

Command modules import from here, never from each other or from ``blrdeploy.cli`` itself (which registers them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from blrdeploy.conversion.pipeline import Callbacks
from blrdeploy.kernels.dtypes import DTYPES

DTYPE_LIST = ", ".join(DTYPES)  # for --help texts: "float16, bfloat16, float32"


def emit_json(data, default=None) -> None:
    """A command's --json result on stdout; ``default`` as json.dump's."""
    json.dump(data, sys.stdout, indent=2, default=default)
    sys.stdout.write("\n")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def check_output_path(path, option: str) -> None:
    """Refuses, before any work, an output path that cannot be written: a directory, or in a missing folder."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        fail(f"{option} {path} is a directory: give a file path")
    if not path.parent.is_dir():
        fail(f"{option} {path}: the folder {path.parent} does not exist")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        fail(f"--device must be auto, cuda, cuda:N or cpu, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device} asked for, but no CUDA GPU is available")
    return device


def parse_dtype(name: str, allow_auto: bool = True):
    """--dtype: a name from the one dtype table (kernels/dtypes.py), or ``auto`` (None: the model's own)."""
    if allow_auto and name == "auto":
        return None
    if name not in DTYPES:
        fail(f"--dtype must be one of {', '.join((['auto'] if allow_auto else []) + list(DTYPES))}, got {name!r}")
    return DTYPES[name]


def csv_ints(text: str | None, what: str) -> list[int] | None:
    """``"1,16,256"`` -> [1, 16, 256]; None passes through; a one-line error for anything else."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} takes comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        fail(f"{what} takes positive integers, got {text!r}")
    return values


def new_bar(label: str):
    """A rich progress bar on stderr (so --json's stdout stays clean) that shows a fit's relative error."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}  rel. error {task.fields[err]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


class fit_progress:
    """A BLAST step bar on stderr while a fit runs; a no-op callback when quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return None
        self._bar = new_bar("BLAST fit")
        self._bar.start()
        self._task = None

        def update(step: int, total: int, err: float) -> None:
            if self._task is None:
                self._task = self._bar.add_task("fit", total=total, err=err)
            self._bar.update(self._task, completed=step, err=err)

        return update

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()


class convert_progress:
    """Layers bar with ETA, plus a step bar for the BLAST fit of the current layer; on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return Callbacks()
        if not sys.stderr.isatty():
            return self._plain_lines()
        self._bar = new_bar("converting")
        self._bar.start()
        self._layers = self._fit = None

        def layer(name: str, index: int, count: int) -> None:
            if self._layers is None:
                self._layers = self._bar.add_task(name, total=count, err=0.0)
            self._bar.update(self._layers, completed=index, description=name)
            if self._fit is not None:
                self._bar.remove_task(self._fit)
                self._fit = None

        def fit(step: int, total: int, err: float) -> None:
            if self._fit is None:
                self._fit = self._bar.add_task("BLAST steps", total=total, err=err)
            self._bar.update(self._fit, completed=step, err=err)

        return Callbacks(layer=layer, fit=fit)

    def _plain_lines(self):
        """One line per layer with elapsed time and ETA, for logs and pipes where a live bar cannot draw."""
        start = time.perf_counter()

        def layer(name: str, index: int, count: int) -> None:
            elapsed = time.perf_counter() - start
            eta = f"{elapsed / index * (count - index):.0f} s" if index else "?"
            print(f"[{index + 1}/{count}] {name}  elapsed {elapsed:.0f} s, eta {eta}", file=sys.stderr, flush=True)

        return Callbacks(layer=layer)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
