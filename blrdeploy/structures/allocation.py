"""Spreading one parameter budget over many layers: each layer's rank chosen by how much output error it loses
per parameter, instead of every layer at the same ratio.

A layer is described by its spectrum: the singular values of its (whitened) weight, whose discarded energy
``sum_{t >= r} s_t^2 / sum_t s_t^2`` at rank r is its relative output error squared (exactly for a whitened
truncated SVD, Eckart-Young). Its parameters are linear in the rank (``structures.budget.structure_params``), so a
rank step costs the same at every rank. :func:`allocate_ranks` minimizes the summed error squared, each layer's
optionally weighted (by how much the model's loss reads that layer's output: ``conversion.sensitivity``), under the
budget by greedy marginal gain: every layer starts at its lowest rank, then the step that removes the most error per
parameter is taken, until no step fits. Sorted singular values make each layer's error convex in its rank (and a
weight >= 0 keeps it so), so the greedy order is the optimum's up to the last step's granularity (a knapsack's
rounding).

Layers given as one group share one rank (kernels stack siblings only when their factor shapes match): the group
steps together, its error the (weighted) sum of its members', its cost the sum of theirs. Nothing here knows a
model; the spectra and weights come from ``conversion.allocate``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch


def discarded_fraction(spectrum: torch.Tensor, rank: int) -> float:
    """sum_{t >= rank} s_t^2 / sum_t s_t^2 of a descending ``spectrum``: the relative error squared of keeping its
    first ``rank`` directions (0 for an all-zero spectrum)."""
    energy = spectrum.detach().double() ** 2
    total = energy.sum()
    return float(energy[rank:].sum() / total) if total > 0 else 0.0


def _tails(spectrum: torch.Tensor) -> list[float]:
    """tails[r] = discarded_fraction(spectrum, r) for r = 0..len(spectrum)."""
    energy = spectrum.detach().double().flatten() ** 2
    total = float(energy.sum())
    if total <= 0:
        return [0.0] * (len(energy) + 1)
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    return (1.0 - kept / total).clamp_min(0).tolist()


def _broadcast(value, n: int, what: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} layers")
    return values


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    params_per_rank: Sequence[int],
    dense_params: Sequence[int],
    budget: int,
    *,
    min_rank: Sequence[int] | int,
    step: Sequence[int] | int,
    max_rank: Sequence[int] | None = None,
    groups: Sequence[Sequence[int]] = (),
    weights: Sequence[float] | None = None,
) -> list[int]:
    """The rank of each layer minimizing sum_i weights[i] * discarded_fraction(spectra[i], rank_i) subject to
    sum_i params_per_rank[i] * rank_i <= budget (``weights`` None: all ones, the plain sum of relative errors
    squared; finite and >= 0, one per layer).

    Layer i takes ranks min_rank[i] + k * step[i]: at least ``min_rank``, at most ``max_rank`` (default: the most
    whose parameters stay under ``dense_params``, and no more than its spectrum's length). ``groups``: lists of
    layer indices that share one rank (same step; the group's bounds are the tightest of its members'); every other
    layer is a group of its own; a group's error is its members' weighted sum. The result spends the budget to within
    one step of the cheapest layer that could still grow. A ValueError when the lowest ranks alone exceed the
    budget, or on inconsistent input."""
    n = len(spectra)
    per_rank = _broadcast(params_per_rank, n, "params_per_rank")
    dense = _broadcast(dense_params, n, "dense_params")
    lo = _broadcast(min_rank, n, "min_rank")
    steps = _broadcast(step, n, "step")
    if any(s < 1 for s in steps) or any(c < 1 for c in per_rank) or any(r < 0 for r in lo):
        raise ValueError("steps and params_per_rank must be >= 1 and min ranks >= 0")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != n:
            raise ValueError(f"weights has {len(weights)} entries for {n} layers")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError("weights must be finite and >= 0")
    if max_rank is None:
        most = [min((dense[i] - 1) // per_rank[i], len(spectra[i])) for i in range(n)]
        hi = [lo[i] + (most[i] - lo[i]) // steps[i] * steps[i] for i in range(n)]
    else:
        hi = _broadcast(max_rank, n, "max_rank")

    member_of = [-1] * n
    units: list[list[int]] = []
    for group in groups:
        members = sorted(set(int(i) for i in group))
        if not members:
            continue
        if any(not 0 <= i < n or member_of[i] >= 0 for i in members):
            raise ValueError(f"group {list(group)} names a layer out of range or already in another group")
        if len({steps[i] for i in members}) > 1 or len({lo[i] % steps[i] for i in members}) > 1:
            raise ValueError(f"group {list(group)}: its layers must share one rank step and grid")
        for i in members:
            member_of[i] = len(units)
        units.append(members)
    units += [[i] for i in range(n) if member_of[i] < 0]

    tails = [_tails(s) for s in spectra]
    if weights is not None:
        tails = [[w * t for t in tail] for w, tail in zip(weights, tails, strict=True)]

    def loss(members: list[int], rank: int) -> float:
        return sum(tails[i][min(rank, len(tails[i]) - 1)] for i in members)

    rank_of, top, cost = [], [], []
    for members in units:
        low, high = max(lo[i] for i in members), min(hi[i] for i in members)
        if high < low:
            raise ValueError(f"layers {members}: max rank {high} is below min rank {low}")
        rank_of.append(low)
        top.append(low + (high - low) // steps[members[0]] * steps[members[0]])
        cost.append(sum(per_rank[i] for i in members) * steps[members[0]])
    spent = sum(per_rank[i] * rank_of[u] for u, members in enumerate(units) for i in members)
    if spent > budget:
        raise ValueError(f"the budget of {budget:,} parameters is below the {spent:,} the layers' lowest ranks take")

    def candidate(u: int):
        members, rank = units[u], rank_of[u]
        if rank + steps[members[0]] > top[u]:
            return None
        gain = loss(members, rank) - loss(members, rank + steps[members[0]])
        return (-gain / cost[u], u)  # the most error removed per parameter first; ties to the earlier layer

    heap = [c for u in range(len(units)) if (c := candidate(u)) is not None]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        if spent + cost[u] > budget:
            continue  # the budget only shrinks and this unit's step costs the same at every rank: never again
        spent += cost[u]
        rank_of[u] += steps[units[u][0]]
        nxt = candidate(u)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    ranks = [0] * n
    for u, members in enumerate(units):
        for i in members:
            ranks[i] = rank_of[u]
    return ranks
