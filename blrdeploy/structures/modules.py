"""``nn.Module`` forms of the structures: BlastLinear, MonarchLinear, LowRankLinear.

Drop-in replacements for ``nn.Linear`` (same ``in_features``/``out_features``/``bias``); each forward is one call
into :mod:`blrdeploy.structures.functional`. ``from_dense`` builds one from a dense weight or ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from blrdeploy.structures import factorize as fz
from blrdeploy.structures import functional, shapes


class BLRLinear(nn.Module):
    """What the three structures share: the bias, parameter and FLOP counts, and from_dense's plumbing."""

    structure: str = ""
    fit_result: fz.FitResult | None = None  # set by from_dense

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype) -> None:
        super().__init__()
        shapes.check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _init_bias(self) -> None:
        linear_bias_init(self.bias, self.in_features)

    def factors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        blocks = f"num_blocks={self.num_blocks}, " if hasattr(self, "num_blocks") else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {blocks}rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

    def num_params(self, include_bias: bool = False) -> int:
        """Weight parameters (the count a parameter budget refers to); the bias only when asked."""
        n = sum(t.numel() for t in self.factors().values())
        return n + (self.out_features if include_bias and self.bias is not None else 0)

    def flops(self, n_tokens: int) -> int:
        """Multiply-adds x2 of the three stages for ``n_tokens`` rows (bias additions not counted)."""
        return 2 * n_tokens * self.num_params()

    def compression(self) -> float:
        """num_params() / the dense weight's out*in."""
        return self.num_params() / (self.in_features * self.out_features)

    @staticmethod
    def _dense_input(weight_or_linear, bias, device):
        weight, bias = shapes.as_weight(weight_or_linear, bias)
        if device is not None:
            weight = weight.to(device)
            bias = None if bias is None else bias.to(device)
        return weight, bias

    def _adopt(self, factors: dict[str, torch.Tensor], bias, dtype, result: fz.FitResult):
        for name, value in factors.items():
            setattr(self, name, nn.Parameter(value.to(dtype).contiguous(), requires_grad=True))
        if bias is not None:
            self.bias = nn.Parameter(bias.to(device=next(iter(factors.values())).device, dtype=dtype))
        self.fit_result = result
        return self


class BlastLinear(BLRLinear):
    """BLAST: a b_out x b_in grid of blocks, block (i, j) = U[i] @ diag(S[i, j]) @ V[j].T."""

    structure = "blast"

    def __init__(self, in_features, out_features, num_blocks, rank, bias=True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        b_out, b_in = _block_pair(num_blocks)
        shapes.check_block_count(b_out, out_features, "out_features")
        shapes.check_block_count(b_in, in_features, "in_features")
        shapes.check_rank(rank, min(in_features, out_features), "BLAST")
        self.num_blocks = (b_out, b_in)
        self.rank = rank
        kw = dict(device=device, dtype=dtype)
        self.U = nn.Parameter(torch.empty(b_out, out_features // b_out, rank, **kw))
        self.S = nn.Parameter(torch.empty(b_out, b_in, rank, **kw))
        self.V = nn.Parameter(torch.empty(b_in, in_features // b_in, rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        blast_init(self.U, self.S, self.V, self.bias, self.in_features)

    def factors(self):
        return {"U": self.U, "S": self.S, "V": self.V}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.blast_linear(x, self.U, self.S, self.V, self.bias)

    def to_dense(self) -> torch.Tensor:
        return functional.blast_to_dense(self.U, self.S, self.V)

    @classmethod
    def from_dense(
        cls,
        weight_or_linear,
        num_blocks,
        rank: int,
        *,
        steps: int = 300,
        bias: torch.Tensor | None = None,
        device=None,
        dtype=None,
        progress: fz.Progress | None = None,
        **fit_options,
    ) -> BlastLinear:
        """Fit BLAST factors to a dense (out, in) weight or an nn.Linear (its bias is copied).

        Runs on the weight's device, or ``device``. ``fit_options`` go to :func:`blast_factorize`
        (``delta``, ``init``, ``seed``, ``tol``, ``compute_dtype``). The fit's error and time are in ``fit_result``.
        """
        weight, bias = cls._dense_input(weight_or_linear, bias, device)
        out, inn = weight.shape
        layer = cls(inn, out, num_blocks, rank, bias=bias is not None, device="meta")
        U, S, V, result = fz.blast_factorize(
            weight, layer.num_blocks, rank, steps=steps, progress=progress, **fit_options
        )
        return layer._adopt({"U": U, "S": S, "V": V}, bias, dtype or weight.dtype, result)


class MonarchLinear(BLRLinear):
    """Monarch (Dao et al.): block-diagonal w1 (b, R, in/b), a stride permutation, block-diagonal w2 (b, out/b, R).

    ``rank`` is the total width R (R % num_blocks == 0); each of the b x b dense blocks has rank R/b.
    """

    structure = "monarch"

    def __init__(self, in_features, out_features, num_blocks, rank, bias=True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        shapes.check_square_block_count(num_blocks, out_features, in_features)
        shapes.check_rank(rank, min(in_features, out_features), f"Monarch with num_blocks={num_blocks}", num_blocks)
        self.num_blocks = num_blocks
        self.rank = rank
        kw = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(torch.empty(num_blocks, rank, in_features // num_blocks, **kw))
        self.w2 = nn.Parameter(torch.empty(num_blocks, out_features // num_blocks, rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each dense entry sums R/b products w2*w1: variances b/in and 1/(3R) give nn.Linear's 1/(3*in).
        nn.init.normal_(self.w1, std=math.sqrt(self.num_blocks / self.in_features))
        nn.init.normal_(self.w2, std=1 / math.sqrt(3 * self.rank))
        self._init_bias()

    def factors(self):
        return {"w1": self.w1, "w2": self.w2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.monarch_linear(x, self.w1, self.w2, self.bias)

    def to_dense(self) -> torch.Tensor:
        return functional.monarch_to_dense(self.w1, self.w2)

    @classmethod
    def from_dense(
        cls, weight_or_linear, num_blocks: int, rank: int, *, bias=None, device=None, dtype=None, compute_dtype=None
    ) -> MonarchLinear:
        """Closed-form projection onto Monarch matrices (a batched truncated SVD of the b*b blocks)."""
        weight, bias = cls._dense_input(weight_or_linear, bias, device)
        out, inn = weight.shape
        layer = cls(inn, out, num_blocks, rank, bias=bias is not None, device="meta")
        w1, w2, result = fz.monarch_project(weight, num_blocks, rank, compute_dtype)
        return layer._adopt({"w1": w1, "w2": w2}, bias, dtype or weight.dtype, result)


class LowRankLinear(BLRLinear):
    """y = (x @ V) @ U.T with U (out, r), V (in, r): the baseline both block structures are measured against."""

    structure = "lowrank"

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        shapes.check_rank(rank, min(in_features, out_features), "low-rank")
        self.rank = rank
        self.U = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lowrank_init(self.U, self.V, self.bias, self.in_features)

    def factors(self):
        return {"U": self.U, "V": self.V}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.lowrank_linear(x, self.U, self.V, self.bias)

    def to_dense(self) -> torch.Tensor:
        return functional.lowrank_to_dense(self.U, self.V)

    @classmethod
    def from_dense(
        cls, weight_or_linear, rank: int, *, bias=None, device=None, dtype=None, compute_dtype=None
    ) -> LowRankLinear:
        """Truncated SVD, singular values split evenly between the two factors."""
        weight, bias = cls._dense_input(weight_or_linear, bias, device)
        out, inn = weight.shape
        layer = cls(inn, out, rank, bias=bias is not None, device="meta")
        U, V, result = fz.lowrank_svd(weight, rank, compute_dtype)
        return layer._adopt({"U": U, "V": V}, bias, dtype or weight.dtype, result)


@torch.no_grad()
def blast_init(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> None:
    """Zero-mean factors whose dense product has nn.Linear's entry variance 1/(3*in) (r * var(U)var(S)var(V)) and
    nn.Linear's bias; any leading (stacked) dims."""
    nn.init.normal_(U, std=1 / math.sqrt(U.shape[-1]))
    nn.init.normal_(S, std=1.0)
    nn.init.normal_(V, std=1 / math.sqrt(3 * in_features))
    linear_bias_init(bias, in_features)


@torch.no_grad()
def lowrank_init(U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> None:
    """Factors whose product has nn.Linear's entry variance 1/(3*in), and nn.Linear's bias; any leading (stacked)
    dims."""
    nn.init.normal_(U, std=1 / math.sqrt(3 * U.shape[-1]))
    nn.init.normal_(V, std=1 / math.sqrt(in_features))
    linear_bias_init(bias, in_features)


@torch.no_grad()
def linear_bias_init(bias: torch.Tensor | None, in_features: int) -> None:
    """nn.Linear's bias init, U(-1/sqrt(in), 1/sqrt(in)); nothing without a bias."""
    if bias is not None:
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def _block_pair(num_blocks) -> tuple[int, int]:
    if isinstance(num_blocks, int) and not isinstance(num_blocks, bool):
        return num_blocks, num_blocks
    if isinstance(num_blocks, (tuple, list)) and len(num_blocks) == 2:
        return tuple(num_blocks)
    raise ValueError(f"num_blocks must be an int or a pair (b_out, b_in), got {num_blocks!r}")


def set_submodule(model: nn.Module, name: str, value) -> None:
    """``model.<dotted name> = value`` for a module or a parameter."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, value)
