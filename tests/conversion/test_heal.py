"""``heal``: a few distillation steps on tiny models (a Llama with a word tokenizer, a BERT encoder) lower the loss
against dense on text the tests write; a run resumed from its state file ends with the same weights as one run
straight through; an interrupted heal leaves the checkpoint at its output as it was; bad inputs are one line and
write nothing."""

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_calibration import llama_with_tokenizer, write_text
from typer.testing import CliRunner

from blrdeploy.cli import app
from blrdeploy.conversion import heal as healing
from blrdeploy.conversion.checkpoint import load
from blrdeploy.conversion.convert import ConvertConfig
from blrdeploy.conversion.pipeline import run_convert
from blrdeploy.models.outputs import main_output
from blrdeploy.models.sources import read_config

runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(source dir, converted checkpoint, text): llama-tiny with a tokenizer, low-rank at ratio 0.3."""
    tmp = tmp_path_factory.mktemp("heal")
    llama_with_tokenizer(tmp / "src")
    run_convert(str(tmp / "src"), tmp / "ckpt", ConvertConfig(structure="lowrank", params_ratio=0.3))
    return tmp / "src", tmp / "ckpt", write_text(tmp / "text.jsonl", 3000, seed=4)


def _files(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _kl_on(ckpt, src, ids) -> float:
    """Mean KL(dense || converted) of next-token distributions on ``ids``, computed here in float64."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(src).double().eval()
    model = load(ckpt).double()
    with torch.no_grad():
        log_t = torch.log_softmax(main_output(dense(input_ids=ids)), -1)
        log_s = torch.log_softmax(main_output(model(input_ids=ids)), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def test_a_few_steps_bring_the_lm_closer_to_dense(lm, tmp_path):
    src, ckpt, text = lm
    held_out = write_text(tmp_path / "other.jsonl", 400, seed=9)
    ids = torch.tensor([[int(w[1:]) for w in json.loads(line)["text"].split()][:32]
                        for line in held_out.read_text().splitlines()])  # fmt: skip
    summary = healing.heal(ckpt, text, tmp_path / "out", healing.HealOptions(steps=40, lr=3e-3, seq_len=32))
    assert summary["loss"]["last"] < 0.7 * summary["loss"]["first"], summary["loss"]
    before, after = _kl_on(ckpt, src, ids), _kl_on(tmp_path / "out", src, ids)
    assert after < 0.8 * before, (before, after)  # on text it did not train on, too
    cfg = json.loads((tmp_path / "out" / "blr_config.json").read_text())
    original = json.loads((ckpt / "blr_config.json").read_text())
    assert cfg["layers"] == original["layers"] and cfg["source"] == original["source"]
    assert cfg["healing"]["tokens_seen"] == 40 * 4 * 32 and cfg["healing"]["trained"] == "BLR factors"
    assert not healing.state_path(tmp_path / "out").exists()
    # only the factors moved: embeddings and norms are the checkpoint's
    old, new = load(ckpt).state_dict(), load(tmp_path / "out").state_dict()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    assert moved and all(k.endswith((".U", ".V", ".S", ".L", ".R")) or ".A" in k or ".B" in k for k in moved), moved


def _tiny_encoder_checkpoint(tmp_path) -> Path:
    """A tiny BERT with a word tokenizer (<cls> text <cls>), converted to BLAST."""
    from test_sensitivity import tiny_bert
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tiny_bert().save_pretrained(tmp_path / "bert")
    vocab = {"<cls>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<cls> $A <cls>", special_tokens=[("<cls>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", cls_token="<cls>", sep_token="<cls>",
                            pad_token="<cls>").save_pretrained(tmp_path / "bert")  # fmt: skip
    cfg = ConvertConfig(structure="blast", params_ratio=0.4, include=("*.intermediate.dense", "*.output.dense"))
    run_convert(str(tmp_path / "bert"), tmp_path / "ckpt", cfg)
    return tmp_path / "ckpt"


def test_encoder_heals_toward_dense_hidden_states(tmp_path):
    _tiny_encoder_checkpoint(tmp_path)
    text = write_text(tmp_path / "t.jsonl", 2000, seed=2)
    summary = healing.heal(tmp_path / "ckpt", text, tmp_path / "out", healing.HealOptions(steps=30, lr=3e-3,
                                                                                           seq_len=16))  # fmt: skip
    assert summary["loss"]["last"] < 0.7 * summary["loss"]["first"], summary["loss"]


def test_encoder_windows_are_one_document_each(tmp_path):
    """An encoder heals on single documents, as it is used and evaluated: each window one document in its special
    tokens, cut at --seq-len, padded to the longest; a batch is cut to its own longest and masked past each length;
    the loss and the agreement read only the masked positions."""
    ckpt = _tiny_encoder_checkpoint(tmp_path)
    docs = ["w2 w3 w4", "w5", "w6 w7 w8 w9 w10 w11 w12 w13 w14 w15", "w16 w17"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    options = healing.HealOptions(steps=2, batch=2, seq_len=8)
    _, windows, lengths = healing._text_windows(ckpt, read_config(ckpt), False, data, options)
    assert lengths.tolist() == [5, 3, 8, 4]  # <cls> + words + <cls>, the third cut at 8
    assert windows.shape == (4, 8)
    assert windows[0, :5].tolist() == [0, 2, 3, 4, 0]
    assert windows[2].tolist() == [0, 6, 7, 8, 9, 10, 11, 0]  # truncated inside its special tokens
    assert windows[1, :3].tolist() == [0, 5, 0]
    ids, kwargs, tokens = healing._batch(windows, lengths, torch.tensor([1, 3]), {}, "cpu")
    assert ids.shape == (2, 4) and tokens == 7
    assert kwargs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    loss = healing.distill_loss(s, t, False, kwargs["attention_mask"])
    s[0, 3] += 100.0  # a padded position's output
    assert healing.distill_loss(s, t, False, kwargs["attention_mask"]) == loss
    assert healing.distill_loss(s, t, False) != loss


class _Stop(BaseException):
    """Raised from the progress callback: the process dies at that step."""


def _stop_at(step):
    def progress(info):
        if info["step"] == step:
            raise _Stop

    return progress


def test_resumed_heal_equals_an_uninterrupted_one(lm, tmp_path):
    _, ckpt, text = lm
    options = healing.HealOptions(steps=12, lr=2e-3, seq_len=32, save_every=5)
    healing.heal(ckpt, text, tmp_path / "straight", options)
    with pytest.raises(_Stop):
        healing.heal(ckpt, text, tmp_path / "resumed", options, progress=_stop_at(8))
    assert healing.state_path(tmp_path / "resumed").is_file() and not (tmp_path / "resumed").exists()
    seen = {}
    summary = healing.heal(ckpt, text, tmp_path / "resumed", options, on_plan=seen.update)
    assert seen["resume_at_step"] == 5 and summary["resumed_at_step"] == 5
    a, b = load(tmp_path / "straight").state_dict(), load(tmp_path / "resumed").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = json.loads((tmp_path / "straight" / "blr_config.json").read_text())["healing"]
    assert summary["loss"] == straight["loss"] and summary["output_agreement"] == straight["output_agreement"]


def test_interrupted_heal_leaves_the_previous_checkpoint_intact(lm, tmp_path):
    _, ckpt, text = lm
    out = tmp_path / "out"
    healing.heal(ckpt, text, out, healing.HealOptions(steps=2, seq_len=32))
    before = _files(out)
    with pytest.raises(_Stop):
        healing.heal(ckpt, text, out, healing.HealOptions(steps=6, seq_len=32), overwrite=True,
                     progress=_stop_at(3))  # fmt: skip
    assert _files(out) == before


def test_a_state_file_of_another_heal_or_garbage_is_refused(lm, tmp_path):
    _, ckpt, text = lm
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        healing.heal(ckpt, text, out, healing.HealOptions(steps=6, seq_len=32, save_every=2), progress=_stop_at(3))
    with pytest.raises(healing.HealError, match="state of a different heal"):
        healing.heal(ckpt, text, out, healing.HealOptions(steps=6, seq_len=32, lr=1e-3, save_every=2))
    healing.state_path(out).write_bytes(b"\x00not a state")
    with pytest.raises(healing.HealError, match="not a heal state"):
        healing.heal(ckpt, text, out, healing.HealOptions(steps=6, seq_len=32, save_every=2))
    assert healing.state_path(out).read_bytes() == b"\x00not a state" and not out.exists()


def _heal(*args):
    return runner.invoke(app, ["heal", *map(str, args), "--device", "cpu"])


def test_cli_heals_prints_the_curve_and_the_result_loads(lm, tmp_path):
    _, ckpt, text = lm
    res = _heal(ckpt, "--data", text, "-o", tmp_path / "out", "--steps", "4", "--seq-len", "32",
                "--eval", text, "--eval-tokens", "256", "--plot", tmp_path / "fig" / "loss.png")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "distillation loss:" in res.stdout and "loss curve" in res.stdout and "perplexity" in res.stdout
    assert (tmp_path / "fig" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curve: {tmp_path / 'fig' / 'loss.png'}" in " ".join(res.stdout.split())
    assert "heal plan: 4 steps of 4 x 32 tokens" in res.stderr
    info = runner.invoke(app, ["info", str(tmp_path / "out")])
    assert info.exit_code == 0, info.output
    assert "healed: 4 steps on 512 tokens (BLR factors), distillation loss" in info.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("steps0", "--steps must be at least 1"),
        ("lr_negative", "--lr must be a positive number"),
        ("no_text", "is empty: it holds no text"),
        ("binary_text", "--data"),
        ("no_source", "heal needs the dense model"),
        ("nan", "the distillation loss became nan"),
        ("nan_last_step", "non-finite values after step 1"),
        ("bad_eval_text", "no such file or folder"),
        ("dense_dir", "blr_config.json"),
        ("plot_not_png", "--plot"),
        ("plot_exists", "already exists; pass --overwrite"),
        ("plot_in_output", "is inside the output checkpoint"),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(lm, tmp_path, case, message):
    src, ckpt, text = lm
    args = [ckpt, "--data", text, "-o", tmp_path / "out", "--steps", "3", "--seq-len", "32"]
    if case == "steps0":
        args[-3] = "0"
    elif case == "lr_negative":
        args += ["--lr", "-1"]
    elif case == "no_text":
        (tmp_path / "empty.txt").write_text("  \n")
        args[2] = tmp_path / "empty.txt"
    elif case == "binary_text":
        (tmp_path / "bin.txt").write_bytes(b"\x00\xff\xfe" * 50)
        args[2] = tmp_path / "bin.txt"
    elif case == "no_source":
        moved = tmp_path / "ckpt_copy"
        shutil.copytree(ckpt, moved)
        cfg = json.loads((moved / "blr_config.json").read_text())
        cfg["source"]["id"] = str(tmp_path / "gone")
        (moved / "blr_config.json").write_text(json.dumps(cfg))
        args[0] = moved
    elif case == "nan":
        args += ["--lr", "1e30"]
    elif case == "nan_last_step":  # the one update blows the model up: no loss after it to catch it, still refused
        args[-3] = "1"
        args += ["--lr", "1e30"]
    elif case == "bad_eval_text":
        args += ["--eval", tmp_path / "missing.txt"]
    elif case == "dense_dir":
        args[0] = src
    elif case == "plot_not_png":
        args += ["--plot", tmp_path / "loss.txt"]
    elif case == "plot_in_output":
        args += ["--plot", tmp_path / "out" / "loss.png"]
    elif case == "plot_exists":
        (tmp_path / "mine.png").write_text("the user's")
        args += ["--plot", tmp_path / "mine.png"]
    res = _heal(*args)
    assert res.exit_code == 2, res.output
    progress = ("heal ", "Loading weights")  # the plan and step lines, transformers' bar while the teacher loads
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith(progress)]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "out").exists()
    assert case != "plot_exists" or (tmp_path / "mine.png").read_text() == "the user's"


def test_a_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    """A bfloat16 Llama keeps float32 rotary buffers; the healed checkpoint stores each tensor as the original did."""
    from safetensors import safe_open

    llama_with_tokenizer(tmp_path / "src")
    cfg = ConvertConfig(structure="lowrank", params_ratio=0.3)
    run_convert(str(tmp_path / "src"), tmp_path / "ckpt", cfg, dtype=torch.bfloat16)
    text = write_text(tmp_path / "t.jsonl", 600, seed=4)
    healing.heal(tmp_path / "ckpt", text, tmp_path / "out", healing.HealOptions(steps=2, seq_len=32))

    def dtypes(path):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}

    before, after = dtypes(tmp_path / "ckpt"), dtypes(tmp_path / "out")
    assert after == before and "BF16" in after.values()
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == (
        tmp_path / "ckpt" / "model.safetensors"
    ).stat().st_size


def test_image_models_and_task_heads_are_refused(tmp_path):
    run_convert("vit-tiny", tmp_path / "vit", ConvertConfig(structure="lowrank", params_ratio=0.5))
    (tmp_path / "t.txt").write_text("w2 w3 w4")
    with pytest.raises(healing.HealError, match="neither"):
        healing.heal(tmp_path / "vit", tmp_path / "t.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chunked_kl_equals_the_plain_kl_in_float64(gen):
    s = torch.randn(3, 700, 50, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(3, 700, 50, generator=gen, dtype=torch.float64) * 3
    log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    want = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    s.requires_grad_(True)
    got = healing.distill_loss(s, t, causal=True)  # 2,100 tokens: three pieces, the last one short
    assert abs(got.item() - want.item()) < 1e-5 * want.item()
    got.backward()
    want_grad = (torch.softmax(s.detach(), -1) - log_t.exp()) / (3 * 700)
    assert torch.allclose(s.grad.double(), want_grad, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_weights(lm, tmp_path, monkeypatch):
    """With --checkpointing each block runs again in the backward (counted on one BLR layer), and the weights
    come out as without it."""
    from blrdeploy.structures.modules import BLRLinear

    _, ckpt, text = lm
    calls = []

    def counting_load(*args, **kwargs):
        model = load(*args, **kwargs)
        first = next(m for m in model.modules() if isinstance(m, BLRLinear))
        first.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(healing, "load", counting_load)
    counts = []
    for name, on in (("plain", False), ("recomputed", True)):
        calls.clear()
        healing.heal(ckpt, text, tmp_path / name, healing.HealOptions(steps=3, seq_len=32, checkpointing=on))
        counts.append(len(calls))
    assert counts[1] == counts[0] + 3, counts  # one recompute per step
    a, b = load(tmp_path / "plain").state_dict(), load(tmp_path / "recomputed").state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.mark.parametrize("lr", [1e-2, None])
def test_the_learning_rate_is_relative_to_each_tensors_rms(lm, tmp_path, lr):
    """Adam's first step moves each element by its group's learning rate: --lr (or, not given, the default of the
    layer's structure: this checkpoint is low-rank) times the tensor's RMS, so factors of very different scales
    (BLAST's U near 0.02, S near 20 on a real encoder) move alike, relatively."""
    _, ckpt, text = lm
    summary = healing.heal(ckpt, text, tmp_path / "out", healing.HealOptions(steps=1, lr=lr, seq_len=32))
    rate = lr or healing.DEFAULT_LR["lowrank"]
    assert summary["peak_lr"] == [rate] and healing.DEFAULT_LR["lowrank"] != healing.DEFAULT_LR["blast"]
    old, new = load(ckpt).state_dict(), load(tmp_path / "out").state_dict()
    factors = [k for k in old if not torch.equal(old[k], new[k])]
    assert len(factors) >= 4
    for k in factors:
        step = (new[k] - old[k]).abs().max().item()
        expected = rate * old[k].pow(2).mean().sqrt().item()
        assert abs(step / expected - 1) < 0.02, (k, step, expected)


def _builtin_plan(model: str, batch: int, checkpointing: bool) -> tuple[dict, list[str]]:
    """heal's plan for a built-in model converted with the paper's BLAST preset, 2048-token windows, on a GPU, and
    the converted layers' names."""
    from blrdeploy.measure.bench import resolve
    from blrdeploy.models.sources import builtin_config

    dense, blr = resolve(model, "blast", preset="paper").variants
    cfg = {"layers": blr.layers, "summary": {"params_before": dense.params, "params_after": blr.params}}
    windows = torch.zeros(64, 2048, dtype=torch.long)
    options = healing.HealOptions(batch=batch, checkpointing=checkpointing)
    the_plan = healing.plan(cfg, builtin_config(model)[2], windows, options, "cuda", True)
    return the_plan, [e["name"] for e in blr.layers]


def test_the_plan_fits_7b_on_141_gb_and_1b_on_24_gb_and_refuses_with_the_numbers(monkeypatch):
    gib = 2**30
    seven, names = _builtin_plan("llama-7b", 4, True)
    # teacher 6.7e9 x 2 bytes, student and its trained factors in float32 with gradient and two moments
    assert 55 * gib < seven["bytes_weights_and_optimizer"] < 70 * gib, seven
    assert seven["bytes_weights_and_optimizer"] + seven["bytes_activations"] < 130 * gib
    # streamed: embeddings and head (2 x 32000 x 4096) and two of the 32 blocks (202M each), in bfloat16
    assert 1.1 * gib < seven["bytes_teacher_streamed"] < 1.4 * gib, seven["bytes_teacher_streamed"] / gib
    one, one_names = _builtin_plan("llama-3.2-1b", 4, True)
    assert one["bytes_weights_and_optimizer"] + one["bytes_activations"] < 23 * gib, one

    def free(gigabytes):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gigabytes * gib, 80 * gib))

    def place(the_plan, stream=None, layer_names=names):
        return healing._teacher_placement(the_plan, "cuda", stream, layer_names)

    free(130)  # a 141 GB H200 with 130 GiB free: 7B heals with its teacher on the GPU
    assert place(seven) == healing.RESIDENT
    free(70)  # an 80 GB card: teacher and student do not fit together, with one teacher block at a time they do
    assert place(seven) == healing.STREAMED
    with pytest.raises(healing.HealError, match="drop --teacher-on-device"):
        place(seven, stream=False)
    with pytest.raises(healing.HealError, match="cannot be streamed: the converted layers are not inside one stack"):
        place(seven, layer_names=["lm_head", *names])
    free(23)  # a 24 GB card: 1B fits; 7B is refused before anything loads, with the numbers; 1B without
    # --checkpointing is told that --checkpointing fits
    assert place(one, layer_names=one_names) == healing.RESIDENT
    assert place(one, True, one_names) == healing.STREAMED  # asked for
    with pytest.raises(healing.HealError, match=r"needs about \d+\.\d GiB \(.*teacher, streamed.* 23\.0 GiB free of "
                       r"80\.0 GiB: a smaller model or a larger GPU"):  # fmt: skip
        place(seven)
    with pytest.raises(healing.HealError, match="add --checkpointing"):
        place(_builtin_plan("llama-3.2-1b", 4, False)[0], layer_names=one_names)
    assert healing._teacher_placement(seven, "cpu", True, names) == healing.RESIDENT  # the host's memory is the user's


def test_a_streamed_teacher_gives_the_same_outputs(lm):
    """Streaming runs each block on a copy of its tensors made in its pre-hook and points them back at the host
    copies after; the outputs do not change."""
    from transformers import AutoModelForCausalLM

    src, ckpt, _ = lm
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    names = [e["name"] for e in json.loads((ckpt / "blr_config.json").read_text())["layers"]]
    block = teacher.model.layers[1]
    host = block.mlp.up_proj.weight.data_ptr()
    seen = []
    with torch.no_grad():
        want = main_output(teacher(input_ids=ids))
        healing._stream_blocks(teacher, names, torch.device("cpu"))
        block.register_forward_pre_hook(lambda *_: seen.append(block.mlp.up_proj.weight.data_ptr()))  # after ours
        got = main_output(teacher(input_ids=ids))
    assert torch.equal(got, want)
    assert seen and seen[0] != host and block.mlp.up_proj.weight.data_ptr() == host  # ran on a copy, then back


@pytest.mark.gpu
def test_gpu_heal_runs_in_bfloat16_lowers_the_loss_and_reports_its_peak(lm, tmp_path):
    """On a GPU: bfloat16 autocast over float32 master factors (the ops' autocast rule, the kernels' forward, the
    reference's backward), the healed checkpoint keeps the stored dtypes, and the measured peak is reported beside
    the plan's estimate (which it exceeds by no more than what CUDA libraries allocate for themselves: cuBLAS's
    workspace)."""
    _, ckpt, text = lm
    options = healing.HealOptions(steps=30, lr=3e-3, seq_len=32)
    summary = healing.heal(ckpt, text, tmp_path / "out", options, device="cuda")
    assert summary["loss"]["last"] < 0.7 * summary["loss"]["first"], summary["loss"]
    after, before = summary["output_agreement"]["after"], summary["output_agreement"]["before"]
    assert after["relative_error"] < before["relative_error"], summary["output_agreement"]
    plan = summary["plan"]
    estimate = plan["bytes_weights_and_optimizer"] + plan["bytes_activations"]
    assert 0 < summary["peak_gpu_bytes"] <= estimate + 2**29, (summary["peak_gpu_bytes"], plan)
    old, new = load(ckpt).state_dict(), load(tmp_path / "out").state_dict()
    assert {k: v.dtype for k, v in old.items()} == {k: v.dtype for k, v in new.items()}


@pytest.mark.gpu
def test_gpu_streamed_teacher_heals_like_a_resident_one(lm, tmp_path):
    """--stream-teacher copies the teacher's blocks in per step; the losses are those of the teacher on the GPU."""
    _, ckpt, text = lm
    options = healing.HealOptions(steps=3, seq_len=32)
    resident = healing.heal(ckpt, text, tmp_path / "a", options, device="cuda")
    streamed = healing.heal(ckpt, text, tmp_path / "b", replace(options, stream_teacher=True), device="cuda")
    assert streamed["plan"]["teacher"] == healing.STREAMED and resident["plan"]["teacher"] == healing.RESIDENT
    assert streamed["losses"] == resident["losses"]
