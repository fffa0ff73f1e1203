"""blrdeploy: block low-rank (BLAST, Monarch) transformer layers, from dense weights to fast GPU kernels."""

from importlib.metadata import PackageNotFoundError, version

from .budget import BudgetChoice, choose_blocks_and_rank
from .checkpoint import CheckpointError, load, save
from .convert import ConvertConfig, convert
from .factorize import FitResult, blast_factorize, lowrank_svd, monarch_project
from .modules import BlastLinear, LowRankLinear, MonarchLinear

try:
    __version__ = version("blrdeploy")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "convert",
    "ConvertConfig",
    "load",
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
