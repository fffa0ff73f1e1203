"""Dense -> structured factorization (DESIGN §3).

BLAST: preconditioned alternating gradient descent (Lee et al., NeurIPS 2024), batched over blocks, on the
weight's device. Monarch and low-rank: closed-form projections by batched truncated SVD.
All three work in float64 on the CPU and float32 on a GPU unless told otherwise, and return factors in the
dtype of the input weight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blrdeploy.structures import functional, shapes

Progress = Callable[[int, int, float], None]  # (step, total_steps, relative_error)


@dataclass
class FitResult:
    relative_error: float  # ||W - W_hat||_F / ||W||_F, computed exactly after the fit
    steps: int = 0  # iterations run (0 for closed-form projections)
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # relative error after each iteration

    def to_dict(self) -> dict:
        return {"relative_error": self.relative_error, "steps": self.steps, "seconds": self.seconds}


def _compute_dtype(weight: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if weight.device.type == "cpu" else torch.float32


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    norm = torch.linalg.vector_norm(weight)
    if norm == 0:
        return float(torch.linalg.vector_norm(approx) > 0)
    return float(torch.linalg.vector_norm(weight - approx) / norm)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------- low-rank


def lowrank_svd(weight: torch.Tensor, rank: int, compute_dtype: torch.dtype | None = None):
    """Truncated SVD, singular values split evenly between U (out, r) and V (in, r)."""
    shapes.check_rank(rank, min(weight.shape), "low-rank")
    t0 = time.perf_counter()
    w = weight.to(_compute_dtype(weight, compute_dtype))
    P, sigma, Qh = torch.linalg.svd(w, full_matrices=False)
    root = sigma[:rank].sqrt()
    U = P[:, :rank] * root
    V = Qh[:rank].mT * root
    err = _discarded_energy(sigma, rank, w)
    _sync(weight.device)
    return U.to(weight.dtype), V.to(weight.dtype), FitResult(err, seconds=time.perf_counter() - t0)


def _discarded_energy(sigma: torch.Tensor, keep: int, w: torch.Tensor) -> float:
    """sqrt(sum of discarded sigma^2) / ||W||: the exact error of a truncated SVD (Eckart-Young)."""
    total = torch.linalg.vector_norm(w) ** 2
    if total == 0:
        return 0.0
    dropped = (sigma[..., keep:] ** 2).sum()
    return float(torch.sqrt(dropped.clamp_min(0) / total))


# ---------------------------------------------------------------------------------------------------- Monarch


def monarch_project(weight: torch.Tensor, num_blocks: int, rank: int, compute_dtype: torch.dtype | None = None):
    """Best Monarch approximation: each (strided-row, contiguous-column) block is truncated to rank R/b."""
    out, inn = weight.shape
    shapes.check_square_block_count(num_blocks, out, inn)
    shapes.check_rank(rank, min(out, inn), f"Monarch with num_blocks={num_blocks}", num_blocks)
    t0 = time.perf_counter()
    b, R = num_blocks, rank
    m = R // b
    w = weight.to(_compute_dtype(weight, compute_dtype))
    blocks = w.view(out // b, b, b, inn // b).permute(1, 2, 0, 3)  # [l, k, s, p]: rows s*b+l, columns block k
    P, sigma, Qh = torch.linalg.svd(blocks, full_matrices=False)
    root = sigma[..., :m].sqrt()
    left = P[..., :m] * root.unsqueeze(-2)  # [l, k, s, t]
    right = Qh[..., :m, :] * root.unsqueeze(-1)  # [l, k, t, p]
    w2 = left.permute(0, 2, 1, 3).reshape(b, out // b, b * m)  # w2[l, s, k*m+t]
    w1 = right.permute(1, 2, 0, 3).reshape(b, m * b, inn // b)  # w1[k, t*b+l, p]
    err = _discarded_energy(sigma, m, w)
    _sync(weight.device)
    return w1.to(weight.dtype), w2.to(weight.dtype), FitResult(err, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------ BLAST


def _damped_right_solve(B: torch.Tensor, G: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """B @ (G + damping*I)^-1 for symmetric PSD G (..., r, r); damping broadcasts over the batch."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, _ = torch.linalg.cholesky_ex(G + damping[..., None, None] * eye)
    return torch.cholesky_solve(B.mT, L).mT


def _damping(G: torch.Tensor, delta: float, rel_err: float) -> torch.Tensor:
    # DESIGN's eps = delta*||W - W_hat||, made scale-free: relative to the Gram's mean diagonal, so it means the
    # same whatever the magnitude of the factors. It fades with the residual, turning each step into plain ALS
    # near the solution; the floor keeps the Cholesky factorization defined when a Gram is singular (r > p).
    mean_diag = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    floor = 100 * torch.finfo(G.dtype).eps
    return mean_diag * max(delta * rel_err, floor) + torch.finfo(G.dtype).tiny


def _svd_init(A4: torch.Tensor, rank: int, gen: torch.Generator):
    """U_i spans the dominant column space of block row i, V_j that of block column j; S from the exact
    least-squares step that follows. Columns beyond a block's dimension start as small noise."""
    bo, bi, p, q = A4.shape
    rows = A4.permute(0, 2, 1, 3).reshape(bo, p, bi * q)
    cols = A4.permute(1, 3, 0, 2).reshape(bi, q, bo * p)
    U = _leading_basis(rows, rank, gen)
    V = _leading_basis(cols, rank, gen)
    S = torch.zeros(bo, bi, rank, dtype=A4.dtype, device=A4.device)
    return U, S, V


def _leading_basis(mats: torch.Tensor, rank: int, gen: torch.Generator) -> torch.Tensor:
    batch, rows, _ = mats.shape
    P, _, _ = torch.linalg.svd(mats, full_matrices=False)
    k = min(rank, P.shape[-1])
    basis = 1e-3 * torch.randn(batch, rows, rank, generator=gen, dtype=mats.dtype, device=mats.device)
    basis /= math.sqrt(rows)
    basis[..., :k] = P[..., :k]
    return basis


def _random_init(A4: torch.Tensor, rank: int, gen: torch.Generator):
    bo, bi, p, q = A4.shape
    kw = dict(generator=gen, dtype=A4.dtype, device=A4.device)
    U = torch.randn(bo, p, rank, **kw) / math.sqrt(p)
    V = torch.randn(bi, q, rank, **kw) / math.sqrt(q)
    S = 0.01 * torch.randn(bo, bi, rank, **kw)
    return U, S, V


# Above this rank the S step solves its b_out*b_in damped r x r systems by warm-started, Jacobi-preconditioned
# conjugate gradients instead of Cholesky: at r=1024 (Llama-7B, b=16) the 256 batched Cholesky solves took 55%
# of a 53.7 ms step on an H100 (bench/NOTES.md). Each outer step refines S again, so an inexact inner solve is
# enough there; small ranks keep the exact solve, which the planted-recovery tests need to reach 1e-8.
CHOLESKY_MAX_RANK = 256
CG_ITERATIONS = 12


def _damped_cg_solve(G, damp, rhs, x0, iterations):
    """Solve (G + damp*I) x = rhs batched over the leading dims; G (..., r, r) SPD, rhs and x0 (..., r)."""
    tiny = torch.finfo(G.dtype).tiny
    damp = damp[..., None]

    def matvec(v):
        return (G @ v.unsqueeze(-1)).squeeze(-1) + damp * v

    inv_diag = 1 / (torch.diagonal(G, dim1=-2, dim2=-1) + damp)
    x = x0
    resid = rhs - matvec(x)
    z = inv_diag * resid
    p = z
    rz = (resid * z).sum(-1, keepdim=True)
    for _ in range(iterations):
        Ap = matvec(p)
        alpha = rz / (p * Ap).sum(-1, keepdim=True).clamp_min(tiny)
        x = x + alpha * p
        resid = resid - alpha * Ap
        z = inv_diag * resid
        rz_next = (resid * z).sum(-1, keepdim=True)
        p = z + (rz_next / rz.clamp_min(tiny)) * p
        rz = rz_next
    return x


def _s_step(A4, U, S, V, AV, delta, rel_err, row_chunk):
    """Damped least squares for every s_ij: (U_i'U_i * V_j'V_j + eps I) s = eps s + diag(U_i' A_ij V_j).
    Returns the new S and ||A - A_hat||^2 - ||A||^2 for it."""
    UtU = U.mT @ U  # (bo, r, r)
    VtV = V.mT @ V  # (bi, r, r)
    d = torch.einsum("ipr,ijpr->ijr", U, AV)
    fit_inner = torch.zeros((), dtype=A4.dtype, device=A4.device)
    fit_norm = torch.zeros((), dtype=A4.dtype, device=A4.device)
    new_S = torch.empty_like(S)
    for lo in range(0, U.shape[0], row_chunk):  # the Grams are bo*bi*r*r: built a few block rows at a time
        hi = min(lo + row_chunk, U.shape[0])
        G = UtU[lo:hi, None] * VtV[None]
        damp = _damping(G, delta, rel_err)
        rhs = damp[..., None] * S[lo:hi] + d[lo:hi]
        if G.shape[-1] > CHOLESKY_MAX_RANK:
            s = _damped_cg_solve(G, damp, rhs, S[lo:hi], CG_ITERATIONS)
        else:
            s = _damped_right_solve(rhs.unsqueeze(-2), G, damp).squeeze(-2)
        new_S[lo:hi] = s
        fit_inner += (s * d[lo:hi]).sum()
        fit_norm += (s.unsqueeze(-2) @ G @ s.unsqueeze(-1)).sum()
    return new_S, fit_norm - 2 * fit_inner


def _factor_step(F_old, cross, other_gram, S_pairs, delta, rel_err):
    """Damped least squares for one side's factors. F_old (n, m, r), cross (n, m, r) = sum_k A-products * s,
    other_gram (k, r, r), S_pairs (n, k, r) indexed [this side, other side]."""
    P = torch.einsum("kab,nka,nkb->nab", other_gram, S_pairs, S_pairs)
    damp = _damping(P, delta, rel_err)
    return _damped_right_solve(damp[:, None, None] * F_old + cross, P, damp)


def _balance(U, S, V):
    """Unit-norm columns in U and V, magnitude moved into S: an exact reparametrization that keeps the Grams
    well scaled from step to step."""
    a = torch.linalg.vector_norm(U, dim=1).clamp_min(torch.finfo(U.dtype).tiny)  # (bo, r)
    c = torch.linalg.vector_norm(V, dim=1).clamp_min(torch.finfo(V.dtype).tiny)  # (bi, r)
    return U / a[:, None], S * a[:, None] * c[None], V / c[:, None]


def blast_factorize(
    weight: torch.Tensor,
    num_blocks: tuple[int, int],
    rank: int,
    *,
    steps: int = 300,
    delta: float = 1.0,
    init: str = "random",
    seed: int = 0,
    tol: float = 0.0,
    momentum: float = 0.3,
    compute_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
):
    """Fit U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r) to ``weight`` (out, in).

    ``init='random'`` (the BLAST paper's) starts from small random factors; ``init='svd'`` from each block
    row's / column's dominant subspace. ``delta`` scales the damping (relative to each Gram's mean diagonal,
    times the current relative error); ``momentum`` is the initial extrapolation weight between sweeps (0 turns
    it off). The defaults are the best of a sweep on planted and unstructured matrices (bench/NOTES.md).
    ``tol`` stops early once the relative error falls below it.
    """
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    bo, bi = num_blocks
    out, inn = weight.shape
    shapes.check_block_count(bo, out, "out_features")
    shapes.check_block_count(bi, inn, "in_features")
    shapes.check_rank(rank, min(out, inn), "BLAST")
    t0 = time.perf_counter()
    p, q = out // bo, inn // bi
    dt = _compute_dtype(weight, compute_dtype)
    W = weight.to(dt)
    scale = W.std() if W.numel() > 1 else W.abs().max()
    scale = scale if scale > 0 else torch.ones((), dtype=dt, device=W.device)
    A4 = (W / scale).view(bo, p, bi, q).permute(0, 2, 1, 3).contiguous()  # [i, j, p, q]: block (i, j)
    norm2 = (A4 * A4).sum()
    gen = torch.Generator(device=W.device).manual_seed(seed)
    U, S, V = (_svd_init if init == "svd" else _random_init)(A4, rank, gen)
    # Bound the bo*bi*r*r Gram buffer of the S step to about 2^27 elements (0.5 GB in float32).
    row_chunk = max(1, min(bo, (1 << 27) // max(1, bi * rank * rank)))
    momentum_max = 1.0

    history: list[float] = []

    def s_step(U, S, V, rel_err):
        AV = torch.einsum("ijpq,jqr->ijpr", A4, V)
        S, fit = _s_step(A4, U, S, V, AV, delta, rel_err, row_chunk)
        return S, AV, float(torch.sqrt((norm2 + fit).clamp_min(0) / norm2)) if norm2 > 0 else 0.0

    S, AV, rel_err = s_step(U, S, V, 1.0)
    history.append(rel_err)
    if progress is not None:
        progress(1, steps, rel_err)
    prev_U = prev_V = None
    for step in range(1, steps):
        if rel_err < tol:
            break
        U_new = _factor_step(U, torch.einsum("ijpr,ijr->ipr", AV, S), V.mT @ V, S, delta, rel_err)
        AtU = torch.einsum("ijpq,ipr->ijqr", A4, U_new)
        V_new = _factor_step(
            V, torch.einsum("ijqr,ijr->jqr", AtU, S), U_new.mT @ U_new, S.transpose(0, 1), delta, rel_err
        )
        del AtU
        U_new, S, V_new = _balance(U_new, S, V_new)
        accepted = False
        if prev_U is not None and momentum > 0:
            # Extrapolate along the last sweep's direction (heuristic extrapolation with restarts, as for CP-ALS):
            # alternating steps crawl through long flat valleys ("swamps"); this leaves them in a few sweeps.
            U_try = U_new + momentum * (U_new - prev_U)
            V_try = V_new + momentum * (V_new - prev_V)
            S_try, AV_try, err_try = s_step(U_try, S, V_try, rel_err)
            if err_try < rel_err:
                U, V, S, AV, rel_err, accepted = U_try, V_try, S_try, AV_try, err_try, True
                momentum_max = min(1.0, momentum_max * 1.05)
                momentum = min(momentum_max, momentum * 1.2)
            else:
                momentum_max, momentum = momentum, momentum / 2
        if not accepted:
            U, V = U_new, V_new
            S, AV, rel_err = s_step(U, S, V, rel_err)
        prev_U, prev_V = U_new, V_new
        history.append(rel_err)
        if progress is not None:
            progress(step + 1, steps, rel_err)
    AV = None  # free the largest buffer before the dense check below

    root = scale ** (1 / 3)  # spread the normalization evenly so no factor alone carries the magnitude
    U, S, V = U * root, S * root, V * root
    err = _relative_error(W, functional.blast_to_dense(U, S, V))
    _sync(weight.device)
    result = FitResult(err, steps=len(history), seconds=time.perf_counter() - t0, history=history)
    return U.to(weight.dtype), S.to(weight.dtype), V.to(weight.dtype), result
