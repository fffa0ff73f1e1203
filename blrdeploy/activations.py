"""An MLP's GELU run inside its first BLAST layer: ``act(fc1(x))`` in one op call, the GELU applied as the U stage
stores its output tile.

Unfused, the activation is a pass of its own over the MLP's widest tensor, (N, 4h) read and written once more:
678 µs of a 12.6 ms ViT-B forward at batch 64 and 2.9 ms of DiT-XL/2's 45.6 ms on an H100 (bench/NOTES.md). The U
stage writes that tensor anyway; the GELU costs it a few FLOPs per element.

:func:`fuse_activations` (run by :func:`blrdeploy.siblings.fuse_family`) takes sites of the form (module class, the
linear child, the activation child). The linear child, if it is BLAST, becomes a
:class:`~blrdeploy.blocks.FusedBlastLinear` with ``activation`` set, and the activation child becomes
``nn.Identity``. A site with no activation child is a module applying the GELU in its own ``gelu`` method after its
``proj`` (diffusers' ``GELU``): its class becomes a subclass whose ``gelu`` passes the input through. Activations
hold no parameters, so names, state dicts and ``save`` are unchanged. Only GELU (exact, or the tanh
approximation) is fused; any other activation stays where it is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from .blocks import to_fused_linear
from .modules import BlastLinear

# Activation classes by name (transformers' ACT2FN entries) -> the kernels' activation; nn.GELU is read directly.
_GELU_CLASSES = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",  # the tanh approximation, written out
}


def activation_kind(module: nn.Module) -> str | None:
    """The kernels' name for a GELU activation module ("gelu" or "gelu_tanh"); None for anything else."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return _GELU_CLASSES.get(type(module).__name__)


class GeluInProjection:
    """Mixed into a module whose ``forward`` is ``self.gelu(self.proj(x))`` once ``proj`` applies the GELU."""

    def __reduce__(self):
        # The class is made at fuse time, so pickle names the module's own class and rebuilds it fused.
        return _rebuild, (type(self).__bases__[1],), self.__getstate__()

    def gelu(self, gate: torch.Tensor) -> torch.Tensor:
        return gate


@functools.cache
def _fused_class(cls: type) -> type:
    return type(f"{cls.__name__}InProjection", (GeluInProjection, cls), {"__module__": __name__})


def _rebuild(cls: type) -> nn.Module:
    fused = _fused_class(cls)
    return fused.__new__(fused)


def _own_gelu(module: nn.Module) -> str | None:
    """The activation of a module applying ``F.gelu(..., approximate=self.approximate)`` in its ``gelu`` method."""
    approximate = getattr(module, "approximate", None)
    if not callable(getattr(module, "gelu", None)) or approximate not in ("none", "tanh"):
        return None
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def fuse_activations(model: nn.Module, sites: Sequence[tuple[str, str, str]]) -> int:
    """In place: in each module whose class is named by a site (class, linear child, activation child; the last
    empty for a module with its own ``gelu`` method), a BLAST linear child followed by a GELU applies the GELU in
    its last stage. Returns how many did."""
    fused = 0
    for module in model.modules():
        if isinstance(module, GeluInProjection):
            continue
        for class_name, linear, act_name in sites:
            if type(module).__name__ != class_name or type(getattr(module, linear, None)) is not BlastLinear:
                continue
            kind = activation_kind(getattr(module, act_name, None)) if act_name else _own_gelu(module)
            if kind is None:
                continue
            layer = getattr(module, linear)
            to_fused_linear(layer)
            layer.activation = kind
            if act_name:
                setattr(module, act_name, nn.Identity())
            else:
                module.__class__ = _fused_class(type(module))
            fused += 1
    return fused
