"""CLI command ``bench``: a converted model beside its dense twin, end to end (prefill, decode, memory)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from blrdeploy.cli.common import check_output_path, emit_json, fail, parse_dtype, resolve_device


class _steps:
    """A progress display on stderr: a bar with the step count and elapsed time on a terminal, plain lines else."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def __call__(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=what)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.done + 1}/{self.total}] {what}  ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _csv_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} takes comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        fail(f"{what} takes positive integers, got {text!r}")
    return values


def bench(
    model: Annotated[str, typer.Argument(help="A built-in model (e.g. llama-7b, vit-b-16) or a converted checkpoint.")],
    structure: Annotated[
        str, typer.Option(help="Built-in models: blast, monarch or lowrank (the checkpoint's own otherwise).")
    ] = "blast",
    params_ratio: Annotated[
        float | None,
        typer.Option(
            "--params-ratio",
            help="Built-in models: per-layer budget instead of the reference paper's preset (used where a model "
            "has one for the structure).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu (cpu: the PyTorch reference path).")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 on a GPU, float32 on a CPU), bfloat16, float16, float32.")
    ] = "auto",
    modes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated harness modes: eager (Python forward), graph (the forward replayed from a CUDA "
            "graph), compile (torch.compile, replayed from a CUDA graph). Default: all three on a GPU, eager on a CPU."
        ),
    ] = None,
    batch: Annotated[
        str | None, typer.Option(help="Comma-separated batch sizes for prefill. Default: the reference paper's.")
    ] = None,
    seq: Annotated[int | None, typer.Option(help="Token models: prefill length. Default: the paper's.")] = None,
    decode: Annotated[bool, typer.Option(help="LLMs: measure greedy decode (batch 1) tokens/s.")] = True,
    new_tokens: Annotated[int, typer.Option(help="Decode: new tokens per run.")] = 128,
    prompt_tokens: Annotated[int, typer.Option(help="Decode: prompt length before the timed tokens.")] = 16,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            help="Cap this process's GPU memory, e.g. 8GB (10^9 bytes) or 7.5GiB, as on an 8 GB Jetson Orin Nano. "
            "A model that does not fit is reported as out of memory; the other still runs."
        ),
    ] = None,
    only: Annotated[str | None, typer.Option(help="Measure one model only: dense or blr.")] = None,
    fuse_siblings: Annotated[
        bool,
        typer.Option(
            help="Run BLAST or low-rank layers that read one input (q/k/v, gate/up) stacked, one launch pair for "
            "the group, and a Llama block's SiLU, RMSNorms and residual adds inside its BLAST layers. "
            "--no-fuse-siblings runs each layer on its own (to measure what stacking brings)."
        ),
    ] = True,
    budget: Annotated[float, typer.Option(help="Seconds of repetitions per timed measurement.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and inputs.")] = 0,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Also write the JSON result here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Benchmark a BLR model against the dense model of the same architecture, under the same harness: prefill
    latency at the reference paper's sizes (Llama 1024 tokens, GPT-2 384, ViT-B batch 1 and 64, DiT-XL/2 16384
    tokens), greedy decode tokens/s (LLMs, batch 1, 128 new tokens on a static cache), weight bytes and peak GPU
    memory. Built-in models get seeded random weights (the BLR one planned with the paper's preset where the model
    has one, else at --params-ratio, default 0.5); a converted
    checkpoint runs its own weights beside a random dense twin. Progress goes to stderr. Exit code: 0 done (a
    model that did not fit is reported, not an error), 2 unusable input."""
    import torch

    from blrdeploy.measure import bench as bn

    check_output_path(output, "--output")
    if params_ratio is not None and not 0 < params_ratio < 1:
        fail(f"--params-ratio must be in (0, 1), got {params_ratio}")
    dev = torch.device(resolve_device(device))
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    chosen = tuple(m.strip() for m in modes.split(",")) if modes else (bn.MODES if dev.type == "cuda" else ("eager",))
    if dev.type != "cuda" and any(m == "graph" for m in chosen):
        fail("--modes graph needs a CUDA GPU (CUDA graphs)")
    if only not in (None, "dense", "blr"):
        fail(f"--only takes dense or blr, got {only!r}")
    limit = None
    try:
        if memory_limit is not None:
            if dev.type != "cuda":
                raise ValueError("--memory-limit caps GPU memory: it needs --device cuda")
            limit = bn.parse_size(memory_limit)
        batches = _csv_ints(batch, "--batch")
        if seq is not None and seq < 1:
            raise ValueError(f"--seq must be positive, got {seq}")
        shapes = tuple((b, seq) for b in batches) if batches else None
        if shapes is None and seq is not None:
            shapes = ((1, seq),)
        config = bn.BenchConfig(
            modes=chosen, shapes=shapes, decode=decode, new_tokens=new_tokens, prompt_tokens=prompt_tokens,
            budget_s=budget, seed=seed,
        )  # fmt: skip
        preset = "auto" if params_ratio is None else None
        ratio = 0.5 if params_ratio is None else params_ratio
        target = bn.resolve(model, structure, preset, ratio, seed, dev, torch_dtype, fuse_siblings)
        if seq is not None and target.family not in bn.LLM_FAMILIES:
            raise ValueError(f"--seq is for token models; a {target.family} model's token count is fixed by its config")
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    progress = _steps(bn.step_count(target, config, only))
    try:
        result = bn.run_bench(target, config, dev, torch_dtype, progress, limit, only)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    finally:
        progress.close()
    if output is not None:
        from blrdeploy.conversion.checkpoint import atomic_write_text

        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    if as_json:
        emit_json(result)
        return
    _print_bench(result)


def _print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from blrdeploy.measure.bench import fmt_ratio, human_bytes

    console = Console()
    variants = result["variants"]
    names = [v["name"] for v in variants]
    title = f"{result['model']} ({result['weights']}) on {result['device']}, {result['dtype']}"
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("mode")
    for name in names:
        table.add_column(name, justify="right")
    if len(variants) == 2:
        table.add_column("BLR vs dense", justify="right")
    pairs = {}
    for v in variants:
        for row in v["prefill"]:
            shape = f"{row['batch']}×{row['seq']}" if row["seq"] else f"batch {row['batch']}"
            pairs.setdefault((f"prefill {shape} ({row['tokens']} tok), ms", row["mode"]), {})[v["name"]] = row["ms"]
        for row in v["decode"]:
            key = (f"decode, tokens/s ({row['new_tokens']} new)", row["mode"])
            pairs.setdefault(key, {})[v["name"]] = row["tokens_per_s"]
    for (measure, mode), values in pairs.items():
        cells = [f"{values[n]:,.2f}" if n in values else "—" for n in names]
        ratio = ""
        if len(names) == 2 and all(n in values for n in names):
            dense, blr = values[names[0]], values[names[1]]
            ratio = fmt_ratio(blr / dense if measure.startswith("decode") else dense / blr)
        table.add_row(measure, mode, *cells, *([ratio] if len(variants) == 2 else []))
    weights = [human_bytes(v["weight_bytes"]) if "weight_bytes" in v else "—" for v in variants]
    smaller = result["speedup"].get("weights_smaller")
    table.add_row("weights", "", *weights, *([fmt_ratio(smaller)] if len(variants) == 2 else []))
    if any("peak_memory_bytes" in v for v in variants):
        peaks = [human_bytes(v["peak_memory_bytes"]) if "weight_bytes" in v else "—" for v in variants]  # built?
        table.add_row("peak GPU memory", "", *peaks,
                      *([""] if len(variants) == 2 else []))  # fmt: skip
    console.print(table)
    for v in variants:
        if v["error"]:
            console.print(f"[red]{v['name']}: {v['error']}[/red] (at: {v.get('failed_at')})", soft_wrap=True)
        if v.get("decode_error"):
            console.print(f"{v['name']}: decode not measured: {v['decode_error']}", soft_wrap=True)
        for row in v["decode"]:
            if row.get("tokens_match_unreplayed") is False:
                console.print(f"[red]{v['name']}: {row['mode']} decode tokens from the CUDA graph differ from the same "
                              "forward's without it[/red]")  # fmt: skip
    if result["memory_limit"]:
        console.print(f"GPU memory capped at {human_bytes(result['memory_limit']['limit_bytes'])}")
