"""Factorize one dense matrix with each structure at the same parameter budget and report the errors.

This is what ``blrdeploy factorize`` runs: the quickest way to see how well a layer compresses before
converting a whole model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from blrdeploy.structures.budget import STRUCTURES, choose_blocks_and_rank, pick_num_blocks
from blrdeploy.structures.factorize import Progress
from blrdeploy.structures.modules import BlastLinear, LowRankLinear, MonarchLinear


@dataclass
class StructureReport:
    structure: str
    num_blocks: int | None
    rank: int
    params: int
    ratio: float
    relative_error: float
    sqnr_db: float  # 20*log10(||W|| / ||W - W_hat||)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def demo_matrix(out_features: int = 768, in_features: int = 768, seed: int = 0) -> torch.Tensor:
    """A seeded matrix with block-varying structure: a BLAST matrix (the block grid the budget rule picks,
    rank min(out, in)/6, so its total rank exceeds what low-rank can keep at rho=0.5) plus 10% dense noise.

    Stands in for a real layer when none is given; trained weights have weaker structure, so expect larger errors.
    """
    g = torch.Generator().manual_seed(seed)
    b = pick_num_blocks(out_features, in_features)
    r = max(1, min(out_features, in_features) // 6)
    U = torch.randn(b, out_features // b, r, generator=g)
    S = torch.randn(b, b, r, generator=g)
    V = torch.randn(b, in_features // b, r, generator=g)
    W = torch.einsum("ipr,ijr,jqr->ipjq", U, S, V).reshape(out_features, in_features)
    noise = torch.randn(out_features, in_features, generator=g)
    W = W / W.norm() + 0.1 * noise / noise.norm()
    return W / W.std() / math.sqrt(3 * in_features)  # nn.Linear's scale


def load_matrix(path: Path, tensor: str | None, transpose: bool = False) -> torch.Tensor:
    """One 2-D tensor from a .safetensors file or a torch state dict (.pt/.pth/.bin)."""
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                name = _pick_name(names, tensor, path)
                weight = f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
            name = _pick_name(list(state), tensor, path)
            weight = state[name]
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"{name!r} in {path} is a {type(weight).__name__}, not a tensor")
    except ValueError:
        raise
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if weight.dim() != 2:
        raise ValueError(f"tensor {name!r} in {path} has shape {tuple(weight.shape)}; a 2-D weight is needed")
    return weight.T.contiguous() if transpose else weight


def _pick_name(names: list[str], tensor: str | None, path: Path) -> str:
    if tensor is None:
        raise ValueError(f"{path} holds {len(names)} tensors; name one with --tensor (e.g. {', '.join(names[:5])})")
    if tensor not in names:
        close = [n for n in names if tensor.split(".")[-1] in n][:5] or names[:5]
        raise ValueError(f"no tensor {tensor!r} in {path}; some it has: {', '.join(close)}")
    return tensor


def compare_structures(
    weight: torch.Tensor,
    ratio: float,
    structures: tuple[str, ...] = STRUCTURES,
    steps: int = 300,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[StructureReport]:
    out_features, in_features = weight.shape
    reports = []
    for structure in structures:
        choice = choose_blocks_and_rank(out_features, in_features, ratio, structure)
        if structure == "blast":
            layer = BlastLinear.from_dense(
                weight, choice.num_blocks, choice.rank, bias=None, steps=steps, seed=seed, progress=progress
            )
        elif structure == "monarch":
            layer = MonarchLinear.from_dense(weight, choice.num_blocks, choice.rank)
        else:
            layer = LowRankLinear.from_dense(weight, choice.rank)
        fit = layer.fit_result
        err = fit.relative_error
        reports.append(
            StructureReport(
                structure=structure,
                num_blocks=choice.num_blocks,
                rank=choice.rank,
                params=choice.params,
                ratio=choice.ratio,
                relative_error=err,
                sqnr_db=math.inf if err == 0 else -20 * math.log10(err),
                seconds=fit.seconds,
            )
        )
    return reports
