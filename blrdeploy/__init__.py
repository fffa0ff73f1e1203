"""blrdeploy: block low-rank (BLAST, Monarch) transformer layers, from dense weights to fast GPU kernels.

The names below load on first use (PEP 562), so ``import blrdeploy`` and ``blrdeploy --version`` cost no torch
import; ``from blrdeploy import load`` and the like work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from blrdeploy.version import __version__

# name -> module that defines it
_LAZY = {
    "CheckpointError": "blrdeploy.conversion.checkpoint",
    "load": "blrdeploy.conversion.checkpoint",
    "save": "blrdeploy.conversion.checkpoint",
    "ConvertConfig": "blrdeploy.conversion.convert",
    "convert": "blrdeploy.conversion.convert",
    "load_bundle": "blrdeploy.exporters.bundle",
    "BudgetChoice": "blrdeploy.structures.budget",
    "choose_blocks_and_rank": "blrdeploy.structures.budget",
    "FitResult": "blrdeploy.structures.factorize",
    "blast_factorize": "blrdeploy.structures.factorize",
    "lowrank_svd": "blrdeploy.structures.factorize",
    "monarch_project": "blrdeploy.structures.factorize",
    "BlastLinear": "blrdeploy.structures.modules",
    "LowRankLinear": "blrdeploy.structures.modules",
    "MonarchLinear": "blrdeploy.structures.modules",
}

if TYPE_CHECKING:
    from blrdeploy.conversion.checkpoint import CheckpointError, load, save
    from blrdeploy.conversion.convert import ConvertConfig, convert
    from blrdeploy.exporters.bundle import load_bundle
    from blrdeploy.structures.budget import BudgetChoice, choose_blocks_and_rank
    from blrdeploy.structures.factorize import FitResult, blast_factorize, lowrank_svd, monarch_project
    from blrdeploy.structures.modules import BlastLinear, LowRankLinear, MonarchLinear


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    raise AttributeError(f"module 'blrdeploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def export_onnx(model, path, inputs=None, **kwargs):
    """Export a model with BLR layers to ONNX (see :func:`blrdeploy.exporters.onnx.export_onnx`)."""
    # deferred: onnx takes about a second to import, and only exporting needs it
    from blrdeploy.exporters.onnx import export_onnx as _export

    return _export(model, path, inputs, **kwargs)


__all__ = [
    "convert",
    "export_onnx",
    "ConvertConfig",
    "load",
    "load_bundle",
    "save",
    "CheckpointError",
    "BlastLinear",
    "MonarchLinear",
    "LowRankLinear",
    "BudgetChoice",
    "choose_blocks_and_rank",
    "FitResult",
    "blast_factorize",
    "monarch_project",
    "lowrank_svd",
    "__version__",
]
