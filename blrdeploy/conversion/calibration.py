"""Calibration for ``convert --calibration``: the converted layers' input Gram matrices XᵀX on real text.

The dense model runs once over the calibration windows; forward pre-hooks on the layers to be converted add each
batch's XᵀX into a running sum (streamed: no activation is kept past its batch), on the model's device. Layers that
read one input tensor (q/k/v, gate/up) share one Gram, found as it happens: a layer called with the very tensor the
previous hooked layer was called with joins that layer's group, so each input is multiplied once. The fits
(``structures.factorize``, ``gram=``) then minimize each layer's output error on these inputs.

The text is read, tokenized with the source checkpoint's own tokenizer and cut into non-overlapping windows of the
token stream (documents joined by the end-of-sequence token) by ``models.text``, as ``eval`` reads it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blrdeploy.models.text import Text, TextError, default_seq_len, load_tokenizer, read_text, token_stream, windows
from blrdeploy.structures.factorize import DEFAULT_DAMPING

DEFAULT_TOKENS = 32768
BATCH_TOKENS = 8192  # tokens per forward: windows are batched up to this many
TEXT_SUFFIXES = (".txt", ".jsonl")

GramProgress = Callable[[int, int], None]  # (tokens done, tokens in all)


# ------------------------------------------------------------------------------------------------ the text


def read_option_text(path: str | Path, option: str):
    """The text at ``path`` (models.text); a TextError names the option that gave the path."""
    try:
        return read_text(path)
    except TextError as exc:
        raise TextError(f"{option}: {exc}") from None


def calibration_windows(
    model_dir: str | Path | None,
    config,
    path: str | Path,
    seq_len: int | None,
    tokens: int,
    option: str = "--calibration",
    tokens_option: str = "--calibration-tokens",
):
    """(text, (windows, seq_len) token ids) for ``convert --calibration`` (and ``heal --data``, whose options the
    errors then name): the text at ``path`` (models.text), tokenized with the model's own tokenizer, as many
    non-overlapping windows of ``seq_len`` (default: the model's context, at most MAX_SEQ_LEN) as fit in
    ``tokens``. Every check is made here, before the model loads."""
    text = read_option_text(path, option)
    tokenizer = load_tokenizer(model_dir, option)
    seq_len = seq_len or default_seq_len(config)
    if tokens < seq_len:
        raise TextError(f"{tokens_option} {tokens} is less than one window of --seq-len {seq_len}")
    ids = token_stream(tokenizer, text.documents, limit=tokens)
    if len(ids) < seq_len:
        raise TextError(f"{option} text {path} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return text, windows(ids, seq_len, tokens)


# ------------------------------------------------------------------------------------------------ the Grams


@dataclass
class Grams:
    """Sum of XᵀX per group of layers that read one input, and the rows (tokens) it holds. ``gram(name)`` or
    ``grams[name]`` is a layer's mean XᵀX/rows (the fits are scale-free; the mean keeps magnitudes readable)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # group leader -> sum of XᵀX
    rows: dict[str, int] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)  # layer -> its group's leader (the first layer called)
    updates: dict[str, int] = field(default_factory=dict)  # group leader -> XᵀX products added
    tokens: int = 0

    def gram(self, name: str) -> torch.Tensor:
        leader = self.group_of[name]
        return self.sums[leader] / max(1, self.rows[leader])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.gram(name)

    def __contains__(self, name: object) -> bool:
        return name in self.group_of

    def groups(self) -> list[list[str]]:
        members: dict[str, list[str]] = {}
        for name, leader in self.group_of.items():
            members.setdefault(leader, []).append(name)
        return list(members.values())

    def release(self, name: str) -> None:
        """Drops a layer; its group's Gram is freed with its last member."""
        leader = self.group_of.pop(name, None)
        if leader is not None and leader not in self.group_of.values():
            self.sums.pop(leader, None)


class _Collector:
    """The forward pre-hooks: each adds its input's XᵀX to its group, once per input tensor."""

    def __init__(self, grams: Grams, dtype: torch.dtype) -> None:
        self.grams, self.dtype = grams, dtype
        self.last: tuple[torch.Tensor, str] | None = None  # the last hooked input and the group it went to

    def hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            grams = self.grams
            if self.last is not None and x is self.last[0]:
                # The same tensor object as the previous hooked layer's input: q/k/v, gate/up. Join its group.
                leader = grams.group_of.setdefault(name, self.last[1])
                if leader == self.last[1] and leader != name:
                    return
            leader = grams.group_of.setdefault(name, name)
            if leader != name:
                raise ValueError(f"layer {name} shared its input with {leader} in one batch but not in another")
            flat = x.detach().reshape(-1, x.shape[-1])
            gram = flat.T.float() @ flat.float()  # float32 products, summed in the accumulator's dtype
            if name in grams.sums:
                grams.sums[name] += gram.to(self.dtype)
            else:
                grams.sums[name] = gram.to(self.dtype)
            grams.rows[name] = grams.rows.get(name, 0) + flat.shape[0]
            grams.updates[name] = grams.updates.get(name, 0) + 1
            self.last = (x, name)

        return pre_hook


def forward_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` where the model's forward takes it: calibration passes keep no KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def collect_grams(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    progress: GramProgress | None = None,
    total_tokens: int | None = None,
) -> Grams:
    """Runs ``model`` on each batch (token ids (batch, seq), or a dict of forward keyword arguments) with
    forward pre-hooks on ``layer_names`` and returns their input Grams. Runs where the model is; the sums are
    float64 on the CPU and float32 on a GPU (a Llama-7B's 128 Grams take 22 GB in float32)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    grams = Grams()
    collector = _Collector(grams, torch.float64 if device.type == "cpu" else torch.float32)
    names = list(layer_names)
    handles = [model.get_submodule(n).register_forward_pre_hook(collector.hook(n)) for n in names]
    extra = forward_kwargs(model)
    done = 0
    try:
        with torch.no_grad():
            for batch in batches:
                kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                collector.last = None
                model(**kwargs, **extra)
                collector.last = None  # do not keep the batch's last activation alive
                ids = kwargs.get("input_ids")
                done += ids.numel() if isinstance(ids, torch.Tensor) else 0
                if progress is not None:
                    progress(done, total_tokens or done)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in grams.group_of]
    if missing:
        raise ValueError(f"calibration never reached layer {missing[0]}: the model's forward does not call it")
    grams.tokens = done
    return grams


def batched(windows: torch.Tensor, batch_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """The windows in batches of at most ``batch_tokens`` tokens (at least one window each)."""
    per = max(1, batch_tokens // windows.shape[1])
    return list(windows.split(per))


# ------------------------------------------------------------------------------------------------ the record


def calibration_record(
    text: Text,
    windows: torch.Tensor,
    damping: float,
    layers: list[dict],
    groups: list[list[str]],
    sequential: bool = False,
) -> dict:
    """blr_config.json's "calibration": what the fit saw (the text's files and sha256, tokens, windows) and each
    layer's calibration output error next to its weight error. ``sequential``: the layers were fitted block by
    block on the converted model's inputs, and each output error is against the dense model's output there."""
    return {
        "path": text.path,
        "files": text.files,
        "tokens": int(windows.numel()),
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "damping": damping,
        "sequential": sequential,
        "shared_inputs": [g for g in groups if len(g) > 1],
        "layers": layers,
    }


@dataclass
class CalibrationOptions:
    """``convert --calibration PATH``: the text, how many tokens of it, the window, and the fit's damping."""

    path: Path
    tokens: int = DEFAULT_TOKENS
    seq_len: int | None = None  # None: the model's context, at most MAX_SEQ_LEN
    damping: float = DEFAULT_DAMPING
    sequential: bool = False  # fit block by block on the converted model's own inputs (conversion.sequential)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.tokens < 1:
            raise ValueError(f"--calibration-tokens must be at least 1, got {self.tokens}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq-len must be at least 1, got {self.seq_len}")
        if not self.damping >= 0:
            raise ValueError(f"--damping must be >= 0, got {self.damping}")
