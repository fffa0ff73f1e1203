"""CLI command ``heal``: distill a converted checkpoint back toward its dense source on text."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from blrdeploy.cli.common import (
    console,
    emit_json,
    held_out_quality,
    one_line_errors,
    print_quality_and_warnings,
    resolve_device,
)
from blrdeploy.conversion import heal as healing
from blrdeploy.files import check_output_file
from blrdeploy.measure import evaluate, plots
from blrdeploy.models.text import MAX_SEQ_LEN, read_text

_DATA = (
    "Text to heal on (.txt, .jsonl with a 'text' field, or a folder of them): the --calibration text suits; "
    "never the --eval text."
)
_TOKENS = "Tokens of the text to read. Default: enough that every step sees new windows (steps x batch x seq-len)."
_EVAL = (
    "Held-out text: after writing, measure the healed checkpoint on it beside its dense source, as `blrdeploy eval` "
    "does."
)


class _Lines:
    """About ten progress lines on stderr: step, loss, tokens/s, elapsed and ETA."""

    def __init__(self) -> None:
        self.start, self.shown, self.first = time.perf_counter(), -1, None

    def __call__(self, info: dict) -> None:
        step, steps = info["step"], info["steps"]
        self.first = self.first if self.first is not None else step - 1
        tenth = 10 * step // steps
        if tenth == self.shown and step != self.first + 1:
            return
        self.shown = tenth
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (step - self.first) * (steps - step)
        print(
            f"heal [{step}/{steps}] loss {info['loss']:.4f}, {info['tokens_per_second']:,.0f} tokens/s, "
            f"elapsed {elapsed:.0f} s, eta {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def _print_plan(plan: dict) -> None:
    gib = 2**30
    held, acts = plan.get("bytes_weights_and_optimizer"), plan.get("bytes_activations")
    streamed = plan.get("teacher") == healing.STREAMED
    memory = ""
    if held is not None:
        if streamed:  # on the GPU: the teacher's embeddings and head and a block or two, not the whole teacher
            held += plan["bytes_teacher_streamed"] - plan["bytes_teacher"]
        memory = f", {held / gib:.2f} GiB weights and optimizer"
        memory += "" if acts is None else f" + about {acts / gib:.2f} GiB activations"
    if streamed:
        memory += f"; the teacher {healing.STREAMED}"
    where = f" at step {plan['resume_at_step']} (its state file)" if plan.get("resume_at_step") else ""
    print(
        f"heal plan: {plan['steps']} steps of {plan['batch']} x {plan['seq_len']} tokens from {plan['windows']} "
        f"windows on {plan['device']}, {plan['trainable_params']:,} parameters trained{memory}"
        + (f"; resuming{where}" if where else ""),
        file=sys.stderr,
        flush=True,
    )


def heal(
    checkpoint: Annotated[Path, typer.Argument(help="A converted checkpoint directory (blrdeploy convert).")],
    data: Annotated[Path, typer.Option(help=_DATA)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The healed checkpoint's directory.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = healing.DEFAULT_STEPS,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate, relative: each trained tensor moves by about LR times its RMS per step. "
            "Default: by structure, "
            + ", ".join(f"{k} {v:g}" for k, v in healing.DEFAULT_LR.items())
            + f" ({healing.OTHER_LR:g} for biases and norms).",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Windows per step.")] = healing.DEFAULT_BATCH,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            help=f"Tokens per window (an encoder's window is one document, cut at this length). Default: the model's "
            f"context, at most {MAX_SEQ_LEN}.",
        ),
    ] = None,
    tokens: Annotated[int | None, typer.Option(help=_TOKENS)] = None,
    train_norms: Annotated[
        bool, typer.Option("--train-norms", help="Also train biases and normalization weights.")
    ] = False,
    checkpointing: Annotated[
        bool,
        typer.Option(
            "--checkpointing", help="Recompute activations in the backward (less memory, about a third more time)."
        ),
    ] = False,
    stream_teacher: Annotated[
        bool | None,
        typer.Option(
            "--stream-teacher/--teacher-on-device",
            help="Keep the dense teacher's blocks in host memory and copy one at a time to the GPU (less GPU "
            "memory, slower). Default: only when teacher and student do not fit the GPU together.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the window order.")] = 0,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Steps between saves of the resumable state (OUT.heal-state.pt).")
    ] = healing.DEFAULT_SAVE_EVERY,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw every step's loss to this .png file (needs matplotlib: blrdeploy[plot])."),
    ] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help=_EVAL)] = None,
    eval_tokens: Annotated[
        int, typer.Option("--eval-tokens", help="At most this many tokens of the --eval text.")
    ] = evaluate.DEFAULT_MAX_TOKENS,
    device: Annotated[str, typer.Option(help="auto (a GPU when present), cuda or cpu.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing checkpoint of ours at the output.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Distill a converted checkpoint toward the dense model it came from: its BLR factors (with --train-norms
    also biases and norms) are trained so that its outputs match dense on the text (KL of next-token
    distributions for causal LMs, relative error of the last hidden states for encoders). float32 master
    weights, bfloat16 compute on a GPU. Resumable: a run stopped after a --save-every save resumes when started
    again with the same arguments. The output is written only at the end, atomically. Exit code: 0 done, 2
    unusable input, 130 interrupted."""
    device = resolve_device(device)
    options = healing.HealOptions(
        steps=steps, lr=lr, batch=batch, seq_len=seq_len, tokens=tokens, train_norms=train_norms, seed=seed,
        save_every=save_every, checkpointing=checkpointing, stream_teacher=stream_teacher,
    )  # fmt: skip
    interrupted = (
        f"interrupted: nothing was written to {output}; the last saved state, if any, is "
        f"{healing.state_path(output)} (run again to resume)"
    )
    with one_line_errors(interrupted=interrupted):
        if eval_data is not None:  # a bad --eval text is said now, not after the heal
            read_text(eval_data)
        if plot is not None:  # and a figure that cannot be written
            check_output_file(plot, overwrite, "--plot", suffixes=(".png",))
            if plot.resolve().is_relative_to(output.resolve()):  # a file there is not the checkpoint's
                raise ValueError(f"--plot {plot} is inside the output checkpoint {output}: put it beside it")
            plots.require_matplotlib("--plot")
        summary = healing.heal(
            checkpoint, data, output, options, device=device, overwrite=overwrite, progress=_Lines(),
            on_plan=None if as_json else _print_plan,
        )  # fmt: skip
    summary["warnings"] = []
    if plot is not None:  # after the checkpoint, which stands whatever happens to the figure
        with one_line_errors():
            plots.loss_curve_png(summary["losses"], plot, f"blrdeploy heal {checkpoint.name}", summary["loss"]["of"])
        summary["plot"] = str(plot)
    if eval_data is not None:
        summary["eval"] = held_out_quality(summary, eval_data, eval_tokens, device)
    if as_json:
        emit_json(summary, default=str)
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    out = console()
    loss = summary["loss"]
    curve = ", ".join(
        f"{step}: {value:.4f}"
        for step, value in summary["loss"]["curve"][:: max(1, len(summary["loss"]["curve"]) // 8)]
    )
    out.print(
        f"distillation loss: {loss['first']:.4f} at step 1 -> {loss['last']:.4f} at step {summary['options']['steps']}"
    )
    out.print(f"loss curve (step: mean): {curve}", soft_wrap=True)
    out.print(
        f"trained {summary['trainable_params']:,} parameters ({summary['trained']}) on {summary['tokens_seen']:,} "
        f"tokens, {summary['tokens_per_second']:,.0f} tokens/s"
    )
    agree = summary["output_agreement"]
    out.print(
        f"model output vs dense on {agree['windows']} windows of the text: cosine "
        f"{agree['before']['cosine_similarity']:.4f} -> {agree['after']['cosine_similarity']:.4f}, relative error "
        f"{agree['before']['relative_error']:.4f} -> {agree['after']['relative_error']:.4f}"
    )
    print_quality_and_warnings(out, summary)
    peak = summary.get("peak_gpu_bytes")
    peak = "" if peak is None else f", peak GPU memory {peak / 2**30:.2f} GiB"
    out.print(f"wrote {summary['output']} in {summary['seconds']:.1f} s on {summary['device']}{peak}")
    if summary.get("plot"):
        out.print(f"loss curve: {summary['plot']}")
