"""Sibling layers: BLAST or low-rank layers of one shape that read the same input (a block's q, k and v
projections; an MLP's gate and up) run as one layer whose factors are stacked.

At batch 1 every layer is a weight stream and every kernel launch costs a few µs beyond its bytes (launch, ramp,
tail). A Llama block's seven BLAST layers are fourteen launches; with q/k/v and gate/up stacked they are eight
(``bench/chain_floor.py`` measures both against plain reads of the same bytes).

:func:`fuse_siblings` moves each group's factors into one :class:`Siblings` registered on the members' parent
and puts a :class:`SiblingOutput` in each member's place. The first member called computes every member's output in
one op call; the others return theirs when called with the same input tensor object, and compute afresh otherwise:
a group whose members do not share an input is only wasteful. (A member called after its input was modified in
place, between the group's calls, would get the output of the unmodified input; no transformer block does that,
and checking the tensor's version counter would break ``torch.compile``'s graph.) The graph is plain Python that
``torch.compile`` traces without a break. Outputs equal the unfused layers' up to float summation order (the
stacked shapes are tuned on their own).

A gated MLP, ``down(silu(gate(x)) * up(x))``, whose gate and up became one group and whose down is BLAST goes one
step further (:func:`fuse_swiglu`): :class:`SwiGLUMLP` hands the group's stacked output straight to down's first
stage, which computes silu(gate) * up as it loads it (``blrdeploy::blast_linear_fused``): no activation pass and,
at one token, no activation launch, a few µs per block. Checkpoints, ONNX export and bundles use unfused layers:
``save`` writes a fused model's factors under its members' names, export wants the model before fusing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from blrdeploy.structures import functional
from blrdeploy.structures.modules import BlastLinear, BLRLinear, LowRankLinear, blast_init, lowrank_init

STACKABLE = (BlastLinear, LowRankLinear)  # the structures whose kernels take stacked factors (a leading L)


class Siblings(nn.Module):
    """L BLAST or low-rank layers of one shape, stacked: each factor gets a leading L (BLAST U (L, b_out, p, r),
    S (L, b_out, b_in, r), V (L, b_in, q, r); low-rank U (L, out, r), V (L, in, r)), bias (L*out,). ``forward``
    gives every layer's output side by side, (..., L*out)."""

    def __init__(self, members: Sequence[BlastLinear | LowRankLinear], names: Sequence[str]) -> None:
        super().__init__()
        first = members[0]
        if len(members) < 2 or any(_signature(m) != _signature(first) for m in members):
            raise ValueError("siblings must be two or more BLAST or low-rank layers of one shape, dtype and device")
        self.names = tuple(names)
        self.structure = first.structure
        self.in_features, self.out_features = first.in_features, first.out_features
        self.num_blocks, self.rank = getattr(first, "num_blocks", None), first.rank
        self.factor_names = tuple(first.factors())
        with torch.no_grad():
            for key in self.factor_names:
                stacked = torch.stack([getattr(m, key) for m in members])
                setattr(self, key, nn.Parameter(stacked, requires_grad=first.U.requires_grad))
            bias = None if first.bias is None else torch.cat([m.bias for m in members])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=first.bias.requires_grad)
        self.fit_errors = tuple(None if m.fit_result is None else m.fit_result.relative_error for m in members)
        self._pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
        self.norm: tuple[
            nn.Module, ...
        ] = ()  # an RMSNorm the group reads its input through (blrdeploy.conversion.blocks)

    def factors(self) -> dict[str, torch.Tensor]:
        """The stacked factors by name, as the members' ``factors()`` with a leading L."""
        return {key: getattr(self, key) for key in self.factor_names}

    def reset_parameters(self) -> None:
        if self.structure == "blast":
            blast_init(self.U, self.S, self.V, self.bias, self.in_features)
        else:
            lowrank_init(self.U, self.V, self.bias, self.in_features)

    def extra_repr(self) -> str:
        blocks = "" if self.num_blocks is None else f"num_blocks={self.num_blocks}, "
        return (
            f"{'+'.join(self.names)} ({self.structure}): in_features={self.in_features}, "
            f"out_features={self.out_features} each, {blocks}rank={self.rank}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm:  # fuse_blocks gives one to BLAST groups only
            norm = self.norm[0]
            return functional.blast_linear_fused(
                x, self.U, self.S, self.V, self.bias, norm_weight=norm.weight, eps=norm.variance_epsilon
            )
        if self.structure == "blast":
            return functional.blast_linear(x, self.U, self.S, self.V, self.bias)
        return functional.lowrank_linear(x, self.U, self.V, self.bias)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for ``x``: kept from the call that computed the whole group on this very
        tensor, else computed now with the others kept for their turn."""
        pending = self._pending
        if pending is not None and pending[0] is x and pending[1][index] is not None:
            out = pending[1][index]
            pending[1][index] = None
            if all(o is None for o in pending[1]):
                self._pending = None  # hold no activations between steps (nor CUDA-graph outputs between replays)
            return out
        outs: list[torch.Tensor | None] = list(self(x).split(self.out_features, dim=-1))
        mine = outs[index]
        outs[index] = None
        self._pending = (x, outs)
        return mine


class SiblingOutput(nn.Module):
    """Stands where a fused member was: same features, its output taken from the group."""

    def __init__(self, group: Siblings, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = group.in_features, group.out_features
        self.index = index
        self._group = (group,)  # a tuple: the group is registered once, on the parent, not under every member

    @property
    def group(self) -> Siblings:
        return self._group[0]

    def extra_repr(self) -> str:
        return f"{self.group.names[self.index]} of {'+'.join(self.group.names)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)


class SwiGLUMLP(nn.Module):
    """Stands where a gated MLP with a SiLU was, once its gate and up are one :class:`Siblings` group and its down is
    BLAST: ``down(swiglu(gate_up(x)))`` in two op calls. The group and ``down_proj`` keep the names they had on the
    MLP, so a state dict (and ``save``) sees what the fused MLP had. With ``adds_residual`` (a fused block,
    :mod:`blrdeploy.conversion.blocks`) it returns ``x + down(...)``, the add done as down's last stage stores."""

    def __init__(self, group_name: str, group: Siblings, down_proj: BlastLinear) -> None:
        super().__init__()
        self.add_module(group_name, group)
        self.down_proj = down_proj
        self._group = (group,)  # read in forward without knowing the name it is registered under
        self.adds_residual = False

    @property
    def gate_up(self) -> Siblings:
        return self._group[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        return functional.blast_linear_fused(
            self.gate_up(x), down.U, down.S, down.V, down.bias,
            swiglu_input=True, residual=x if self.adds_residual else None,
        )  # fmt: skip


def _swiglu_parts(mlp: nn.Module) -> tuple[str, Siblings] | None:
    """(its name on the MLP, the stacked gate+up group) of a gated MLP that :class:`SwiGLUMLP` can replace."""
    gate, up, down = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if not (isinstance(gate, SiblingOutput) and isinstance(up, SiblingOutput) and gate.group is up.group):
        return None
    group = gate.group
    act = getattr(mlp, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    if group.names != ("gate_proj", "up_proj") or not silu or type(down) is not BlastLinear:
        return None
    if down.in_features != group.out_features or down.U.dtype != group.U.dtype:
        return None
    return next(((n, m) for n, m in mlp._modules.items() if m is group), None)


def fuse_swiglu(model: nn.Module, mlp_classes: Sequence[str]) -> int:
    """In place, after :func:`fuse_siblings`: each module whose class is named in ``mlp_classes`` (gated MLPs
    computing ``down(act_fn(gate_proj(x)) * up_proj(x))``, e.g. ``LlamaMLP``) with a SiLU act_fn, gate_proj and
    up_proj stacked in that order, and a BLAST down_proj, becomes a :class:`SwiGLUMLP`. Returns how many did."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            parts = _swiglu_parts(child) if type(child).__name__ in mlp_classes else None
            if parts is not None:
                setattr(parent, name, SwiGLUMLP(*parts, child.down_proj))
                swapped += 1
    return swapped


def _signature(m: BlastLinear | LowRankLinear) -> tuple:
    return (
        type(m), m.in_features, m.out_features, getattr(m, "num_blocks", None), m.rank, m.bias is not None,
        m.U.dtype, m.U.device,
    )  # fmt: skip


def fuse_siblings(model: nn.Module, sibling_names: Iterable[Sequence[str]]) -> list[Siblings]:
    """In place: for each parent module and each tuple of child names (e.g. ``("q_proj", "k_proj", "v_proj")``),
    the BLAST or low-rank children of one structure and shape become one :class:`Siblings` (two or more of them;
    a child of another shape, or a Monarch one, stays as it is). Returns the groups made. Peak memory grows by one
    group's factors."""
    groups = []
    sibling_names = [tuple(names) for names in sibling_names]
    wanted = {name for names in sibling_names for name in names}
    # Parents only: a list of every module would keep each replaced member (and its factors) alive to the end.
    parents = [m for m in model.modules() if wanted & set(m._modules)]
    for parent in parents:
        for names in sibling_names:
            for member_names in _same_shape(parent, names):
                members = [parent._modules[name] for name in member_names]
                group = Siblings(members, member_names)
                parent.add_module("siblings_" + "_".join(member_names), group)
                for i, name in enumerate(member_names):
                    setattr(parent, name, SiblingOutput(group, i))
                groups.append(group)
                del members  # the old layers' factors go now, before the next group is stacked
    return groups


def _same_shape(parent: nn.Module, names: Sequence[str]) -> list[list[str]]:
    """The names among ``names`` of ``parent``'s stackable children, in groups of two or more of one structure and
    shape."""
    by_shape: dict[tuple, list[str]] = {}
    for name in names:
        child = parent._modules.get(name)
        if type(child) in STACKABLE:
            by_shape.setdefault(_signature(child), []).append(name)
    return [group for group in by_shape.values() if len(group) >= 2]


def blr_layer_count(model: nn.Module) -> int:
    """BLR layers in ``model``, each member of a fused group counted."""
    return sum(
        1 if isinstance(m, BLRLinear) else len(m.names) if isinstance(m, Siblings) else 0 for m in model.modules()
    )
