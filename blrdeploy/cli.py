"""The ``blrdeploy`` command line. Commands stay thin: they parse, call one library function, and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="blrdeploy",
    help="Convert transformer linears to block low-rank form (BLAST, Monarch, low-rank) and run them fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"blrdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device} asked for, but no CUDA GPU is available")
    return device


def _parse_shape(shape: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        fail(f"--shape must look like OUTxIN (e.g. 768x3072), got {shape!r}")
    return out_features, in_features


@app.command()
def factorize(
    weights: Annotated[
        Path | None,
        typer.Option(help="A .safetensors or torch state-dict file holding the matrix. Default: a built-in demo."),
    ] = None,
    tensor: Annotated[str | None, typer.Option(help="Name of the 2-D tensor inside --weights.")] = None,
    transpose: Annotated[
        bool, typer.Option(help="The stored tensor is (in, out), as in GPT-2's Conv1D: transpose it first.")
    ] = False,
    shape: Annotated[str, typer.Option(help="OUTxIN of the built-in demo matrix (unused with --weights).")] = "768x768",
    params_ratio: Annotated[
        float, typer.Option("--params-ratio", help="Parameter budget rho: structured params / dense out*in, in (0,1).")
    ] = 0.5,
    structure: Annotated[
        list[str] | None,
        typer.Option(help="blast, monarch or lowrank; repeat for several. Default: all three."),
    ] = None,
    steps: Annotated[int, typer.Option(help="BLAST optimization steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed for the demo matrix and BLAST's initialization.")] = 0,
    device: Annotated[str, typer.Option(help="Where to factorize: auto (GPU when present), cpu, cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
) -> None:
    """Factorize one matrix with each structure at the same parameter budget; report error and SQNR.

    With no --weights it uses a seeded 768x768 demo matrix with block-varying structure.
    """
    from . import compare
    from .budget import STRUCTURES

    chosen = tuple(structure or STRUCTURES)
    for s in chosen:
        if s not in STRUCTURES:
            fail(f"unknown structure {s!r}; choose from {', '.join(STRUCTURES)}")
    try:
        if weights is not None:
            matrix = compare.load_matrix(weights, tensor, transpose)
            source = f"{weights}:{tensor}"
        else:
            matrix = compare.demo_matrix(*_parse_shape(shape), seed=seed)
            source = f"demo {shape} (seed {seed})"
        matrix = matrix.to(resolve_device(device))
        with _progress(not as_json) as progress:
            reports = compare.compare_structures(matrix, params_ratio, chosen, steps, seed, progress)
    except ValueError as exc:
        fail(str(exc))
    rows = [r.to_dict() for r in reports]
    if as_json:
        json.dump({"source": source, "shape": list(matrix.shape), "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    _print_table(source, tuple(matrix.shape), rows)


class _progress:
    """A BLAST step bar on stderr while a fit runs; a no-op callback when quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("BLAST fit"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps  rel. error {task.fields[err]:.4f}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
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


def _print_table(source: str, shape: tuple[int, int], rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{source}  {shape[0]}x{shape[1]}")
    for col in ("structure", "blocks", "rank", "params", "ratio", "rel. error", "SQNR dB", "time s"):
        table.add_column(col, justify="left" if col == "structure" else "right")
    for r in rows:
        table.add_row(
            r["structure"],
            "-" if r["num_blocks"] is None else str(r["num_blocks"]),
            str(r["rank"]),
            f"{r['params']:,}",
            f"{r['ratio']:.3f}",
            f"{r['relative_error']:.4f}",
            f"{r['sqnr_db']:.1f}",
            f"{r['seconds']:.2f}",
        )
    Console().print(table)


def main() -> None:
    app()
