"""Running a loaded model by hand, whatever kernels it is on: capping the GPU memory, loading a checkpoint for
the JIT kernels, the input it is fed (a .safetensors file or the family's seeded sample), timed forwards, and
greedy text generation. What a user can act on is a :class:`RunError` of one line; anything else is a defect
and propagates."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from blrdeploy.conversion.checkpoint import load, read_blr_config, verify
from blrdeploy.kernels.dtypes import dtype_named
from blrdeploy.measure.bench import limit_gpu_memory, parse_size
from blrdeploy.models.outputs import model_output, sample_inputs
from blrdeploy.models.text import has_tokenizer


class RunError(ValueError):
    """The model or its input cannot be run, said in one line: a user's error, not a defect."""


def cap_gpu_memory(limit: str, device: str) -> None:
    """Cap this process's memory on ``device`` at ``limit`` (e.g. "8GB", "7.5GiB")."""
    if not device.startswith("cuda"):
        raise RunError("--memory-limit caps GPU memory: it needs a CUDA GPU")
    try:
        limit_gpu_memory(parse_size(limit), torch.device(device))
    except ValueError as exc:
        raise RunError(str(exc)) from None


def load_checkpoint(checkpoint: Path, device: str, dtype: str, fuse_siblings: bool = True) -> nn.Module:
    """A converted checkpoint for the JIT kernels, in the dtype named ``dtype``, its weights checked against their
    recorded sha256 first (as validate and bench do: load checks only their size, and damaged weights would run);
    ``fuse_siblings`` False keeps every layer on its own (True: the loader's default, stacked siblings and fused
    blocks on CUDA)."""
    torch_dtype = dtype_named(dtype, "--dtype")
    verify(checkpoint)
    return load(checkpoint, device=device, dtype=torch_dtype, fuse_siblings=None if fuse_siblings else False)


def read_feed(path: Path) -> dict[str, torch.Tensor]:
    """A model's inputs by name from a .safetensors file; a RunError naming the file when it is not one."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise RunError(f"--input {path} is not a readable .safetensors file: {str(exc).splitlines()[0]}") from None


def sample_feed(model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The family's seeded sample input (batch 1) for a checkpoint's model."""
    return sample_inputs(model, read_blr_config(checkpoint), batch=1, seed=0)


def describe_feed(feed: dict[str, torch.Tensor]) -> str:
    """``input_ids [1, 16] int64, ...``: what a model was fed, for an error message."""
    return ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in feed.items())


@dataclass
class Timing:
    output: torch.Tensor  # the first forward's main output, float32 on the CPU
    first_s: float  # the first forward, which includes any compiling
    steady_ms: float | None  # the median of the repeats (None without any)


def time_forwards(
    model: nn.Module,
    feed: dict[str, torch.Tensor],
    repeat: int,
    *,
    input_file: Path | None = None,
    kernels_may_refuse: bool = False,
) -> Timing:
    """One forward, then ``repeat`` timed ones. An input the model cannot take is a RunError when it came from
    ``input_file`` (with the model's own sample input it is a defect); a kernel error (out of memory, a launch
    the shipped kernels do not serve) is one when the input came from a file or ``kernels_may_refuse``."""
    times = []
    try:
        t1 = time.perf_counter()
        out = model_output(model, feed)  # synchronizes: copies the output to the CPU
        first_s = time.perf_counter() - t1
        for _ in range(max(0, repeat)):
            t = time.perf_counter()
            model_output(model, feed)
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        raise RunError("out of memory running the model (it loaded; a smaller input may fit)") from None
    except RuntimeError as exc:  # MissingKernel, CudaError: the kernels cannot serve this input on this machine
        if not kernels_may_refuse and input_file is None:
            raise
        raise RunError(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    except (ValueError, IndexError, TypeError, AttributeError) as exc:
        if input_file is None:  # the model's own sample input: a defect, not the user's input
            raise
        raise RunError(
            f"the model cannot run --input {input_file} ({describe_feed(feed)}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    return Timing(out, first_s, 1e3 * sorted(times)[len(times) // 2] if times else None)


# ------------------------------------------------------------------------------------------------ text


def _no_tokenizer(checkpoint: Path) -> str:
    return f"{checkpoint} carries no tokenizer (tokenizer.json / tokenizer_config.json): use --input for tensors"


def check_generation(checkpoint: Path | None, max_new_tokens: int, with_tensors: bool) -> None:
    """Before loading anything: text generation takes no tensor input or output (``with_tensors``), at least one
    new token, and a checkpoint (when given) that carries a tokenizer."""
    if with_tensors:
        raise RunError("--prompt runs text in, text out: it does not take --input or --output")
    if max_new_tokens < 1:
        raise RunError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if checkpoint is not None and not has_tokenizer(checkpoint):
        raise RunError(_no_tokenizer(checkpoint))


@dataclass
class Generation:
    model: str  # the checkpoint whose tokenizer was used
    prompt: str
    text: str
    prompt_tokens: int
    token_ids: list[int]  # the new tokens
    load_s: float
    warmup_s: float  # a one-token generate: the kernels the prompt needs, compiled
    seconds: float  # the generate itself

    def to_json(self) -> dict:
        return {
            "model": self.model, "prompt": self.prompt, "text": self.text, "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.token_ids), "token_ids": self.token_ids, "load_seconds": round(self.load_s, 3),
            "warmup_seconds": round(self.warmup_s, 3), "generate_seconds": round(self.seconds, 3),
            "tokens_per_s": round(len(self.token_ids) / self.seconds, 2),
        }  # fmt: skip


def generate_text(model: nn.Module, checkpoint: Path, prompt: str, max_new_tokens: int, load_s: float) -> Generation:
    """Greedy generation with transformers' ``generate`` on the loaded model and the checkpoint's tokenizer."""
    if not has_tokenizer(checkpoint):
        raise RunError(_no_tokenizer(checkpoint))
    if not hasattr(model, "generate"):
        raise RunError(f"{type(model).__name__} does not generate text; run it on tensors with --input")
    from transformers import AutoTokenizer  # deferred: transformers is slow to import, and only text needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read the tokenizer in {checkpoint}: {str(exc).splitlines()[0]}") from None
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise RunError("--prompt encodes to no tokens")
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and ids.shape[1] + max_new_tokens > positions:
        raise RunError(
            f"the prompt's {ids.shape[1]} tokens and --max-new-tokens {max_new_tokens} exceed the model's "
            f"{positions} positions: shorten the prompt or ask for at most {max(0, positions - ids.shape[1])} tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(n: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  min_new_tokens=0, pad_token_id=pad)  # fmt: skip

    try:
        t = time.perf_counter()
        generate(1)  # compiles the kernels the prompt needs: start-up, not generation speed
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(max_new_tokens)
        seconds = time.perf_counter() - t
    except torch.OutOfMemoryError:
        raise RunError(
            "out of memory while generating (the model loaded; a shorter prompt or fewer tokens may fit)"
        ) from None
    except RuntimeError as exc:  # MissingKernel, CudaError from a bundle's launches
        raise RunError(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    new = out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(str(checkpoint), prompt, text, ids.shape[1], new, load_s, warm_s, seconds)
