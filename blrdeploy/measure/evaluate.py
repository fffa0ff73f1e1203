"""``blrdeploy eval``: how much of a model's behaviour a conversion kept, measured on its outputs.

- Causal LMs: perplexity over non-overlapping windows of ``seq_len`` tokens of real text (the first token of each
  window unscored: it has no context in the window), the documents tokenized with the model's own tokenizer and
  joined with EOS; against the dense source, top-1 next-token agreement and the mean KL(dense || converted) over
  the same scored tokens.
- Encoders (a model whose output is hidden states, not next-token logits): each document cut into chunks of at
  most ``seq_len`` tokens, the last hidden state mean-pooled over each chunk's real tokens; cosine to the dense
  model's pooled vector per chunk, mean and min.
- Image and latent models (the vit and dit families): relative error and cosine of the output against dense on
  the family's seeded sample inputs.

A converted checkpoint is compared with the dense model it came from whenever that model is at hand and unchanged
(``against="auto"``); ``against="dense"`` makes a missing or changed source an error, ``against="none"`` skips
it. Every user mistake is an :class:`EvalError` (one line), raised before any model runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blrdeploy.conversion.checkpoint import BLR_CONFIG, load, read_blr_config, verify
from blrdeploy.conversion.pipeline import open_recorded_source, unique_params
from blrdeploy.models.families import BUILTIN, FAMILIES, Family
from blrdeploy.models.outputs import compare, main_output
from blrdeploy.models.sources import builtin_config, identify, is_causal_lm, open_source, read_config
from blrdeploy.models.text import (
    TextError,
    context_of,
    default_seq_len,
    load_tokenizer,
    read_text,
    token_stream,
    windows,
)

AGAINST = ("auto", "dense", "none")
DEFAULT_MAX_TOKENS = 65536
DEFAULT_BATCH = 4
# Log-softmax rows per chunk: chunk * vocab elements in float32 stay near 64 MiB (a 49k vocabulary at 2048 tokens
# in one piece would be 400 MB per copy, and the KL needs three).
_CHUNK_ELEMENTS = 1 << 24

Progress = Callable[[int, int], None]  # (done, total) units of work: windows, chunks or sample batches


class EvalError(ValueError):
    """What a user can fix: a missing or unreadable model, text or tokenizer, too little text, bad options, a
    required dense source that is gone or changed."""


@dataclass
class Column:
    """One model's numbers: ``dense`` or ``converted``. Metrics it has no value for are None."""

    name: str
    model: str | None  # the model's id or path; None when not available
    available: bool = True
    note: str | None = None  # why it is not available
    params: int | None = None
    perplexity: float | None = None
    nll: float | None = None  # mean negative log-likelihood, nats per scored token
    top1_agreement: float | None = None  # converted only: argmax equal to dense's
    kl: float | None = None  # converted only: mean KL(dense || converted), nats per scored token
    cosine_mean: float | None = None  # encoders, converted only: pooled output cosine to dense
    cosine_min: float | None = None
    relative_error: float | None = None  # image/latent, converted only: ||out - dense|| / ||dense||
    cosine: float | None = None  # image/latent, converted only
    output_rms: float | None = None  # image/latent: the output's root mean square


@dataclass
class EvalResult:
    model: str  # as given
    kind: str  # causal-lm, encoder, image, latent or samples
    family: str | None
    converted: bool
    data: str | None
    documents: int | None
    seq_len: int | None
    windows: int  # LM windows, encoder chunks, or seeded sample batches
    tokens: int  # LMs: scored tokens; encoders: tokens pooled; image/latent: 0
    batch: int
    seed: int
    device: str
    dtype: str
    columns: list[Column] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class _Spec:
    """What MODEL_OR_CHECKPOINT names, read from its config files only (no weights)."""

    arg: str
    checkpoint: Path | None  # a converted checkpoint directory
    blr_config: dict | None
    config: dict
    library: str
    class_name: str
    family: Family | None
    text_dir: Path | None  # where its tokenizer would be: the directory itself; None for a built-in


def _spec(arg: str) -> _Spec:
    path = Path(arg)
    try:
        if path.is_dir() and (path / BLR_CONFIG).exists():
            cfg = read_blr_config(path)
            src = cfg["source"]
            family = FAMILIES.get(src.get("family") or "")
            return _Spec(arg, path, cfg, read_config(path), src["library"], src["class"], family, path)
        if arg in BUILTIN:
            library, class_name, config = builtin_config(arg)
            return _Spec(arg, None, None, config, library, class_name, FAMILIES[BUILTIN[arg].family], None)
        if not path.exists():
            raise EvalError(f"{arg!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing directory")
        config = read_config(path)
        library, class_name, family = identify(config, allow_unknown=True)
    except EvalError:
        raise
    except ValueError as exc:  # CheckpointError, a config.json that is missing or not JSON
        raise EvalError(str(exc)) from None
    return _Spec(arg, None, None, config, library, class_name, family, path)


def model_kind(library: str, class_name: str, family: Family | None) -> str:
    """causal-lm (next-token logits), encoder (hidden states of token ids), or, for the families fed seeded
    samples rather than tokens, image (vit), latent (dit) or samples (another such family)."""
    if family is not None and family.sample is not None and not family.tokens:
        return {"vit": "image", "dit": "latent"}.get(family.name, "samples")
    if library != "transformers":
        raise EvalError(f"eval knows causal LMs, encoders and the vit/dit families; {class_name} is none of them")
    return "causal-lm" if is_causal_lm(class_name) else "encoder"


# ------------------------------------------------------------------------------------------------ text


def encoder_chunks(tokenizer, documents: list[str], seq_len: int, max_tokens: int) -> list[dict[str, list[int]]]:
    """Each document cut into chunks of at most ``seq_len`` tokens (the tokenizer's special tokens included), in
    order, until ``max_tokens`` tokens are taken."""
    chunks, total = [], 0
    keys = ("input_ids", "token_type_ids")
    for doc in documents:
        enc = tokenizer(doc, truncation=True, max_length=seq_len, return_overflowing_tokens=True, verbose=False)
        ids = enc["input_ids"]
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        for i, row in enumerate(rows):
            if not row or total >= max_tokens:
                continue
            chunk = {k: (enc[k][i] if rows is ids else enc[k]) for k in keys if k in enc}
            chunks.append(chunk)
            total += len(row)
        if total >= max_tokens:
            break
    return chunks


# ------------------------------------------------------------------------------------------------ scoring


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32: log-softmax of a bfloat16 row over 49k entries loses the small probabilities."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def score_lm_batch(logits: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor | None, sums: dict) -> None:
    """Adds a batch of windows' scores to ``sums``: position t's logits predict token t+1, so each window's first
    token is never a target. ``ref`` (the dense logits, same shape) adds dense NLL, agreement and KL."""
    vocab = logits.shape[-1]
    flat = logits[:, :-1].reshape(-1, vocab)
    ref_flat = None if ref is None else ref[:, :-1].reshape(-1, vocab)
    targets = ids[:, 1:].reshape(-1, 1).to(logits.device)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    for s in range(0, flat.shape[0], rows):
        lp = F.log_softmax(_wide(flat[s : s + rows]), dim=-1)
        t = targets[s : s + rows]
        _add(sums, "nll", -lp.gather(1, t).sum())
        if ref_flat is not None:
            lr = F.log_softmax(_wide(ref_flat[s : s + rows]), dim=-1)
            _add(sums, "nll_ref", -lr.gather(1, t).sum())
            _add(sums, "agree", (lp.argmax(-1) == lr.argmax(-1)).sum())
            _add(sums, "kl", (lr.exp() * (lr - lp)).sum())
    sums["count"] = sums.get("count", 0) + flat.shape[0]


def _add(sums: dict, key: str, value: torch.Tensor) -> None:
    value = value.double()
    sums[key] = sums[key] + value if key in sums else value


def _lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return main_output(model(input_ids=ids, use_cache=False))


def score_lm(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict:
    """Perplexity of ``model`` over ``windows`` (and, with ``reference``, the dense model's, top-1 agreement and
    mean KL(reference || model)), as ``{"tokens", "nll", "perplexity", "ref_nll", "ref_perplexity",
    "top1_agreement", "kl"}``."""
    device = next(model.parameters()).device
    sums: dict = {}
    if progress is not None:
        progress(0, windows.shape[0])
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch].to(device)
            logits = _lm_logits(model, ids)
            ref = None if reference is None else _lm_logits(reference, ids).to(logits.device)
            score_lm_batch(logits, ids, ref, sums)
            del logits, ref
            if progress is not None:
                progress(min(start + batch, windows.shape[0]), windows.shape[0])
    count = sums["count"]
    out = {"tokens": count, "nll": float(sums["nll"]) / count}
    out["perplexity"] = _exp(out["nll"])
    if reference is not None:
        out["ref_nll"] = float(sums["nll_ref"]) / count
        out["ref_perplexity"] = _exp(out["ref_nll"])
        out["top1_agreement"] = float(sums["agree"]) / count
        out["kl"] = float(sums["kl"]) / count
    return out


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _pooled(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The last hidden state mean-pooled over the attention mask, float64, (batch, hidden)."""
    out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1]
    mask = inputs["attention_mask"].unsqueeze(-1).to(torch.float64)
    return (hidden.double() * mask).sum(1) / mask.sum(1).clamp_min(1)


def score_encoder(
    model: nn.Module,
    chunks: list[dict[str, list[int]]],
    reference: nn.Module | None = None,
    batch: int = DEFAULT_BATCH,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Per chunk, the cosine between ``model``'s and ``reference``'s pooled outputs: ``{"chunks", "tokens",
    "cosine_mean", "cosine_min"}`` (cosines None without a reference)."""
    device = next(model.parameters()).device
    cosines, tokens = [], 0
    if progress is not None:
        progress(0, len(chunks))
    with torch.inference_mode():
        for start in range(0, len(chunks), batch):
            group = chunks[start : start + batch]
            inputs = _padded(group, pad_id, device)
            tokens += int(inputs["attention_mask"].sum())
            pooled = _pooled(model, inputs)
            if reference is not None:
                ref = _pooled(reference, inputs).to(pooled.device)
                cosines += F.cosine_similarity(pooled, ref, dim=-1).tolist()
            if progress is not None:
                progress(min(start + batch, len(chunks)), len(chunks))
    return {
        "chunks": len(chunks),
        "tokens": tokens,
        "cosine_mean": sum(cosines) / len(cosines) if cosines else None,
        "cosine_min": min(cosines) if cosines else None,
    }


def _padded(group: list[dict[str, list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(c["input_ids"]) for c in group)
    out = {"input_ids": torch.full((len(group), width), pad_id, dtype=torch.long)}
    out["attention_mask"] = torch.zeros((len(group), width), dtype=torch.long)
    if all("token_type_ids" in c for c in group):
        out["token_type_ids"] = torch.zeros((len(group), width), dtype=torch.long)
    for i, c in enumerate(group):
        n = len(c["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(c["input_ids"])
        out["attention_mask"][i, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.tensor(c["token_type_ids"])
    return {k: v.to(device) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ the job


def _check_options(against: str, seq_len: int | None, max_tokens: int, batch: int) -> None:
    if against not in AGAINST:
        raise EvalError(f"--against must be one of {', '.join(AGAINST)}, got {against!r}")
    if seq_len is not None and seq_len < 2:
        raise EvalError(f"--seq-len must be at least 2 (a window's first token is not scored), got {seq_len}")
    if max_tokens < 1:
        raise EvalError(f"--max-tokens must be at least 1, got {max_tokens}")
    if batch < 1:
        raise EvalError(f"--batch must be at least 1, got {batch}")


def _seq_len(spec: _Spec, tokenizer, seq_len: int | None) -> int:
    context = context_of(spec.config)
    if seq_len is not None:
        if context is not None and seq_len > context:
            raise EvalError(f"--seq-len {seq_len} exceeds {spec.arg}'s context of {context} positions")
        return seq_len
    limits = [default_seq_len(spec.config)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 2 <= tok_max < 10**8:  # transformers' "no limit" is a huge int
        limits.append(tok_max)
    return min(limits)


def _open_dense_source(spec: _Spec, against: str, dtype: torch.dtype, device: str) -> tuple[nn.Module | None, str]:
    """(the dense model the checkpoint came from, its id), or (None, why it is not in the comparison)."""
    if against == "none":
        return None, "not evaluated (--against none)"
    seed = (spec.blr_config.get("conversion") or {}).get("seed", 0)
    try:
        source, _ = open_recorded_source(spec.blr_config["source"], seed=seed, dtype=dtype)
    except ValueError as exc:
        if against == "dense":
            raise EvalError(f"--against dense: {exc}") from None
        return None, f"not available: {exc}"
    return source.model.to(device).eval(), source.id


def _check_vocab(ids: list[int], config: dict, where: Path) -> None:
    vocab = config.get("vocab_size")
    top = max(ids, default=0)
    if isinstance(vocab, int) and top >= vocab:
        raise EvalError(f"the tokenizer in {where} yields token id {top}, beyond the model's vocabulary of {vocab}")


@dataclass
class _Text:
    """The text side of a run, all of it checked before a model is loaded."""

    tokenizer: object
    documents: list[str]
    seq_len: int
    work: torch.Tensor | list  # LM windows (windows, seq_len), or encoder chunks


def _prepare_text(spec: _Spec, kind: str, data, seq_len: int | None, max_tokens: int) -> _Text:
    what = "a causal LM" if kind == "causal-lm" else "an encoder"
    if data is None:
        raise EvalError(
            f"--data is needed: {spec.arg} is {what}, evaluated on text (.txt, a folder of .txt, or .jsonl with "
            'a "text" field)'
        )
    try:
        tokenizer = load_tokenizer(spec.text_dir, f"eval of {what}")
        documents = read_text(data).documents
    except TextError as exc:
        raise EvalError(str(exc)) from None
    seq_len = _seq_len(spec, tokenizer, seq_len)
    if max_tokens < seq_len:
        raise EvalError(f"--max-tokens {max_tokens} is less than one window of --seq-len {seq_len}")
    if kind == "causal-lm":
        ids = token_stream(tokenizer, documents, limit=max_tokens)
        if len(ids) < seq_len:
            raise EvalError(
                f"{data} tokenizes to {len(ids)} tokens, fewer than one window of --seq-len {seq_len}: give more "
                "text or a smaller --seq-len"
            )
        _check_vocab(ids, spec.config, spec.text_dir)
        return _Text(tokenizer, documents, seq_len, windows(ids, seq_len, max_tokens))
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if seq_len <= specials:
        raise EvalError(f"--seq-len {seq_len} leaves no room beside the tokenizer's {specials} special tokens")
    chunks = encoder_chunks(tokenizer, documents, seq_len, max_tokens)
    if not chunks:
        raise EvalError(f"{data} tokenizes to no tokens")
    _check_vocab([i for c in chunks for i in c["input_ids"]], spec.config, spec.text_dir)
    return _Text(tokenizer, documents, seq_len, chunks)


def _open_models(spec: _Spec, against: str, device: str, dtype: torch.dtype | None):
    """(the model evaluated, the dense model or None, the dense model's id or why it is not there)."""
    try:
        if spec.checkpoint is None:
            return open_source(spec.arg, device=device, dtype=dtype, allow_unknown=True).model, None, None
        verify(spec.checkpoint)  # the weights are the ones written: a quality number of a corrupt file misleads
        model = load(spec.checkpoint, device=device, dtype=dtype)
        dense, about = _open_dense_source(spec, against, next(model.parameters()).dtype, device)
        return model, dense, about
    except EvalError:
        raise
    except ValueError as exc:  # CheckpointError, a source that cannot be opened
        raise EvalError(str(exc)) from None


def evaluate(
    model: str,
    data: str | Path | None = None,
    *,
    against: str = "auto",
    seq_len: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Evaluate ``model`` (a converted checkpoint directory, a Hugging Face directory or a built-in name) on the
    text in ``data`` (causal LMs and encoders) or on seeded samples (image and latent models), beside the dense
    model a checkpoint came from; see the module's docstring. ``dtype`` None: the model's own."""
    t0 = time.perf_counter()
    _check_options(against, seq_len, max_tokens, batch)
    spec = _spec(model)
    kind = model_kind(spec.library, spec.class_name, spec.family)
    if spec.checkpoint is None and against == "dense":
        raise EvalError(
            f"{model} is a dense model: --against dense compares a converted checkpoint with the model it came from"
        )
    text = _prepare_text(spec, kind, data, seq_len, max_tokens) if kind in ("causal-lm", "encoder") else None
    evaluated, dense, dense_about = _open_models(spec, against, device, dtype)
    evaluated.eval()

    result = EvalResult(
        model=model, kind=kind, family=spec.family.name if spec.family else None,
        converted=spec.checkpoint is not None, data=None if text is None else str(data),
        documents=None if text is None else len(text.documents), seq_len=None if text is None else text.seq_len,
        windows=0, tokens=0, batch=batch, seed=seed, device=str(device),
        dtype=str(next(evaluated.parameters()).dtype).removeprefix("torch."),
    )  # fmt: skip
    if text is None and data is not None:
        result.notes.append(f"--data is not used: {kind} models are measured on the family's seeded sample inputs")
    own = Column("converted" if result.converted else "dense", model, params=unique_params(evaluated)[0])
    ref_col = None
    if result.converted:
        if dense is None:
            ref_col = Column("dense", None, available=False, note=dense_about)
        else:
            ref_col = Column("dense", dense_about, params=unique_params(dense)[0])
        result.columns.append(ref_col)
    result.columns.append(own)

    if kind == "causal-lm":
        scores = score_lm(evaluated, text.work, dense, batch, progress)
        result.windows, result.tokens = text.work.shape[0], scores["tokens"]
        own.nll, own.perplexity = scores["nll"], scores["perplexity"]
        if dense is not None:
            ref_col.nll, ref_col.perplexity = scores["ref_nll"], scores["ref_perplexity"]
            own.top1_agreement, own.kl = scores["top1_agreement"], scores["kl"]
    elif kind == "encoder":
        pad = text.tokenizer.pad_token_id if text.tokenizer.pad_token_id is not None else 0
        scores = score_encoder(evaluated, text.work, dense, batch, pad, progress)
        result.windows, result.tokens = scores["chunks"], scores["tokens"]
        own.cosine_mean, own.cosine_min = scores["cosine_mean"], scores["cosine_min"]
    else:
        _score_samples(spec.family, evaluated, dense, batch, seed, own, ref_col, progress)
        result.windows = 1
    result.seconds = time.perf_counter() - t0
    return result


def _score_samples(family, model, dense, batch, seed, own: Column, ref_col: Column | None, progress) -> None:
    """Image/latent models: one batch of the family's seeded samples through both models."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in family.sample(model, batch, seed).items()}
    with torch.inference_mode():
        out = main_output(model(**inputs)).double().cpu()
        own.output_rms = float(out.pow(2).mean().sqrt())
        if dense is not None:
            ref = main_output(dense(**inputs)).double().cpu()
            ref_col.output_rms = float(ref.pow(2).mean().sqrt())
            check = compare("output", out, ref, None)
            own.relative_error, own.cosine = check.relative_error, check.cosine_similarity
    if progress is not None:
        progress(1, 1)


# ------------------------------------------------------------------------------------------------ verdicts

# Past these a converted model is said to be far from dense: perplexity twice dense's is the issue-21 target for a
# calibrated 0.8 conversion; an encoder's pooled cosine below 0.97 and an image or latent model's output error above
# 10% change what a user downstream sees.
PERPLEXITY_RATIO_WARN = 2.0
COSINE_WARN = 0.97
RELATIVE_ERROR_WARN = 0.1


def quality_warning(result: EvalResult) -> str | None:
    """The warning for a converted model far from its dense source on the evaluated data; None when it is close
    (or there is nothing to compare)."""
    dense, conv = result.column("dense"), result.column("converted")
    if conv is None or not conv.available:
        return None
    if result.kind == "causal-lm" and dense is not None and dense.available and dense.perplexity and conv.perplexity:
        ratio = conv.perplexity / dense.perplexity
        if ratio > PERPLEXITY_RATIO_WARN:
            return (
                f"perplexity {conv.perplexity:,.1f} is {ratio:,.1f}x dense's {dense.perplexity:,.2f} on the held-out "
                "text"
            )
    if result.kind == "encoder" and conv.cosine_mean is not None and conv.cosine_mean < COSINE_WARN:
        return f"pooled outputs' cosine to dense is {conv.cosine_mean:.3f} on the held-out text (below {COSINE_WARN})"
    if conv.relative_error is not None and conv.relative_error > RELATIVE_ERROR_WARN:
        return f"outputs differ from dense by {conv.relative_error:.1%} (relative error) on seeded samples"
    return None


def quality_line(result: dict) -> str:
    """One line of an :class:`EvalResult` (as its dict): the converted model's numbers beside dense's."""
    cols = {c["name"]: c for c in result["columns"]}
    dense, conv = cols.get("dense") or {}, cols.get("converted") or {}
    if result["kind"] == "causal-lm":
        line = f"held-out text, {result['tokens']:,} tokens: perplexity {conv.get('perplexity') or float('nan'):,.2f}"
        if dense.get("perplexity"):
            line += f" (dense {dense['perplexity']:,.2f}), top-1 agreement {conv.get('top1_agreement') or 0:.3f}"
            line += f", KL {conv.get('kl') or 0:.3f} nats/token"
        return line
    if result["kind"] == "encoder":
        cosine = _number(conv, "cosine_mean", ".4f")
        return f"held-out text, {result['tokens']:,} tokens: pooled cosine to dense mean {cosine}"
    return f"seeded samples: relative error to dense {_number(conv, 'relative_error', '.4e')}"


def _number(column: dict, key: str, spec: str) -> str:
    value = column.get(key)
    return "not measured" if value is None else format(value, spec)
