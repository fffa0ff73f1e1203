"""Choosing (num_blocks, rank) from a parameter budget ratio rho: r ≈ rho·out·in / (out + in + b²) in multiples of 16,
b so that each block is 64-256 wide (tensor-core friendly)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from blrdeploy.structures import shapes

STRUCTURES = ("blast", "monarch", "lowrank")
RANK_MULTIPLE = 16  # tensor-core tile width: ranks off a multiple of 16 waste part of every MMA
BLOCK_WIDTH = (64, 256)  # in/b in this range keeps each block's GEMM tensor-core friendly


@dataclass(frozen=True)
class BudgetChoice:
    structure: str
    out_features: int
    in_features: int
    num_blocks: int | None  # None for low-rank
    rank: int
    params: int
    requested_ratio: float

    @property
    def ratio(self) -> float:
        """The parameter ratio actually reached: params / (out*in)."""
        return self.params / (self.out_features * self.in_features)

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def structure_params(structure: str, out_features: int, in_features: int, num_blocks: int | None, rank: int) -> int:
    if structure == "blast":
        return rank * (out_features + in_features + num_blocks * num_blocks)
    if structure in ("monarch", "lowrank"):
        return rank * (out_features + in_features)
    raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")


def pick_num_blocks(out_features: int, in_features: int) -> int:
    """The fewest blocks whose width in/b lies in 64..256 and is a multiple of 16; failing that, the common
    divisor whose width is nearest that range."""
    lo, hi = BLOCK_WIDTH
    common = shapes.common_block_counts(out_features, in_features)
    good = [b for b in common if lo <= in_features // b <= hi and (in_features // b) % RANK_MULTIPLE == 0]
    if good:
        return min(good)
    in_range = [b for b in common if lo <= in_features // b <= hi]
    if in_range:
        return min(in_range)

    def distance(b: int) -> float:
        width = in_features / b
        return math.log(lo / width) if width < lo else math.log(width / hi)

    return min(common, key=distance)


def rank_step(structure: str, out_features: int, in_features: int, num_blocks: int | None) -> int:
    """The multiple the budget rule rounds ranks to: RANK_MULTIPLE, for Monarch the least multiple of b too (its
    width is b blocks of R/b), or b alone when that exceeds the layer's rank."""
    if structure != "monarch":
        return RANK_MULTIPLE
    step = math.lcm(num_blocks, RANK_MULTIPLE)
    return num_blocks if step > min(out_features, in_features) else step


def choose_blocks_and_rank(out_features: int, in_features: int, ratio: float, structure: str = "blast") -> BudgetChoice:
    """(num_blocks, rank) for a layer so that its parameters are about ``ratio`` x the dense out*in."""
    shapes.check_features(in_features, out_features)
    if not 0 < ratio < 1:
        raise ValueError(f"params ratio must be in (0, 1), got {ratio}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    budget = ratio * out_features * in_features
    max_rank = min(out_features, in_features)
    b = None if structure == "lowrank" else pick_num_blocks(out_features, in_features)
    extra = b * b if structure == "blast" else 0
    step = rank_step(structure, out_features, in_features, b)
    raw = budget / (out_features + in_features + extra)
    rank = round(raw / step) * step
    if rank == 0:  # layers too small for the preferred multiple: the nearest valid rank instead
        unit = b if structure == "monarch" else 1
        rank = max(unit, round(raw / unit) * unit)
    rank = min(rank, max_rank - max_rank % (b if structure == "monarch" else 1))
    params = structure_params(structure, out_features, in_features, b, rank)
    return BudgetChoice(structure, out_features, in_features, b, rank, params, ratio)
