"""Calibration-aware fits (factorize's ``gram=``): each structure fitted to its output error tr(E G Eᵀ) on inputs
whose Gram is G, against the weight-only fits. Float64 on the CPU, small shapes, seeded."""

import pytest
import torch

from blrdeploy.structures import factorize as fz
from blrdeploy.structures import functional

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def decaying_gram(inn: int, seed: int = 0, tokens: int = 600) -> torch.Tensor:
    """XᵀX of correlated inputs: a random basis with a spectrum falling over four decades, plus a shared offset
    (activations have one), so that whitening matters."""
    g = _gen(seed)
    basis, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=F64))
    scales = torch.logspace(0, -2, inn, dtype=F64)
    X = torch.randn(tokens, inn, generator=g, dtype=F64) @ (basis * scales) @ basis.T
    X += 0.3 * torch.randn(tokens, 1, generator=g, dtype=F64) * torch.randn(1, inn, generator=g, dtype=F64)
    return X.T @ X


def test_planted_low_rank_in_whitened_space_is_recovered_exactly():
    """Inputs confined to a subspace: W = (rank r) + (a part the inputs never see). The whitened fit finds the
    rank-r part, output error ~0; the plain SVD spends its rank on the invisible part and misses."""
    g = _gen(1)
    out, inn, r, k = 40, 56, 6, 44
    basis, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=F64))
    seen, unseen = basis[:, :k], basis[:, k:]
    X = torch.randn(500, k, generator=g, dtype=F64) @ seen.T
    G = X.T @ X
    planted = torch.randn(out, r, generator=g, dtype=F64) @ torch.randn(r, inn, generator=g, dtype=F64)
    W = planted + 3 * torch.randn(out, inn - k, generator=g, dtype=F64) @ unseen.T
    U, V, res = fz.lowrank_svd(W, r, gram=G, damping=0.0)
    assert res.output_relative_error < 1e-6
    torch.testing.assert_close(U @ V.T @ X.T, W @ X.T, rtol=0, atol=1e-9 * float((W @ X.T).abs().max()))
    U0, V0, plain = fz.lowrank_svd(W, r)
    assert fz.output_relative_error(W, U0 @ V0.T, G) > 0.05
    assert res.relative_error > plain.relative_error  # it gave up weight error for output error, as it should


def test_whitened_low_rank_is_the_optimum_of_the_damped_objective():
    """Eckart-Young in whitened space: the damped objective's value is the discarded energy of W L; no other rank-r
    matrix (the plain SVD, a perturbation of the optimum) does better."""
    out, inn, r, damping = 48, 64, 8, 1e-2
    G = decaying_gram(inn)
    W = torch.randn(out, inn, generator=_gen(2), dtype=F64)
    U, V, res = fz.lowrank_whitened(W, r, G, damping=damping)
    Gd = fz.damped_gram(G, damping)
    L = fz.whitening(G, damping)
    torch.testing.assert_close(L @ L.T, Gd)
    sigma = torch.linalg.svdvals(W @ L)

    def objective(approx):
        E = W - approx
        return float(((E @ Gd) * E).sum())

    best = objective(U @ V.T)
    assert best == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-9)
    U0, V0, _ = fz.lowrank_svd(W, r)
    assert objective(U0 @ V0.T) > 1.5 * best
    bump = 1e-3 * torch.randn(out, r, generator=_gen(3), dtype=F64)
    assert objective((U + bump) @ V.T) > best


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blast"])
def test_calibrated_fit_beats_weight_only_on_output_error(structure):
    out, inn = 48, 64
    G = decaying_gram(inn, seed=4)
    W = torch.randn(out, inn, generator=_gen(5), dtype=F64)
    if structure == "lowrank":
        U, V, plain = fz.lowrank_svd(W, 12)
        plain_approx = U @ V.T
        U, V, cal = fz.lowrank_svd(W, 12, gram=G)
        cal_approx = U @ V.T
    elif structure == "monarch":
        w1, w2, plain = fz.monarch_project(W, 4, 16)
        plain_approx = functional.monarch_to_dense(w1, w2)
        w1, w2, cal = fz.monarch_project(W, 4, 16, gram=G)
        cal_approx = functional.monarch_to_dense(w1, w2)
    else:
        U, S, V, plain = fz.blast_factorize(W, (4, 4), 8, steps=60, init="svd")
        plain_approx = functional.blast_to_dense(U, S, V)
        U, S, V, cal = fz.blast_factorize(W, (4, 4), 8, steps=60, init="svd", gram=G)
        cal_approx = functional.blast_to_dense(U, S, V)
    plain_out = fz.output_relative_error(W, plain_approx, G)
    assert cal.output_relative_error == pytest.approx(fz.output_relative_error(W, cal_approx, G), rel=1e-9)
    assert cal.relative_error == pytest.approx(float((W - cal_approx).norm() / W.norm()), rel=1e-9)
    assert plain.output_relative_error is None and "output_relative_error" in cal.to_dict()
    assert cal.output_relative_error < 0.7 * plain_out, (cal.output_relative_error, plain_out)


@pytest.mark.parametrize("structure", ["monarch", "blast"])
def test_sweeps_descend_on_the_full_gram(structure):
    """Block-coordinate sweeps on the full Gram never raise the damped objective and beat per-block whitening."""
    out, inn = 32, 48
    G = decaying_gram(inn, seed=6)
    W = torch.randn(out, inn, generator=_gen(7), dtype=F64)
    if structure == "monarch":
        *_, per_block = fz.monarch_whitened(W, 4, 8, G, sweeps=0)
        *_, swept = fz.monarch_whitened(W, 4, 8, G, sweeps=4)
        full = swept.history
    else:
        *_, per_block = fz.blast_whitened(W, (4, 4), 6, G, sweeps=0, steps=40, init="svd")
        *_, swept = fz.blast_whitened(W, (4, 4), 6, G, sweeps=4, steps=40, init="svd")
        full = swept.history[-4:]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(full, full[1:], strict=False)), full
    assert swept.output_relative_error < 0.95 * per_block.output_relative_error


def test_blast_whitening_only_changes_v():
    """With G block diagonal, BLAST's whitened fit is the plain fit of W blockdiag(L_j), V_j folded back by
    L_j^-T: the same U and S, and the same error history."""
    out, inn, bi = 24, 32, 4
    q = inn // bi
    blocks = [decaying_gram(q, seed=10 + j) for j in range(bi)]
    G = torch.block_diag(*blocks)
    W = torch.randn(out, inn, generator=_gen(8), dtype=F64)
    U, S, V, res = fz.blast_whitened(W, (2, bi), 4, G, damping=0.0, sweeps=0, steps=20)
    L = fz.whitening(torch.stack(blocks), 0.0)
    white = torch.cat([W[:, j * q : (j + 1) * q] @ L[j] for j in range(bi)], dim=1)
    U0, S0, V0, res0 = fz.blast_factorize(white, (2, bi), 4, steps=20)
    torch.testing.assert_close(U, U0)
    torch.testing.assert_close(S, S0)
    torch.testing.assert_close(torch.einsum("jqk,jqr->jkr", L, V), V0)  # L_j^T V_j = V'_j
    assert res.history == pytest.approx(res0.history)


def test_planted_blast_is_recovered_through_whitening():
    """Planted BLAST factors stay exactly representable after per-block whitening: recovered to < 1e-6."""
    g = _gen(9)
    bo, bi, p, q, r = 2, 3, 8, 6, 3
    U = torch.randn(bo, p, r, generator=g, dtype=F64)
    S = torch.randn(bo, bi, r, generator=g, dtype=F64)
    V = torch.randn(bi, q, r, generator=g, dtype=F64)
    W = functional.blast_to_dense(U, S, V)
    G = decaying_gram(bi * q, seed=11)
    *_, res = fz.blast_factorize(W, (bo, bi), r, steps=300, init="svd", tol=1e-10, gram=G)
    assert res.output_relative_error < 1e-6 and res.relative_error < 1e-6


def test_gram_checks_and_degenerate_grams():
    W = torch.randn(8, 12, dtype=F64)
    with pytest.raises(ValueError, match=r"must be \(12, 12\)"):
        fz.lowrank_svd(W, 2, gram=torch.eye(8, dtype=F64))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fz.lowrank_svd(W, 2, gram=torch.full((12, 12), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        fz.lowrank_svd(W, 2, gram=torch.eye(12, dtype=F64), damping=-1.0)
    # An all-zero Gram (inputs that were always zero): any fit is exact on them; whitening falls back to identity.
    U, V, res = fz.lowrank_svd(W, 2, gram=torch.zeros(12, 12, dtype=F64))
    assert res.output_relative_error == 0.0
    _, _, plain = fz.lowrank_svd(W, 2)
    assert res.relative_error == pytest.approx(plain.relative_error)
    # The identity Gram makes the calibrated fit the weight-only one.
    U, V, res = fz.lowrank_svd(W, 3, gram=torch.eye(12, dtype=F64), damping=0.0)
    _, _, plain = fz.lowrank_svd(W, 3)
    assert res.relative_error == pytest.approx(plain.relative_error) == pytest.approx(res.output_relative_error)
