"""What every command shares: one-line errors, --json output, the console tables print on, option checks and the
progress bars on stderr.

Command modules import from here, never from each other or from ``blrdeploy.cli`` itself (which registers them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
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
from safetensors import SafetensorError

from blrdeploy.conversion.pipeline import Callbacks
from blrdeploy.files import OutputError, safetensors_os_error
from blrdeploy.kernels.dtypes import DTYPES
from blrdeploy.measure import evaluate
from blrdeploy.models.families import extra_of, install_hint

DTYPE_LIST = ", ".join(DTYPES)  # for --help texts: "float16, bfloat16, float32"


def emit_json(data, default=None) -> None:
    """A command's --json result on stdout; ``default`` as json.dump's."""
    json.dump(data, sys.stdout, indent=2, default=default)
    sys.stdout.write("\n")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------ errors

# What a write that cannot succeed fails with, whoever wrote: the disk or quota is full, the file too large, the
# file system read-only.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# What torch raises when a CUDA call finds no GPU: a CPU-only build, no driver, no device.
_NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available")


def error_line(exc: BaseException, user: type[ValueError] = ValueError) -> str | None:
    """The one line a user is told for ``exc``, or None for a defect (it keeps its traceback). The library says
    what a user can act on as a ValueError of the class ``user`` (CheckpointError, BundleError, RunError, ...) or
    an OutputError (every command's output check, blrdeploy.files); the rest here is what the operating system,
    safetensors, a missing optional package or a missing GPU raise on their own."""
    if isinstance(exc, ValueError):
        return _first_line(exc) if isinstance(exc, (user, OutputError)) else None
    if isinstance(exc, ModuleNotFoundError):
        package = (exc.name or "").partition(".")[0]
        return install_hint(package) if extra_of(package) else None  # a package we require: a broken install
    if isinstance(exc, SafetensorError):
        exc = safetensors_os_error(exc) or exc
        if not isinstance(exc, OSError):
            return f"safetensors: {_first_line(exc)}"
    if isinstance(exc, OSError):
        reason = exc.strerror or _first_line(exc)
        if exc.errno in _WRITE_ERRNOS:
            return f"cannot write {exc.filename or 'the output'}: {reason}"
        return f"{exc.filename}: {reason}" if exc.filename else reason
    if isinstance(exc, (AssertionError, RuntimeError)) and any(s in str(exc) for s in _NO_CUDA):
        return "no CUDA GPU is available"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def one_line_errors(interrupted: str | None = None, user: type[ValueError] = ValueError):
    """Every command's library call runs inside this: what it raises that a user can act on (see
    :func:`error_line`; ``user``: the library's class for those ValueErrors, where its others are defects) ends the
    command with one line on stderr and exit code 2; Ctrl-C, where the command names what it leaves
    (``interrupted``), with that line and 130; anything else is a defect and keeps its traceback."""
    try:
        yield
    except (typer.Exit, typer.Abort):  # click's own RuntimeErrors: a command ending itself (fail) is no error
        raise
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        fail(interrupted, code=130)
    except Exception as exc:
        message = error_line(exc, user)
        if message is None:
            raise
        fail(message)


_UNCUT_WIDTH = 10_000  # columns: more than any table of ours needs; rich sizes each table to its content


def console(stderr: bool = False) -> Console:
    """The rich console a command prints its tables and lines on. On a terminal it fits the terminal; elsewhere
    (a pipe, a CI log) rich would cut every line at 80 columns (``transfo…``), so it gets room enough that each
    table is as wide as its content."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else _UNCUT_WIDTH)


def held_out_quality(summary: dict, data: Path, tokens: int, device: str) -> dict:
    """``eval`` (--eval) of the checkpoint a command just wrote (``summary["output"]``) beside its dense source;
    its warning joins ``summary["warnings"]``."""
    with one_line_errors(user=evaluate.EvalError):
        result = evaluate.evaluate(summary["output"], data, max_tokens=tokens, device=device)
    warning = evaluate.quality_warning(result)
    if warning is not None:
        summary.setdefault("warnings", []).append(warning)
    return result.to_dict()


def print_quality_and_warnings(out: Console, summary: dict) -> None:
    """The end a writing command's summary shares (convert, heal): the quality on held-out text when --eval gave
    it, then each warning in red."""
    if summary.get("eval"):
        out.print(evaluate.quality_line(summary["eval"]), soft_wrap=True)
    for warning in summary.get("warnings", []):
        out.print(f"[bold red]warning:[/bold red] {warning}", soft_wrap=True)


def cpu_threads(requested: int | None) -> int:
    """How many threads torch's CPU work gets. Asked for (--threads, BLRDEPLOY_THREADS): that. Else the user's
    OMP_NUM_THREADS when set. Else the cores this process may run on less those already busy (the 1-minute load
    average), at least one: torch's default of one thread per core makes its threads wait on each other's cores
    when other work holds them (a convert measured 13x slower on a loaded 2-core machine, 1.6x faster idle)."""
    if requested is not None:
        if requested < 1:
            fail(f"--threads must be 1 or more, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))


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


def parse_dtype(name: str):
    """--dtype: a name from the one dtype table (kernels/dtypes.py), or ``auto`` (None: the model's own)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        fail(f"--dtype must be one of auto, {DTYPE_LIST}, got {name!r}")
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
        console=console(stderr=True),
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
