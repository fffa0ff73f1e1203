"""A model family's launch-saving fusions, applied in order on load: sibling layers stacked
(:mod:`~blrdeploy.conversion.siblings`), gated MLPs handed to down's first stage, then whole pre-norm blocks run
inside their BLAST layers (:mod:`~blrdeploy.conversion.blocks`). Outputs equal the unfused model's up to float
summation order; checkpoints, ONNX export and bundles use the unfused model.
"""

from __future__ import annotations

from torch import nn

from blrdeploy.conversion.blocks import fuse_blocks
from blrdeploy.conversion.siblings import Siblings, fuse_siblings, fuse_swiglu
from blrdeploy.models.families import FAMILIES


def fuse_family(model: nn.Module, family: str | None) -> list[Siblings]:
    """:func:`~blrdeploy.conversion.siblings.fuse_siblings`, :func:`~blrdeploy.conversion.siblings.fuse_swiglu`,
    then :func:`~blrdeploy.conversion.blocks.fuse_blocks`, with the sibling names, gated MLP classes and decoder
    layer classes of a model family (``blrdeploy.models.families.FAMILIES``); an unknown family has none."""
    known = FAMILIES.get(family or "")
    if known is None:
        return []
    groups = fuse_siblings(model, known.siblings)
    fuse_swiglu(model, known.swiglu_mlps)
    fuse_blocks(model, known.blocks)
    return groups
