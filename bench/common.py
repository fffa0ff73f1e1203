"""What every benchmark records next to its numbers: the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def commit() -> str:
    """The measured commit: $BLR_COMMIT (set it where the tree travels without .git), else git's HEAD."""
    if os.environ.get("BLR_COMMIT"):
        return os.environ["BLR_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict:
    import triton

    info = {
        "commit": commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return info
