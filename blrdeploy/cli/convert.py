"""CLI commands ``convert`` and ``info``: write a converted checkpoint, and describe one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blrdeploy.cli.common import (
    DTYPE_LIST,
    console,
    convert_progress,
    emit_json,
    one_line_errors,
    parse_dtype,
    resolve_device,
)
from blrdeploy.conversion import checkpoint
from blrdeploy.conversion.pipeline import convert_job

# The longer option helps, kept out of the signature so that the command's options read one to a line.
_MODEL = (
    "A built-in model (llama-7b, llama-3.2-1b, gpt2-s, vit-b-16, dit-xl-2, gpt2-mini, *-tiny) or a Hugging Face "
    "checkpoint directory. Default: gpt2-mini."
)
_PARAMS_RATIO = (
    "Per-layer parameter budget rho in (0,1): (b, r) chosen by DESIGN's rule. Default 0.5 when neither --preset nor "
    "--layers is given."
)
_DTYPE = (
    f"Model dtype: auto (what the checkpoint loads as; float32 for built-in models), {DTYPE_LIST}. The fit itself "
    "always runs in float32."
)
_LAYERS = "JSON/YAML file mapping layer-name patterns to {num_blocks, rank}; wins over the rest."


def convert(
    model: Annotated[str | None, typer.Argument(help=_MODEL)] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory. Default: ./<model>-<structure>.")
    ] = None,
    structure: Annotated[str, typer.Option(help="blast, monarch or lowrank.")] = "blast",
    params_ratio: Annotated[float | None, typer.Option("--params-ratio", help=_PARAMS_RATIO)] = None,
    preset: Annotated[
        str | None, typer.Option(help="'paper': the reference paper's per-layer (b, r) for the built-in models.")
    ] = None,
    layers: Annotated[Path | None, typer.Option(help=_LAYERS)] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Glob of layer names to convert (repeatable). Default: the family's.")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of layer names to keep dense (repeatable).")] = None,
    steps: Annotated[int, typer.Option(help="BLAST optimization steps per layer.")] = 300,
    device: Annotated[str, typer.Option(help="Where to factorize: auto (GPU when present), cpu, cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help=_DTYPE)] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for built-in weights, BLAST init and the comparison inputs.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    skip_incompatible: Annotated[
        bool, typer.Option(help="Keep dense (and report) layers whose dims no setting fits, instead of failing.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Plan only, on the meta device: layers, (b, r) and parameter counts; no weights.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Convert a model's linears to BLAST, Monarch or low-rank layers and write a converted checkpoint.

    With no MODEL it converts the built-in gpt2-mini (GPT-2's architecture, 4 layers of width 384, seeded random
    weights) so the whole flow can be seen on a CPU in about two minutes.
    """
    dev = resolve_device(device) if not dry_run else "meta"
    with one_line_errors(interrupted="interrupted: nothing was written"):
        with convert_progress(not dry_run) as callbacks:  # on stderr: --json's stdout stays clean
            summary = convert_job(
                model, output, structure=structure, params_ratio=params_ratio, preset=preset, layers_file=layers,
                include=include, exclude=exclude or (), steps=steps, seed=seed, skip_incompatible=skip_incompatible,
                device=dev, dtype=parse_dtype(dtype), overwrite=overwrite, dry_run=dry_run, callbacks=callbacks,
            )  # fmt: skip
    if as_json:
        emit_json(summary, default=str)
        return
    _print_conversion(summary)


def _print_conversion(summary: dict) -> None:
    out = console()
    out.print(_layers_table(summary))
    for s in summary["skipped"]:
        out.print(f"[yellow]kept dense[/yellow] {s['name']}: {s['reason']}")
    before, after = summary["params_before"], summary["params_after"]
    out.print(f"parameters: {before:,} -> {after:,} ({before / after:.2f}x smaller)")
    if summary.get("dry_run"):
        return
    mib = 2**20
    out.print(f"weight bytes: {summary['bytes_before'] / mib:,.1f} MiB -> {summary['bytes_after'] / mib:,.1f} MiB")
    out.print(
        f"layer relative error: mean {summary['mean_relative_error']:.4f}, worst {summary['worst_relative_error']:.4f}"
    )
    agree = summary["output_agreement"]
    if agree:
        out.print(
            f"model output vs dense on seeded inputs: relative error {agree['relative_error']:.4f}, "
            f"cosine similarity {agree['cosine_similarity']:.4f}"
        )
    if summary.get("builtin"):
        out.print(
            "[dim]built-in models carry seeded random weights, which have no structure to keep: expect large errors "
            "here; trained checkpoints lose far less[/dim]"
        )
    out.print(f"wrote {summary['output']} in {summary['seconds']:.1f} s on {summary['device']}")


def _layers_table(summary: dict) -> Table:
    """One row per converted (or, in a dry run, planned) layer."""
    planned = summary.get("dry_run")
    table = Table(title=f"{summary['model']}: {'plan' if planned else 'converted layers'}")
    cols = ["layer", "structure", "blocks", "rank", "dense params", "params"]
    if not planned:
        cols += ["rel. error", "time s"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("layer", "structure") else "right")
    for e in summary["layers"]:
        row = [e["name"], e["structure"], str(e["num_blocks"] or "-"), str(e["rank"])]
        row += [f"{e['dense_params']:,}", f"{e['params']:,}"]
        if not planned:
            row += [f"{e['relative_error']:.4f}", f"{e['seconds']:.2f}"]
        table.add_row(*row)
    return table


def info(
    path: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    verify: Annotated[bool, typer.Option(help="Also check model.safetensors against its recorded sha256.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
) -> None:
    """Describe a converted checkpoint: layers, structure, b, r, parameters before/after, size, worst error."""
    with one_line_errors():
        report = checkpoint.describe(path, check_sha256=verify)
    if as_json:
        emit_json(report)
    else:
        _print_info(report)


def _print_info(report: dict) -> None:
    source, layers = report["source"], report["layers"]
    table = Table(title=f"{report['path']}  ({source.get('id')}, {source.get('class')})")
    for c in ("layer", "structure", "blocks", "rank", "params before", "params after", "rel. error"):
        table.add_column(c, justify="left" if c in ("layer", "structure") else "right")
    for e in layers:
        err = "-" if e["relative_error"] is None else f"{e['relative_error']:.4f}"
        table.add_row(
            e["name"], e["structure"], str(e["num_blocks"] or "-"), str(e["rank"]),
            f"{e['in_features'] * e['out_features']:,}", f"{e['params']:,}", err,
        )  # fmt: skip
    out = console()
    out.print(table)
    if report["model_params_before"]:
        out.print(f"model parameters: {report['model_params_before']:,} -> {report['model_params_after']:,}")
    dense, factored = report["converted_layer_params_before"], report["converted_layer_params_after"]
    out.print(f"converted layers: {dense:,} -> {factored:,} parameters ({dense / max(1, factored):.2f}x)")
    worst = report["worst_relative_error"]
    out.print(
        f"weights file: {report['weights_bytes'] / 2**20:,.1f} MiB; worst layer error: "
        f"{'-' if worst is None else f'{worst:.4f}'}" + ("; sha256 verified" if report["verified"] else "")
    )
