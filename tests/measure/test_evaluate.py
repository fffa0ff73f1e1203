"""blrdeploy.measure.evaluate and .text: perplexity, agreement and KL against hand computations in float64, the
encoder and image paths, the text readers and their one-line errors. Tiny models with random weights and word-level
tokenizers built here; no network."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from blrdeploy.conversion.convert import ConvertConfig
from blrdeploy.conversion.pipeline import run_convert
from blrdeploy.measure import evaluate as ev
from blrdeploy.models.sources import build_builtin
from blrdeploy.models.text import TextError, read_text

VOCAB = 128  # gpt2-tiny's; word "w<i>" is token i, "<eos>" 0, "<unk>" 1


def _word_tokenizer(**special):
    # deferred: transformers (and its tokenizers) take about half a second to import; only these tests need them
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def _gpt2_dir(path, seed=5):
    """gpt2-tiny as a Hugging Face directory with a word-level tokenizer (EOS = token 0)."""
    build_builtin("gpt2-tiny", seed=seed).model.save_pretrained(path)
    _word_tokenizer(eos_token="<eos>").save_pretrained(path)
    return path


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def _doc_ids(gen, lengths):
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _hand_nll(model, windows):
    """Sum of -log p(token t+1 | tokens <= t) over every window, and the count: one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            total += float(F.cross_entropy(logits[:-1].double(), w[1:], reduction="sum"))
            count += len(w) - 1
    return total, count


# ------------------------------------------------------------------------------------------------ scoring


def test_perplexity_equals_hand_computed_nll_float64(gen, monkeypatch):
    model = build_builtin("gpt2-tiny", dtype=torch.float64, seed=1).model
    windows = torch.randint(0, VOCAB, (5, 17), generator=gen)  # odd count and length: batches of 2 leave one over
    total, count = _hand_nll(model, windows)
    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", 3 * VOCAB)  # several log-softmax chunks per batch
    scores = ev.score_lm(model, windows, batch=2)
    assert scores["tokens"] == count == 5 * 16  # each window's first token unscored
    assert scores["nll"] == pytest.approx(total / count, rel=1e-12)
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-12)
    assert 10 < scores["perplexity"] < 10 * VOCAB  # random weights: near the vocabulary size, never degenerate


def test_dense_against_itself_agrees_fully_with_zero_kl(gen):
    model = build_builtin("gpt2-tiny", dtype=torch.float64, seed=2).model
    windows = torch.randint(0, VOCAB, (3, 12), generator=gen)
    scores = ev.score_lm(model, windows, reference=model, batch=2)
    assert scores["top1_agreement"] == 1.0
    assert scores["kl"] == 0.0
    assert scores["ref_perplexity"] == scores["perplexity"]


def test_agreement_and_kl_against_a_perturbed_model_match_hand_computation(gen, monkeypatch):
    dense = build_builtin("gpt2-tiny", dtype=torch.float64, seed=3).model
    other = build_builtin("gpt2-tiny", dtype=torch.float64, seed=3).model
    with torch.no_grad():
        for p in other.transformer.h[0].mlp.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    windows = torch.randint(0, VOCAB, (4, 10), generator=gen)
    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", 5 * VOCAB)
    scores = ev.score_lm(other, windows, reference=dense, batch=3)
    with torch.no_grad():
        lp = F.log_softmax(other(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, VOCAB)
        lr = F.log_softmax(dense(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, VOCAB)
    kl = float((lr.exp() * (lr - lp)).sum(-1).mean())
    agree = float((lp.argmax(-1) == lr.argmax(-1)).double().mean())
    assert scores["kl"] == pytest.approx(kl, rel=1e-10) and scores["kl"] > 1e-4
    assert scores["top1_agreement"] == pytest.approx(agree) and scores["top1_agreement"] < 1
    assert scores["ref_nll"] == pytest.approx(_hand_nll(dense, windows)[0] / 36, rel=1e-12)


def test_encoder_pooling_ignores_padding(gen):
    from transformers import BertConfig, BertModel  # deferred: transformers is slow to import

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=VOCAB)).eval()  # fmt: skip
    short = {"input_ids": torch.randint(2, VOCAB, (5,), generator=gen).tolist()}
    long = {"input_ids": torch.randint(2, VOCAB, (11,), generator=gen).tolist()}
    alone = ev._pooled(model, ev._padded([short], 0, "cpu"))
    padded = ev._pooled(model, ev._padded([long, short], 0, "cpu"))
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-5, atol=1e-6)  # 6 pad tokens changed nothing
    scores = ev.score_encoder(model, [short, long], reference=model, batch=1)
    assert scores["cosine_mean"] == pytest.approx(1.0) and scores["chunks"] == 2 and scores["tokens"] == 16


def test_encoder_chunks_carry_the_special_tokens_and_stop_at_max_tokens(tmp_path):
    from transformers import BertTokenizerFast  # deferred: transformers is slow to import

    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *[f"w{i}" for i in range(4, 20)]])
    )
    tokenizer = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    docs = ["w4 w5 w6 w7 w8", "w9 w10"]
    chunks = ev.encoder_chunks(tokenizer, docs, seq_len=4, max_tokens=100)
    assert [c["input_ids"] for c in chunks] == [[2, 4, 5, 3], [2, 6, 7, 3], [2, 8, 3], [2, 9, 10, 3]]
    assert len(ev.encoder_chunks(tokenizer, docs, seq_len=4, max_tokens=8)) == 2


# ------------------------------------------------------------------------------------------------ evaluate()


def test_evaluate_dense_directory_matches_hand_computed_windows(tmp_path, gen):
    src = _gpt2_dir(tmp_path / "gpt2")
    docs = _doc_ids(gen, (30, 1, 25))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": _words(d)}) + "\n" for d in docs))
    ids = docs[0] + [0] + docs[1] + [0] + docs[2]  # joined with EOS (token 0): 58 tokens
    res = ev.evaluate(str(src), tmp_path / "text.jsonl", seq_len=16, max_tokens=50, batch=2, dtype=torch.float64)
    windows = torch.tensor(ids[:48]).view(3, 16)  # --max-tokens 50: three whole windows
    total, count = _hand_nll(build_builtin("gpt2-tiny", seed=5).model.double(), windows)  # as saved, then float64
    assert (res.kind, res.converted, res.documents, res.windows, res.tokens) == ("causal-lm", False, 3, 3, count)
    [dense] = res.columns
    assert dense.name == "dense" and dense.perplexity == pytest.approx(math.exp(total / count), rel=1e-10)
    assert dense.top1_agreement is None and dense.params > 0 and res.dtype == "float64"


def test_evaluate_converted_lm_against_its_source_and_without_it(tmp_path):
    src = _gpt2_dir(tmp_path / "gpt2")
    ckpt = tmp_path / "ckpt"
    run_convert(str(src), ckpt, ConvertConfig(structure="lowrank", params_ratio=0.5))
    # A random-weight model's argmax hardly depends on its block linears (agreement about 0.975 even at ratio 0.1):
    # 558 scored tokens make "all agree" a one-in-a-million event.
    (tmp_path / "t.txt").write_text(_words(_doc_ids(torch.Generator().manual_seed(0), (600,))[0]))
    res = ev.evaluate(str(ckpt), tmp_path / "t.txt", seq_len=32)
    dense, conv = res.columns
    assert (dense.name, conv.name, dense.available, res.windows, res.tokens) == ("dense", "converted", True, 18, 558)
    assert 0 <= conv.top1_agreement < 1 and conv.kl > 0 and conv.perplexity != dense.perplexity
    assert conv.params < dense.params

    (src / "model.safetensors").write_bytes(b"changed")  # the source is no longer the model converted
    res = ev.evaluate(str(ckpt), tmp_path / "t.txt", seq_len=32)
    dense, conv = res.columns
    assert not dense.available and "changed since it was converted" in dense.note and conv.top1_agreement is None
    with pytest.raises(ev.EvalError, match="^--against dense: the source model .* changed since it was converted"):
        ev.evaluate(str(ckpt), tmp_path / "t.txt", seq_len=32, against="dense")
    res = ev.evaluate(str(ckpt), tmp_path / "t.txt", seq_len=32, against="none")
    assert res.columns[0].note == "not evaluated (--against none)"


def test_evaluate_converted_encoder_cosine(tmp_path, gen):
    from transformers import BertConfig, BertModel  # deferred: transformers is slow to import

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                         vocab_size=VOCAB)).save_pretrained(tmp_path / "bert")  # fmt: skip
    _word_tokenizer(pad_token="<eos>").save_pretrained(tmp_path / "bert")
    cfg = ConvertConfig(structure="lowrank", params_ratio=0.3, include=("*.intermediate.dense",))
    run_convert(str(tmp_path / "bert"), tmp_path / "ckpt", cfg)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(_doc_ids(gen, (40, 7, 19))):
        (folder / f"{i}.txt").write_text(_words(d))
    res = ev.evaluate(str(tmp_path / "ckpt"), folder, seq_len=16, batch=2)
    dense, conv = res.columns
    assert res.kind == "encoder" and res.windows == 3 + 1 + 2 and res.tokens == 66  # chunks of <= 16 per document
    assert -1 <= conv.cosine_min <= conv.cosine_mean < 1 and dense.available


def test_evaluate_image_model_needs_no_text(tmp_path):
    run_convert("vit-tiny", tmp_path / "vit", ConvertConfig(structure="lowrank", params_ratio=0.5))
    res = ev.evaluate(str(tmp_path / "vit"), batch=2, seed=3)
    dense, conv = res.columns
    assert res.kind == "image" and dense.model == "vit-tiny"
    assert 0 < conv.relative_error < 10 and conv.cosine < 1 and conv.output_rms > 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("builtin", "built-in models have seeded weights and none"),
        ("no_tokenizer", "carries no tokenizer"),
        ("no_data", "--data is needed"),
        ("too_few", "tokenizes to 9 tokens, fewer than one window of --seq-len 16"),
        ("max_tokens", "--max-tokens 8 is less than one window of --seq-len 16"),
        ("seq_len", "--seq-len 65 exceeds"),
        ("dense_against_dense", "is a dense model: --against dense compares a converted checkpoint"),
        ("against", "--against must be one of auto, dense, none"),
    ],
)
def test_user_errors_are_eval_errors(tmp_path, case, message):
    src = _gpt2_dir(tmp_path / "gpt2")
    (tmp_path / "t.txt").write_text("w2 w3 w4 w5 w6 w7 w8 w9 w10")
    bare = tmp_path / "bare"
    build_builtin("gpt2-tiny").model.save_pretrained(bare)
    model, kwargs = str(src), {"data": tmp_path / "t.txt", "seq_len": 16}
    if case == "builtin":
        model = "gpt2-tiny"
    elif case == "no_tokenizer":
        model = str(bare)
    elif case == "no_data":
        kwargs["data"] = None
    elif case == "max_tokens":
        kwargs["max_tokens"] = 8
    elif case == "seq_len":
        kwargs["seq_len"] = 65
    elif case == "dense_against_dense":
        kwargs["against"] = "dense"
    elif case == "against":
        kwargs["against"] = "onnx"
    with pytest.raises(ev.EvalError, match=message):
        ev.evaluate(model, **kwargs)


# ------------------------------------------------------------------------------------------------ text


def test_read_documents_txt_folder_jsonl(tmp_path):
    (tmp_path / "one.txt").write_bytes("\ufeffhello world\n\nsecond paragraph\n".encode())
    assert read_text(tmp_path / "one.txt").documents == ["hello world\n\nsecond paragraph\n"]  # one document, no BOM
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "sub" / "c.txt").write_text("sea")
    (folder / "blank.txt").write_text("  \n")
    (folder / "notes.md").write_text("not read")
    assert read_text(folder).documents == ["ay", "bee", "sea"]
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "sécond"}), json.dumps({"text": ""})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert read_text(tmp_path / "d.jsonl").documents == ["first", "sécond"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "no such file or folder"),
        ("empty.txt", b"", "is empty: it holds no text"),
        ("blank.txt", b" \n\t\n", "is empty: it holds no text"),
        ("binary.txt", b"PK\x03\x04\x00\x00\x08\x00text", r"is binary \(it holds NUL bytes\)"),
        ("latin1.txt", "café".encode("latin-1"), "is not UTF-8 text"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', 'line 2 has no "text" field'),
        ("notjson.jsonl", b'{"text": "ok"}\nplain words\n', "line 2 is not JSON"),
        ("number.jsonl", b'{"text": 3}\n', '"text" is int, not a string'),
        ("emptydir", "dir", "holds no .txt or .jsonl files"),
    ],
)
def test_read_documents_errors_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(TextError, match=message) as info:
        read_text(path)
    assert "\n" not in str(info.value)
