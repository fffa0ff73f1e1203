"""``blrdeploy bench``: models built without dense weights, the static-cache decoder against transformers'
``generate``, the command's table and JSON on a CPU, and on a GPU the CUDA-graph and compile modes and the memory
cap."""

import contextlib
import json

import pytest
import torch
from helpers import assert_rel_close
from safetensors.torch import save_file
from typer.testing import CliRunner

from blrdeploy import load, save
from blrdeploy.cli import app
from blrdeploy.conversion.pipeline import unique_params
from blrdeploy.conversion.siblings import Siblings
from blrdeploy.measure import bench
from blrdeploy.models.sources import build_builtin
from blrdeploy.structures.modules import BLRLinear

runner = CliRunner()


@pytest.mark.parametrize("text, size", [("8GB", 8_000_000_000), ("7.5GiB", int(7.5 * 2**30)), ("512 MB", 512e6),
                                         ("123", 123), ("2gib", 2 * 2**30)])  # fmt: skip
def test_parse_size(text, size):
    assert bench.parse_size(text) == int(size)


@pytest.mark.parametrize("text", ["", "GB", "8 XB", "-1GB", "0"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="memory size"):
        bench.parse_size(text)


def test_blr_variant_has_no_dense_weight_and_keeps_ties():
    target = bench.resolve("gpt2-tiny", dtype=torch.float32)
    dense_variant, blr_variant = target.variants
    blr = blr_variant.build()
    assert not any(t.is_meta for t in [*blr.parameters(), *blr.buffers()])
    converted = {name for name, m in blr.named_modules() if isinstance(m, BLRLinear)}
    assert converted == {layer["name"] for layer in blr_variant.layers} and converted
    assert blr.lm_head.weight is blr.transformer.wte.weight  # tied, materialized once
    assert unique_params(blr)[0] == blr_variant.params < dense_variant.params
    dense = dense_variant.build()
    assert unique_params(dense)[0] == dense_variant.params
    for name, p in dense.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() > 1:
            assert 0.005 < p.std() < 2, name  # filled at an init scale, not left empty


@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
def test_decoder_matches_generate(model):
    """The static-cache decoder with its explicit 4-D mask produces transformers' own greedy tokens."""
    target = bench.resolve(model, dtype=torch.float32, seed=3)
    blr = target.variants[1].build()
    prompt = torch.randint(0, target.config["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    tokens = bench.Decoder(blr, prompt, 12, "eager").run_eager()
    with torch.no_grad():
        ref = blr.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0)  # fmt: skip
    assert tokens == ref[:, 7:].tolist()


@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
def test_batched_decoder_decodes_each_sequence_as_alone(model):
    """Batched decode (three prompts at once, one new token each a step) gives each sequence the tokens it gets
    decoded alone."""
    target = bench.resolve(model, dtype=torch.float32, seed=0)  # seed 0: the three prompts' tokens all differ
    blr = target.variants[1].build()
    prompts = torch.randint(0, target.config["vocab_size"], (3, 5), generator=torch.Generator().manual_seed(2))
    together = bench.Decoder(blr, prompts, 9, "eager").run_eager()
    alone = [bench.Decoder(blr, p[None], 9, "eager").run_eager()[0] for p in prompts]
    assert together == alone and len({tuple(t) for t in alone}) > 1  # the prompts lead to different tokens


def test_bench_command_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "llama-tiny", "--new-tokens", "6", "--budget", "0.05", "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert json.loads(out.read_text()) == data
    dense, blr = data["variants"]
    assert (dense["name"], blr["name"]) == ("dense", "blast") and not dense["error"] and not blr["error"]
    assert [(r["batch"], r["seq"], r["mode"]) for r in blr["prefill"]] == [(1, 64, "eager")]  # 1024 capped at 64
    assert blr["decode"][0]["new_tokens"] == 6 and blr["decode"][0]["tokens_per_s"] > 0
    assert blr["weight_bytes"] < dense["weight_bytes"] and data["speedup"]["weights_smaller"] > 1
    assert (blr["sibling_groups"], blr["fused_blocks"]) == (4, 2) and dense["fused_blocks"] == 0
    ratio = dense["prefill"][0]["ms"] / blr["prefill"][0]["ms"]
    assert data["speedup"]["prefill"][0]["vs_dense_same_mode"] == pytest.approx(ratio)

    table = runner.invoke(app, ["bench", "vit-tiny", "--batch", "2,3", "--budget", "0.05"])
    assert table.exit_code == 0, table.output
    assert "prefill batch 2 (34 tok), ms" in table.stdout and "prefill batch 3" in table.stdout
    assert "weights" in table.stdout and "decode" not in table.stdout  # a ViT has no decode


@pytest.mark.parametrize(
    "args, message",
    [
        (["llama-tiny", "--memory-limit", "8GB", "--device", "cpu"], "needs --device cuda"),
        (["llama-tiny", "--modes", "eager,fast"], "unknown mode"),
        (["llama-tiny", "--modes", "graph", "--device", "cpu"], "needs a CUDA GPU"),
        (["llama-tiny", "--batch", "0"], "positive"),
        (["llama-tiny", "--only", "both"], "--only"),
        (["no-such-model"], "neither a built-in model"),
        (["llama-tiny", "--new-tokens", "1"], "at least 2"),
        (["gpt2-tiny", "--params-ratio", "0"], "must be in (0, 1)"),
        (["gpt2-tiny", "--device", "garbage"], "--device must be"),
        (["gpt2-tiny", "-o", "/dev/null/x.json"], "is a file, not a folder"),
        (["gpt2-tiny", "-o", "."], "is a directory"),
        (["vit-tiny", "--seq", "5"], "--seq is for token models"),
    ],
)
def test_bench_refuses_bad_input(args, message):
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code == 2
    assert message in res.output


def test_run_a_request_from_python(tmp_path):
    """bench.run, what the command calls: its steps go to the progress it opens, its result to the output file."""
    out, steps = tmp_path / "result.json", []

    @contextlib.contextmanager
    def progress(total):
        steps.append(total)
        yield steps.append

    request = bench.BenchRequest("gpt2-tiny", batches=(2,), seq=8, decode=False, only="blr", budget_s=0.01,
                                 output=out)  # fmt: skip
    result = bench.run(request, progress)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert steps == [2, "blast: building the model", "blast: prefill 2x8, eager"]
    assert [(r["batch"], r["seq"]) for r in result["variants"][0]["prefill"]] == [(2, 8)]
    with pytest.raises(ValueError, match="--seq is for token models"):
        bench.run(bench.BenchRequest("vit-tiny", seq=5))


def test_bench_regimes_prefill_lengths_and_decode_batches():
    """--seq takes several lengths and --decode-batch several batch sizes: a row for each, each BLR row beside
    the dense row of the same shape, and the table names the batch."""
    res = runner.invoke(app, ["bench", "llama-tiny", "--seq", "8,16", "--decode-batch", "1,3", "--new-tokens", "4",
                              "--budget", "0.02", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    dense, blr = data["variants"]
    assert [(r["batch"], r["seq"]) for r in blr["prefill"]] == [(1, 8), (1, 16)]
    assert [(r["batch"], r["new_tokens"]) for r in blr["decode"]] == [(1, 4), (3, 4)]
    for row, ratio in zip(blr["decode"], data["speedup"]["decode"], strict=True):
        same = next(d for d in dense["decode"] if d["batch"] == row["batch"])
        assert ratio["batch"] == row["batch"]
        assert ratio["vs_dense_same_mode"] == pytest.approx(row["tokens_per_s"] / same["tokens_per_s"])
    table = runner.invoke(app, ["bench", "llama-tiny", "--seq", "8", "--decode-batch", "3", "--new-tokens", "3",
                                "--budget", "0.02"])  # fmt: skip
    assert table.exit_code == 0 and "decode batch 3" in table.stdout, table.output
    bad = runner.invoke(app, ["bench", "llama-tiny", "--decode-batch", "0"])
    assert bad.exit_code == 2 and "--decode-batch takes positive integers" in bad.output


def test_decode_stays_within_the_position_table():
    """gpt2-tiny has 64 positions: 16 prompt tokens leave 48 to decode, not the default 128."""
    target = bench.resolve("gpt2-tiny", dtype=torch.float32)
    result = bench.run_bench(target, bench.BenchConfig(modes=("eager",), budget_s=0.01, prompt_tokens=16),
                             torch.device("cpu"), torch.float32)  # fmt: skip
    for v in result["variants"]:
        assert v["error"] is None and [r["new_tokens"] for r in v["decode"]] == [48], v
    full = bench.run_bench(target, bench.BenchConfig(modes=("eager",), budget_s=0.01, prompt_tokens=63),
                           torch.device("cpu"), torch.float32, only="dense")  # fmt: skip
    assert full["variants"][0]["decode"] == [] and "position table" in full["variants"][0]["decode_error"]


def test_a_failing_variant_keeps_the_others_results(monkeypatch):
    target = bench.resolve("llama-tiny", dtype=torch.float32)

    def broken():
        raise RuntimeError("kernel exploded\nmore detail")

    target.variants[1].build = broken
    result = bench.run_bench(target, bench.BenchConfig(modes=("eager",), budget_s=0.01, new_tokens=3),
                             torch.device("cpu"), torch.float32)  # fmt: skip
    dense, blr = result["variants"]
    assert dense["error"] is None and dense["prefill"] and dense["decode"]
    assert blr["error"] == "RuntimeError: kernel exploded" and blr["failed_at"] == "blast: building the model"
    assert result["speedup"] == {}


def test_bench_reads_a_converted_checkpoint(tmp_path):
    target = bench.resolve("gpt2-tiny", dtype=torch.float32)
    save(target.variants[1].build(), tmp_path / "ckpt")
    res = runner.invoke(app, ["bench", str(tmp_path / "ckpt"), "--no-decode", "--budget", "0.05", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["structure"] == "blast" and "checkpoint" in data["weights"]
    assert data["variants"][1]["params"] == target.variants[1].params


@pytest.mark.gpu
def test_gpu_bench_modes_and_decode_graph():
    target = bench.resolve("llama-tiny", device="cuda", dtype=torch.bfloat16)
    config = bench.BenchConfig(new_tokens=10, budget_s=0.05)
    result = bench.run_bench(target, config, torch.device("cuda"), torch.bfloat16)
    for v in result["variants"]:
        assert v["error"] is None, v["error"]
        assert {r["mode"] for r in v["prefill"]} == set(bench.MODES)
        assert all(r["tokens_match_unreplayed"] for r in v["decode"] if r["mode"] != "eager"), v["decode"]
        assert v["weight_bytes"] <= v["peak_memory_bytes"] <= v["peak_reserved_bytes"], v


@pytest.mark.gpu
def test_gpu_memory_limit_dense_fails_blr_runs():
    """llama-3.2-1b: 2.47 GB of dense weights, 1.52 GB as BLAST (paper preset). A 2 GB cap admits only BLAST."""
    res = runner.invoke(app, ["bench", "llama-3.2-1b", "--memory-limit", "2GB", "--modes", "graph", "--seq", "128",
                              "--new-tokens", "4", "--budget", "0.05", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    dense, blr = json.loads(res.stdout)["variants"]
    assert dense["error"].startswith("out of memory") and "2.00 GB" in dense["error"] and "2.47 GB" in dense["error"]
    assert blr["error"] is None and blr["prefill"][0]["mode"] == "graph" and blr["decode"][0]["new_tokens"] == 4
    lifted = torch.empty(int(3e9), dtype=torch.uint8, device="cuda")  # the process-wide cap ended with the bench
    del lifted


def _hf_checkpoint_with_tokenizer(path):
    """gpt2-tiny saved as a Hugging Face checkpoint with a word-level tokenizer built here (no hub)."""
    # deferred: transformers (and its tokenizers) take about half a second to import; only this helper needs them
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    build_builtin("gpt2-tiny", seed=5).model.save_pretrained(path)
    fast.save_pretrained(path)
    return fast


def test_run_text_in_text_out(tmp_path):
    """A converted LLM keeps its source's tokenizer; run --prompt returns what generate makes of the prompt."""
    src, out = tmp_path / "hf", tmp_path / "blast"
    tokenizer = _hf_checkpoint_with_tokenizer(src)
    res = runner.invoke(app, ["convert", str(src), "-o", str(out), "--steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert (out / "tokenizer.json").is_file()
    res = runner.invoke(app, ["run", str(out), "--prompt", "w5 w9 w17", "--max-new-tokens", "6", "--dtype",
                              "float32", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    model = load(out, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 17]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert data["token_ids"] == ref[0, 3:].tolist() and data["prompt_tokens"] == 3
    assert data["text"] == tokenizer.decode(ref[0, 3:], skip_special_tokens=True) and data["text"].strip()

    plain = runner.invoke(app, ["run", str(out), "--prompt", "w5", "--max-new-tokens", "2", "--dtype", "float32"])
    assert plain.exit_code == 0 and plain.stdout.strip().split()[0].startswith("w")


def test_bench_and_run_refuse_a_damaged_checkpoint_and_bad_run_arguments(tmp_path):
    ckpt = tmp_path / "ckpt"
    save(bench.resolve("gpt2-tiny", dtype=torch.float32).variants[1].build(), ckpt)
    bad_names = tmp_path / "in.safetensors"
    save_file({"pixel_values": torch.zeros(1, 3, 8, 8)}, str(bad_names))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a tensor file\xff" * 4)
    cases = [
        (["--input", str(bad_names)], "the model cannot run --input"),  # a GPT-2 given an image tensor
        (["--input", str(tmp_path)], "no such file"),
        (["--input", str(garbage)], f"--input {garbage} is not a readable .safetensors file"),
        (["--output", str(bad_names / "o.safetensors")], "is a file, not a folder"),
        (["--repeat", "-1"], "--repeat must be 0 or more"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["run", str(ckpt), "--device", "cpu", "--dtype", "float32", *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert isinstance(res.exception, SystemExit), args  # a clean exit, not an escaped exception
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:] = bytes(200)  # same size: only the sha256 tells
    weights.write_bytes(bytes(data))
    res = runner.invoke(app, ["bench", str(ckpt), "--no-decode"])
    assert res.exit_code == 2 and "does not match its recorded sha256" in res.output, res.output
    res = runner.invoke(app, ["run", str(ckpt), "--device", "cpu", "--dtype", "float32", "--repeat", "0"])
    assert res.exit_code == 2 and "does not match its recorded sha256" in res.output, res.output  # not run on it
    assert isinstance(res.exception, SystemExit)


def test_run_prompt_needs_a_tokenizer(tmp_path):
    save(bench.resolve("gpt2-tiny", dtype=torch.float32).variants[1].build(), tmp_path / "ckpt")
    res = runner.invoke(app, ["run", str(tmp_path / "ckpt"), "--prompt", "hello"])
    assert res.exit_code == 2 and "carries no tokenizer" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "ckpt"), "--memory-limit", "1GB", "--device", "cpu"])
    assert res.exit_code == 2 and "needs a CUDA GPU" in res.output


@pytest.mark.gpu
def test_gpu_loaded_model_compiles_with_graphs_and_generates(tmp_path, monkeypatch):
    """blrdeploy.load on CUDA: the BLR layers run the kernels under torch.compile(mode="reduce-overhead") and
    inside transformers' generate, and agree with the float32 CPU reference."""
    # deferred: the launchers load Triton, which only the GPU tests need
    from blrdeploy.kernels import launch

    calls = []
    original = launch.blast_forward
    monkeypatch.setattr(launch, "blast_forward", lambda *a, **k: calls.append(k.get("swiglu")) or original(*a, **k))
    save(bench.resolve("llama-tiny", dtype=torch.float32, seed=2).variants[1].build(), tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    ref = load(tmp_path / "ckpt", dtype=torch.float32)(input_ids=ids).logits
    gpu = load(tmp_path / "ckpt", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = gpu(input_ids=ids.cuda()).logits.float().cpu()
        assert len(calls) == 10  # 2 layers x (q, k+v stacked, o, gate+up stacked, down), each on the kernels
        assert calls.count(True) == 2  # down applies the MLP's SiLU as it loads gate+up's output
        assert sum(isinstance(m, Siblings) for m in gpu.modules()) == 4  # load fuses siblings on CUDA
        compiled = torch.compile(gpu, mode="reduce-overhead")
        for _ in range(3):  # recorded, then replayed from the CUDA graph
            out = compiled(input_ids=ids.cuda()).logits.float().cpu()
        prompt = ids[:1].cuda()
        new = gpu.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    assert_rel_close(eager, ref, 3e-2, "eager")
    assert_rel_close(out, ref, 3e-2, "compiled, graph replay")
    assert new.sequences.shape == (1, 32)
    assert_rel_close(new.scores[0].float().cpu(), ref[:1, -1], 3e-2, "generate's first step")
