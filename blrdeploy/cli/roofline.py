"""CLI command ``roofline``: predicted per-layer time of dense, the PyTorch reference and our kernels on a device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from blrdeploy.cli.common import check_output_path, emit_json, fail

# The reference paper's token counts per family (prefill / batch), plus single-token decode for the LLMs.
DEFAULT_TOKENS = {"llama": [1, 1024], "gpt2": [1, 384], "vit": [197, 197 * 64], "dit": [16384]}


def _layers(model: str, structure: str) -> tuple[list[dict], list[dict], str, str]:
    """(BLR layer entries, linears kept dense, family) of a converted checkpoint directory or of a built-in model's
    conversion plan (the reference paper's preset where the model has one for the structure, else half the
    parameters), and the BLR structure. Nothing is allocated: the model is a skeleton on the meta device."""
    from blrdeploy.measure.bench import resolve

    target = resolve(model, structure)
    return target.variants[1].layers, target.kept, target.family, target.structure


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
    png: Annotated[Path | None, typer.Option(help="Write the roofline figure (PNG) here.")] = None,
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
    modeled; the stages are as blrdeploy.roofline describes."""
    from blrdeploy.measure import devices
    from blrdeploy.measure import roofline as rl

    check_output_path(png, "--png")
    try:
        device = devices.get(target)
        layers, kept, family, blr = _layers(model, structure)
        seen = None
        if measured is not None:
            try:
                bench_result = json.loads(measured.read_text())
                seen = rl.measured_speedups(bench_result)
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"--measured {measured}: not a blrdeploy bench --json result ({exc})") from None
            benched = (bench_result.get("model"), bench_result.get("structure"))
            if benched != (model, blr) and not _same_checkpoint(benched[0], model):
                raise ValueError(f"--measured {measured} is a bench of {benched[0]!r} ({benched[1]}), not {model!r} "
                                 f"({blr})")  # fmt: skip
        try:
            counts = [int(t) for t in tokens.split(",")] if tokens else DEFAULT_TOKENS.get(family or "", [1, 1024])
        except ValueError:
            raise ValueError(f"--tokens takes comma-separated positive integers, got {tokens!r}") from None
        if not layers:
            raise ValueError(f"{model} has no BLR layer to predict")
        if any(n < 1 for n in counts):
            raise ValueError("--tokens must be positive integers")
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    rows = rl.predict(layers, device, counts)
    totals = rl.totals(rows, kept, device)
    for n, t in totals.items():
        t["measured"] = None if seen is None else seen.get(n)
    if png is not None:
        try:
            rl.plot(rows, device, png)
        except ImportError:
            fail("--png needs matplotlib: pip install matplotlib (or blrdeploy[plot])")
    if as_json:
        data = {"model": model, "target": device.to_json(), "rows": [r.to_json() for r in rows], "totals": totals}
        emit_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} on {device.description} (predicted)")
    for col in ("layer shape", "×", "N", "AI dense", "AI ours", "dense µs", "PyTorch µs", "ours µs", "dense/ours"):
        table.add_column(col, justify="left" if col == "layer shape" else "right")
    for r in rows:
        us = {p: 1e6 * r.seconds[p] for p in rl.PATHS}
        table.add_row(
            r.shape, str(r.count), str(r.tokens), f"{r.intensity['dense']:.1f}", f"{r.intensity['kernels']:.1f}",
            f"{us['dense']:.1f}", f"{us['pytorch']:.1f}", f"{us['kernels']:.1f}", f"{us['dense'] / us['kernels']:.2f}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    for n, t in totals.items():
        line = (
            f"N={n}: converted layers {1e6 * t['dense']:,.1f} µs dense, {1e6 * t['pytorch']:,.1f} µs PyTorch, "
            f"{1e6 * t['kernels']:,.1f} µs ours; predicted speedup {t['speedup_kernels']:.2f}x "
            f"(PyTorch BLR {t['speedup_pytorch']:.2f}x)"
        )
        if "speedup_all_linears" in t:
            line += f", all linears {t['speedup_all_linears']:.2f}x"
        if t["measured"]:
            line += f"; measured end to end {t['measured']['speedup']:.2f}x ({t['measured']['what']})"
        elif seen is not None:
            line += "; not measured at this N"
        console.print(line, soft_wrap=True)
    if seen is not None:
        console.print(
            f"measured by bench on {bench_result.get('device', 'its device')}, whole model (attention and norms "
            "included)",
            soft_wrap=True,
        )
    if png is not None:
        console.print(f"figure: {png}")


def _same_checkpoint(benched: str | None, model: str) -> bool:
    """Whether bench's model and roofline's are one checkpoint directory, however the path was written."""
    if not benched or not Path(model).is_dir():
        return False
    return Path(benched).resolve() == Path(model).resolve()
