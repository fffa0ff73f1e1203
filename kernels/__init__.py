"""Triton kernels and their launchers (installed as ``blrdeploy.kernels``).

Kernels import nothing from the rest of blrdeploy; the structures call them through one op per structure
(``blrdeploy.ops``). Runs on CUDA GPUs, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from .configs import BUCKETS, Config, ConfigTable, bucket, space
from .launch import active_table, blast_forward, lowrank_forward, monarch_forward, tuning, use_table

__all__ = [
    "BUCKETS",
    "Config",
    "ConfigTable",
    "active_table",
    "blast_forward",
    "bucket",
    "lowrank_forward",
    "monarch_forward",
    "space",
    "tuning",
    "use_table",
]
