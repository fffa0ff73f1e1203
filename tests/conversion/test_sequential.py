"""Sequential calibration (``conversion.sequential``): the compensated target's algebra, the drift error against a
direct computation, the first group's fit equal to the one-shot fit, the converted model closer to dense on its
calibration text than the one-shot conversion, and the CLI's record and refusals."""

import json

import pytest
import torch
from test_calibration import llama_with_tokenizer, tiny_llama, write_text
from typer.testing import CliRunner

from blrdeploy import ConvertConfig, convert
from blrdeploy.cli import app
from blrdeploy.conversion import calibration as cal
from blrdeploy.conversion import sequential as seq
from blrdeploy.conversion.convert import convert_layers_sequential, plan
from blrdeploy.models.sources import build_builtin, family_of
from blrdeploy.structures import factorize as fz

runner = CliRunner()


def _stats(xc, xd):
    return seq.LayerStats(xc.T @ xc, xc.T @ xd, xd.T @ xd, xc.shape[0])


def test_compensated_target_is_the_drift_objective_in_whitened_form():
    """For any W_hat: ||X_c W_hat^T - X_d W^T||^2 + lam ||W_hat - W||^2 = n ||(W_hat - M) L||^2 + const, with M and
    G_c from compensated_target (L L^T = G_c + lam I): checked on random candidates, odd shapes, float64."""
    g = torch.Generator().manual_seed(11)
    n, inn, out = 97, 13, 7
    xd = torch.randn(n, inn, generator=g, dtype=torch.float64)
    xc = xd + 0.3 * torch.randn(n, inn, generator=g, dtype=torch.float64)
    w = torch.randn(out, inn, generator=g, dtype=torch.float64)
    damping = 0.05
    m, gram = seq.compensated_target(w, _stats(xc, xd), damping)
    lam = damping * torch.diagonal(xc.T @ xc / n).mean()
    L = fz.whitening(gram, damping)

    def direct(a):
        return ((xc @ a.T - xd @ w.T) ** 2).sum() / n + lam * ((a - w) ** 2).sum()

    def whitened(a):
        return (((a - m) @ L) ** 2).sum()

    a1, a2 = (torch.randn(out, inn, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(direct(a1) - direct(a2), whitened(a1) - whitened(a2), rtol=1e-9, atol=1e-9)
    assert direct(m) <= direct(a1) and direct(m) <= direct(w)  # M is the unconstrained minimizer
    no_drift, _ = seq.compensated_target(w, _stats(xd, xd), damping)
    torch.testing.assert_close(no_drift, w, rtol=1e-9, atol=1e-9)  # no drift: the one-shot target
    half = seq.LayerStats(*(t.float() for t in (xc.T @ xc, xc.T @ xd, xd.T @ xd)), n)
    m16, g16 = seq.compensated_target(w.bfloat16(), half, damping)  # a bf16 model's target keeps float32 digits
    assert m16.dtype == g16.dtype == torch.float32
    torch.testing.assert_close(m16.double(), seq.compensated_target(w.bfloat16().double(), _stats(xc, xd), damping)[0])


def test_drift_error_matches_the_outputs():
    g = torch.Generator().manual_seed(12)
    xd = torch.randn(50, 9, generator=g, dtype=torch.float64)
    xc = xd + 0.1 * torch.randn(50, 9, generator=g, dtype=torch.float64)
    w, a = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    expected = torch.linalg.norm(xc @ a.T - xd @ w.T) / torch.linalg.norm(xd @ w.T)
    assert seq.drift_error(w, a, _stats(xc, xd)) == pytest.approx(float(expected), rel=1e-9)
    assert seq.drift_error(w, w, _stats(xd, xd)) == pytest.approx(0.0, abs=1e-6)


def test_block_stack_finds_the_blocks_and_refuses_layers_outside():
    model = tiny_llama()
    names = [e.name for e in plan(model, ConvertConfig(structure="lowrank"), family_of(model)).layers]
    list_name, blocks, by_block = seq.block_stack(model, names)
    assert list_name == "model.layers" and len(blocks) == 2 and sorted(by_block) == [0, 1]
    assert len(by_block[0]) == 7 and all(n.startswith("model.layers.1.") for n in by_block[1])
    for order in (["lm_head", *names], [*names, "lm_head"]):  # named wherever it comes
        with pytest.raises(ValueError, match="layer lm_head is not inside one stack of blocks.*--exclude it"):
            seq.block_stack(model, order)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blast"])
def test_sequential_is_closer_to_dense_on_its_calibration_text(structure):
    """Same (b, r), same calibration tokens: the sequential conversion's logits are nearer the dense model's than
    the one-shot calibrated conversion's; its first layers (nothing converted before them) are the one-shot fits."""
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(5))
    config = ConvertConfig(structure=structure, layers=(("*", 4, 8),), params_ratio=None, steps=40)
    dense, oneshot, sequential = tiny_llama(), tiny_llama(), tiny_llama()
    convert(oneshot, config, calibration=ids)
    done = convert(sequential, config, calibration=ids, sequential=True)
    reference = _logits(dense, ids)
    err_one = torch.linalg.norm(_logits(oneshot, ids) - reference)
    err_seq = torch.linalg.norm(_logits(sequential, ids) - reference)
    assert err_seq < err_one, (float(err_seq), float(err_one))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        torch.testing.assert_close(
            sequential.get_submodule(name).to_dense(), oneshot.get_submodule(name).to_dense(), rtol=1e-4, atol=1e-4
        )  # BLAST's descent carries M's last-bit difference from W a little further
    assert all(0 <= e.output_relative_error < 1.5 for e in done.layers)
    assert all(torch.isfinite(torch.tensor(e.relative_error)) and e.relative_error > 0 for e in done.layers)


def test_sequential_on_gpt2_conv1d_layers():
    """GPT-2's Conv1D stores its weight transposed: the compensated target and the swap must agree on it."""
    model = build_builtin("gpt2-mini", seed=1).model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    config = ConvertConfig(structure="lowrank", params_ratio=0.5)
    dense = build_builtin("gpt2-mini", seed=1).model.eval()
    done = convert(model, config, calibration=ids, sequential=True)
    assert len(done.layers) > 0 and all(e.output_relative_error < 1 for e in done.layers)
    assert torch.linalg.norm(_logits(model, ids) - _logits(dense, ids)) < torch.linalg.norm(_logits(dense, ids))


def test_convert_sequential_cli_records_it_and_refuses_without_text(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    llama_with_tokenizer(src)
    text = write_text(tmp_path / "calib.jsonl", 400)
    args = ["convert", str(src), "-o", str(out), "--structure", "lowrank", "--calibration", str(text)]
    res = runner.invoke(app, [*args, "--calibration-tokens", "128", "--seq-len", "32", "--sequential", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["calibration"]["sequential"] is True
    record = json.loads((out / "blr_config.json").read_text())["calibration"]
    assert record["sequential"] is True and len(record["layers"]) == 14
    shown = runner.invoke(app, [*args[:3], str(tmp_path / "o3"), *args[4:], "--calibration-tokens", "64",
                                "--seq-len", "32", "--sequential"])  # fmt: skip
    assert shown.exit_code == 0 and "64 calibration tokens (2 x 32), against dense, drift included" in shown.stdout
    bare = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "o2"), "--sequential"])
    assert bare.exit_code == 2 and "give --calibration PATH" in bare.output
    assert len(bare.output.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()


def test_recorded_error_is_the_converted_models_output_against_dense():
    """Each layer's recorded error is ||y_c - y_d|| / ||y_d|| of its output in the converted model against the dense
    model's, on the calibration tokens, measured here with hooks on both models."""
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(8))
    config = ConvertConfig(structure="lowrank", layers=(("*", None, 8),), params_ratio=None)
    dense, converted = tiny_llama(), tiny_llama()
    done = convert(converted, config, calibration=ids, sequential=True)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"):
        outs = []
        for model in (dense, converted):
            handle = model.get_submodule(name).register_forward_hook(
                lambda m, a, out, outs=outs: outs.append(out.double())
            )
            _logits(model, ids)
            handle.remove()
        measured = float(torch.linalg.norm(outs[1] - outs[0]) / torch.linalg.norm(outs[0]))
        recorded = next(e.output_relative_error for e in done.layers if e.name == name)
        assert recorded == pytest.approx(measured, rel=1e-4), name


def test_default_allocation_with_fixed_ranks_and_calibration_is_uniform_and_runs_no_backward(monkeypatch):
    """--allocation auto with --layers (no layer set by the ratio) and calibration text: nothing to spread, so no
    loss-sensitivity pass either."""
    from blrdeploy.conversion import convert as convert_module

    def refuse(*args, **kwargs):
        raise AssertionError("the sensitivity pass ran")

    monkeypatch.setattr(convert_module, "output_sensitivity", refuse)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    config = ConvertConfig(structure="lowrank", layers=(("*", None, 8),), params_ratio=None)
    for sequential in (False, True):
        done = convert(tiny_llama(), config, calibration=ids, sequential=sequential)
        assert done.allocation["method"] == "uniform" and done.allocation["requested"] == "auto"


def test_block_chain_reproduces_the_encoder_with_its_mask():
    """The captured block calls (a padded attention mask among them), replayed block by block, give the model's
    own output: what the sequential pass runs is the model."""
    from test_sensitivity import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    _, blocks, _ = seq.block_stack(model, ["encoder.layer.1.output.dense"])
    hidden, calls = seq._capture_block_inputs(model, blocks, 1, [{"input_ids": ids, "attention_mask": mask}], "cpu")
    h = hidden[0]
    for index in range(2):
        h = seq._run_to(blocks[index], None, h, calls[index][0])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(h, expected)
    unmasked = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(unmasked[0, :7], expected[0, :7], atol=1e-4)  # the mask matters here


def test_sequential_on_an_encoder_with_an_attention_mask():
    """A BERT encoder (blocks called with an attention mask, returning tuples): the sequential conversion's hidden
    states are nearer dense than the one-shot conversion's on the calibration batch."""
    from test_sensitivity import tiny_bert

    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # a padded row: the captured mask must reach every block
    batch = [{"input_ids": ids, "attention_mask": mask}]
    config = ConvertConfig(structure="lowrank", layers=(("*", None, 8),), params_ratio=None, include=("encoder.*",))
    dense, oneshot, sequential = tiny_bert(), tiny_bert(), tiny_bert()
    names = [e.name for e in plan(dense, config, family_of(dense)).layers]
    grams = cal.collect_grams(oneshot, names, batch)
    convert(oneshot, config, calibration=grams)
    the_plan = plan(sequential, config, family_of(sequential))
    convert_layers_sequential(sequential, the_plan, config, batch)

    def hidden(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state.double()

    reference = hidden(dense)
    assert torch.linalg.norm(hidden(sequential) - reference) < torch.linalg.norm(hidden(oneshot) - reference)
