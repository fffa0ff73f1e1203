"""Device profiles: the GPUs a bundle can be packaged for, as data.

Built in: ``jetson`` (Jetson Orin Nano 8 GB), ``a40``, ``h100`` (SXM), ``h200``. A user adds one as a JSON file
with the same fields, named by its path (``--target my-gpu.json``) or placed as ``NAME.json`` in the directory
that ``$BLRDEPLOY_DEVICES`` names (``--target NAME``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from blrdeploy.kernels.dispatch import PDL_MIN_ARCH
from blrdeploy.kernels.dtypes import NAMES as DTYPE_NAMES


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    arch: int  # compute capability, e.g. 87 for sm_87
    sm_count: int  # streaming multiprocessors: the kernels' split counts are planned for this many
    memory_gb: float
    bandwidth_gbs: float  # DRAM bandwidth
    fp16_tflops: float  # dense fp16/bf16 tensor-core peak
    dtype: str = "bfloat16"  # what a bundle for this device stores and computes in by default

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.arch, int) or not 70 <= self.arch < 200:
            problems.append(f"arch must be a compute capability like 87, got {self.arch!r}")
        for f in ("sm_count", "memory_gb", "bandwidth_gbs", "fp16_tflops"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                problems.append(f"{f} must be a positive finite number, got {value!r}")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if problems:
            raise ValueError(f"device profile {self.name!r}: " + "; ".join(problems))

    @property
    def pdl(self) -> bool:
        """Whether the kernels use programmatic dependent launch on this device."""
        return self.arch >= PDL_MIN_ARCH

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> Device:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a device profile is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name != "dtype")
        if unknown or missing:
            raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing}; fields: {sorted(known)}")
        return cls(**data)


BUILTIN = {
    d.name: d
    for d in (
        Device("jetson", "NVIDIA Jetson Orin Nano 8 GB", 87, 8, 8, 68, 10, "float16"),
        Device("a40", "NVIDIA A40", 86, 84, 48, 696, 150),
        Device("h100", "NVIDIA H100 SXM 80 GB", 90, 132, 80, 3350, 989),
        Device("h200", "NVIDIA H200 141 GB", 90, 132, 141, 4800, 989),
    )
}


def _user_dir() -> Path | None:
    path = os.environ.get("BLRDEPLOY_DEVICES")
    return Path(path) if path else None


def names() -> list[str]:
    found = list(BUILTIN)
    if _user_dir() is not None and _user_dir().is_dir():
        found += sorted(p.stem for p in _user_dir().glob("*.json") if p.stem not in BUILTIN)
    return found


def get(name_or_path: str) -> Device:
    """A built-in name, a NAME.json in $BLRDEPLOY_DEVICES, or the path of a profile JSON file."""
    path = Path(name_or_path)
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    if not path.suffix == ".json" and _user_dir() is not None:
        path = _user_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown target {name_or_path!r}; known: {', '.join(names())} (or give the path of a profile JSON file)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON device profile ({e})") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return Device.from_json(data, str(path))
