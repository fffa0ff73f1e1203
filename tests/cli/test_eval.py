"""``blrdeploy eval``: a checkpoint made by ``convert`` beside its dense source in one table and as JSON, the three
text inputs, and every bad input as exit 2 with one ``error:`` line and nothing written (as tests/cli/test_sweep.py
checks the other commands)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blrdeploy.cli import app
from blrdeploy.models.sources import build_builtin

runner = CliRunner()
VOCAB = 128  # gpt2-tiny's; word "w<i>" is token i, "<eos>" 0


def _gpt2_dir(path: Path) -> Path:
    """gpt2-tiny as a Hugging Face directory with a word-level tokenizer built here (no hub)."""
    # deferred: transformers (and its tokenizers) take about half a second to import; only this helper needs them
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    build_builtin("gpt2-tiny", seed=5).model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return path


def _convert(src: Path, out: Path) -> Path:
    result = runner.invoke(app, ["convert", str(src), "--structure", "lowrank", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _docs(n: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(n * 1000 + length)
    return [" ".join(f"w{i}" for i in torch.randint(2, VOCAB, (length,), generator=g).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A source with a tokenizer, its converted checkpoint, one whose source is gone, one without a tokenizer, and
    the same three documents as a folder, a .jsonl and (joined) a .txt."""
    root = tmp_path_factory.mktemp("eval")
    src = _gpt2_dir(root / "gpt2")
    gone = _convert(_gpt2_dir(root / "gpt2_gone"), root / "ckpt_gone")
    shutil.rmtree(root / "gpt2_gone")
    bare = root / "bare"
    build_builtin("gpt2-tiny").model.save_pretrained(bare)
    docs = _docs(3, 200)  # 555 scored tokens: a random-weight model's argmax agrees with dense ~97.5% of the time
    (root / "docs").mkdir()
    for i, d in enumerate(docs):
        (root / "docs" / f"{i}.txt").write_text(d)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "one.txt").write_text(" ".join(docs))
    return {"root": root, "src": src, "ckpt": _convert(src, root / "ckpt"), "gone": gone, "bare": bare}


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args, "--device", "cpu"])


def test_converted_beside_dense_in_one_table_and_json(made):
    result = _eval(str(made["ckpt"]), "--data", str(made["root"] / "docs"), "--seq-len", "16")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "measure" in line)
    assert "dense" in header and "converted" in header
    for row in ("perplexity", "top-1 agreement with dense", "KL(dense || converted)", "parameters"):
        assert row in result.stdout, result.stdout

    result = _eval(str(made["ckpt"]), "--data", str(made["root"] / "docs"), "--seq-len", "16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    dense, conv = data["columns"]
    assert (dense["name"], conv["name"], data["kind"], data["windows"], data["tokens"]) == (
        "dense", "converted", "causal-lm", 37, 37 * 15,  # 3 x 200 words + 2 EOS = 602 tokens: 37 windows of 16
    )  # fmt: skip
    assert dense["model"] == str(made["src"].resolve()) and conv["params"] < dense["params"]
    assert 0 <= conv["top1_agreement"] < 1 and conv["kl"] > 0
    assert dense["perplexity"] > 1 and conv["perplexity"] > 1 and dense["top1_agreement"] is None


def test_folder_and_jsonl_of_the_same_documents_agree_and_a_txt_is_one_document(made):
    runs = {}
    for name in ("docs", "docs.jsonl", "one.txt"):
        result = _eval(str(made["src"]), "--data", str(made["root"] / name), "--seq-len", "16", "--json")
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout)
    assert runs["docs"]["documents"] == runs["docs.jsonl"]["documents"] == 3 and runs["one.txt"]["documents"] == 1
    assert runs["docs"]["columns"] == runs["docs.jsonl"]["columns"]  # identical token streams
    [dense] = runs["one.txt"]["columns"]
    assert dense["name"] == "dense" and dense["perplexity"] != runs["docs"]["columns"][0]["perplexity"]  # no EOS


def test_source_gone_is_a_note_unless_against_dense_is_asked(made):
    result = _eval(str(made["gone"]), "--data", str(made["root"] / "docs.jsonl"), "--seq-len", "16")
    assert result.exit_code == 0, result.output
    assert "not available" in result.stdout and "is gone" in result.stdout


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in root.rglob("*")}


@pytest.mark.parametrize(
    "args, message",
    [
        (["{ckpt}", "--data", "{missing}"], "no such file or folder"),
        (["{missing}", "--data", "{docs}"], "neither a built-in model"),
        (["{ckpt}", "--data", "{empty}"], "is empty"),
        (["{ckpt}", "--data", "{binary}"], "is binary"),
        (["{ckpt}", "--data", "{notext}"], 'line 1 has no "text" field'),
        (["{ckpt}", "--data", "{short}", "--seq-len", "16"], "tokenizes to 3 tokens, fewer than one window"),
        (["{bare}", "--data", "{docs}"], "carries no tokenizer"),
        (["{gone}", "--data", "{docs}", "--against", "dense"], "--against dense: the source model"),
        (["{ckpt}", "--data", "{docs}", "--dtype", "float8"], "--dtype must be one of"),
        (["{ckpt}"], "--data is needed"),
    ],
    ids=[
        "missing_data",
        "missing_model",
        "empty",
        "binary",
        "jsonl_no_text",
        "too_few",
        "no_tokenizer",
        "against_dense_source_gone",
        "bad_dtype",
        "no_data",
    ],  # fmt: skip
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(made, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # anything written by default would land here
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 8)
    (tmp_path / "notext.jsonl").write_text('{"body": "w2 w3"}\n')
    (tmp_path / "short.txt").write_text("w2 w3 w4")
    paths = {
        **{k: str(v) for k, v in made.items()},
        "missing": str(tmp_path / "missing.txt"), "docs": str(made["root"] / "docs"),
        **{k: str(tmp_path / f) for k, f in [("empty", "empty.txt"), ("binary", "binary.txt"),
                                                ("notext", "notext.jsonl"), ("short", "short.txt")]},
    }  # fmt: skip
    before = _snapshot(tmp_path), _snapshot(made["root"])

    result = _eval(*[a.format(**paths) for a in args])

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert (_snapshot(tmp_path), _snapshot(made["root"])) == before
