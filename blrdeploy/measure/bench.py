"""End-to-end benchmark of a converted model beside its dense twin: prefill latency, decode tokens/s, weight bytes
and peak GPU memory, each under the same harness (``blrdeploy bench``).

Both models get random weights (seeded) unless a converted checkpoint is given, whose BLR model is loaded as stored;
its dense twin is then built from the checkpoint's config. Weights go straight to the device in the target dtype,
in one allocation: a BLR model never has a dense weight, so a memory cap (``--memory-limit``) shows what fits.

Harness modes, the same for both models:

* ``eager``: the Python forward, timed on the GPU between CUDA events (Python launch cost included).
* ``graph``: that forward captured once in a CUDA graph and replayed (launch cost removed).
* ``compile``: ``torch.compile`` of the forward, captured and replayed the same way.

Decode is greedy, batch 1, on a transformers ``StaticCache`` with an explicit 4-D mask (so no mask logic reads
tensor values: the whole step, argmax and cache write included, lives in one CUDA graph); tokens/s counts the new
tokens only. The graph's tokens are checked against the same forward stepped without the graph.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blrdeploy.conversion.blocks import FusedPreNormBlock
from blrdeploy.conversion.checkpoint import (
    BLR_CONFIG,
    blr_module,
    load,
    read_blr_config,
    tool_versions,
    verify,
)
from blrdeploy.conversion.convert import ConvertConfig, is_linear, linear_dims, plan
from blrdeploy.conversion.fusion import fuse_family
from blrdeploy.conversion.pipeline import unique_params
from blrdeploy.conversion.siblings import Siblings, blr_layer_count
from blrdeploy.files import atomic_write_text, check_output_file
from blrdeploy.models.families import BUILTIN, FAMILIES
from blrdeploy.models.outputs import main_output
from blrdeploy.models.sources import builtin_config, identify, instantiate, read_config
from blrdeploy.structures.modules import set_submodule

MODES = ("eager", "graph", "compile")
LLM_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.tokens)
# The reference paper's prefill shapes per family as (batch, sequence); ViT and DiT sequences come from the model.
PAPER_SHAPES = {"llama": [(1, 1024)], "gpt2": [(1, 384)], "vit": [(1, None), (64, None)], "dit": [(64, None)]}
Progress = Callable[[str], None]  # called with a description before each measured step
# Given a run's step count, opens what receives its steps (a progress bar, say) for the length of the run.
OpenProgress = Callable[[int], AbstractContextManager[Progress | None]]


# ------------------------------------------------------------------------------------------------- memory limit

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of "8GB" (10^9), "7.5GiB" (2^30), "512MB", "123" (bytes)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 8GB, 7.5GiB or 512MB")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower().rstrip("b") or "b"
    scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    size = int(value * scale[unit])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return size


def limit_gpu_memory(limit: int, device: torch.device) -> dict:
    """Caps what the bench may allocate on ``device`` at ``limit`` bytes (an 8 GB Jetson's memory on a larger GPU).
    The allocator's cap is process-wide and counts every block it holds, so memory this process already holds
    (tensors of earlier work, blocks cached for reuse, CUDA graph pools) is freed where it can be and added to the
    cap: otherwise the same bench would fit or not depending on what ran before it. The CUDA context is outside."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    gc.collect()  # graphs and models of earlier runs that only a cycle still holds
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved(index)
    if limit + held > total:
        raise ValueError(
            f"--memory-limit {limit / 1e9:.2f} GB is more than the GPU's free {(total - held) / 1e9:.2f} GB"
        )
    torch.cuda.set_per_process_memory_fraction((limit + held) / total, index)
    return {"limit_bytes": limit, "device_bytes": total, "held_bytes": held}


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------------ building models


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device and their buffers as usual (rotary
    frequencies, position tables): the skeleton costs no memory, and nothing but the parameters is left to fill."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _fill(module: nn.Module, key: str, p: torch.Tensor) -> None:
    """Values for a parameter whose module has no reset_parameters (RMS norms, GPT-2's Conv1D, ...)."""
    if p.dim() == 1 and key == "weight":  # a norm's scale
        p.fill_(1.0)
    elif p.dim() == 1 and key == "bias":
        p.zero_()
    else:
        p.normal_(0, 0.02)


_ALIGN = 256  # bytes: every tensor in the slab starts where a kernel's vectorized loads want it


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Gives every meta parameter a seeded random value on ``device`` in ``dtype`` and moves the buffers there.
    The parameters are views into one allocation (a per-tensor allocation wastes up to a 2 MB allocator segment
    each, 0.4 GB over Llama-7B's 700 BLR factors, which decides whether it fits 8 GB). Tied parameters stay tied.
    Modules with ``reset_parameters`` use it (nn.Linear, embeddings, norms and the BLR layers, whose init gives
    nn.Linear's output scale)."""
    torch.manual_seed(seed)
    unique: dict[int, tuple[torch.Tensor, torch.dtype, int]] = {}  # id -> (meta param, dtype, offset)
    size = 0
    for p in model.parameters():  # each tied parameter once
        kind = dtype if p.is_floating_point() else p.dtype
        unique[id(p)] = (p, kind, size)
        size += -(-p.numel() * kind.itemsize // _ALIGN) * _ALIGN
    slab = torch.empty(size, dtype=torch.uint8, device=device)
    made = {
        key: nn.Parameter(slab[off : off + p.numel() * kind.itemsize].view(kind).view(p.shape), requires_grad=False)
        for key, (p, kind, off) in unique.items()
    }
    for module in model.modules():
        fresh = [k for k, p in module._parameters.items() if p is not None and p.is_meta]
        for key in fresh:
            module._parameters[key] = made[id(module._parameters[key])]
        if fresh:
            owned = [k for k, v in module._parameters.items() if v is not None]
            if hasattr(module, "reset_parameters") and len(fresh) == len(owned):
                module.reset_parameters()
            else:
                for key in fresh:
                    _fill(module, key, module._parameters[key])
        for key, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[key] = buf.to(device)
    return model.eval()


@dataclass
class Variant:
    """One of the two models a bench compares."""

    name: str  # "dense", or the BLR structure
    build: Callable[[], nn.Module]
    params: int  # weight parameters, counted on the skeleton before anything is allocated
    layers: list[dict] = field(default_factory=list)  # BLR layer entries (empty for dense)


@dataclass
class Target:
    """What to benchmark: the family, the two variants, and where they came from."""

    id: str
    family: str
    structure: str
    variants: list[Variant]
    config: dict  # the model config (for sequence lengths, vocabulary)
    note: str = ""
    kept: list[dict] = field(default_factory=list)  # the linears both variants keep dense (LM head, ...)


def _skeleton(library: str, class_name: str, config: dict) -> nn.Module:
    with parameters_on_meta():
        return instantiate(library, class_name, config, device="cpu")


def _blr_skeleton(model: nn.Module, layers: list[dict]) -> nn.Module:
    for layer in layers:
        set_submodule(model, layer["name"], blr_module(layer))
    return model


def resolve(
    model: str, structure: str = "blast", preset: str | None = "auto", params_ratio: float = 0.5, seed: int = 0,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, fuse_siblings: bool = True,
) -> Target:  # fmt: skip
    """A built-in model (its conversion planned with the paper preset where it has one for ``structure``, else
    ``params_ratio``; random weights) or a converted checkpoint directory (its stored weights). Nothing is
    allocated until a variant is built. ``fuse_siblings``: the BLR model's sibling BLAST or low-rank layers run stacked
    (:mod:`blrdeploy.conversion.siblings`)."""
    device = torch.device(device)
    if model in BUILTIN:
        spec = BUILTIN[model]
        library, class_name, config = builtin_config(model)
        use_preset = "paper" if preset == "paper" or (preset == "auto" and structure in spec.paper) else None
        conv = ConvertConfig(structure=structure, preset=use_preset, params_ratio=params_ratio)
        skeleton = _skeleton(library, class_name, config)
        layers = [e.to_dict() for e in plan(skeleton, conv, FAMILIES[spec.family], spec).layers]
        family, blr_name = spec.family, structure
        note = f"{'paper preset' if use_preset else f'params ratio {params_ratio}'}; random weights (seed {seed})"

        def blr():
            skeleton = _blr_skeleton(_skeleton(library, class_name, config), layers)
            if fuse_siblings:  # on the meta skeleton: the stacked factors are allocated once, in the slab
                fuse_family(skeleton, spec.family)
            return materialize(skeleton, device, dtype, seed)

    else:
        path = Path(model)
        if not (path / BLR_CONFIG).is_file():
            known = ", ".join(BUILTIN)
            raise ValueError(f"{model!r} is neither a built-in model ({known}) nor a converted checkpoint directory")
        verify(path)  # the weights against their sha256: a damaged checkpoint is refused, not benchmarked
        cfg = read_blr_config(path)
        config = read_config(path)
        library, class_name, fam = identify(config, allow_unknown=True)
        library, class_name = cfg["source"].get("library", library), cfg["source"].get("class", class_name)
        family = cfg["source"].get("family") or (fam.name if fam else None)
        if family not in FAMILIES:
            raise ValueError(f"{model}: bench knows the families {', '.join(FAMILIES)}, not {family!r}")
        layers = cfg["layers"]
        skeleton = _skeleton(library, class_name, config)
        blr_name = "+".join(sorted({layer["structure"] for layer in layers}))
        note = f"the checkpoint's weights; the dense twin has random weights (seed {seed})"

        def blr():
            return load(path, device=device, dtype=dtype, fuse_siblings=fuse_siblings)

    def dense():
        return materialize(_skeleton(library, class_name, config), device, dtype, seed)

    dense_params = unique_params(skeleton)[0]
    converted = {layer["name"] for layer in layers}
    kept = [_linear_entry(name, m) for name, m in skeleton.named_modules() if is_linear(m) and name not in converted]
    blr_params = unique_params(_blr_skeleton(skeleton, layers))[0]
    variants = [Variant("dense", dense, dense_params), Variant(blr_name, blr, blr_params, layers)]
    return Target(model, family, blr_name, variants, config, note, kept)


def _linear_entry(name: str, module: nn.Module) -> dict:
    """A dense linear as a roofline layer entry."""
    _, i, o = linear_dims(module)
    return {"name": name, "structure": "dense", "in_features": int(i), "out_features": int(o),
            "num_blocks": None, "rank": None, "bias": module.bias is not None}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the harness


def prefill_inputs(target: Target, model: nn.Module, batch: int, seq: int | None, seed: int, device) -> dict:
    """Seeded inputs of ``batch`` x ``seq`` tokens (seq only for token models)."""
    family = FAMILIES[target.family]
    feed = (
        family.sample(model, batch, seed, seq or 16)
        if target.family in LLM_FAMILIES
        else family.sample(model, batch, seed)
    )
    feed = {k: v.to(device) for k, v in feed.items()}
    dtype = next(model.parameters()).dtype
    feed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in feed.items()}
    if target.family in LLM_FAMILIES:
        feed["use_cache"] = False
    return feed


def tokens_of(target: Target, feed: dict, model: nn.Module) -> int:
    if "input_ids" in feed:
        return feed["input_ids"].numel()
    if target.family == "vit":
        c = model.config
        return feed["pixel_values"].shape[0] * ((c.image_size // c.patch_size) ** 2 + 1)
    c = model.config
    return feed["hidden_states"].shape[0] * (c.sample_size // c.patch_size) ** 2


def median_ms(fn: Callable[[], object], device: torch.device, budget_s: float, min_reps: int = 5) -> float:
    """Median time of ``fn`` over repetitions filling about ``budget_s`` (at least ``min_reps``): CUDA events on a
    GPU (the GPU timeline, so a CPU-bound forward shows its gaps), the wall clock on a CPU."""
    fn()  # warm
    if device.type != "cuda":
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 100):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    once = max(time.perf_counter() - t, 1e-6)
    reps = int(min(200, max(min_reps, budget_s / once)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 2):
    """Runs ``fn`` ``warmup`` times on a side stream (compiles kernels, sets up cuBLAS), then captures one call in
    a CUDA graph. Returns (graph, the captured call's output)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the warm-up's blocks: the graph's private pool cannot reuse them, a memory cap can
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out


def _compiled(fn: Callable, mode: str) -> Callable:
    return torch.compile(fn, dynamic=False) if mode == "compile" else fn


@torch.no_grad()
def time_prefill(model: nn.Module, feed: dict, mode: str, device: torch.device, budget_s: float) -> dict:
    forward = _compiled(model.forward, mode)
    t0 = time.perf_counter()
    if mode == "eager":
        ms = median_ms(lambda: forward(**feed), device, budget_s)
        return {"ms": ms}
    if device.type != "cuda":
        forward(**feed)
        setup = time.perf_counter() - t0
        return {"ms": median_ms(lambda: forward(**feed), device, budget_s), "setup_s": setup}
    graph, _ = capture_graph(lambda: forward(**feed), device)
    setup = time.perf_counter() - t0
    ms = median_ms(graph.replay, device, budget_s)
    del graph
    return {"ms": ms, "setup_s": setup}


def _static_cache(model: nn.Module, length: int, device, dtype, batch: int = 1):
    # deferred: transformers takes about half a second to import, and only decoding needs its cache
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    wanted = {"max_batch_size": batch, "batch_size": batch, "device": device, "dtype": dtype}
    kwargs = {k: v for k, v in wanted.items() if k in params}
    if "max_batch_size" in kwargs:
        kwargs.pop("batch_size", None)
    return StaticCache(config=model.config, max_cache_len=length, **kwargs)


class Decoder:
    """Greedy decode of a batch of equally long prompts (``prompt`` is (batch, length); each sequence gets one new
    token a step, as a server decoding several requests at once) on a static cache whose every step (mask update,
    forward, argmax, cache write, next position) touches only fixed buffers, so one step is one CUDA graph
    replayed ``new_tokens`` times."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int, mode: str) -> None:
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.batch = prompt.shape[0]
        self.device = prompt.device
        self.dtype = next(model.parameters()).dtype
        self.length = prompt.shape[1] + new_tokens
        self.forward = _compiled(model.forward, mode)
        self.cache = _static_cache(model, self.length, self.device, self.dtype, self.batch)
        self.neg = torch.finfo(self.dtype).min
        self.token = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.first = torch.zeros_like(self.token)  # each sequence's first new token, from the prompt's forward
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.mask = torch.full((self.batch, 1, 1, self.length), self.neg, dtype=self.dtype, device=self.device)
        self.out = torch.zeros(self.batch, new_tokens, dtype=torch.long, device=self.device)
        # transformers 5 renamed past_key_values to cache and tracks positions inside the cache; 4.x takes both.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.positions = "cache_position" in params

    def _call(self, forward, ids, mask, pos) -> torch.Tensor:
        kwargs = {self.cache_arg: self.cache, "cache_position": pos} if self.positions else {self.cache_arg: self.cache}
        position_ids = pos[None].expand(self.batch, -1)
        out = forward(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **kwargs)
        return main_output(out)

    def prefill(self) -> None:
        """Fills the cache with the prompts and resets the step buffers to the first new token."""
        p = self.prompt.shape[1]
        pos = torch.arange(p, device=self.device)
        causal = torch.full((p, self.length), self.neg, dtype=self.dtype, device=self.device)
        causal[:, :p] = torch.triu(causal[:, :p], diagonal=1)
        self.cache.reset()
        logits = self._call(self.model, self.prompt, causal.expand(self.batch, 1, p, self.length), pos)
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.first.copy_(self.token)
        self.pos.fill_(p)
        self.mask.fill_(self.neg)
        self.mask[..., :p] = 0

    def step(self) -> torch.Tensor:
        self.mask.index_fill_(3, self.pos, 0)
        logits = self._call(self.forward, self.token, self.mask, self.pos)
        nxt = logits[:, -1:].argmax(-1)
        self.out.index_copy_(1, self.pos - self.prompt.shape[1], nxt)
        self.token.copy_(nxt)
        self.pos.add_(1)
        return nxt

    def tokens(self, steps: int) -> list[list[int]]:
        """Each sequence's new tokens since the last prefill: the prompt's forward's, then ``steps`` steps'."""
        return torch.cat([self.first, self.out[:, :steps]], dim=1).tolist()

    @torch.no_grad()
    def run_eager(self, tokens: int | None = None) -> list[list[int]]:
        """The first ``tokens`` (default all) new tokens of each sequence, stepped without a graph."""
        steps = (tokens or self.new_tokens) - 1
        self.prefill()
        for _ in range(steps):
            self.step()
        return self.tokens(steps)


@torch.no_grad()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, mode: str, check_tokens: int) -> dict:
    """Tokens/s (all sequences together) of ``new_tokens`` greedy steps after the prompts (the prompts' forward not
    counted). In graph and compile modes, the graph's first ``check_tokens`` tokens are compared with the same
    forward's stepped without the graph (compiled kernels round differently from eager ones, so eager is not the
    reference)."""
    device = prompt.device
    batch = prompt.shape[0]
    t0 = time.perf_counter()
    dec = Decoder(model, prompt, new_tokens, mode)
    steps = new_tokens - 1  # the first new token comes from the prompt's forward
    if mode == "eager" or device.type != "cuda":
        dec.prefill()
        dec.step()  # warm
        dec.prefill()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the prompt's forward is not decode time
        start = time.perf_counter()
        for _ in range(steps):
            dec.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return {"tokens_per_s": batch * steps / seconds, "ms_per_step": 1e3 * seconds / steps,
                "setup_s": time.perf_counter() - t0 - seconds}  # fmt: skip
    dec.prefill()
    graph, _ = capture_graph(dec.step, device)
    setup = time.perf_counter() - t0
    dec.prefill()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    ms = start.elapsed_time(end)
    tokens = dec.tokens(steps)
    result = {"tokens_per_s": 1e3 * batch * steps / ms, "ms_per_step": ms / steps, "setup_s": setup}
    if check_tokens:  # the same forward (compiled or not) stepped without the graph: replay must not change a token
        # Same cache length, so the same attention shapes (and, compiled, the same graph) as the timed run.
        n = min(check_tokens, new_tokens)
        reference = Decoder(model, prompt, new_tokens, mode).run_eager(n)
        result["tokens_match_unreplayed"] = [row[:n] for row in tokens] == reference
    del graph, dec
    return result


# ------------------------------------------------------------------------------------------------------ the run


@dataclass
class BenchConfig:
    modes: tuple[str, ...] = MODES
    shapes: tuple[tuple[int, int | None], ...] | None = None  # (batch, seq); None: the reference paper's
    decode: bool = True
    new_tokens: int = 128
    prompt_tokens: int = 16
    check_tokens: int = 16
    budget_s: float = 1.0  # per timed measurement
    seed: int = 0
    decode_batches: tuple[int, ...] = (1,)  # sequences decoded together, one new token each a step

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown mode {unknown[0] if unknown else ''!r}; modes are {', '.join(MODES)}")
        if self.new_tokens < 2:
            raise ValueError(f"--new-tokens must be at least 2, got {self.new_tokens}")
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens must be at least 1, got {self.prompt_tokens}")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ValueError(f"--decode-batch takes positive integers, got {self.decode_batches!r}")


def _positions(target: Target) -> int | None:
    """Length of a token model's position table (Llama's and GPT-2's config names), None if it has none."""
    return target.config.get("max_position_embeddings") or target.config.get("n_positions")


def shapes_for(target: Target, config: BenchConfig) -> list[tuple[int, int | None]]:
    shapes = list(config.shapes or PAPER_SHAPES[target.family])
    if target.family not in LLM_FAMILIES:
        return [(b, None) for b, _ in shapes]
    limit = _positions(target) or 1024
    return [(b, min(s or 1024, limit)) for b, s in shapes]


def decode_length(target: Target, config: BenchConfig) -> int:
    """New tokens to decode: as asked, but within the model's position table after the prompt."""
    limit = _positions(target)
    return config.new_tokens if not limit else min(config.new_tokens, limit - config.prompt_tokens)


def decodes(target: Target, config: BenchConfig) -> bool:
    return config.decode and target.family in LLM_FAMILIES


def chosen_variants(target: Target, only: str | None) -> list[Variant]:
    """Both models, or ``only`` "dense" or "blr"."""
    return [v for v in target.variants if only is None or (v.name == "dense") == (only == "dense")]


def step_count(target: Target, config: BenchConfig, only: str | None = None) -> int:
    """How many progress steps a run reports: per model, its build, each prefill shape and mode, each decode mode."""
    decoding = decodes(target, config) and decode_length(target, config) >= 2
    decode_steps = len(config.modes) * len(config.decode_batches) if decoding else 0
    per_model = 1 + len(shapes_for(target, config)) * len(config.modes) + decode_steps
    return len(chosen_variants(target, only)) * per_model


def _oom_message(variant: str, limit: int | None, weights: int) -> str:
    cap = f"the --memory-limit of {human_bytes(limit)}" if limit else "the GPU's free memory"
    return f"out of memory: the {variant} model does not fit {cap} (its weights alone are {human_bytes(weights)})"


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_variant(
    target: Target, variant: Variant, config: BenchConfig, device: torch.device, dtype: torch.dtype,
    progress: Progress, memory_limit: int | None = None,
) -> dict:  # fmt: skip
    result: dict = {"name": variant.name, "prefill": [], "decode": [], "error": None}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = None
    step = f"{variant.name}: building the model"

    def report(what: str) -> None:
        nonlocal step
        step = what
        progress(what)

    try:
        report(step)
        t0 = time.perf_counter()
        model = variant.build()
        result["build_s"] = round(time.perf_counter() - t0, 3)
        result["params"], result["weight_bytes"] = unique_params(model)
        result["blr_layers"] = blr_layer_count(model)
        result["sibling_groups"] = sum(isinstance(m, Siblings) for m in model.modules())
        result["fused_blocks"] = sum(isinstance(m, FusedPreNormBlock) for m in model.modules())
        for batch, seq in shapes_for(target, config):
            feed = prefill_inputs(target, model, batch, seq, config.seed, device)
            for mode in config.modes:
                report(f"{variant.name}: prefill " + (f"{batch}x{seq}" if seq else f"batch {batch}") + f", {mode}")
                row = {"batch": batch, "seq": seq, "tokens": tokens_of(target, feed, model), "mode": mode}
                row.update(time_prefill(model, feed, mode, device, config.budget_s))
                result["prefill"].append(row)
                _free_compiled(mode)
        new_tokens = decode_length(target, config)
        if decodes(target, config) and new_tokens < 2:
            result["decode_error"] = f"the prompt ({config.prompt_tokens} tokens) fills the model's position table"
        elif decodes(target, config):
            vocab = target.config.get("vocab_size")
            for batch in config.decode_batches:
                g = torch.Generator().manual_seed(config.seed)
                prompt = torch.randint(0, vocab, (batch, config.prompt_tokens), generator=g).to(device)
                for mode in config.modes:
                    report(f"{variant.name}: decode batch {batch}, {new_tokens} tokens, {mode}")
                    row = {
                        "mode": mode,
                        "batch": batch,
                        "new_tokens": new_tokens,
                        "prompt_tokens": config.prompt_tokens,
                    }
                    check = config.check_tokens if mode != "eager" else 0
                    try:
                        row.update(time_decode(model, prompt, new_tokens, mode, check))
                    except (TypeError, AttributeError, NotImplementedError) as exc:  # no static-cache support
                        result["decode_error"] = f"this model/transformers cannot decode on a static cache: {exc}"
                        break
                    result["decode"].append(row)
                    _free_compiled(mode)
                if "decode_error" in result:
                    break
    except torch.OutOfMemoryError:
        elem = torch.empty((), dtype=dtype).element_size()
        result["error"] = _oom_message(variant.name, memory_limit, variant.params * elem)
        result["failed_at"] = step
    except Exception as exc:  # keep what was measured (the other model's results) and say what broke, and where
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        result["failed_at"] = step
    finally:
        if cuda:
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        del model
        _free(device)
    return result


def _free_compiled(mode: str) -> None:
    if mode == "compile":
        torch._dynamo.reset()


def speedups(variants: list[dict]) -> dict:
    """Dense time / BLR time per prefill shape and mode, and BLR tokens/s / dense tokens/s per decode mode; also
    against dense's best mode."""
    if len(variants) != 2 or any(v["error"] for v in variants):
        return {}
    dense, blr = variants
    out: dict = {"prefill": [], "decode": []}
    for row in blr["prefill"]:
        same = [d for d in dense["prefill"] if (d["batch"], d["seq"]) == (row["batch"], row["seq"])]
        ref = next((d for d in same if d["mode"] == row["mode"]), None)
        best = min(same, key=lambda d: d["ms"], default=None)
        out["prefill"].append({
            "batch": row["batch"], "seq": row["seq"], "mode": row["mode"],
            "vs_dense_same_mode": None if ref is None else ref["ms"] / row["ms"],
            "vs_dense_best": None if best is None else best["ms"] / row["ms"],
            "dense_best_mode": None if best is None else best["mode"],
        })  # fmt: skip
    for row in blr["decode"]:
        same = [d for d in dense["decode"] if d.get("batch", 1) == row.get("batch", 1)]
        ref = next((d for d in same if d["mode"] == row["mode"]), None)
        best = max(same, key=lambda d: d["tokens_per_s"], default=None)
        out["decode"].append({
            "batch": row.get("batch", 1), "mode": row["mode"],
            "vs_dense_same_mode": None if ref is None else row["tokens_per_s"] / ref["tokens_per_s"],
            "vs_dense_best": None if best is None else row["tokens_per_s"] / best["tokens_per_s"],
        })  # fmt: skip
    out["weights_smaller"] = dense["weight_bytes"] / blr["weight_bytes"]
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(
    target: Target, config: BenchConfig, device: torch.device, dtype: torch.dtype, progress: Progress | None = None,
    memory_limit: int | None = None, only: str | None = None,
) -> dict:  # fmt: skip
    """Measures each variant (or ``only`` "dense" or "blr") in turn, the dense one first, freeing one before
    building the next."""
    progress = progress or (lambda _: None)
    chosen = chosen_variants(target, only)
    cuda = device.type == "cuda"
    # Events, streams and graphs use the current device: make it the one asked for.
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        limit = limit_gpu_memory(memory_limit, device) if memory_limit and cuda else None
        try:
            variants = [run_variant(target, v, config, device, dtype, progress, memory_limit) for v in chosen]
        finally:
            if limit is not None:  # the cap is process-wide: lift it for whatever runs next in this process
                torch.cuda.set_per_process_memory_fraction(1.0, device.index or torch.cuda.current_device())
    return {
        "model": target.id,
        "family": target.family,
        "structure": target.structure,
        "weights": target.note,
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "memory_limit": limit,
        "modes": list(config.modes),
        "variants": variants,
        "speedup": speedups(variants),
        "tool_versions": tool_versions("triton"),
    }


@dataclass
class BenchRequest:
    """One benchmark as ``blrdeploy bench`` asks for it. Left as None, an option takes the command's default: the
    paper's preset and shapes, bfloat16 on a GPU and float32 on a CPU, every mode on a GPU and eager on a CPU."""

    model: str  # a built-in model name or a converted checkpoint directory
    structure: str = "blast"  # built-in models only (a checkpoint has its own)
    params_ratio: float | None = None  # built-in models: None takes the paper's preset where it has one, else 0.5
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    modes: tuple[str, ...] | None = None
    batches: tuple[int, ...] | list[int] | None = None  # prefill batch sizes
    seq: int | tuple[int, ...] | list[int] | None = None  # token models: prefill length(s)
    decode: bool = True
    decode_batches: tuple[int, ...] | list[int] | None = None  # decode batch sizes; None: (1,)
    new_tokens: int = 128
    prompt_tokens: int = 16
    memory_limit: str | int | None = None  # bytes, or a size such as "8GB" or "7.5GiB"
    only: str | None = None  # "dense" or "blr": measure one model only
    fuse_siblings: bool = True
    budget_s: float = 1.0  # per timed measurement
    seed: int = 0
    output: Path | None = None  # also write the result here, as JSON
    overwrite: bool = False  # ... replacing an existing file there


def run(request: BenchRequest, progress: OpenProgress | None = None) -> dict:
    """Checks ``request``, resolves its model, measures both variants (or ``only`` one) and returns the result, also
    written to ``request.output``. ``progress`` is opened with the run's step count once the model is resolved.
    A request that cannot run raises a one-line ValueError before anything is measured."""
    if request.output is not None:
        check_output_file(request.output, request.overwrite)  # before minutes of measuring, not after
    device = torch.device(request.device)
    dtype = request.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    limit = _checked_limit(request, device)
    config = _config(request, device)
    preset = "auto" if request.params_ratio is None else None
    ratio = 0.5 if request.params_ratio is None else request.params_ratio
    target = resolve(request.model, request.structure, preset, ratio, request.seed, device, dtype,
                     request.fuse_siblings)  # fmt: skip
    if request.seq is not None and target.family not in LLM_FAMILIES:
        raise ValueError(f"--seq is for token models; a {target.family} model's token count is fixed by its config")
    opened = progress(step_count(target, config, request.only)) if progress else contextlib.nullcontext()
    with opened as report:
        result = run_bench(target, config, device, dtype, report, limit, request.only)
    if request.output is not None:
        atomic_write_text(request.output, json.dumps(result, indent=2) + "\n")
    return result


def _checked_limit(request: BenchRequest, device: torch.device) -> int | None:
    """The memory cap in bytes (None: uncapped), once the options that do not depend on the model are checked."""
    if request.params_ratio is not None and not 0 < request.params_ratio < 1:
        raise ValueError(f"--params-ratio must be in (0, 1), got {request.params_ratio}")
    if device.type != "cuda" and any(m == "graph" for m in request.modes or ()):
        raise ValueError("--modes graph needs a CUDA GPU (CUDA graphs)")
    if request.only not in (None, "dense", "blr"):
        raise ValueError(f"--only takes dense or blr, got {request.only!r}")
    if request.memory_limit is None:
        return None
    if device.type != "cuda":
        raise ValueError("--memory-limit caps GPU memory: it needs --device cuda")
    limit = request.memory_limit
    return parse_size(limit) if isinstance(limit, str) else int(limit)


def _config(request: BenchRequest, device: torch.device) -> BenchConfig:
    """The harness settings: the request's modes and prefill shapes, or the defaults for ``device``."""
    if request.batches is not None and (not request.batches or min(request.batches) < 1):
        raise ValueError(f"--batch takes positive integers, got {request.batches!r}")
    seqs = (request.seq,) if isinstance(request.seq, int) else request.seq
    if seqs is not None and (not seqs or min(seqs) < 1):
        raise ValueError(f"--seq takes positive integers, got {request.seq!r}")
    shapes = None
    if request.batches or seqs:  # every batch at every length; a batch alone at the paper's length
        shapes = tuple((b, s) for b in (request.batches or (1,)) for s in (seqs or (None,)))
    modes = request.modes or (MODES if device.type == "cuda" else ("eager",))
    return BenchConfig(
        modes=tuple(modes), shapes=shapes, decode=request.decode, new_tokens=request.new_tokens,
        prompt_tokens=request.prompt_tokens, budget_s=request.budget_s, seed=request.seed,
        decode_batches=tuple(request.decode_batches or (1,)),
    )  # fmt: skip


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}x"
