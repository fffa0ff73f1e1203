"""CLI command ``bench``: a converted model beside its dense twin, end to end (prefill, decode, memory)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from blrdeploy.cli.common import (
    DTYPE_LIST,
    console,
    csv_ints,
    emit_json,
    one_line_errors,
    parse_dtype,
    resolve_device,
)
from blrdeploy.measure import bench as bn


class _Steps:
    """A progress display on stderr for a run of ``total`` steps: a bar with the step count and elapsed time on a
    terminal, plain lines else. A context manager, so the bar goes when the run ends, however it ends."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), console=console(stderr=True), transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("", total=total)

    def __enter__(self) -> _Steps:
        if self.bar is not None:
            self.bar.start()
        return self

    def __call__(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=what)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.done + 1}/{self.total}] {what}  ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        self.done += 1

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# The longer option helps, kept out of the signature so that the command's options read one to a line.
_PARAMS_RATIO = (
    "Built-in models: per-layer budget instead of the reference paper's preset (used where a model has one for the "
    "structure)."
)
_MODES = (
    "Comma-separated harness modes: eager (Python forward), graph (the forward replayed from a CUDA graph), compile "
    "(torch.compile, replayed from a CUDA graph). Default: all three on a GPU, eager on a CPU."
)
_MEMORY_LIMIT = (
    "Cap this process's GPU memory, e.g. 8GB (10^9 bytes) or 7.5GiB, as on an 8 GB Jetson Orin Nano. A model that "
    "does not fit is reported as out of memory; the other still runs."
)
_DECODE_BATCH = (
    "LLMs: comma-separated decode batch sizes, e.g. 1,4,16,64: that many sequences decoded together, one new token "
    "each a step (batched serving); tokens/s counts them all. Default: 1."
)
_FUSE_SIBLINGS = (
    "Run BLAST or low-rank layers that read one input (q/k/v, gate/up) stacked, one launch pair for the group, and a "
    "Llama block's SiLU, RMSNorms and residual adds inside its BLAST layers. --no-fuse-siblings runs each layer on "
    "its own (to measure what stacking brings)."
)


def bench(
    model: Annotated[str, typer.Argument(help="A built-in model (e.g. llama-7b, vit-b-16) or a converted checkpoint.")],
    structure: Annotated[
        str, typer.Option(help="Built-in models: blast, monarch or lowrank (the checkpoint's own otherwise).")
    ] = "blast",
    params_ratio: Annotated[float | None, typer.Option("--params-ratio", help=_PARAMS_RATIO)] = None,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu (cpu: the PyTorch reference path).")] = "auto",
    dtype: Annotated[str, typer.Option(help=f"auto (bfloat16 on a GPU, float32 on a CPU), {DTYPE_LIST}.")] = "auto",
    modes: Annotated[str | None, typer.Option(help=_MODES)] = None,
    batch: Annotated[
        str | None, typer.Option(help="Comma-separated batch sizes for prefill. Default: the reference paper's.")
    ] = None,
    seq: Annotated[
        str | None,
        typer.Option(help="Token models: comma-separated prefill lengths, e.g. 64,256,1024. Default: the paper's."),
    ] = None,
    decode: Annotated[bool, typer.Option(help="LLMs: measure greedy decode tokens/s.")] = True,
    decode_batch: Annotated[str | None, typer.Option(help=_DECODE_BATCH)] = None,
    new_tokens: Annotated[int, typer.Option(help="Decode: new tokens per run.")] = 128,
    prompt_tokens: Annotated[int, typer.Option(help="Decode: prompt length before the timed tokens.")] = 16,
    memory_limit: Annotated[str | None, typer.Option(help=_MEMORY_LIMIT)] = None,
    only: Annotated[str | None, typer.Option(help="Measure one model only: dense or blr.")] = None,
    fuse_siblings: Annotated[bool, typer.Option(help=_FUSE_SIBLINGS)] = True,
    budget: Annotated[float, typer.Option(help="Seconds of repetitions per timed measurement.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and inputs.")] = 0,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the JSON result here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a file already at --output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Benchmark a BLR model against the dense model of the same architecture, under the same harness: prefill
    latency at the reference paper's sizes (Llama 1024 tokens, GPT-2 384, ViT-B batch 1 and 64, DiT-XL/2 16384
    tokens; or --batch and --seq), greedy decode tokens/s (LLMs, batch 1 or --decode-batch, 128 new tokens on a
    static cache), weight bytes and peak GPU memory. Built-in models get seeded random weights (the BLR one planned
    with the paper's preset where the model has one, else at --params-ratio, default 0.5); a converted checkpoint
    runs its own weights beside a random dense twin. Progress goes to stderr. Exit code: 0 done (a model that did
    not fit is reported, not an error), 2 unusable input."""
    request = bn.BenchRequest(
        model, structure, params_ratio, resolve_device(device), parse_dtype(dtype),
        modes=tuple(m.strip() for m in modes.split(",")) if modes else None, batches=csv_ints(batch, "--batch"),
        seq=csv_ints(seq, "--seq"), decode=decode, decode_batches=csv_ints(decode_batch, "--decode-batch"),
        new_tokens=new_tokens, prompt_tokens=prompt_tokens, memory_limit=memory_limit, only=only,
        fuse_siblings=fuse_siblings, budget_s=budget, seed=seed, output=output, overwrite=overwrite,
    )  # fmt: skip
    with one_line_errors():
        result = bn.run(request, _Steps)
    if as_json:
        emit_json(result)
        return
    _print_bench(result)


def _print_bench(result: dict) -> None:
    out = console()
    out.print(_bench_table(result))
    for v in result["variants"]:
        if v["error"]:
            out.print(f"[red]{v['name']}: {v['error']}[/red] (at: {v.get('failed_at')})", soft_wrap=True)
        if v.get("decode_error"):
            out.print(f"{v['name']}: decode not measured: {v['decode_error']}", soft_wrap=True)
        for row in v["decode"]:
            if row.get("tokens_match_unreplayed") is False:
                out.print(f"[red]{v['name']}: {row['mode']} decode tokens from the CUDA graph differ from the same "
                          "forward's without it[/red]")  # fmt: skip
    if result["memory_limit"]:
        out.print(f"GPU memory capped at {bn.human_bytes(result['memory_limit']['limit_bytes'])}")


def _bench_table(result: dict) -> Table:
    """One row per measure and mode, one column per model, and the BLR model's ratio to dense when both ran."""
    variants = result["variants"]
    names = [v["name"] for v in variants]
    pair = len(variants) == 2
    table = Table(title=f"{result['model']} ({result['weights']}) on {result['device']}, {result['dtype']}")
    table.add_column("measure")
    table.add_column("mode")
    for name in names:
        table.add_column(name, justify="right")
    if pair:
        table.add_column("BLR vs dense", justify="right")
    for (measure, mode), values in _timings(variants).items():
        cells = [f"{values[n]:,.2f}" if n in values else "—" for n in names]
        ratio = ""
        if pair and all(n in values for n in names):
            dense, blr = values[names[0]], values[names[1]]
            ratio = bn.fmt_ratio(blr / dense if measure.startswith("decode") else dense / blr)
        table.add_row(measure, mode, *cells, *([ratio] if pair else []))
    weights = [bn.human_bytes(v["weight_bytes"]) if "weight_bytes" in v else "—" for v in variants]
    smaller = result["speedup"].get("weights_smaller")
    table.add_row("weights", "", *weights, *([bn.fmt_ratio(smaller)] if pair else []))
    if any("peak_memory_bytes" in v for v in variants):
        peaks = [bn.human_bytes(v["peak_memory_bytes"]) if "weight_bytes" in v else "—" for v in variants]  # built?
        table.add_row("peak GPU memory", "", *peaks, *([""] if pair else []))
    return table


def _timings(variants: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(measure, mode) -> model name -> ms (prefill) or tokens/s (decode), in the order measured."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for v in variants:
        for row in v["prefill"]:
            shape = f"{row['batch']}×{row['seq']}" if row["seq"] else f"batch {row['batch']}"
            rows.setdefault((f"prefill {shape} ({row['tokens']} tok), ms", row["mode"]), {})[v["name"]] = row["ms"]
        for row in v["decode"]:
            batch = f" batch {row['batch']}" if row.get("batch", 1) != 1 else ""
            key = (f"decode{batch}, tokens/s ({row['new_tokens']} new)", row["mode"])
            rows.setdefault(key, {})[v["name"]] = row["tokens_per_s"]
    return rows
