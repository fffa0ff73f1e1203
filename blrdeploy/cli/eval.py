"""CLI command ``eval``: a model's quality on real text (or seeded samples), converted beside dense."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from blrdeploy.cli.common import DTYPE_LIST, console, emit_json, one_line_errors, parse_dtype, resolve_device
from blrdeploy.measure import evaluate as ev
from blrdeploy.models.text import MAX_SEQ_LEN

_DATA = (
    'Text to evaluate on: a .txt file (one document), a .jsonl file with a "text" field per line, or a folder of '
    "them. Needed for causal LMs and encoders; image and latent models use seeded samples."
)
_AGAINST = (
    "auto: compare with the dense model a checkpoint was converted from when it is at hand and unchanged; dense: "
    "the same, and a missing or changed source is an error; none: the model alone."
)
_SEQ_LEN = f"Tokens per window (LMs) or chunk (encoders). Default: the model's context, at most {MAX_SEQ_LEN}."


class _Bar:
    """Windows done, with elapsed time and ETA, on stderr: a live bar on a terminal, a few plain lines else."""

    def __init__(self) -> None:
        self.bar = self.task = None
        self.start, self.shown = time.perf_counter(), -1
        if sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console(stderr=True), transient=True,
            )  # fmt: skip

    def __enter__(self) -> _Bar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("", total=total)
            self.bar.update(self.task, completed=done)
            return
        tenth = 10 * done // total
        if 0 < done < total and tenth > self.shown:  # about ten lines per run, none at the end (the table follows)
            self.shown = tenth
            elapsed = time.perf_counter() - self.start
            eta = f"{elapsed / done * (total - done):.0f} s"
            print(f"eval [{done}/{total}]  elapsed {elapsed:.0f} s, eta {eta}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def eval_command(
    model: Annotated[
        str, typer.Argument(help="A converted checkpoint, a Hugging Face model directory, or a built-in model.")
    ],
    data: Annotated[Path | None, typer.Option(help=_DATA)] = None,
    against: Annotated[str, typer.Option(help=_AGAINST)] = "auto",
    seq_len: Annotated[int | None, typer.Option("--seq-len", help=_SEQ_LEN)] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="At most this many tokens of the text are evaluated.")
    ] = ev.DEFAULT_MAX_TOKENS,
    batch: Annotated[int, typer.Option(help="Windows (chunks, samples) per forward pass.")] = ev.DEFAULT_BATCH,
    seed: Annotated[int, typer.Option(help="Seed of the sample inputs of image and latent models.")] = 0,
    device: Annotated[str, typer.Option(help="auto (a GPU when present), cuda or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help=f"auto (the model's own), {DTYPE_LIST}.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Measure a model's quality, converted beside dense. Causal LMs: perplexity over non-overlapping windows of
    the text (each window's first token unscored), with the model's own tokenizer, and against dense top-1
    next-token agreement and mean KL(dense || converted). Encoders: cosine of mean-pooled outputs to dense per
    chunk. Image and latent models: output relative error against dense on seeded samples. Progress goes to
    stderr. Exit code: 0 done, 2 unusable input."""
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    with one_line_errors(user=ev.EvalError), _Bar() as bar:
        result = ev.evaluate(
            model, data, against=against, seq_len=seq_len, max_tokens=max_tokens, batch=batch, seed=seed,
            device=device, dtype=torch_dtype, progress=bar,
        )  # fmt: skip
    if as_json:
        emit_json(result.to_dict())
        return
    _print_result(result)


# (label, Column attribute, format) per kind; a cell is "—" where the column has no value.
_ROWS = {
    "causal-lm": [
        ("perplexity", "perplexity", "{:,.3f}"),
        ("mean NLL, nats/token", "nll", "{:.4f}"),
        ("top-1 agreement with dense", "top1_agreement", "{:.4f}"),
        ("KL(dense || converted), nats/token", "kl", "{:.4f}"),
    ],
    "encoder": [
        ("pooled cosine to dense, mean", "cosine_mean", "{:.4f}"),
        ("pooled cosine to dense, min", "cosine_min", "{:.4f}"),
    ],
    "samples": [
        ("output relative error vs dense", "relative_error", "{:.4e}"),
        ("output cosine to dense", "cosine", "{:.6f}"),
        ("output RMS", "output_rms", "{:.4g}"),
    ],
}


def _cell(column: ev.Column, attr: str, fmt: str) -> str:
    if not column.available:
        return "not available"
    value = getattr(column, attr)
    return "—" if value is None else fmt.format(value)


def _print_result(result: ev.EvalResult) -> None:
    out = console()
    out.print(_headline(result), soft_wrap=True)
    out.print(_table(result))
    for column in result.columns:
        if column.note:
            out.print(f"{column.name}: {column.note}", soft_wrap=True)
    for note in result.notes:
        out.print(f"[dim]{note}[/dim]", soft_wrap=True)


def _headline(result: ev.EvalResult) -> str:
    """What was measured on what: the model, the text, the windows; device, dtype and time."""
    if result.kind == "causal-lm":
        what = f"{result.windows} windows of {result.seq_len} tokens, {result.tokens:,} tokens scored"
    elif result.kind == "encoder":
        what = f"{result.windows} chunks of at most {result.seq_len} tokens, {result.tokens:,} tokens"
    else:
        what = f"{result.kind} model on seeded samples (batch {result.batch}, seed {result.seed})"
    data = f" on {result.data} ({result.documents} documents)" if result.data else ""
    return f"eval {result.model}{data}: {what}; {result.device}, {result.dtype}, {result.seconds:.1f} s"


def _table(result: ev.EvalResult) -> Table:
    table = Table()
    table.add_column("measure")
    for column in result.columns:
        table.add_column(column.name, justify="right")
    for label, attr, fmt in [*_ROWS.get(result.kind, _ROWS["samples"]), ("parameters", "params", "{:,}")]:
        if any(getattr(c, attr) is not None for c in result.columns):  # a row no model has a value for says nothing
            table.add_row(label, *[_cell(c, attr, fmt) for c in result.columns])
    table.add_row("model", *[c.model or "not available" for c in result.columns])
    return table
