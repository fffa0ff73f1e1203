"""One comparison of two tensors, shared by every validator and by the conversion summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class Check:
    name: str  # what was compared, e.g. "logits batch=2 seq=16"
    shape: list[int]
    max_abs: float
    relative_error: float
    tolerance: float | None
    cosine_similarity: float | None = None

    @property
    def ok(self) -> bool:
        return math.isfinite(self.relative_error) and (self.tolerance is None or self.relative_error <= self.tolerance)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, tolerance: float | None) -> Check:
    if tuple(out.shape) != tuple(ref.shape):
        return Check(
            f"{name} (shape {list(out.shape)} != {list(ref.shape)})", list(ref.shape), math.inf, math.inf, tolerance
        )
    shape = list(ref.shape)
    out, ref = out.double().flatten(), ref.double().flatten()
    diff = out - ref
    rel = float(diff.norm() / ref.norm()) if ref.norm() > 0 else float(diff.norm())
    cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=0)) if ref.norm() > 0 else None
    return Check(name, shape, float(diff.abs().max()), rel if math.isfinite(rel) else math.inf, tolerance, cos)
