"""Pre-norm residual blocks run inside their BLAST layers: ``h + attn(norm1(h))`` then ``h + mlp(norm2(h))``.

At one token each RMSNorm and each residual add is a kernel of its own (under ``torch.compile``, one add+norm
kernel per pair), a few µs of launch and latency for 8 KB of work, twice per block. In a fused block:

* the layers that read a norm's output (q/k/v; the stacked gate/up) apply the RMSNorm as their first stage loads
  the input (``blast_linear_fused``'s ``norm_weight``), so the block hands them the residual stream itself;
* the layers whose output joins the residual stream (o_proj; down) add it as their last stage stores.

No kernel is left between a block's attention output and its next BLAST layer, nor between two blocks.

:func:`fuse_blocks` (after :func:`~blrdeploy.conversion.siblings.fuse_siblings` and ``fuse_swiglu``) fuses a
decoder layer only when every piece is there: two RMSNorms, BLAST q/k/v (stacked or alone) and o_proj, and a
:class:`~blrdeploy.conversion.siblings.SwiGLUMLP`. It changes no parameter or name: the layer's class becomes a
subclass with the fused forward, lone q/k/v and o_proj become :class:`FusedBlastLinear` (a BlastLinear), and the
norms stay registered where they were (their weights are read from there), so ``save`` writes the unfused checkpoint.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from blrdeploy.conversion.siblings import SiblingOutput, Siblings, SwiGLUMLP
from blrdeploy.structures import functional
from blrdeploy.structures.modules import BlastLinear


class FusedBlastLinear(BlastLinear):
    """A BLAST layer of a fused block: reads its input through ``norm`` (a q/k/v projection not stacked with the
    others), or adds ``pending_residual``, set by the block right before (o_proj, called inside the attention)."""

    norm: tuple[nn.Module, ...] = ()
    pending_residual: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.pending_residual
        if residual is not None:  # written only when set: an attribute write on every call recompiles
            self.pending_residual = None
        norm = self.norm[0] if self.norm else None
        return functional.blast_linear_fused(
            x, self.U, self.S, self.V, self.bias,
            norm_weight=None if norm is None else norm.weight, eps=0.0 if norm is None else norm.variance_epsilon,
            residual=residual,
        )  # fmt: skip


class FusedPreNormBlock:
    """The forward of a fused pre-norm decoder layer (mixed into the layer's own class, see :func:`fuse_blocks`)."""

    def __reduce__(self):
        # The fused class is made at fuse time, so pickle names the layer's own class and rebuilds it fused.
        return _rebuild_fused, (type(self).__bases__[1],), self.__getstate__()

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        self.self_attn.o_proj.pending_residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)  # q/k/v normalize; o_proj adds
        return self.mlp(hidden_states)  # gate/up normalize; down adds


@functools.cache
def _fused_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (FusedPreNormBlock, cls), {"__module__": __name__})


def _rebuild_fused(cls: type) -> nn.Module:
    fused = _fused_class(cls)
    return fused.__new__(fused)


def _is_rms_norm(module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight") and hasattr(module, "variance_epsilon")
    )


def _returns_tensor(cls: type) -> bool:
    """Whether the layer's own forward returns the hidden states alone, as the fused one does (transformers 5's
    decoder layers; older ones return a tuple, which the model indexes)."""
    annotation = inspect.signature(cls.forward).return_annotation
    return "Tensor" in str(annotation) and "tuple" not in str(annotation).lower()


def _qkv_producers(attn: nn.Module) -> list[nn.Module] | None:
    """The modules computing q, k and v (Siblings groups, lone BLAST layers), if all are BLAST and read only the
    attention's input."""
    producers = []
    for name in ("q_proj", "k_proj", "v_proj"):
        child = getattr(attn, name, None)
        if isinstance(child, SiblingOutput) and child.group.structure == "blast":
            if not set(child.group.names) <= {"q_proj", "k_proj", "v_proj"}:
                return None
            child = child.group
        elif type(child) is not BlastLinear:
            return None
        if child not in producers:
            producers.append(child)
    return producers


def _fusable(layer: nn.Module) -> list[nn.Module] | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    if attn is None or not isinstance(mlp, SwiGLUMLP) or not all(_is_rms_norm(n) for n in norms):
        return None
    if mlp.gate_up.structure != "blast":  # the norm runs in BLAST's first stage (a BLAST down may follow low-rank)
        return None
    if type(getattr(attn, "o_proj", None)) is not BlastLinear or not _returns_tensor(type(layer)):
        return None
    return _qkv_producers(attn)


def _to_fused_linear(layer: BlastLinear) -> None:
    layer.__class__ = FusedBlastLinear
    layer.norm, layer.pending_residual = (), None  # instance attributes from the start: compiled guards stay valid


def fuse_blocks(model: nn.Module, block_classes: Sequence[str]) -> int:
    """In place: each module whose class is named in ``block_classes`` (pre-norm decoder layers computing
    ``h + attn(input_layernorm(h))`` then ``h + mlp(post_attention_layernorm(h))``, e.g. ``LlamaDecoderLayer``)
    whose parts are all fused BLAST (see the module's doc) runs its norms and residual adds inside its BLAST
    layers. Returns how many were fused."""
    fused = 0
    for layer in model.modules():
        if type(layer).__name__ not in block_classes or isinstance(layer, FusedPreNormBlock):
            continue
        producers = _fusable(layer)
        if producers is None:
            continue
        for producer in producers:
            if not isinstance(producer, Siblings):
                _to_fused_linear(producer)
            producer.norm = (layer.input_layernorm,)
        _to_fused_linear(layer.self_attn.o_proj)
        layer.mlp.gate_up.norm = (layer.post_attention_layernorm,)
        layer.mlp.adds_residual = True
        layer.__class__ = _fused_class(type(layer))
        fused += 1
    return fused
