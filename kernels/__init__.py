"""Triton kernels and their launchers (installed as ``blrdeploy.kernels``).

Kernels import nothing from the rest of blrdeploy; the structures call them through one op per structure
(``blrdeploy.structures.ops``). Runs on CUDA GPUs, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``).

Importing the package, ``configs``, ``dispatch`` or ``dtypes`` never loads Triton: the launchers' names below are
resolved on first use (PEP 562), so converting a model or planning on a machine without a GPU stays light.

The modules:

- ``blast``, ``monarch``, ``gemm``: the ``@triton.jit`` kernels.
- ``launch``: the launchers (checks, buffers, grids, constexpr builders) for every structure.
- ``configs`` and ``tables/``: the config space per architecture, the token buckets, the shipped tables.
- ``dispatch``: which path a shape takes (thresholds), and the benchmark switches (``switched``).
- ``dtypes``: the one table of dtypes blrdeploy runs in.
- ``replay``: launch plans, each launcher's decisions recorded on the first call of a kind and replayed after.
- ``runtime``: where launches go (Triton's JIT, the CUDA driver, a recorder, a bundle's shipped cubins), and the
  stages run on cuBLAS.
- ``plan``: launch planning for a target GPU without one (what a bundle compiles and ships).
- ``aot`` and ``cubin``: ahead-of-time compilation, and launching a cubin through the CUDA driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .configs import BUCKETS, Config, ConfigTable, bucket, space
from .dispatch import Switches, switched

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .launch import active_table, blast_forward, lowrank_forward, monarch_forward, tuning, use_table

_FROM_LAUNCH = ("active_table", "blast_forward", "lowrank_forward", "monarch_forward", "tuning", "use_table")

__all__ = [
    "BUCKETS",
    "Config",
    "ConfigTable",
    "Switches",
    "active_table",
    "blast_forward",
    "bucket",
    "lowrank_forward",
    "monarch_forward",
    "space",
    "switched",
    "tuning",
    "use_table",
]


def __getattr__(name: str):
    if name in _FROM_LAUNCH:
        # deferred: the launchers load Triton
        value = getattr(importlib.import_module(".launch", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
