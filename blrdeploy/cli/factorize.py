"""CLI command ``factorize``: one matrix, each structure at the same parameter budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from torch import Tensor

from blrdeploy.cli.common import console, emit_json, fail, fit_progress, one_line_errors, resolve_device
from blrdeploy.structures import tradeoffs
from blrdeploy.structures.budget import STRUCTURES
from blrdeploy.structures.shapes import check_features


def _parse_shape(shape: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        fail(f"--shape must look like OUTxIN (e.g. 768x3072), got {shape!r}")
    try:
        check_features(in_features, out_features)
    except ValueError as exc:
        fail(f"--shape {shape}: {exc}")
    return out_features, in_features


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
    chosen = tuple(structure or STRUCTURES)
    for s in chosen:
        if s not in STRUCTURES:
            fail(f"unknown structure {s!r}; choose from {', '.join(STRUCTURES)}")
    with one_line_errors():
        matrix, source = _matrix(weights, tensor, transpose, shape, seed)
        matrix = matrix.to(resolve_device(device))
        with fit_progress(not as_json) as progress:
            reports = tradeoffs.compare_structures(matrix, params_ratio, chosen, steps, seed, progress)
    rows = [r.to_dict() for r in reports]
    if as_json:
        emit_json({"source": source, "shape": list(matrix.shape), "results": rows})
        return
    _print_table(source, tuple(matrix.shape), rows)


def _matrix(weights: Path | None, tensor: str | None, transpose: bool, shape: str, seed: int) -> tuple[Tensor, str]:
    """The matrix to factorize, from --weights or the seeded demo of --shape, and how the output names it."""
    if weights is not None:
        return tradeoffs.load_matrix(weights, tensor, transpose), f"{weights}:{tensor}"
    return tradeoffs.demo_matrix(*_parse_shape(shape), seed=seed), f"demo {shape} (seed {seed})"


def _print_table(source: str, shape: tuple[int, int], rows: list[dict]) -> None:
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
    console().print(table)
