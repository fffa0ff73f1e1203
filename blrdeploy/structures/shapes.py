"""Shape rules shared by the structures: block counts must divide, ranks must be in range, weights must be finite.

Every failure is a ``ValueError`` that names the valid choices; nothing is ever padded.
"""

from __future__ import annotations

import torch


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _short(values: list[int], limit: int = 16) -> str:
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head = ", ".join(map(str, values[: limit - 2]))
    return f"{head}, ..., {values[-2]}, {values[-1]}"


def check_features(in_features: int, out_features: int) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_block_count(num_blocks: int, dim: int, what: str) -> None:
    """``what`` names the dimension for the message, e.g. 'in_features'."""
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1 or dim % num_blocks:
        raise ValueError(
            f"num_blocks={num_blocks!r} does not divide {what}={dim}; valid block counts: {_short(divisors(dim))}"
        )


def common_block_counts(out_features: int, in_features: int) -> list[int]:
    return [b for b in divisors(in_features) if out_features % b == 0]


def check_square_block_count(num_blocks: int, out_features: int, in_features: int) -> None:
    if (
        not isinstance(num_blocks, int)
        or isinstance(num_blocks, bool)
        or num_blocks < 1
        or in_features % num_blocks
        or out_features % num_blocks
    ):
        raise ValueError(
            f"num_blocks={num_blocks!r} must divide both out_features={out_features} and in_features={in_features}; "
            f"valid block counts: {_short(common_block_counts(out_features, in_features))}"
        )


def check_rank(rank: int, max_rank: int, what: str, multiple_of: int = 1) -> None:
    ok = isinstance(rank, int) and not isinstance(rank, bool) and multiple_of <= rank <= max_rank
    if ok and rank % multiple_of == 0:
        return
    if multiple_of == 1:
        valid = f"1..{max_rank}"
    else:
        valid = f"multiples of {multiple_of} from {multiple_of} to {max_rank - max_rank % multiple_of}"
    raise ValueError(f"rank={rank!r} is out of range for {what}; valid ranks: {valid}")


def as_weight(weight_or_linear, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(W, bias)`` with W shaped (out, in), from a tensor (bias given separately) or an
    ``nn.Linear``-like module (its own bias)."""
    if isinstance(weight_or_linear, torch.Tensor):
        weight = weight_or_linear
    elif isinstance(getattr(weight_or_linear, "weight", None), torch.Tensor):
        if bias is not None:
            raise ValueError("bias given twice: pass either an nn.Linear or a weight tensor with bias=, not both")
        weight, bias = weight_or_linear.weight, getattr(weight_or_linear, "bias", None)
    else:
        raise ValueError(
            f"expected a weight tensor of shape (out, in) or an nn.Linear, got {type(weight_or_linear).__name__}"
        )
    if weight.dim() != 2:
        raise ValueError(f"dense weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.is_meta:
        raise ValueError("dense weight is on the meta device: it has no values to factorize")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"dense weight must be floating point, got {weight.dtype}")
    check_finite(weight, "dense weight")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        check_finite(bias, "bias")
    return weight.detach(), None if bias is None else bias.detach()


def check_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{what} has {count} NaN/Inf value(s), the first at index {first}")
