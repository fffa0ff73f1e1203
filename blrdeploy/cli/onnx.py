"""CLI commands ``export`` and ``validate``: the ONNX reference graph, and checks of a checkpoint's outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from blrdeploy.cli.common import console, emit_json, one_line_errors
from blrdeploy.models.outputs import TOLERANCE


def _exp(value: float) -> str:
    """1e-4, not 1e-04: how the help text writes a tolerance."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")] = Path("model.onnx"),
    seed: Annotated[int, typer.Option(help="Seed of the sample inputs traced for export.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT (and OUTPUT.data).")] = False,
) -> None:
    """Export a converted checkpoint to ONNX (opset 20): one com.blrdeploy node per BLR layer, each defined as
    a model-local function of standard ops, so onnxruntime runs it on a CPU with no plugin. Batch (and sequence,
    for language models) are dynamic axes; models over 2 GB keep their weights in OUTPUT.data beside it."""
    # deferred: the exporter loads onnx (about half a second), which `blrdeploy --help` and other commands skip
    from blrdeploy.exporters.onnx import export_checkpoint

    t0 = time.perf_counter()
    with one_line_errors():
        path = export_checkpoint(checkpoint, output, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f} s")


def validate(
    checkpoint: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    against: Annotated[
        str,
        typer.Option(
            help="onnx: the PyTorch model vs onnxruntime (CPU) on its ONNX reference; dense: vs the dense "
            "model it was converted from (approximation quality); reference: GPU path vs the float64 CPU reference."
        ),
    ] = "onnx",
    onnx_file: Annotated[
        Path | None, typer.Option("--onnx", help="The ONNX file (with --against onnx). Default: export to a temp dir.")
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            help="Relative-error tolerance ||out-ref||/||ref||. Default: "
            f"{_exp(TOLERANCE[torch.float32])} for onnx (float32), {_exp(TOLERANCE[torch.bfloat16])} for reference "
            "(bfloat16); --against dense requires it."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Compare a converted checkpoint's outputs on seeded inputs of several shapes. Exit code: 0 pass, 1 fail,
    2 unusable input (missing/corrupt file, ONNX from another checkpoint, unknown op or missing function body)."""
    # deferred: the validators load onnx (about half a second), which `blrdeploy --help` and other commands skip
    from blrdeploy.validators import onnx as v

    with one_line_errors():  # Unusable and CheckpointError are ValueErrors: exit 2
        report = v.validate(checkpoint, against, onnx_file, rtol)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_report(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_report(report) -> None:
    out = console()
    out.print(f"validate {report.checkpoint} against {report.against}")
    for c in report.checks:
        mark = "[green]✓[/green]" if c.ok else "[red]✗[/red]"
        tol = "" if c.tolerance is None else f" (tolerance {c.tolerance:.0e})"
        cos = "" if c.cosine_similarity is None else f", cosine {c.cosine_similarity:.6f}"
        out.print(f"  {mark} {c.name} {c.shape}: max abs {c.max_abs:.3e}, relative {c.relative_error:.3e}{tol}{cos}")
    if report.first_diverging_layer:
        out.print(f"  first diverging BLR layer: [bold]{report.first_diverging_layer}[/bold]")
    for note in report.notes:
        out.print(f"  [dim]{note}[/dim]")
    out.print("[green]passed[/green]" if report.ok else "[red]failed[/red]")
