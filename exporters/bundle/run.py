"""Running a converted model by hand, as ``blrdeploy run`` does: :func:`run_model` loads a bundle (its shipped
cubins) or a checkpoint (Triton's JIT kernels), feeds it, times it and checks the bundle's sample. The parts that
do not depend on bundles (memory cap, feeding, timing, text generation) are ``blrdeploy.measure.runner``'s."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from blrdeploy.files import atomic_file, check_output_file, safetensors_os_error
from blrdeploy.measure.runner import (
    Generation,
    RunError,
    Timing,
    cap_gpu_memory,
    check_generation,
    generate_text,
    load_checkpoint,
    read_feed,
    sample_feed,
    time_forwards,
)

from .format import CHECKPOINT
from .load import Bundle, load_bundle, sample_check


@dataclass
class RunOutcome:
    result: dict  # what ``run --json`` prints: timings and the output's shape, or the generated text
    ok: bool = True  # False: the output differs from the bundle's expected sample output
    generation: Generation | None = None  # with a prompt


def run_model(
    checkpoint: Path | None = None,
    bundle_dir: Path | None = None,
    *,
    device: str = "cpu",
    inputs: Path | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 32,
    memory_limit: str | None = None,
    output: Path | None = None,
    dtype: str = "bfloat16",
    allow_jit: bool = False,
    fuse_siblings: bool = True,
    repeat: int = 10,
    overwrite: bool = False,
) -> RunOutcome:
    """Run a bundle on its shipped cubins or a checkpoint on Triton's JIT kernels (``device="cpu"``: the PyTorch
    reference path), as ``blrdeploy run`` does: greedy generation from ``prompt``; otherwise one input (``inputs``,
    the bundle's sample, or the family's seeded sample) with start-up and steady forward times, the bundle's sample
    check when its sample input is used, and the output written to ``output``. Raises RunError (one line) when the
    model or input cannot be run; the process's kernels are restored after a bundle. An existing ``output`` is
    replaced only with ``overwrite``."""
    if output is not None:
        check_output_file(output, overwrite)  # before loading and running, not after
    if memory_limit is not None:
        cap_gpu_memory(memory_limit, device)
    if prompt is not None:
        check_generation(checkpoint, max_new_tokens, with_tensors=inputs is not None or output is not None)
    t0 = time.perf_counter()
    bundle = None
    try:
        try:
            if bundle_dir is not None:
                model, bundle = load_bundle(bundle_dir, device, allow_jit=allow_jit)
            else:
                model = load_checkpoint(checkpoint, device, dtype, fuse_siblings)
            if prompt is not None:
                where = bundle.root / CHECKPOINT if bundle is not None else checkpoint
                generation = generate_text(model, where, prompt, max_new_tokens, time.perf_counter() - t0)
                return RunOutcome(generation.to_json(), generation=generation)
            feed = _feed(model, checkpoint, bundle, inputs)
        except RunError:
            raise
        except (ValueError, OSError, SafetensorError) as exc:
            raise RunError(str(exc).splitlines()[0]) from exc
        except torch.OutOfMemoryError:
            limit = f" under --memory-limit {memory_limit}" if memory_limit else ""
            raise RunError(f"out of memory loading the model{limit}") from None
        load_s = time.perf_counter() - t0
        timing = time_forwards(model, feed, repeat, input_file=inputs, kernels_may_refuse=bundle is not None)
        name = str(bundle_dir or checkpoint)
        return _finish(model, bundle, feed, timing, load_s, name=name, device=device, inputs=inputs, output=output)
    finally:
        if bundle is not None:
            bundle.close()


def _feed(model: torch.nn.Module, checkpoint: Path | None, bundle: Bundle | None, inputs: Path | None) -> dict:
    """The input file, else the bundle's sample input, else the checkpoint family's seeded sample."""
    if inputs is not None:
        return read_feed(inputs)
    if bundle is not None:
        return read_feed(bundle.root / bundle.manifest["sample"]["input"])
    return sample_feed(model, checkpoint)


def _finish(
    model: torch.nn.Module,
    bundle: Bundle | None,
    feed: dict,
    timing: Timing,
    load_s: float,
    *,
    name: str,
    device: str,
    inputs: Path | None,
    output: Path | None,
) -> RunOutcome:
    """The result of a timed run; with the bundle's sample input, its check; the output written if asked."""
    kernels = "shipped cubins" if bundle is not None else "Triton JIT"
    result = {
        "model": name,
        "kernels": "PyTorch reference" if device == "cpu" else kernels,
        "device": device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_seconds": round(load_s, 3),
        "first_forward_seconds": round(timing.first_s, 3),
        "startup_seconds": round(load_s + timing.first_s, 3),
        "forward_ms": None if timing.steady_ms is None else round(timing.steady_ms, 3),
        "inputs": {k: list(v.shape) for k, v in feed.items()},
        "output_shape": list(timing.output.shape),
        "jit_launches": bundle.kernels.jit_launches if bundle is not None and bundle.kernels is not None else None,
    }
    ok = True
    if bundle is not None and inputs is None:
        check, _ = sample_check(model, bundle)
        result["sample_check"] = check.to_dict()
        ok = check.ok
    if output is not None:
        try:
            with atomic_file(output) as tmp:
                save_file({"output": timing.output.contiguous()}, str(tmp))
        except SafetensorError as exc:  # a full disk: the OSError it is, naming --output
            error = safetensors_os_error(exc, output)
            if error is None:
                raise
            raise error from exc
        result["output_file"] = str(output)
    return RunOutcome(result, ok)
