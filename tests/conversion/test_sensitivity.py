"""Loss-aware allocation: each layer's output sensitivity h_l = mean ||dL/dy_l||^2 / out_features from one backward
pass through the dense model (checked against autograd on a captured output), for a causal LM and, through a seeded
random projection, for an encoder; the weights leave no trace; the weighted greedy allocation and ``allocate``'s
``sensitivities``."""

import copy
import math

import pytest
import torch
from torch import nn

from blrdeploy import ConvertConfig
from blrdeploy.conversion.allocate import allocate
from blrdeploy.conversion.calibration import Grams, batched, collect_grams
from blrdeploy.conversion.convert import plan
from blrdeploy.conversion.sensitivity import output_sensitivity
from blrdeploy.models.sources import build_builtin, family_of
from blrdeploy.structures.allocation import allocate_ranks, discarded_fraction


def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if type(m).__name__ in ("Linear", "Conv1D") and not any(s in n for s in skip)
    ]


def tiny_bert():
    from transformers import BertConfig, BertModel  # deferred: transformers takes seconds to import

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128
    )
    return BertModel(config).eval()


# ------------------------------------------------------------------------------------------------ the sensitivities


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_causal_lm_sensitivities_are_positive_and_leave_the_weights_alone(name):
    model = build_builtin(name, seed=1).model.train()  # dropout on: the pass runs in eval mode, then restores it
    frozen = next(model.parameters())
    frozen.requires_grad_(False)  # a mixed set of flags, each restored as it was
    flags = [p.requires_grad for p in model.parameters()]
    names = linear_names(model)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    h = output_sensitivity(model, names, batched(ids, 32), progress=lambda done, total: seen.append((done, total)))
    assert list(h) == names
    assert all(math.isfinite(v) and v > 0 for v in h.values()), h
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and not frozen.requires_grad
    assert all(m.training for m in model.modules())
    assert seen == [(32, 48), (48, 48)]
    # the same windows batched otherwise: h is per token (a summed loss), not per batch
    again = output_sensitivity(model, names, [ids])
    for n in names:
        assert again[n] == pytest.approx(h[n], rel=1e-4)


def _reference(model, name, batches):
    """h of one layer by brute force: its output replaced by a leaf, the loss written out, torch.autograd.grad."""
    total, rows, width = 0.0, 0, None
    for kwargs in batches:
        captured = []

        def hook(module, args, output, captured=captured):
            leaf = output.detach().requires_grad_()
            captured.append(leaf)
            return leaf

        handle = model.get_submodule(name).register_forward_hook(hook)
        try:
            logits = model(**kwargs, use_cache=False).logits
        finally:
            handle.remove()
        targets = kwargs["input_ids"].clone()
        targets[kwargs["attention_mask"] == 0] = -100
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        (grad,) = torch.autograd.grad(loss, captured)
        total += float(grad.square().sum())
        rows += grad.numel() // grad.shape[-1]
        width = grad.shape[-1]
    return total / rows / width


def test_sensitivity_matches_autograd_on_a_captured_output():
    model = build_builtin("llama-tiny", seed=2).model.double().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a padded window: its padding predicts nothing
    batches = [
        {"input_ids": ids[:1], "attention_mask": mask[:1]},
        {"input_ids": ids[1:], "attention_mask": mask[1:]},  # batches of unequal size
    ]
    names = linear_names(model)
    h = output_sensitivity(model, names, batches)
    for name in names:
        assert h[name] == pytest.approx(_reference(model, name, batches), rel=1e-5), name
    assert all(p.grad is None for p in model.parameters())


def test_encoder_uses_a_seeded_random_projection():
    model = tiny_bert()
    names = linear_names(model, skip=("pooler",))  # the pooler does not feed last_hidden_state
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(2)]
    h = output_sensitivity(model, names, batches, seed=3)
    assert all(math.isfinite(v) and v > 0 for v in h.values()), h
    assert output_sensitivity(model, names, batches, seed=3) == h  # one seed, one answer
    assert output_sensitivity(model, names, batches, seed=4) != h
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    # a layer the forward calls but the output does not read (the pooler, beside last_hidden_state): 0, not an error
    with_pooler = output_sensitivity(model, [*names, "pooler.dense"], batches, seed=3)
    assert with_pooler["pooler.dense"] == 0.0 and with_pooler[names[0]] == pytest.approx(h[names[0]], rel=1e-6)


def test_unknown_or_unreached_layers_are_refused():
    model = build_builtin("llama-tiny", seed=1).model
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no layer 'model.layers.9.mlp.up_proj'"):
        output_sensitivity(model, ["model.layers.9.mlp.up_proj"], [ids])
    model.unused = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="never reached layer unused"):
        output_sensitivity(model, ["model.layers.0.mlp.up_proj", "unused"], [ids])
    with pytest.raises(ValueError, match="at least one batch"):
        output_sensitivity(model, ["model.layers.0.mlp.up_proj"], [])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.get_submodule("model.layers.0.mlp.up_proj")._forward_hooks  # the hooks are gone


# ------------------------------------------------------------------------------------------------ the weights


def decaying(n: int, tau: float) -> torch.Tensor:
    return torch.exp(-torch.arange(n, dtype=torch.float64) / tau)


def test_weights_decide_which_layer_gets_the_rank():
    n = 128
    spectra = [decaying(n, 16.0), decaying(n, 16.0)]
    args = ([2 * n, 2 * n], [n * n] * 2, n * n)
    even = allocate_ranks(spectra, *args, min_rank=16, step=16)
    assert even[0] == even[1]
    heavy = allocate_ranks(spectra, *args, min_rank=16, step=16, weights=[1.0, 100.0])
    assert heavy[1] > heavy[0] and sum(heavy) == sum(even)
    assert allocate_ranks(spectra, *args, min_rank=16, step=16, weights=[100.0, 1.0]) == heavy[::-1]
    # the weighted optimum on the grid
    best = min(
        (discarded_fraction(spectra[0], a) + 100 * discarded_fraction(spectra[1], b), a, b)
        for a in range(16, n, 16)
        for b in range(16, n, 16)
        if (a + b) * 2 * n <= n * n
    )
    cost = discarded_fraction(spectra[0], heavy[0]) + 100 * discarded_fraction(spectra[1], heavy[1])
    assert cost == pytest.approx(best[0])


def test_no_weights_or_unit_weights_are_the_old_allocation():
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (128, 64), (64, 128), (96, 160), (128, 128), (32, 96)]
    spectra = [torch.rand(min(s), generator=gen, dtype=torch.float64).sort(descending=True).values for s in shapes]
    per_rank = [o + i for o, i in shapes]
    dense = [o * i for o, i in shapes]
    budget = int(0.5 * sum(dense))
    old = allocate_ranks(spectra, per_rank, dense, budget, min_rank=16, step=16, groups=[[0, 4]])
    ones = allocate_ranks(spectra, per_rank, dense, budget, min_rank=16, step=16, groups=[[0, 4]], weights=[1] * 6)
    scaled = allocate_ranks(
        spectra, per_rank, dense, budget, min_rank=16, step=16, groups=[[0, 4]], weights=[1e-7] * 6
    )  # only the weights' ratios matter
    assert old == ones == scaled
    # a group's error is its members' weighted sum: weigh the group's members up and it grows
    same = [decaying(128, 16.0)] * 3
    args = ([256] * 3, [128 * 128] * 3, 3 * 128 * 64)
    even = allocate_ranks(same, *args, min_rank=8, step=8, groups=[[0, 1]])
    heavy = allocate_ranks(same, *args, min_rank=8, step=8, groups=[[0, 1]], weights=[10, 10, 1])
    assert even[0] == even[1] and heavy[0] == heavy[1] > even[0] and heavy[2] < even[2]


@pytest.mark.parametrize(
    "weights, match",
    [([1.0], "1 entries for 2 layers"), ([1.0, -1.0], "finite and >= 0"), ([1.0, math.nan], "finite"),
     ([math.inf, 1.0], "finite")],
)  # fmt: skip
def test_bad_weights_are_refused(weights, match):
    spectra = [decaying(64, 8.0)] * 2
    with pytest.raises(ValueError, match=match):
        allocate_ranks(spectra, [128, 128], [4096, 4096], 4096, min_rank=8, step=8, weights=weights)


# ------------------------------------------------------------------------------------------------ allocate()


class Pair(nn.Module):
    """Two identical 128 x 128 linears in a row (no family: converted with --include)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        w = torch.randn(128, 128, generator=gen) * torch.logspace(0, -1, 128)  # a decaying spectrum
        self.layers = nn.ModuleList(nn.Linear(128, 128, bias=False) for _ in range(2))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(w)


def _identity_grams(names) -> Grams:
    grams = Grams()
    for name in names:
        grams.sums[name], grams.rows[name], grams.group_of[name] = torch.eye(128, dtype=torch.float64), 1, name
    return grams


def test_allocate_weighs_by_the_sensitivities():
    model = Pair()
    config = ConvertConfig(structure="lowrank", params_ratio=0.5, include=("layers.*",), allocation="sensitivity")
    names = ["layers.0", "layers.1"]
    base = plan(model, config, None)
    unweighted = copy.deepcopy(base)
    record = allocate(model, unweighted, config, None, _identity_grams(names))
    assert unweighted.layers[0].rank == unweighted.layers[1].rank and record["proxy"] == "whitened spectrum"
    weighted = copy.deepcopy(base)
    record = allocate(
        model, weighted, config, None, _identity_grams(names), sensitivities={names[0]: 1e-3, names[1]: 0.1}
    )
    assert weighted.layers[1].rank > weighted.layers[0].rank
    assert record["proxy"] == "loss-weighted whitened spectrum" and record["achieved_ratio"] <= 0.5
    with pytest.raises(ValueError, match="no loss sensitivity for layer layers.1"):
        allocate(model, copy.deepcopy(base), config, None, _identity_grams(names), sensitivities={names[0]: 1.0})
    with pytest.raises(ValueError, match="layers.0's loss sensitivity nan"):
        allocate(model, copy.deepcopy(base), config, None, None, sensitivities={names[0]: math.nan, names[1]: 1.0})
    # uniform ignores them
    uniform = copy.deepcopy(base)
    record = allocate(model, uniform, ConvertConfig("lowrank", 0.5, include=("layers.*",), allocation="uniform"),
                      None, None, sensitivities={names[0]: 1e-3, names[1]: 0.1})  # fmt: skip
    assert [e.rank for e in uniform.layers] == [e.rank for e in base.layers] and record["proxy"] is None


def test_sensitivities_feed_allocate_as_the_pipeline_calls_it():
    """output_sensitivity then allocate(..., sensitivities=) on a tiny Llama, as ``run_convert`` will: the budget
    holds, siblings share a rank, and the record names the loss-weighted proxy."""
    model = build_builtin("llama-tiny", seed=1).model.eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    config = ConvertConfig(structure="lowrank", params_ratio=0.5, allocation="sensitivity")
    family = family_of(model)
    the_plan = plan(model, config, family)
    names = [e.name for e in the_plan.layers]
    grams = collect_grams(model, names, batched(ids))
    sens = output_sensitivity(model, names, batched(ids[:2], 16))
    record = allocate(model, the_plan, config, family, grams, sensitivities=sens)
    assert record["proxy"] == "loss-weighted whitened spectrum"
    assert sum(e.params for e in the_plan.layers) <= 0.5 * sum(e.dense_params for e in the_plan.layers)
    rank = {e.name: e.rank for e in the_plan.layers}
    assert len(record["shared_rank"]) == 4  # k/v (q is wider: grouped-query attention) and gate/up per block
    for group in record["shared_rank"]:
        assert len({rank[n] for n in group}) == 1
