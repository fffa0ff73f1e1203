"""Real text for a model: reading it, the model's own tokenizer, and the token windows a causal LM is fed.

One place for what ``convert --calibration`` and ``eval`` both read, so both accept the same files and refuse the
same mistakes. Text comes from a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, in its
``"text"`` field) or a folder of them (every ``.txt`` and ``.jsonl`` under it, in path order). Documents stay
separate, so text can be split by document; blank ones are dropped. Each file's sha256 is kept, for the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from blrdeploy.files import file_sha256

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")  # a directory with either carries a tokenizer
MAX_SEQ_LEN = 2048  # the default window: the model's context, capped here (the published LLaMA numbers use 2048)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


class TextError(ValueError):
    """Text or a tokenizer that cannot be used: a missing path, no text, binary or non-UTF-8 bytes, a malformed
    .jsonl line, a model directory without a tokenizer, too few tokens."""


@dataclass
class Text:
    documents: list[str]
    files: dict[str, str]  # file (relative to the folder given, or its name) -> sha256
    path: str


def read_text(path: str | Path) -> Text:
    """The documents under ``path`` (see the module's docstring), each non-blank, in a stable order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise TextError(f"{path} holds no .txt or .jsonl files")
        names = [f.relative_to(path).as_posix() for f in files]
    elif path.is_file():
        files, names = [path], [path.name]
    else:
        raise TextError(f"no such file or folder: {path}")
    documents = [doc for f in files for doc in _documents(f) if doc.strip()]
    if not documents:
        raise TextError(f"{path} is empty: it holds no text")
    return Text(documents, {n: file_sha256(f) for n, f in zip(names, files, strict=True)}, str(path))


def _decode(path: Path) -> str:
    """A file's text as UTF-8 (a byte-order mark dropped); a NUL byte or invalid UTF-8 is a TextError."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise TextError(f"{path} is binary (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _documents(path: Path) -> list[str]:
    text = _decode(path)
    if path.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextError(f"{path} line {number} is not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise TextError(f'{path} line {number} has no "text" field')
        if not isinstance(record["text"], str):
            raise TextError(f'{path} line {number}: "text" is {type(record["text"]).__name__}, not a string')
        documents.append(record["text"])
    return documents


# ------------------------------------------------------------------------------------------------ tokens


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS)


def load_tokenizer(directory: str | Path | None, needed_for: str):
    """The tokenizer a model directory carries (never downloaded). ``needed_for`` says why, in the error when the
    directory is a built-in model (None) or carries none."""
    if directory is None:
        raise TextError(f"{needed_for} needs the model's own tokenizer; built-in models have seeded weights and none")
    if not has_tokenizer(directory):
        raise TextError(f"{needed_for} needs the model's own tokenizer; {directory} carries no tokenizer")
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import; only text needs it

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise TextError(f"cannot read the tokenizer in {directory}: {str(exc).strip().splitlines()[0]}") from None


def token_stream(tokenizer, documents: list[str], limit: int | None = None) -> list[int]:
    """The documents' tokens (no special tokens added) joined with the tokenizer's EOS (or, without one, nothing
    between them); tokenizing stops once ``limit`` tokens are at hand."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    step = 64  # documents per tokenizer call: batched, yet no more tokenized than the limit needs
    for start in range(0, len(documents), step):
        for doc in tokenizer(documents[start : start + step], add_special_tokens=False, verbose=False)["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def windows(ids: list[int], seq_len: int, max_tokens: int) -> torch.Tensor:
    """(windows, seq_len) non-overlapping windows from the start of ``ids``, at most ``max_tokens`` tokens."""
    count = min(len(ids), max_tokens) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def context_of(config) -> int | None:
    """A model's context in positions, from its config (object or config.json dict); None when it names none."""
    config = getattr(config, "config", config)
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(config) -> int:
    """The window calibration and eval use unless told: the model's context, at most MAX_SEQ_LEN."""
    return min(context_of(config) or MAX_SEQ_LEN, MAX_SEQ_LEN)
