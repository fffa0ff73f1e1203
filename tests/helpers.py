"""Assertions the tests share (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """||out - ref|| / ||ref|| <= tol, failing with where and by how much; NaN never passes."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite values"
    err = rel_error(out, ref)
    if not err <= tol:
        diff = (out.detach().double() - ref.detach().double()).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst at {worst}: "
            f"{float(out[worst]):.6g} vs {float(ref[worst]):.6g}"
        )
