"""Budget allocation for ``convert``: how ``--params-ratio`` is spread over the converted layers.

- ``uniform``: every layer at the ratio, (b, r) from the budget rule (``structures.budget``), as ``plan`` chose.
- ``sensitivity``: the ratio is one budget for all the layers the rule would have set (their BLR parameters together
  at most ratio x their dense parameters), spread by each layer's output error lost per parameter
  (``structures.allocation``). A layer's error curve is its whitened spectrum: the singular values of W L,
  L L^T = G + lambda I, with G its calibration Gram (of W itself without one). b stays as the rule chose it; only
  ranks move, in the rule's kernel-friendly steps.

``auto`` (the default) is ``sensitivity`` when calibration text is given and some layer is set by the ratio, else
``uniform``. With calibration text, layer l's relative error squared is weighted by w_l = h_l * E_l
(``sensitivities``, from ``conversion.sensitivity``): to second order the loss grows by 1/2 sum_t dy_t^T H dy_t over
the tokens, H ~ h_l I (the Fisher of the layer's output, averaged over its channels; h_l = mean ||dL/dy_l||^2 /
out_features), so the layer costs ~ 1/2 h_l ||dW X||^2 = 1/2 N h_l E_l relative_error^2 over N tokens, E_l the sum
of its whitened spectrum squared ~ tr(W G W^T), its output energy per token. The unweighted proxy (every layer's
relative error at weight 1) lowered the summed layer error yet raised perplexity on a real 135M Llama (low-rank 0.5:
499 -> 1,123); the loss-weighted one lowered it in every pair measured (bench/NOTES.md, "Sequential calibration and
loss-weighted allocation"). Without calibration text ``sensitivity`` still reads the weights' own spectra,
unweighted: opt-in only.

Sibling layers the family stacks on load (q/k/v, gate/up: ``models.families``, ``conversion.siblings``) get one
rank per group, their errors summed: stacking needs equal factor shapes, and a different rank per member would
silently cost the group its fused launches.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from blrdeploy.conversion.siblings import STACKABLE
from blrdeploy.structures import factorize as fz
from blrdeploy.structures.allocation import allocate_ranks, discarded_fraction
from blrdeploy.structures.budget import rank_step, structure_params

if TYPE_CHECKING:
    from blrdeploy.conversion.calibration import Grams
    from blrdeploy.conversion.convert import ConvertConfig, LayerPlan, Plan
    from blrdeploy.models.families import Family

ALLOCATIONS = ("auto", "uniform", "sensitivity")
STACKED = frozenset(cls.structure for cls in STACKABLE)  # Monarch layers are never stacked: no shared rank needed
MIN_RANK_FRACTION = 4  # a layer keeps at least 1/4 of its uniform rank (and one rank step)


def resolve_allocation(requested: str, calibrated: bool = False, by_ratio: bool = True) -> str:
    """``requested``, checked; ``auto`` is ``sensitivity`` when calibration text gives the loss weights and some
    layer is set by the ratio, else ``uniform`` (the weight-only proxy was never measured better than uniform)."""
    if requested not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {requested!r}; choose one of {', '.join(ALLOCATIONS)}")
    if requested == "auto":
        return "sensitivity" if calibrated and by_ratio else "uniform"
    return requested


def sibling_groups(entries: list[LayerPlan], family: Family | None) -> list[list[int]]:
    """Indices into ``entries`` of the layers that must share one rank: children of one parent named in one of the
    family's sibling tuples, of one shape, bias and b, in a structure the kernels stack (as ``fuse_siblings``
    groups them on load)."""
    if family is None:
        return []
    groups: dict[tuple, list[int]] = {}
    for index, entry in enumerate(entries):
        if entry.structure not in STACKED:
            continue
        parent, _, child = entry.name.rpartition(".")
        tuple_index = next((k for k, names in enumerate(family.siblings) if child in names), None)
        if tuple_index is None:
            continue
        key = (parent, tuple_index, entry.in_features, entry.out_features, entry.bias, entry.num_blocks)
        groups.setdefault(key, []).append(index)
    return [g for g in groups.values() if len(g) > 1]


def _monarch_blocks(w: torch.Tensor, b: int) -> torch.Tensor:
    """[l, k, s, p] = w[s*b + l, k*(in/b) + p]: Monarch's blocks, as ``structures.factorize`` lays them out."""
    out, inn = w.shape
    return w.reshape(out // b, b, b, inn // b).permute(1, 2, 0, 3)


def layer_spectrum(
    structure: str, weight: torch.Tensor, num_blocks: int | None, whitening: torch.Tensor | None
) -> torch.Tensor:
    """The descending values whose discarded energy at rank r estimates the layer's relative output error squared.

    Low-rank: the singular values of W L (``whitening`` L, or W itself when None): exact, Eckart-Young. Monarch of
    width R: every block (l, k) truncated to rank R/b, whitened by its input block's L_k (``whitening`` (b, q, q)),
    which is ``monarch_whitened``'s closed-form start (its sweeps only lower it): the blocks' t-th energies summed,
    spread over the b rank units that step t costs, so that the tail at any multiple of b is that projection's error.
    BLAST: the low-rank spectrum, as a proxy: a rank-r BLAST holds every rank-r matrix (S all ones), so the
    low-rank curve bounds its error from above; its own curve would take a descent per candidate rank."""
    if structure == "monarch":
        b = num_blocks
        blocks = _monarch_blocks(weight, b)
        if whitening is not None:
            blocks = blocks @ whitening  # [l, k, s, p] @ [k, p, p]
        energy = (torch.linalg.svdvals(blocks) ** 2).sum((0, 1))
        return (energy / b).repeat_interleave(b).sqrt()
    matrix = weight if whitening is None else weight @ whitening
    return torch.linalg.svdvals(matrix)


def _bounds(entry: LayerPlan) -> tuple[int, int, int]:
    """(step, min rank, max rank) of a layer: ranks in the budget rule's step, at least one step and 1/4 of the
    uniform rank, at most the most whose parameters stay under the dense layer's (one at dense size would only be
    slower than the dense layer; a real 135M Llama's k/v reached it at rho 0.5). A layer too small for the step
    takes the structure's unit (1, or b for Monarch); one too small even for that keeps its uniform rank."""
    out, inn, b = entry.out_features, entry.in_features, entry.num_blocks
    unit = b if entry.structure == "monarch" else 1
    largest = min(out, inn) - min(out, inn) % unit
    largest = min(largest, (entry.dense_params - 1) // structure_params(entry.structure, out, inn, b, 1))
    step = rank_step(entry.structure, out, inn, b)
    if largest < step:
        step = unit
    top = largest - largest % step
    if top < step:
        return step, entry.rank, entry.rank
    low = max(step, math.ceil(entry.rank / MIN_RANK_FRACTION / step) * step)
    return step, min(low, top), top


def allocate(
    model: nn.Module,
    the_plan: Plan,
    config: ConvertConfig,
    family: Family | None = None,
    grams: Grams | None = None,
    *,
    damping: float = fz.DEFAULT_DAMPING,
    device: str | torch.device | None = None,
    sensitivities: dict[str, float] | None = None,
) -> dict:
    """Applies ``config.allocation`` to ``the_plan`` in place (ranks and params of the layers the budget rule set)
    and returns the record blr_config.json keeps as "allocation" (also set as ``the_plan.allocation``).

    ``model`` holds the dense weights (sensitivity reads them: a meta-device model is refused); ``grams``, when
    given, whiten each spectrum (damped by ``damping`` as the fits are). ``sensitivities`` (layer name -> h_l,
    ``conversion.sensitivity.output_sensitivity``), when given, weigh each layer's error by h_l times its spectrum's
    energy (sensitivity only; uniform ignores them); every layer the allocation moves needs one."""
    t0 = time.perf_counter()
    by_ratio = set(the_plan.by_ratio)
    entries = [e for e in the_plan.layers if e.name in by_ratio]
    method = resolve_allocation(config.allocation, sensitivities is not None, bool(entries))
    groups = sibling_groups(entries, family)
    if method == "sensitivity":
        if not entries:
            raise ValueError(
                "--allocation sensitivity spreads --params-ratio over the layers it sets; every layer here has a "
                "fixed (b, r) from --preset or --layers"
            )
        _allocate_by_sensitivity(model, entries, groups, config, grams, damping, device, sensitivities)
    dense = sum(e.dense_params for e in the_plan.layers)
    record = {
        "method": method,
        "requested": config.allocation,
        "budget_ratio": config.params_ratio if entries else None,
        "achieved_ratio": sum(e.params for e in the_plan.layers) / max(1, dense),
        "proxy": None,
        "shared_rank": [[entries[i].name for i in g] for g in groups],
        "seconds": time.perf_counter() - t0,
    }
    if method == "sensitivity":
        proxy = "whitened spectrum" if grams is not None else "weight spectrum"
        proxy = "loss-weighted " + proxy if sensitivities is not None else proxy
        record["proxy"] = proxy + (" (low-rank curve for BLAST)" if config.structure == "blast" else "")
    the_plan.allocation = record
    return record


def _allocate_by_sensitivity(model, entries, groups, config, grams, damping, device, sensitivities) -> None:
    compute = getattr(torch, config.compute_dtype)
    if sensitivities is not None:
        missing = next((e.name for e in entries if e.name not in sensitivities), None)
        if missing is not None:
            raise ValueError(f"--allocation sensitivity: no loss sensitivity for layer {missing}")
        bad = next(
            (e.name for e in entries if not (math.isfinite(sensitivities[e.name]) and sensitivities[e.name] >= 0)), None
        )
        if bad is not None:
            raise ValueError(
                f"--allocation sensitivity: layer {bad}'s loss sensitivity {sensitivities[bad]} is not finite and >= 0"
            )
    # One Cholesky per shared input: q/k/v (gate/up) share a Gram and come one after another in the plan; only the
    # last is kept (a 7B model's would take GBs).
    whitenings: dict[tuple, torch.Tensor] = {}
    spectra = []
    for entry in entries:
        weight = model.get_submodule(entry.name).weight
        if weight.is_meta:
            raise ValueError(
                "--allocation sensitivity measures each layer's weights: a --dry-run has none (plan with "
                "--allocation uniform)"
            )
        where = torch.device(device) if device is not None else weight.device
        w = weight.detach().to(device=where, dtype=compute)
        w = w.T if entry.kind == "conv1d" else w
        whiten = None
        if grams is not None:
            blocks = entry.num_blocks if entry.structure == "monarch" else None
            key = (grams.group_of.get(entry.name, entry.name), blocks)
            if key not in whitenings:
                gram = grams[entry.name].to(where)
                fz.check_gram(gram, entry.in_features)
                whitenings = {key: _whitening(gram, blocks, damping, compute)}
                del gram
            whiten = whitenings[key]
        spectra.append(layer_spectrum(entry.structure, w, entry.num_blocks, whiten).cpu())
        del w
    bounds = [_bounds(e) for e in entries]
    dense = [e.dense_params for e in entries]
    per_rank = [structure_params(e.structure, e.out_features, e.in_features, e.num_blocks, 1) for e in entries]
    budget = math.floor(config.params_ratio * sum(dense))
    weights = None
    if sensitivities is not None:  # h_l * E_l: the loss's curvature in the output times the output's energy
        weights = [
            sensitivities[e.name] * float(s.double().square().sum()) for e, s in zip(entries, spectra, strict=True)
        ]
    ranks = allocate_ranks(
        spectra, per_rank, dense, budget, step=[s for s, _, _ in bounds], min_rank=[lo for _, lo, _ in bounds],
        max_rank=[hi for _, _, hi in bounds], groups=groups, weights=weights,
    )  # fmt: skip
    for entry, rank, spectrum in zip(entries, ranks, spectra, strict=True):
        entry.rank = rank
        entry.params = structure_params(entry.structure, entry.out_features, entry.in_features, entry.num_blocks, rank)
        entry.estimated_output_error = math.sqrt(discarded_fraction(spectrum, rank))
    spent = sum(e.params for e in entries)
    if spent > budget:  # allocate_ranks counts with the same linear costs: a defect if this ever fires
        raise AssertionError(f"allocation spent {spent} parameters over its budget of {budget}")


def _whitening(gram: torch.Tensor, num_blocks: int | None, damping: float, dtype: torch.dtype) -> torch.Tensor:
    """L of the damped Gram (the low-rank and BLAST fits' objective), or for Monarch (b, q, q): each input block's
    diagonal Gram block whitened on its own, damped by the whole diagonal's lambda (``monarch_whitened``'s start)."""
    if num_blocks is None:
        return fz.whitening(gram, damping, dtype)
    g = fz.damped_gram(gram, damping, torch.float64)
    q = g.shape[-1] // num_blocks
    diagonal = torch.stack([g[j * q : (j + 1) * q, j * q : (j + 1) * q] for j in range(num_blocks)])
    return fz.whitening(diagonal, 0.0, dtype)
