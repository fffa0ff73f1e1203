"""CLI commands ``convert`` and ``info``: write a converted checkpoint, and describe one."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blrdeploy.cli.common import (
    DTYPE_LIST,
    console,
    convert_progress,
    emit_json,
    fail,
    held_out_quality,
    one_line_errors,
    parse_dtype,
    print_quality_and_warnings,
    resolve_device,
)
from blrdeploy.conversion import checkpoint
from blrdeploy.conversion.calibration import DEFAULT_TOKENS
from blrdeploy.conversion.pipeline import convert_job
from blrdeploy.models.text import MAX_SEQ_LEN
from blrdeploy.structures.factorize import DEFAULT_DAMPING

# The longer option helps, kept out of the signature so that the command's options read one to a line.
_MODEL = (
    "A built-in model (llama-7b, llama-3.2-1b, gpt2-s, vit-b-16, dit-xl-2, gpt2-mini, *-tiny) or a Hugging Face "
    "checkpoint directory. Default: gpt2-mini."
)
_PARAMS_RATIO = (
    "Per-layer parameter budget rho in (0,1): (b, r) chosen by the budget rule (blrdeploy.structures.budget). "
    "Default 0.5 when neither --preset nor --layers is given."
)
_DTYPE = (
    f"Model dtype: auto (what the checkpoint loads as; float32 for built-in models), {DTYPE_LIST}. The fit itself "
    "always runs in float32."
)
_LAYERS = "JSON/YAML file mapping layer-name patterns to {num_blocks, rank}; wins over the rest."
_CALIBRATION = (
    "Text to fit each layer's outputs on instead of its weights: a .txt file, a folder of .txt/.jsonl files, or "
    ".jsonl with a 'text' field. Needs the model's tokenizer (a checkpoint directory that carries one)."
)
_EVAL = (
    "Held-out text (.txt, .jsonl or a folder; never the --calibration text): after writing, measure the checkpoint "
    "on it beside its dense source as `blrdeploy eval` does, and warn when it is far from dense."
)
_ALLOCATION = (
    "How --params-ratio is spread: uniform (every layer at the ratio), sensitivity (one budget for all converted "
    "layers, more rank where it removes more of the loss's error per parameter, weighted by the loss gradient at "
    "each layer when --calibration is given), or auto: sensitivity with --calibration, else uniform."
)
_SEQUENTIAL = (
    "With --calibration: convert block by block, each layer fitted on the inputs the converted layers before it "
    "give, to the dense model's outputs (about three more passes over the calibration text)."
)
_SEQ_LEN = f"Calibration window in tokens. Default: the model's context, at most {MAX_SEQ_LEN}."
_DAMPING = "Calibration damping: the Gram G gets lambda*I, lambda = DAMPING * mean(diag G)."


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
    steps: Annotated[
        int, typer.Option(help="BLAST optimization steps per layer, at most: a fit stops once it stalls.")
    ] = 300,
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
    calibration: Annotated[Path | None, typer.Option(help=_CALIBRATION)] = None,
    calibration_tokens: Annotated[
        int, typer.Option(help="Calibration tokens to run the dense model on (whole windows).")
    ] = DEFAULT_TOKENS,
    seq_len: Annotated[int | None, typer.Option(help=_SEQ_LEN)] = None,
    damping: Annotated[float, typer.Option(help=_DAMPING)] = DEFAULT_DAMPING,
    allocation: Annotated[str, typer.Option(help=_ALLOCATION)] = "auto",
    sequential: Annotated[bool, typer.Option(help=_SEQUENTIAL)] = False,
    eval_data: Annotated[Path | None, typer.Option("--eval", help=_EVAL)] = None,
    eval_tokens: Annotated[int, typer.Option(help="With --eval: tokens of held-out text to score.")] = 16384,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Convert a model's linears to BLAST, Monarch or low-rank layers and write a converted checkpoint.

    With no MODEL it converts the built-in gpt2-mini (GPT-2's architecture, 4 layers of width 384, seeded random
    weights) so the whole flow can be seen on a CPU in well under a minute.
    """
    dev = resolve_device(device) if not dry_run else "meta"
    if eval_data is not None and (dry_run or eval_tokens < 1):
        fail("--eval measures the written checkpoint: not with --dry-run, and --eval-tokens must be at least 1")
    if eval_data is not None and not eval_data.exists():
        fail(f"--eval {eval_data}: no such file or folder")  # before the conversion, not after
    with one_line_errors(interrupted="interrupted: nothing was written"):
        with convert_progress(not dry_run) as callbacks:  # on stderr: --json's stdout stays clean
            summary = convert_job(
                model, output, structure=structure, params_ratio=params_ratio, preset=preset, layers_file=layers,
                include=include, exclude=exclude or (), steps=steps, seed=seed, skip_incompatible=skip_incompatible,
                device=dev, dtype=parse_dtype(dtype), overwrite=overwrite, dry_run=dry_run,
                callbacks=_with_calibration_lines(callbacks), calibration=calibration,
                calibration_tokens=calibration_tokens, seq_len=seq_len, damping=damping, allocation=allocation,
                sequential=sequential,
            )  # fmt: skip
    if eval_data is not None:
        summary["eval"] = held_out_quality(summary, eval_data, eval_tokens, dev)
    if as_json:
        emit_json(summary, default=str)
        return
    _print_conversion(summary)


def _with_calibration_lines(callbacks):
    """Adds a line on stderr per calibration batch: the dense model's run over the text has no bar of its own."""
    start = time.perf_counter()

    def calibration(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        eta = f"{elapsed / done * (total - done):.0f} s" if done else "?"
        print(f"calibration: {done:,}/{total:,} tokens, elapsed {elapsed:.0f} s, eta {eta}", file=sys.stderr)

    callbacks.calibration = calibration
    return callbacks


def _print_conversion(summary: dict) -> None:
    out = console()
    out.print(_layers_table(summary))
    for s in summary["skipped"]:
        out.print(f"[yellow]kept dense[/yellow] {s['name']}: {s['reason']}")
    before, after = summary["params_before"], summary["params_after"]
    out.print(f"parameters: {before:,} -> {after:,} ({before / after:.2f}x smaller)")
    out.print(_converted_line(summary["layers"], summary.get("allocation")))
    if summary.get("dry_run"):
        return
    mib = 2**20
    out.print(f"weight bytes: {summary['bytes_before'] / mib:,.1f} MiB -> {summary['bytes_after'] / mib:,.1f} MiB")
    out.print(
        f"layer relative error: mean {summary['mean_relative_error']:.4f}, worst {summary['worst_relative_error']:.4f}"
    )
    calib = summary.get("calibration")
    if calib:
        out.print(
            f"layer output error on {calib['tokens']:,} calibration tokens ({calib['windows']} x {calib['seq_len']})"
            + (", against dense, drift included" if calib.get("sequential") else "")
            + f": mean {summary['mean_output_relative_error']:.4f}, worst {summary['worst_output_relative_error']:.4f}"
        )
    agree = summary["output_agreement"]
    if agree:
        out.print(
            f"model output vs dense on seeded inputs: relative error {agree['relative_error']:.4f}, "
            f"cosine similarity {agree['cosine_similarity']:.4f}"
        )
    print_quality_and_warnings(out, summary)
    if summary.get("builtin"):
        out.print(
            "[dim]built-in models carry seeded random weights, which have no structure to keep: expect large errors "
            "here; trained checkpoints lose far less[/dim]"
        )
    out.print(f"wrote {summary['output']} in {summary['seconds']:.1f} s on {summary['device']}")


def _converted_line(layers: list[dict], allocation: dict | None) -> str:
    """The converted layers' parameters together, the ratio they reached and how the ratio was spread."""
    dense = sum(e["in_features"] * e["out_features"] for e in layers)
    factored = sum(e["params"] for e in layers)
    line = f"converted layers: {dense:,} -> {factored:,} parameters (ratio {factored / max(1, dense):.4f}"
    if allocation:
        budget = allocation.get("budget_ratio")
        line += f"; allocation {allocation['method']}" + ("" if budget is None else f", budget {budget:g}")
    return line + ")"


def _layers_table(summary: dict) -> Table:
    """One row per converted (or, in a dry run, planned) layer."""
    planned = summary.get("dry_run")
    table = Table(title=f"{summary['model']}: {'plan' if planned else 'converted layers'}")
    calibrated = bool(summary.get("calibration"))
    cols = ["layer", "structure", "blocks", "rank", "dense params", "params", "ratio"]
    if not planned:
        cols += ["rel. error", "out. error", "time s"] if calibrated else ["rel. error", "time s"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("layer", "structure") else "right")
    for e in summary["layers"]:
        row = [e["name"], e["structure"], str(e["num_blocks"] or "-"), str(e["rank"])]
        row += [f"{e['dense_params']:,}", f"{e['params']:,}", f"{e['params'] / e['dense_params']:.3f}"]
        if not planned:
            row += [f"{e['relative_error']:.4f}"]
            row += [f"{e['output_relative_error']:.4f}"] if calibrated else []
            row += [f"{e['seconds']:.2f}"]
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
    for c in ("layer", "structure", "blocks", "rank", "params before", "params after", "ratio", "rel. error"):
        table.add_column(c, justify="left" if c in ("layer", "structure") else "right")
    for e in layers:
        err = "-" if e["relative_error"] is None else f"{e['relative_error']:.4f}"
        table.add_row(
            e["name"], e["structure"], str(e["num_blocks"] or "-"), str(e["rank"]),
            f"{e['in_features'] * e['out_features']:,}", f"{e['params']:,}", f"{e['ratio']:.3f}", err,
        )  # fmt: skip
    out = console()
    out.print(table)
    if report["model_params_before"]:
        out.print(f"model parameters: {report['model_params_before']:,} -> {report['model_params_after']:,}")
    out.print(_converted_line(layers, report.get("allocation")))
    healed = report.get("healing")
    if healed:
        out.print(
            f"healed: {healed['steps']} steps on {healed['tokens_seen']:,} tokens ({healed['trained']}), distillation "
            f"loss {healed['loss']['first']:.4f} -> {healed['loss']['last']:.4f}, output cosine to dense "
            f"{healed['cosine_before']:.4f} -> {healed['cosine_after']:.4f}"
        )
    worst = report["worst_relative_error"]
    out.print(
        f"weights file: {report['weights_bytes'] / 2**20:,.1f} MiB; worst layer error: "
        f"{'-' if worst is None else f'{worst:.4f}'}" + ("; sha256 verified" if report["verified"] else "")
    )
