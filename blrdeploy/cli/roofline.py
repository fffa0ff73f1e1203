"""CLI command ``roofline``: predicted per-layer time of dense, the PyTorch reference and our kernels on a device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blrdeploy.cli.common import console, emit_json, fail, one_line_errors
from blrdeploy.measure import roofline as rl


def roofline(
    model: Annotated[str, typer.Argument(help="A converted checkpoint directory or a built-in model name.")],
    target: Annotated[
        str, typer.Option(help="Device profile: jetson, a40, h100, h200, a NAME in $BLRDEPLOY_DEVICES, or a JSON file.")
    ],
    structure: Annotated[str, typer.Option(help="Built-in models only: blast, monarch or lowrank.")] = "blast",
    tokens: Annotated[
        str | None,
        typer.Option(help="Comma-separated token counts. Default: the reference paper's (and 1 for LLMs)."),
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Write the roofline figure (a .png file) here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a file already at --png.")] = False,
    measured: Annotated[
        Path | None,
        typer.Option(
            help="A `blrdeploy bench --json` result of the same model: its measured speedups (on the GPU it ran on) "
            "are shown beside the predicted ones."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows and totals as JSON on stdout.")] = False,
) -> None:
    """Predict, per BLR layer shape and token count, the arithmetic intensity and time of dense, of the PyTorch
    reference and of our kernels on the target's bandwidth and fp16 peak (max of memory and math time per stage),
    the converted layers' predicted speedup over dense, and over all linear layers (those kept dense, like the LM
    head, run the same in both); with --measured, the speedup bench measured beside it. Attention and norms are not
    modeled; the stages are as blrdeploy.measure.roofline describes."""
    with one_line_errors():
        report = rl.model_report(model, target, structure, _token_counts(tokens), png, measured, overwrite)
    if as_json:
        emit_json(report.to_json())
        return
    _print_report(report)
    if png is not None:
        console().print(f"figure: {png}")


def _token_counts(text: str | None) -> list[int] | None:
    """--tokens as integers (their range is the library's to check); None for the default."""
    try:
        return [int(t) for t in text.split(",")] if text else None
    except ValueError:
        fail(f"--tokens takes comma-separated positive integers, got {text!r}")


def _print_report(report: rl.ModelReport) -> None:
    table = Table(title=f"{report.model} on {report.device.description} (predicted)")
    for col in ("layer shape", "×", "N", "AI dense", "AI ours", "dense µs", "PyTorch µs", "ours µs", "dense/ours"):
        table.add_column(col, justify="left" if col == "layer shape" else "right")
    for r in report.rows:
        us = {p: 1e6 * r.seconds[p] for p in rl.PATHS}
        table.add_row(
            r.shape, str(r.count), str(r.tokens), f"{r.intensity['dense']:.1f}", f"{r.intensity['kernels']:.1f}",
            f"{us['dense']:.1f}", f"{us['pytorch']:.1f}", f"{us['kernels']:.1f}", f"{us['dense'] / us['kernels']:.2f}",
        )  # fmt: skip
    out = console()
    out.print(table)
    for n, t in report.totals.items():
        out.print(_totals_line(n, t, report.measured_on is not None), soft_wrap=True)
    if report.measured_on is not None:
        out.print(
            f"measured by bench on {report.measured_on}, whole model (attention and norms included)", soft_wrap=True
        )


def _totals_line(n: int, t: dict, measured: bool) -> str:
    line = (
        f"N={n}: converted layers {1e6 * t['dense']:,.1f} µs dense, {1e6 * t['pytorch']:,.1f} µs PyTorch, "
        f"{1e6 * t['kernels']:,.1f} µs ours; predicted speedup {t['speedup_kernels']:.2f}x "
        f"(PyTorch BLR {t['speedup_pytorch']:.2f}x)"
    )
    if "speedup_all_linears" in t:
        line += f", all linears {t['speedup_all_linears']:.2f}x"
    if t["measured"]:
        line += f"; measured end to end {t['measured']['speedup']:.2f}x ({t['measured']['what']})"
    elif measured:
        line += "; not measured at this N"
    return line
