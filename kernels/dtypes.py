"""The floating-point dtypes blrdeploy runs in: the one table every room reads (CLI options, device profiles,
bundle manifests, the ops' input check, the kernels' signatures).

It sits in kernels/ because the kernels are what limit the set, and kernels/ is the lowest room: everything above
may import it. It loads torch only, never Triton.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
NAMES: tuple[str, ...] = tuple(DTYPES)
# How Triton spells each one in a kernel signature (``*fp16`` is a pointer to float16).
TRITON_NAMES: dict[str, str] = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def dtype_named(name: str, option: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name``; a one-line ValueError naming ``option`` for any other name."""
    if name not in DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(NAMES)}, got {name!r}")
    return DTYPES[name]
