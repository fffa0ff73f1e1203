"""Budget allocation (``convert --allocation``): the greedy allocation on planted spectra, sibling groups sharing a
rank (and still fusing on load), uniform (the default) reproducing today's plan, sensitivity beating uniform on output
error at equal parameters, the record in blr_config.json and ``info``, and bad input in one line."""

import copy
import json

import pytest
import torch
from test_calibration import llama_with_tokenizer, write_text
from torch import nn
from typer.testing import CliRunner

from blrdeploy import ConvertConfig, convert, load, save
from blrdeploy.cli import app
from blrdeploy.conversion.allocate import allocate
from blrdeploy.conversion.calibration import Grams, batched, collect_grams
from blrdeploy.conversion.convert import plan
from blrdeploy.conversion.siblings import Siblings
from blrdeploy.models.sources import build_builtin, family_of
from blrdeploy.structures.allocation import allocate_ranks, discarded_fraction
from blrdeploy.structures.budget import choose_blocks_and_rank
from blrdeploy.structures.factorize import output_relative_error

runner = CliRunner()


def decaying(n: int, tau: float) -> torch.Tensor:
    return torch.exp(-torch.arange(n, dtype=torch.float64) / tau)


def planted(out: int, inn: int, spectrum: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A weight with the given singular values and random singular vectors."""
    P = torch.linalg.qr(torch.randn(out, len(spectrum), generator=gen, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(inn, len(spectrum), generator=gen, dtype=torch.float64))[0]
    return (P * spectrum) @ Q.T


# ------------------------------------------------------------------------------------------- the pure allocation


def test_budget_is_met_within_one_step():
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (128, 64), (64, 128), (96, 160), (128, 128), (32, 96)]
    spectra = [torch.rand(min(s), generator=gen, dtype=torch.float64).sort(descending=True).values for s in shapes]
    per_rank = [o + i for o, i in shapes]
    dense = [o * i for o, i in shapes]
    for ratio in (0.35, 0.5, 0.65, 0.8):
        budget = int(ratio * sum(dense))
        ranks = allocate_ranks(spectra, per_rank, dense, budget, min_rank=16, step=16, groups=[[0, 4]])
        spent = sum(c * r for c, r in zip(per_rank, ranks, strict=True))
        assert spent <= budget
        assert all(r % 16 == 0 and 16 <= r and c * r < d for r, c, d in zip(ranks, per_rank, dense, strict=True))
        assert ranks[0] == ranks[4]  # the group shares one rank
        units = [[0, 4], [1], [2], [3], [5]]
        growable = [
            sum(per_rank[i] * 16 for i in u) for u in units if all(per_rank[i] * (ranks[i] + 16) < dense[i] for i in u)
        ]
        if growable:  # no whole step of a layer that could still grow is left unspent
            assert budget - spent < min(growable), (ratio, ranks)


def test_fast_decaying_spectrum_gets_less_rank_than_a_flat_one():
    n = 128
    fast, flat = decaying(n, 4.0), torch.ones(n, dtype=torch.float64)
    ranks = allocate_ranks([fast, flat], [2 * n, 2 * n], [n * n] * 2, n * n, min_rank=16, step=16)
    assert ranks[0] < ranks[1]
    assert sum(ranks) * 2 * n == n * n  # the whole budget, in whole steps
    # and the split is the best one on the grid: no other (r0, r1) within budget loses less
    best = min(
        (discarded_fraction(fast, a) + discarded_fraction(flat, b), a, b)
        for a in range(16, n + 1, 16)
        for b in range(16, n + 1, 16)
        if (a + b) * 2 * n <= n * n
    )
    assert discarded_fraction(fast, ranks[0]) + discarded_fraction(flat, ranks[1]) == pytest.approx(best[0])


def test_bounds_and_refusals():
    n = 64
    spectra = [decaying(n, 2.0), torch.ones(n, dtype=torch.float64)]
    # any budget: each layer stops at the largest rank whose parameters stay under its dense size
    ranks = allocate_ranks(spectra, [100] * 2, [n * n] * 2, 10 * n * n, min_rank=[16, 16], step=16)
    assert ranks == [32, 32]  # 3200 < 4096; 48 would be 4800
    ranks = allocate_ranks(spectra, [2 * n] * 2, [n * n] * 2, 10 * n * n, min_rank=[16, 16], step=16)
    assert ranks == [16, 16]  # 32 * 2n = n*n: at dense size, so not taken
    with pytest.raises(ValueError, match="below the 4,096 the layers' lowest ranks take"):
        allocate_ranks(spectra, [2 * n] * 2, [n * n] * 2, 1000, min_rank=16, step=16)
    with pytest.raises(ValueError, match="max rank 16 is below min rank 32"):
        allocate_ranks(spectra, [2 * n] * 2, [n * n] * 2, n * n, min_rank=32, step=16)
    with pytest.raises(ValueError, match="share one rank step"):
        allocate_ranks(spectra, [2 * n] * 2, [n * n] * 2, n * n, min_rank=16, step=[16, 8], groups=[[0, 1]])


# ------------------------------------------------------------------------------------------------- on models


def test_uniform_and_the_default_without_calibration_are_todays_plan():
    model = build_builtin("gpt2-tiny", seed=1).model
    expected = []
    for e in plan(model, ConvertConfig(structure="monarch", params_ratio=0.4), family_of(model)).layers:
        choice = choose_blocks_and_rank(e.out_features, e.in_features, 0.4, "monarch")  # the per-layer rule
        expected.append((e.name, choice.num_blocks, choice.rank, choice.params))
    for kw in ({}, {"allocation": "uniform"}):
        done = convert(copy.deepcopy(model), ConvertConfig(structure="monarch", params_ratio=0.4, **kw))
        assert [(e.name, e.num_blocks, e.rank, e.params) for e in done.layers] == expected
        assert done.allocation["method"] == "uniform"
        assert done.allocation["requested"] == kw.get("allocation", "auto")
    # uniform stays uniform with calibration inputs too
    llama = build_builtin("llama-tiny", seed=1).model.eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    config = ConvertConfig(structure="lowrank", params_ratio=0.5, allocation="uniform")
    ranks = [(e.name, e.rank) for e in plan(llama, config, family_of(llama)).layers]
    done = convert(llama, config, calibration=ids)
    assert [(e.name, e.rank) for e in done.layers] == ranks and done.allocation["method"] == "uniform"
    # the default (auto) with calibration inputs: the loss-weighted budget
    auto = convert(build_builtin("llama-tiny", seed=1).model.eval(), ConvertConfig("lowrank", 0.5), calibration=ids)
    assert auto.allocation["method"] == "sensitivity" and auto.allocation["requested"] == "auto"
    assert auto.allocation["proxy"] == "loss-weighted whitened spectrum"
    assert auto.allocation["achieved_ratio"] <= 0.5


def test_sensitivity_without_calibration_reads_the_weights():
    """No Gram: the spectrum of W itself (GPT-2 Conv1D layers); the budget holds over all of them."""
    model = build_builtin("gpt2-tiny", seed=1).model
    with torch.no_grad():  # one layer made nearly rank-16: it needs the least rank of its kind
        w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
        w.copy_(planted(w.shape[1], w.shape[0], decaying(16, 4.0), torch.Generator().manual_seed(5)).T)
    config = ConvertConfig(structure="lowrank", params_ratio=0.5, allocation="sensitivity")
    done = convert(model, config)
    assert done.allocation["method"] == "sensitivity" and done.allocation["proxy"] == "weight spectrum"
    assert sum(e.params for e in done.layers) <= 0.5 * sum(e.dense_params for e in done.layers)
    rank = {e.name: e.rank for e in done.layers}
    assert rank["transformer.h.0.mlp.c_fc"] == 16 < rank["transformer.h.1.mlp.c_fc"]
    assert rank["transformer.h.0.mlp.c_fc"] == min(e.rank for e in done.layers)


def _planted_llama(gen):
    """A 2-layer Llama whose q/k/v read one input at one shape (no GQA), q_proj planted with a fast-decaying
    spectrum and up_proj with a fast one too: left alone, the allocation would give them other ranks than
    k/v and gate."""
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers takes seconds to import

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(planted(128, 128, 0.5 * decaying(128, 3.0), gen))
            layer.mlp.up_proj.weight.copy_(planted(256, 128, 0.5 * decaying(128, 3.0), gen))
    return model


def test_siblings_share_a_rank_and_still_fuse_on_load(tmp_path):
    gen = torch.Generator().manual_seed(1)
    model = _planted_llama(gen)
    ids = torch.randint(0, 128, (4, 32), generator=gen)
    config = ConvertConfig(structure="lowrank", params_ratio=0.5, allocation="sensitivity")
    the_plan = plan(model, config, family_of(model))
    grams = collect_grams(model, [e.name for e in the_plan.layers], batched(ids))
    # without the family's sibling groups, the planted layers get other ranks than their siblings
    alone = copy.deepcopy(the_plan)
    allocate(model, alone, config, None, grams)
    rank = {e.name: e.rank for e in alone.layers}
    assert rank["model.layers.0.self_attn.q_proj"] != rank["model.layers.0.self_attn.v_proj"]
    assert rank["model.layers.0.mlp.up_proj"] != rank["model.layers.0.mlp.gate_proj"]

    done = convert(model, config, calibration=ids)
    assert done.allocation["method"] == "sensitivity" and done.allocation["requested"] == "sensitivity"
    assert len(done.allocation["shared_rank"]) == 4
    rank = {e.name: e.rank for e in done.layers}
    for i in range(2):
        p = f"model.layers.{i}."
        assert len({rank[p + f"self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert rank[p + "mlp.gate_proj"] == rank[p + "mlp.up_proj"]
    assert len(set(rank.values())) > 1  # not uniform: the budget moved between layers
    assert sum(e.params for e in done.layers) <= 0.5 * sum(e.dense_params for e in done.layers)
    save(model, tmp_path / "c")
    fused = load(tmp_path / "c", fuse_siblings=True)
    names = sorted(m.names for m in fused.modules() if isinstance(m, Siblings))
    assert names == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2


N = 512  # the budget rule's b is 2 at this width: Monarch and BLAST are real block structures


class Stack(nn.Module):
    """Independent N x N linears (no family: converted with --include)."""

    def __init__(self, weights):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(N, N, bias=False) for _ in weights)
        with torch.no_grad():
            for layer, w in zip(self.layers, weights, strict=True):
                layer.weight.copy_(w)


def _grams(names, gen) -> Grams:
    """A random anisotropic input Gram per layer (inputs whose feature scales span two decades)."""
    grams = Grams()
    for name in names:
        x = torch.randn(4 * N, N, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, N, dtype=torch.float64)
        x = x @ torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))[0]
        grams.sums[name], grams.rows[name], grams.group_of[name] = x.T @ x, 4 * N, name
    return grams


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blast"])
def test_sensitivity_beats_uniform_on_output_error_at_equal_parameters(structure):
    """The fits' own output errors on the Grams (not the allocation's estimate): summed squared, sensitivity's are
    lower than uniform's, at no more parameters."""
    gen = torch.Generator().manual_seed(2)
    weights = [planted(N, N, decaying(N, tau), gen).float() for tau in (8.0, 32.0, 128.0, 1e4)]
    names = [f"layers.{i}" for i in range(4)]
    result = {}
    for allocation in ("uniform", "sensitivity"):
        model = Stack(weights)
        config = ConvertConfig(
            structure=structure, params_ratio=0.5, include=("layers.*",), allocation=allocation, steps=40
        )
        grams = _grams(names, torch.Generator().manual_seed(3))
        kept = {n: grams[n] for n in names}
        done = convert(model, config, calibration=grams)
        errors = [
            output_relative_error(weights[i].double(), model.layers[i].to_dense().double(), kept[names[i]])
            for i in range(4)
        ]
        result[allocation] = (sum(e * e for e in errors), sum(e.params for e in done.layers), done)
    uniform, sensitivity = result["uniform"], result["sensitivity"]
    assert structure == "lowrank" or sensitivity[2].layers[0].num_blocks == 2
    assert sensitivity[1] <= uniform[1]
    assert sensitivity[0] < 0.7 * uniform[0], (sensitivity[0], uniform[0])
    ranks = [e.rank for e in sensitivity[2].layers]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]  # the flatter the spectrum, the more rank


# ------------------------------------------------------------------------------------------------ the command


def test_convert_records_the_allocation_and_info_shows_it(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    llama_with_tokenizer(src)
    text = write_text(tmp_path / "calib.jsonl", 400)
    args = ["convert", str(src), "-o", str(out), "--structure", "lowrank", "--params-ratio", "0.5"]
    res = runner.invoke(app, [*args, "--calibration", str(text), "--calibration-tokens", "128", "--seq-len", "32",
                              "--allocation", "sensitivity"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "converted layers: " in res.stdout and "; allocation sensitivity, budget 0.5)" in res.stdout
    cfg = json.loads((out / "blr_config.json").read_text())
    record = cfg["allocation"]
    assert record["method"] == "sensitivity" and record["requested"] == "sensitivity" and record["budget_ratio"] == 0.5
    dense = sum(e["in_features"] * e["out_features"] for e in cfg["layers"])
    assert record["achieved_ratio"] == pytest.approx(sum(e["params"] for e in cfg["layers"]) / dense)
    assert record["achieved_ratio"] <= 0.5 and record["proxy"] == "loss-weighted whitened spectrum"
    assert f"(ratio {record['achieved_ratio']:.4f}; allocation sensitivity" in res.stdout
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "ratio" in info.stdout and "allocation sensitivity, budget 0.5" in info.stdout
    as_json = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert as_json["allocation"]["method"] == "sensitivity"
    assert all(
        e["ratio"] == pytest.approx(e["params"] / (e["in_features"] * e["out_features"])) for e in as_json["layers"]
    )


def test_bad_allocation_gives_one_line_and_writes_nothing(tmp_path):
    cases = [
        (
            ["gpt2-tiny", "--allocation", "bogus"],
            "unknown allocation 'bogus'; choose one of auto, uniform, sensitivity",
        ),
        (["llama-tiny", "--allocation", "sensitivity", "--dry-run"], "a --dry-run has none"),
        (
            ["llama-7b", "--preset", "paper", "--allocation", "sensitivity"],
            "spreads --params-ratio, and none was given",
        ),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        res = runner.invoke(app, ["convert", *args, "-o", str(out)])
        assert res.exit_code == 2, (message, res.output)
        assert message in res.output, (message, res.output)
        assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1, res.output
        assert isinstance(res.exception, SystemExit)
        assert not out.exists(), message
