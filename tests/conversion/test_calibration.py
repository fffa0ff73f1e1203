"""Calibration-aware conversion: input Grams collected by hooks on the dense model, shared between layers that
read one input, fed to the fits; ``convert --calibration`` on a tiny Llama with a tokenizer and text made here;
bad inputs give one line and write nothing."""

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from blrdeploy import ConvertConfig, convert
from blrdeploy.cli import app
from blrdeploy.conversion import calibration as cal
from blrdeploy.conversion.convert import plan
from blrdeploy.models.sources import build_builtin, family_of
from blrdeploy.models.text import context_of, read_text
from blrdeploy.structures.factorize import output_relative_error

runner = CliRunner()
WORDS = [f"w{i}" for i in range(2, 128)]


def tiny_llama(seed=1):
    return build_builtin("llama-tiny", seed=seed).model.eval()


def llama_with_tokenizer(path):
    """llama-tiny saved as a Hugging Face checkpoint with a word-level tokenizer built here (no hub)."""
    # deferred: transformers (and its tokenizers) take about half a second to import; only this helper needs them
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i for i, w in enumerate(WORDS, 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    tiny_llama().save_pretrained(path)
    fast.save_pretrained(path)
    return fast


def write_text(path, words: int, seed=0, docs: int = 4):
    """A .jsonl of ``docs`` documents of ``words`` words in all, drawn with a skew (real text is not uniform)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(1 / torch.arange(1, len(WORDS) + 1.0), words, replacement=True, generator=g).tolist()
    per = -(-words // docs)
    lines = [json.dumps({"text": " ".join(WORDS[i] for i in ids[k : k + per])}) for k in range(0, words, per)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gram_over_two_batches_is_the_gram_of_the_concatenation():
    model = tiny_llama()
    name = "model.layers.0.self_attn.o_proj"
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    grams = cal.collect_grams(model, [name], [ids[:2], ids[2:]])
    handle.remove()
    X = torch.cat([x.reshape(-1, 64) for x in seen]).double()
    assert X.shape[0] == 64 and grams.rows[name] == 64 and grams.tokens == 64 and grams.updates[name] == 2
    torch.testing.assert_close(grams.sums[name], X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grams.gram(name), X.T @ X / 64, rtol=1e-5, atol=1e-6)


def test_layers_reading_one_input_share_one_gram():
    """q/k/v read one tensor, gate/up another: one Gram (and one XᵀX per batch) per input, not per layer."""
    model = tiny_llama()
    the_plan = plan(model, ConvertConfig(structure="lowrank", params_ratio=0.5), family_of(model))
    names = [e.name for e in the_plan.layers if e.name.startswith("model.layers.0.")]
    assert len(names) == 7
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(3))
    grams = cal.collect_grams(model, names, [ids[:1], ids[1:]])
    prefix = "model.layers.0."
    groups = sorted(sorted(n.removeprefix(prefix) for n in g) for g in grams.groups())
    qkv = ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert groups == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], qkv, ["self_attn.o_proj"]]
    assert len(grams.sums) == 4 and all(n == 2 for n in grams.updates.values())  # one product per input per batch
    assert grams[prefix + "self_attn.k_proj"] is not None
    torch.testing.assert_close(grams[prefix + "self_attn.q_proj"], grams[prefix + "self_attn.v_proj"])
    grams.release(prefix + "self_attn.q_proj")
    grams.release(prefix + "self_attn.k_proj")
    assert len(grams.sums) == 4  # v still reads it
    grams.release(prefix + "self_attn.v_proj")
    assert len(grams.sums) == 3


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blast"])
def test_calibrated_convert_beats_weight_only_on_the_calibration_outputs(structure):
    """The library path (convert(..., calibration=token ids)): every layer's output error on the calibration inputs
    is lower than the weight-only fit's, measured on the same Grams."""
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    config = ConvertConfig(structure=structure, layers=(("*", 4, 16),), params_ratio=None, steps=30)
    dense = tiny_llama()
    names = [e.name for e in plan(dense, config, family_of(dense)).layers]
    grams = cal.collect_grams(dense, names, cal.batched(ids))
    plain, calibrated = tiny_llama(), tiny_llama()
    convert(plain, config)
    done = convert(calibrated, config, calibration=ids)
    wins = 0
    for entry in done.layers:
        w = dense.get_submodule(entry.name).weight.double()
        g = grams[entry.name]
        weight_only = output_relative_error(w, plain.get_submodule(entry.name).to_dense().double(), g)
        assert entry.output_relative_error == pytest.approx(
            output_relative_error(w, calibrated.get_submodule(entry.name).to_dense().double(), g), rel=1e-3
        )
        wins += entry.output_relative_error < weight_only
    assert wins == len(done.layers)


def test_convert_calibration_writes_its_record(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    llama_with_tokenizer(src)
    text = write_text(tmp_path / "calib.jsonl", 400)
    args = ["convert", str(src), "-o", str(out), "--structure", "lowrank", "--calibration", str(text)]
    res = runner.invoke(app, [*args, "--calibration-tokens", "200", "--seq-len", "32", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    record = json.loads((out / "blr_config.json").read_text())["calibration"]
    assert record["files"] == {"calib.jsonl": hashlib.sha256(text.read_bytes()).hexdigest()}
    assert (record["tokens"], record["windows"], record["seq_len"], record["damping"]) == (192, 6, 32, 1e-2)
    assert sorted(map(sorted, record["shared_inputs"])) == sorted(
        [[f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"] for i in range(2)]
        + [[f"model.layers.{i}.self_attn.{x}_proj" for x in "kqv"] for i in range(2)]
    )
    layers = {e["name"]: e for e in record["layers"]}
    saved = {e["name"]: e for e in json.loads((out / "blr_config.json").read_text())["layers"]}
    assert set(layers) == set(saved) and len(layers) == 14
    for name, e in layers.items():
        assert e["relative_error"] == saved[name]["relative_error"]
        assert 0 <= e["output_relative_error"] < 1
    assert summary["calibration"]["tokens"] == 192 and "layers" not in summary["calibration"]
    assert summary["worst_output_relative_error"] == max(e["output_relative_error"] for e in layers.values())
    table = runner.invoke(app, args + ["--calibration-tokens", "64", "--seq-len", "32", "-o", str(tmp_path / "t")])
    assert table.exit_code == 0 and "out. error" in table.stdout and "64 calibration tokens" in table.stdout


def test_bad_calibration_inputs_give_one_line_and_write_nothing(tmp_path):
    src = tmp_path / "hf"
    llama_with_tokenizer(src)
    bare = tmp_path / "bare"  # a checkpoint without its tokenizer
    tiny_llama().save_pretrained(bare)
    good = write_text(tmp_path / "good.jsonl", 200)
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"w2 w3\x00\xff\xfe w4")
    (tmp_path / "latin1.txt").write_bytes("w2 caf\xe9".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "w2 w3"}\n{"body": "w4"}\n')
    (tmp_path / "no_text_dir").mkdir()
    (tmp_path / "short.txt").write_text("w2 w3 w4 w5")
    vit = tmp_path / "vit"  # an image model, even with tokenizer files beside it
    build_builtin("vit-tiny", seed=1).model.save_pretrained(vit)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (vit / name).write_bytes((src / name).read_bytes())
    cases = [
        (src, tmp_path / "empty.txt", [], "is empty"),
        (src, tmp_path / "binary.txt", [], "is binary"),
        (src, tmp_path / "latin1.txt", [], "is not UTF-8 text"),
        (src, tmp_path / "bad.jsonl", [], 'line 2 has no "text" field'),
        (src, tmp_path / "no_text_dir", [], "holds no .txt or .jsonl files"),
        (src, tmp_path / "missing.txt", [], "--calibration: no such file or folder"),
        (src, tmp_path / "short.txt", ["--seq-len", "32"], "has 4 tokens, fewer than one window of --seq-len 32"),
        (src, good, ["--seq-len", "32", "--calibration-tokens", "16"], "less than one window of --seq-len 32"),
        (src, good, ["--calibration-tokens", "0"], "--calibration-tokens must be at least 1"),
        (src, good, ["--damping", "-1"], "--damping must be >= 0"),
        (bare, good, [], "carries no tokenizer"),
        ("llama-tiny", good, [], "built-in models have seeded weights and none"),
        (vit, good, [], "vit models are not fed tokens"),
    ]
    for model, text, extra, message in cases:
        out = tmp_path / "out"
        res = runner.invoke(app, ["convert", str(model), "-o", str(out), "--calibration", str(text), *extra])
        assert res.exit_code == 2, (message, res.output)
        assert message in res.output, (message, res.output)
        assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
        assert isinstance(res.exception, SystemExit)
        assert not out.exists(), message


def test_text_reading_and_windows(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("w2 w3 w4")
    (folder / "sub" / "b.jsonl").write_text('{"text": "w5 w6"}\n\n{"text": "w7"}\n')
    (folder / "notes.md").write_text("ignored")
    text = read_text(folder)
    assert text.documents == ["w2 w3 w4", "w5 w6", "w7"] and sorted(text.files) == ["a.txt", "sub/b.jsonl"]
    llama_with_tokenizer(tmp_path / "hf")
    _, windows = cal.calibration_windows(tmp_path / "hf", {}, folder, seq_len=3, tokens=100)
    assert windows.tolist() == [[2, 3, 4], [0, 5, 6]]  # documents joined by <eos>; a partial window is dropped
    assert cal.calibration_windows(tmp_path / "hf", {}, folder, seq_len=2, tokens=5)[1].shape == (2, 2)
    assert context_of(tiny_llama()) == 64
