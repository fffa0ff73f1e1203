"""What a model outputs, the seeded inputs it is probed with, and how two outputs compare: the helpers that
conversion, export, bundles and validation share, kept here below all of them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from blrdeploy.models.families import FAMILIES

# ||out - ref|| / ||ref|| allowed per dtype of the compared run (a float32 ONNX reference, a bf16 bundle sample)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def main_output(out) -> torch.Tensor:
    """The tensor a model's output is compared and exported by: logits, a DiT's sample, or the last hidden state."""
    for attr in ("logits", "sample", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


def model_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's main output on ``inputs`` (moved to its device), in float32 on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in inputs.items()})
    return main_output(out).float().cpu()


def sample_inputs(model: nn.Module, blr_config: dict, batch: int, seed: int, seq: int = 16) -> dict:
    """Seeded inputs of the checkpoint's family (token ids, pixels or latents) for ``model``."""
    family = FAMILIES.get(blr_config["source"].get("family") or "")
    if family is None or family.sample is None:
        raise ValueError(
            f"no sample inputs are known for {blr_config['source'].get('class')}; "
            f"ONNX export covers the {', '.join(FAMILIES)} families"
        )
    return family.sample(model, batch, seed, seq)


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


def agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    check = compare("output", out, ref, None)
    return {"relative_error": check.relative_error, "cosine_similarity": check.cosine_similarity}


# Below this cosine to dense on the family's seeded inputs a converted model is said to be broken. On a real 135M
# Llama (bench/NOTES.md, issue 21) every conversion whose perplexity was 5x dense or worse scored 0.68 or less
# (weight-only fits: -0.35 to 0.39); seeded token ids are not text, so this is an alarm, not a measure of quality.
AGREEMENT_COSINE = 0.9


def disagreement(agree: dict | None) -> str | None:
    """The warning a conversion prints when its outputs disagree with dense on seeded inputs; None when they agree
    (or were not compared)."""
    if not agree or agree.get("cosine_similarity") is None or agree["cosine_similarity"] >= AGREEMENT_COSINE:
        return None
    return (
        f"the converted model's outputs disagree with dense on seeded inputs (cosine {agree['cosine_similarity']:.2f}"
        f", relative error {agree['relative_error']:.2f}): it may no longer work. Measure it on real text "
        "(blrdeploy eval, or convert --eval) and fit to real inputs (--calibration)"
    )
