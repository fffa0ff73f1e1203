"""blrdeploy: block low-rank (BLAST, Monarch) transformer layers, from dense weights to fast GPU kernels."""

from blrdeploy.conversion.checkpoint import CheckpointError, load, save
from blrdeploy.conversion.convert import ConvertConfig, convert
from blrdeploy.exporters.bundle import load_bundle
from blrdeploy.structures import ops  # noqa: F401  (registers torch.ops.blrdeploy.*)
from blrdeploy.structures.budget import BudgetChoice, choose_blocks_and_rank
from blrdeploy.structures.factorize import FitResult, blast_factorize, lowrank_svd, monarch_project
from blrdeploy.structures.modules import BlastLinear, LowRankLinear, MonarchLinear
from blrdeploy.version import __version__


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
