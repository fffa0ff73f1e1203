"""Dense -> structured factorization into the canonical forms of ``structures.functional``.

BLAST: preconditioned alternating gradient descent (Lee et al., NeurIPS 2024), batched over blocks, on the
weight's device, from the better of the truncated SVD and BLAST's algebraic solution, stopping once it stalls.
Monarch and low-rank: closed-form projections by batched truncated SVD. Those two work in float64 on the CPU and
float32 on a GPU unless told otherwise; BLAST in float32, moving to float64 only for a near-exact fit. All
return factors in the dtype of the input weight.

Given ``gram`` = XᵀX of the layer's calibration inputs (in, in), each fit minimizes the calibration output error
||(W − Ŵ)Xᵀ||_F² = tr(E G Eᵀ) instead of ||W − Ŵ||_F² (the layer's output error), with G damped to G + λI,
λ = damping·mean(diag G): low-rank exactly (whitened SVD, SVD-LLM); Monarch and BLAST by whitening each input
block (exact per block), then block-coordinate sweeps on the full Gram (see their functions). Each reports both
errors.
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
    history: list[float] = field(default_factory=list)  # relative error after each iteration (of what it fits)
    # sqrt(tr(E G E^T) / tr(W G W^T)), E = W - W_hat, G the undamped calibration Gram: set when a Gram was given
    output_relative_error: float | None = None

    def to_dict(self) -> dict:
        data = {"relative_error": self.relative_error, "steps": self.steps, "seconds": self.seconds}
        if self.output_relative_error is not None:
            data["output_relative_error"] = self.output_relative_error
        return data


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


# ------------------------------------------------------------------------------------------- calibration Grams

DEFAULT_DAMPING = 1e-2  # lambda = 1e-2 * mean(diag G): SVD-LLM's and the issue-21 measurement's choice


def check_gram(gram: torch.Tensor, in_features: int) -> None:
    """A ValueError unless ``gram`` is a finite (in_features, in_features) matrix."""
    if gram.dim() != 2 or tuple(gram.shape) != (in_features, in_features):
        raise ValueError(f"the calibration Gram must be ({in_features}, {in_features}), got {tuple(gram.shape)}")
    shapes.check_finite(gram, "the calibration Gram")


def damped_gram(gram: torch.Tensor, damping: float = DEFAULT_DAMPING, dtype: torch.dtype | None = None):
    """(G + G^T)/2 + lambda*I with lambda = ``damping`` * mean(diag G), in ``dtype`` (default float64)."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    g = gram.to(dtype or torch.float64)
    g = (g + g.mT) / 2
    lam = damping * torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)
    return g + lam[..., None, None] * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)


def whitening(gram: torch.Tensor, damping: float = DEFAULT_DAMPING, dtype: torch.dtype | None = None):
    """Lower-triangular L with L L^T = G + lambda*I (batched over leading dims), in ``dtype`` (default float64):
    ||E L||_F^2 = tr(E (G + lambda I) E^T). Factorized in float64; a Gram that stays singular after damping
    (damping 0, fewer tokens than features) gets the least diagonal jitter that makes it positive definite, and
    an all-zero Gram (a layer that only ever saw zeros: every fit has zero output error) the identity."""
    g = damped_gram(gram, damping, torch.float64)
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    scale = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)
    g = torch.where((scale > 0)[..., None, None], g, eye)
    scale = scale.clamp_min(1.0e-300)[..., None, None]
    L, info = torch.linalg.cholesky_ex(g)
    jitter = 1e-12
    while bool((info > 0).any()) and jitter <= 1.0:
        failed = (info > 0)[..., None, None]  # only those get the jitter; a batch's other Grams stay exact
        retry, info = torch.linalg.cholesky_ex(g + jitter * scale * eye)
        L, info = torch.where(failed, retry, L), torch.where(failed[..., 0, 0], info, 0)
        jitter *= 10
    if bool((info > 0).any()):
        raise ValueError("the calibration Gram is not positive semi-definite")
    return L.to(dtype or torch.float64)


def _solve_lower_t(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """L^-T B (a triangular solve, never an explicit inverse); L lower (..., n, n), B (..., n, k)."""
    return torch.linalg.solve_triangular(L.mT, B, upper=True)


def output_relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """sqrt(tr(E G E^T) / tr(W G W^T)), E = W - approx: the layer's relative output error on the inputs whose
    Gram is ``gram`` (undamped: the error the calibration data itself sees)."""
    weight, approx = weight.detach(), approx.detach()
    g = gram.detach().to(weight.dtype)
    err = weight - approx
    num = ((err @ g) * err).sum().clamp_min(0)
    den = ((weight @ g) * weight).sum()
    if den <= 0:
        return float(num > 0)
    return float(torch.sqrt(num / den))


def _input_block_whitening(gram, num_blocks: int, damping: float, dtype) -> torch.Tensor:
    """(b, q, q): the whitening of each input block's diagonal Gram block G_jj + lambda*I, lambda from the whole
    diagonal (so the blocks see the damping the full Gram would)."""
    inn = gram.shape[-1]
    q = inn // num_blocks
    g = damped_gram(gram, damping, torch.float64)
    diag_blocks = torch.stack([g[j * q : (j + 1) * q, j * q : (j + 1) * q] for j in range(num_blocks)])
    return whitening(diag_blocks, 0.0, dtype)


# --------------------------------------------------------------------------------------------------- low-rank


def lowrank_svd(
    weight: torch.Tensor,
    rank: int,
    compute_dtype: torch.dtype | None = None,
    *,
    gram: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
):
    """Truncated SVD, singular values split evenly between U (out, r) and V (in, r). With ``gram``, the exact
    minimizer of the damped output error instead (:func:`lowrank_whitened`)."""
    if gram is not None:
        return lowrank_whitened(weight, rank, gram, damping=damping, compute_dtype=compute_dtype)
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


def lowrank_whitened(
    weight: torch.Tensor,
    rank: int,
    gram: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    compute_dtype: torch.dtype | None = None,
):
    """The rank-r W_hat minimizing tr((W - W_hat)(G + lambda I)(W - W_hat)^T), exactly (SVD-LLM): with
    G + lambda I = L L^T, the truncated SVD W L = P S Q^T gives W_hat = P_r S_r Q_r^T L^-1, returned as
    U = P_r S_r^1/2 (out, r) and V = L^-T Q_r S_r^1/2 (in, r) (a triangular solve, no inverse)."""
    out, inn = weight.shape
    shapes.check_rank(rank, min(out, inn), "low-rank")
    check_gram(gram, inn)
    t0 = time.perf_counter()
    dt = _compute_dtype(weight, compute_dtype)
    w = weight.to(dt)
    L = whitening(gram.to(weight.device), damping, dt)
    P, sigma, Qh = torch.linalg.svd(w @ L, full_matrices=False)
    root = sigma[:rank].sqrt()
    U = P[:, :rank] * root
    V = _solve_lower_t(L, Qh[:rank].mT * root)
    approx = U @ V.mT
    result = FitResult(
        _relative_error(w, approx), output_relative_error=output_relative_error(w, approx, gram.to(w)),
    )  # fmt: skip
    _sync(weight.device)
    result.seconds = time.perf_counter() - t0
    return U.to(weight.dtype), V.to(weight.dtype), result


def _discarded_energy(sigma: torch.Tensor, keep: int, w: torch.Tensor) -> float:
    """sqrt(sum of discarded sigma^2) / ||W||: the exact error of a truncated SVD (Eckart-Young)."""
    total = torch.linalg.vector_norm(w) ** 2
    if total == 0:
        return 0.0
    dropped = (sigma[..., keep:] ** 2).sum()
    return float(torch.sqrt(dropped.clamp_min(0) / total))


# ---------------------------------------------------------------------------------------------------- Monarch


def monarch_project(
    weight: torch.Tensor,
    num_blocks: int,
    rank: int,
    compute_dtype: torch.dtype | None = None,
    *,
    gram: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
    sweeps: int | None = None,
):
    """Best Monarch approximation: each (strided-row, contiguous-column) block is truncated to rank R/b.
    With ``gram``, fitted to the damped output error instead (:func:`monarch_whitened`)."""
    if gram is not None:
        kw = {} if sweeps is None else {"sweeps": sweeps}
        return monarch_whitened(weight, num_blocks, rank, gram, damping=damping, compute_dtype=compute_dtype, **kw)
    out, inn = weight.shape
    shapes.check_square_block_count(num_blocks, out, inn)
    shapes.check_rank(rank, min(out, inn), f"Monarch with num_blocks={num_blocks}", num_blocks)
    t0 = time.perf_counter()
    b, R = num_blocks, rank
    m = R // b
    w = weight.to(_compute_dtype(weight, compute_dtype))
    P, sigma, Qh = torch.linalg.svd(_monarch_blocks(w, b), full_matrices=False)
    root = sigma[..., :m].sqrt()
    left = P[..., :m] * root.unsqueeze(-2)  # [l, k, s, t]
    right = Qh[..., :m, :] * root.unsqueeze(-1)  # [l, k, t, p]
    w1, w2 = _monarch_pack(left, right)
    err = _discarded_energy(sigma, m, w)
    _sync(weight.device)
    return w1.to(weight.dtype), w2.to(weight.dtype), FitResult(err, seconds=time.perf_counter() - t0)


def _monarch_blocks(w: torch.Tensor, b: int) -> torch.Tensor:
    """[l, k, s, p] = w[s*b + l, k*(in/b) + p]: Monarch's (strided-row, contiguous-column) blocks (a view)."""
    out, inn = w.shape
    return w.view(out // b, b, b, inn // b).permute(1, 2, 0, 3)


def _monarch_pack(left: torch.Tensor, right: torch.Tensor):
    """w1, w2 from the rank-m factors of every block: left [l, k, s, t], right [l, k, t, p]."""
    b, _, s, m = left.shape
    p = right.shape[-1]
    w2 = left.permute(0, 2, 1, 3).reshape(b, s, b * m)  # w2[l, s, k*m+t]
    w1 = right.permute(1, 2, 0, 3).reshape(b, m * b, p)  # w1[k, t*b+l, p]
    return w1, w2


# Block-coordinate sweeps on the full Gram after the per-block whitened fit. On a real 135M Llama (SmolLM2-class,
# layer 15 down_proj 576x1536, rho 0.5, 8192 Wikipedia tokens, CPU) the output error went 0.471 -> 0.389 -> 0.374
# -> 0.367 -> 0.362 with 0, 1, 2, 4, 8 sweeps for Monarch and 0.330 -> 0.275 -> 0.271 -> 0.267 with 0, 2, 4, 8 for
# BLAST; the held-out text followed (0.478 -> 0.427, 0.339 -> 0.310). Each sweep costs about one projection.
MONARCH_SWEEPS = 2


def monarch_whitened(
    weight: torch.Tensor,
    num_blocks: int,
    rank: int,
    gram: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    sweeps: int = MONARCH_SWEEPS,
    compute_dtype: torch.dtype | None = None,
):
    """Monarch factors minimizing the damped output error tr(E (G + lambda I) E^T).

    Each block (l, k) is low-rank on its own, so with the input block's whitening G_kk + lambda I = L_k L_k^T the
    truncated SVD of W_lk L_k, folded back by L_k^-1, is the exact optimum of sum_k tr(E_lk G_kk E_lk^T): the
    per-input-block objective, which is all the structure allows in closed form. The full Gram's off-diagonal
    blocks G_kk' couple the blocks of one row group; ``sweeps`` rounds of exact block-coordinate descent on the
    full objective follow (block (l, k) refit to W_lk + R_lk G_kk^-1, R_lk = sum_{k' != k} E_lk' G_k'k: the
    whitened SVD of W_lk L_k + R_lk L_k^-T), each as costly as the first projection and never worse.
    """
    out, inn = weight.shape
    shapes.check_square_block_count(num_blocks, out, inn)
    shapes.check_rank(rank, min(out, inn), f"Monarch with num_blocks={num_blocks}", num_blocks)
    check_gram(gram, inn)
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    t0 = time.perf_counter()
    b, m, q = num_blocks, rank // num_blocks, inn // num_blocks
    dt = _compute_dtype(weight, compute_dtype)
    w = weight.to(dt)
    g = gram.to(device=w.device)
    L = _input_block_whitening(g, b, damping, dt)  # [k, p, p]
    Wb = _monarch_blocks(w, b)  # [l, k, s, p]

    def fit(target_white, Lk):  # rank-m SVD in whitened space, right factor folded back by L^-1
        P, sigma, Qh = torch.linalg.svd(target_white, full_matrices=False)
        root = sigma[..., :m].sqrt()
        left = P[..., :m] * root.unsqueeze(-2)
        right = _solve_lower_t(Lk, (Qh[..., :m, :] * root.unsqueeze(-1)).mT).mT
        return left, right

    left, right = fit(Wb @ L, L)  # L broadcasts over l
    history = []
    if sweeps:
        Gd = damped_gram(g, damping, dt)
        approx = left @ right
        history.append(_monarch_output_error(Wb, approx, Gd))
        for _ in range(sweeps):
            for k in range(b):
                E = _monarch_rows(Wb - approx)  # [l, s, in]: the error of each row group
                cols = slice(k * q, (k + 1) * q)
                R = E @ Gd[:, cols] - (Wb[:, k] - approx[:, k]) @ Gd[cols, cols]  # [l, s, q]
                target = Wb[:, k] @ L[k] + torch.linalg.solve_triangular(L[k], R.mT, upper=False).mT
                lk, rk = fit(target, L[k])
                left[:, k], right[:, k] = lk, rk
                approx[:, k] = lk @ rk
            history.append(_monarch_output_error(Wb, approx, Gd))
    w1, w2 = _monarch_pack(left, right)
    approx = functional.monarch_to_dense(w1, w2)
    result = FitResult(
        _relative_error(w, approx), steps=sweeps, history=history,
        output_relative_error=output_relative_error(w, approx, g.to(dt)),
    )  # fmt: skip
    _sync(weight.device)
    result.seconds = time.perf_counter() - t0
    return w1.to(weight.dtype), w2.to(weight.dtype), result


def _monarch_rows(blocks: torch.Tensor) -> torch.Tensor:
    """[l, s, in]: row group l (rows s*b + l) of the matrix whose Monarch blocks are ``blocks`` [l, k, s, p]."""
    b, _, s, p = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(b, s, b * p)


def _monarch_output_error(Wb, approx, gram) -> float:
    err, w = _monarch_rows(Wb - approx), _monarch_rows(Wb)
    den = ((w @ gram) * w).sum()
    return float(torch.sqrt(((err @ gram) * err).sum().clamp_min(0) / den)) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------------ BLAST


def _damped_right_solve(B: torch.Tensor, G: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """B @ (G + damping*I)^-1 for symmetric PSD G (..., r, r); damping broadcasts over the batch."""
    H = G.clone()
    H.diagonal(dim1=-2, dim2=-1).add_(damping[..., None])  # in place: through an eye matrix it cost 2.4x the time
    L, _ = torch.linalg.cholesky_ex(H)
    return torch.cholesky_solve(B.mT, L).mT


def _damping(G: torch.Tensor, delta: float, rel_err: float) -> torch.Tensor:
    # The BLAST paper's eps = delta*||W - W_hat||, made scale-free: relative to the Gram's mean diagonal, so it means
    # the same whatever the magnitude of the factors. It fades with the residual, turning each step into plain ALS
    # near the solution; the floor keeps the Cholesky factorization defined when a Gram is singular (r > p).
    mean_diag = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    floor = 100 * torch.finfo(G.dtype).eps
    return mean_diag * max(delta * rel_err, floor) + torch.finfo(G.dtype).tiny


class _Target:
    """The scaled weight A = W / scale in the two layouts the steps read, so that each large contraction is one
    batched GEMM on a contiguous operand: ``rows`` [i, p, in] (block row i; a view) for A_i^T U_i, and ``cols``
    [j, out, q] (block column j; a copy) for A_:j V_j."""

    def __init__(self, W: torch.Tensor, num_blocks: tuple[int, int], dtype: torch.dtype, scale: torch.Tensor):
        (bo, bi), (out, inn) = num_blocks, W.shape
        self.shape = (bo, bi, out // bo, inn // bi)
        A = (W.to(dtype) / scale.to(dtype)).contiguous()
        self.rows = A.view(bo, out // bo, inn)
        self.cols = A.view(out, bi, inn // bi).permute(1, 0, 2).contiguous()
        self.norm2 = (A * A).sum()

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def times_v(self, V: torch.Tensor) -> torch.Tensor:
        """[j, i, p, r] = A_ij V_j."""
        bo, bi, p, _ = self.shape
        return torch.bmm(self.cols, V).view(bi, bo, p, V.shape[-1])

    def t_times_u(self, U: torch.Tensor) -> torch.Tensor:
        """[i, j, q, r] = A_ij^T U_i."""
        bo, bi, _, q = self.shape
        return torch.bmm(self.rows.mT, U).view(bo, bi, q, U.shape[-1])

    def relative_error(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
        """||A - A_hat|| / ||A||, from the residual itself (one GEMM): exact where the cheap Gram form cancels."""
        bo, bi, _, q = self.shape
        right = (V[None] * S[:, :, None]).reshape(bo, bi * q, -1)  # [i, in, r]: rows of block j are V_j diag(s_ij)
        resid = torch.linalg.vector_norm(self.rows - U @ right.mT)
        return float(resid / self.norm2.sqrt()) if self.norm2 > 0 else float(resid > 0)


def _lowrank_init(A: _Target, rank: int, gen: torch.Generator):
    """The rank-r truncated SVD P_r Sigma_r Q_r^T, which BLAST holds exactly: U_i = P_r's rows of block i,
    V_j = Q_r's rows of block j, s_ij = sigma."""
    bo, bi, p, q = A.shape
    P, sigma, Qh = torch.linalg.svd(A.rows.reshape(bo * p, bi * q), full_matrices=False)
    U = P[:, :rank].reshape(bo, p, rank)
    V = Qh[:rank].mT.reshape(bi, q, rank)
    return U, sigma[:rank].expand(bo, bi, rank).contiguous(), V


def _algebraic_init(A: _Target, rank: int, gen: torch.Generator):
    """BLAST's own structure solved for directly, exact on a BLAST matrix (bo, bi >= 2, r <= p, q); None where
    it does not apply or breaks down. With B_i / C_j the top-r singular vectors of block row i / block column j
    (they span U_i / V_j there), the cores K_ij = B_i^T A_ij C_j = X_i D_ij Y_j^T share X_i along a block row and
    Y_j along a block column. Then M = sum_j w_j K_0j K_1j^-1 = X_0 (sum_j w_j D_0j D_1j^-1) X_1^-1, so the
    eigenvectors of M_a M_b^-1 (two random weightings) are X_0's columns (a simultaneous diagonalization, as in
    Jennrich's algorithm for CP); Y_j^T = X_0^-1 K_0j, X_i = K_i0 Y_0^-T and s_ij = diag(X_i^-1 K_ij Y_j^-T)
    follow, the scales and order of the r components agreeing across blocks by construction. Computed in float64."""
    bo, bi, p, q = A.shape
    if bo < 2 or bi < 2 or rank > min(p, q):
        return None
    rows = A.rows.double()
    B = torch.linalg.svd(rows, full_matrices=False)[0][..., :rank]  # [i, p, r]
    C = torch.linalg.svd(A.cols.double().mT, full_matrices=False)[0][..., :rank]  # [j, q, r]
    K = B.mT[:, None] @ rows.view(bo, p, bi, q).transpose(1, 2) @ C[None]  # [i, j, r, r]
    weights = torch.randn(2, bi, 1, 1, generator=gen, dtype=torch.float64, device=rows.device)
    if not bool(torch.isfinite(K).all()):
        return None
    try:
        ratios = torch.linalg.solve(K[1], K[0], left=False)  # [j]: K_0j K_1j^-1
        Ma, Mb = (weights * ratios).sum(1)
        X0 = torch.linalg.eig(torch.linalg.solve(Mb, Ma, left=False))[1].real
        Yt = torch.linalg.solve(X0, K[0])  # [j]: Y_j^T
        X = torch.linalg.solve(Yt[0], K[:, 0], left=False)  # [i]: X_i
        core = torch.linalg.solve(Yt[None], torch.linalg.solve(X[:, None], K), left=False)
    except RuntimeError as exc:  # LinAlgError is one: a singular core, not BLAST-structured enough to solve this
        # way. LAPACK's batched LU on the CPU reports some singular cores as a plain RuntimeError about its pivots
        # (seen on a real calibrated SmolLM2 layer with torch 2.13); any other RuntimeError (out of memory, a bug)
        # is not ours to hide
        if isinstance(exc, torch.linalg.LinAlgError) or "pivots" in str(exc).lower():
            return None
        raise
    U, S, V = B @ X, torch.diagonal(core, dim1=-2, dim2=-1), C @ Yt.mT
    if not all(bool(torch.isfinite(t).all()) for t in (U, S, V)):
        return None
    return U, S, V


def _svd_init(A: _Target, rank: int, gen: torch.Generator):
    """U_i spans the dominant column space of block row i, V_j that of block column j; S from the exact
    least-squares step that follows. Columns beyond a block's dimension start as small noise."""
    bo, bi, _, _ = A.shape
    U = _leading_basis(A.rows, rank, gen)
    V = _leading_basis(A.cols.mT, rank, gen)
    return U, torch.zeros(bo, bi, rank, dtype=A.dtype, device=A.rows.device), V


def _leading_basis(mats: torch.Tensor, rank: int, gen: torch.Generator) -> torch.Tensor:
    batch, rows, _ = mats.shape
    P, _, _ = torch.linalg.svd(mats, full_matrices=False)
    k = min(rank, P.shape[-1])
    basis = 1e-3 * torch.randn(batch, rows, rank, generator=gen, dtype=mats.dtype, device=mats.device)
    basis /= math.sqrt(rows)
    basis[..., :k] = P[..., :k]
    return basis


def _random_init(A: _Target, rank: int, gen: torch.Generator):
    bo, bi, p, q = A.shape
    kw = dict(generator=gen, dtype=A.dtype, device=A.rows.device)
    U = torch.randn(bo, p, rank, **kw) / math.sqrt(p)
    V = torch.randn(bi, q, rank, **kw) / math.sqrt(q)
    S = 0.01 * torch.randn(bo, bi, rank, **kw)
    return U, S, V


INITS = ("auto", "lowrank", "algebraic", "svd", "random")


def _initial_factors(A: _Target, rank: int, init: str, gen: torch.Generator, exact: Callable[[], _Target]):
    """(U, S, V, relative error or None if unknown) for ``init``; 'auto' takes the better of 'lowrank' and
    'algebraic' (where that applies), measured exactly. ``exact()`` gives the target in float64, which the
    algebraic solution is computed from (from a float32 copy it would only be exact to 1e-6)."""
    if init in ("svd", "random"):
        return *(_svd_init if init == "svd" else _random_init)(A, rank, gen), None
    candidates = []
    if init in ("auto", "lowrank"):
        candidates.append(_lowrank_init(A, rank, gen))
    if init in ("auto", "algebraic"):
        bo, bi, p, q = A.shape
        solved = _algebraic_init(exact(), rank, gen) if bo > 1 and bi > 1 and rank <= min(p, q) else None
        if solved is None and init == "algebraic":
            raise ValueError(
                "init='algebraic' found no solution: it needs at least 2 blocks on each side, rank <= the block "
                f"sizes (got blocks {A.shape[:2]}, block size {A.shape[2]}x{A.shape[3]}, rank {rank}) and "
                "nonsingular block cores"
            )
        if solved is not None:
            candidates.append(solved)
    scored = [(A.relative_error(*(t.to(A.dtype) for t in f)), f) for f in candidates]
    err, (U, S, V) = min(scored, key=lambda c: c[0])
    return U, S, V, err  # in the dtype they were computed in: an exact float64 solution stays exact


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


def _s_step(U, S, V, AV, delta, rel_err, row_chunk):
    """Damped least squares for every s_ij: (U_i'U_i * V_j'V_j + eps I) s = eps s + diag(U_i' A_ij V_j), with
    AV [j, i, p, r] = A_ij V_j. Returns the new S and ||A - A_hat||^2 - ||A||^2 for it."""
    UtU = U.mT @ U  # (bo, r, r)
    VtV = V.mT @ V  # (bi, r, r)
    d = (AV * U).sum(-2).transpose(0, 1)  # [i, j, r] = diag(U_i' A_ij V_j)
    fit_inner = torch.zeros((), dtype=U.dtype, device=U.device)
    fit_norm = torch.zeros((), dtype=U.dtype, device=U.device)
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
    n, _, r = F_old.shape
    P = torch.zeros(n, r, r, dtype=F_old.dtype, device=F_old.device)
    for k in range(S_pairs.shape[1]):  # sum_k diag(s_nk) G_k diag(s_nk): 2.6x faster than a 3-operand einsum
        P += S_pairs[:, k, :, None] * other_gram[k] * S_pairs[:, k, None, :]
    damp = _damping(P, delta, rel_err)
    return _damped_right_solve(damp[:, None, None] * F_old + cross, P, damp)


def _balance(U, S, V):
    """Unit-norm columns in U and V, magnitude moved into S: an exact reparametrization that keeps the Grams
    well scaled from step to step."""
    a = torch.linalg.vector_norm(U, dim=1).clamp_min(torch.finfo(U.dtype).tiny)  # (bo, r)
    c = torch.linalg.vector_norm(V, dim=1).clamp_min(torch.finfo(V.dtype).tiny)  # (bi, r)
    return U / a[:, None], S * a[:, None] * c[None], V / c[:, None]


# Defaults measured on SmolLM2-135M's layers and on planted factors (bench/NOTES.md, 2026-12-02). The damping
# scale: 0.03 reached in ~120 steps what 1.0 (the earlier default, tuned on planted matrices only) reached in 300
# on real layers, whose error stays at 0.1-0.6, so that 1.0 kept every step heavily damped.
DEFAULT_DELTA = 0.03
# The fit stops once the relative error improved by less than ``rtol`` per step, averaged over STALL_WINDOW steps
# (extrapolated steps make single steps uneven; plateaus of 10 steps occur).
DEFAULT_RTOL = 3e-4
STALL_WINDOW = 20
# Restarts (only with tol > 0, when a fit stalls above it) from the best factors plus noise of this relative size
# alternate with random starts: on 60 planted fits from random starts, 1.0 left 1 stalled after 6 restarts, 0.3
# left 10 (they fell back into the same minimum), fresh random starts 2.
DEFAULT_RESTARTS = 4
RESTART_NOISE = 1.0
# An automatic-dtype fit runs in float32 and moves to float64 once its error falls below FLOAT64_BELOW; below
# EXACT_BELOW the error is taken from the residual itself. The step error ||A||^2 + (s'Gs - 2 s'd) cancels down
# to noise near sqrt(eps) (3e-4 in float32, 1.5e-8 in float64), and only (near-)exact fits get there. Real
# weights stay above both, at float32's speed (2.2x float64's on a CPU, same final error to 4 digits).
FLOAT64_BELOW = 1e-2
EXACT_BELOW = 1e-2


def blast_factorize(
    weight: torch.Tensor,
    num_blocks: tuple[int, int],
    rank: int,
    *,
    steps: int = 300,
    delta: float = DEFAULT_DELTA,
    init: str = "auto",
    seed: int = 0,
    tol: float = 0.0,
    rtol: float = DEFAULT_RTOL,
    restarts: int = DEFAULT_RESTARTS,
    momentum: float = 0.3,
    compute_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    gram: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
):
    """Fit U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r) to ``weight`` (out, in).

    ``init``: 'auto' starts from the better of the rank-r truncated SVD ('lowrank', which BLAST holds exactly,
    so the fit never ends worse than it) and BLAST's algebraic solution ('algebraic', exact on a BLAST matrix;
    only for r <= the block sizes); 'random' (the BLAST paper's) from small random factors; 'svd' from each block
    row's / column's dominant subspace. ``delta`` scales the damping (relative to each Gram's mean diagonal,
    times the current relative error); ``momentum`` is the initial extrapolation weight between sweeps (0 turns
    it off). At most ``steps`` steps; the fit stops early once the relative error falls below ``tol`` or improves
    by less than ``rtol`` per step (averaged over STALL_WINDOW steps; 0 turns that off). When ``tol`` > 0 and a
    fit stalls above it (a local minimum: from a random start, planted factors do that 20-50% of the time), up
    to ``restarts`` more fits follow (from the 'auto' start if another was asked for, then alternately from the
    best factors plus noise and from a random start), and the best is returned; ``history`` then holds every
    fit's steps in order. ``compute_dtype`` None: float32, moving to float64 once the error is below
    FLOAT64_BELOW (only near-exact fits get there). With ``gram``, the fit minimizes the damped output error
    instead (:func:`blast_whitened`; the same options apply, ``tol`` and ``rtol`` to the whitened error).
    """
    if gram is not None:
        return blast_whitened(
            weight, num_blocks, rank, gram, damping=damping, steps=steps, delta=delta, init=init, seed=seed, tol=tol,
            rtol=rtol, restarts=restarts, momentum=momentum, compute_dtype=compute_dtype, progress=progress,
        )  # fmt: skip
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    for name, value in (("steps", steps), ("restarts", restarts), ("tol", tol), ("rtol", rtol)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    bo, bi = num_blocks
    out, inn = weight.shape
    shapes.check_block_count(bo, out, "out_features")
    shapes.check_block_count(bi, inn, "in_features")
    shapes.check_rank(rank, min(out, inn), "BLAST")
    t0 = time.perf_counter()
    W = weight.detach()
    dt = compute_dtype or torch.float32
    scale = W.to(dt).std() if W.numel() > 1 else W.to(dt).abs().max()
    scale = scale if scale > 0 else torch.ones((), dtype=dt, device=W.device)
    fit = _Descent(W, num_blocks, scale, rank, delta, momentum, steps, tol, rtol, compute_dtype is None, progress)
    gen = torch.Generator(device=W.device).manual_seed(seed)
    best = fit.run(*_initial_factors(fit.A, rank, init, gen, fit.exact_target))
    history = list(best.history)
    plan = (["auto"] if init != "auto" else []) + ["perturbed", "random"] * restarts
    for start in plan[: restarts if tol > 0 else 0]:
        if not best.stalled or best.rel_err < tol:
            break
        if start == "perturbed":
            U, S, V = _balance(*(t.to(fit.dtype) for t in (best.U, best.S, best.V)))
            kw = dict(generator=gen, dtype=U.dtype, device=U.device)
            U = U + RESTART_NOISE * torch.randn(U.shape, **kw) / math.sqrt(U.shape[1])
            V = V + RESTART_NOISE * torch.randn(V.shape, **kw) / math.sqrt(V.shape[1])
            factors = (U, S, V, None)
        else:
            factors = _initial_factors(fit.A, rank, start, gen, fit.exact_target)
        attempt = fit.run(*factors)
        history += attempt.history
        best = attempt if attempt.rel_err < best.rel_err else best
    root = scale.to(best.U.dtype) ** (1 / 3)  # spread the normalization evenly so no factor carries the magnitude
    U, S, V = best.U * root, best.S * root, best.V * root
    err = _relative_error(W.to(U.dtype), functional.blast_to_dense(U, S, V))
    _sync(weight.device)
    result = FitResult(err, steps=len(history), seconds=time.perf_counter() - t0, history=history)
    return U.to(weight.dtype), S.to(weight.dtype), V.to(weight.dtype), result


@dataclass
class _Run:
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rel_err: float
    history: list[float]
    stalled: bool  # stopped by rtol (not by tol or the step budget)


class _Descent:
    """Preconditioned alternating descent: damped least squares on U, V, then S, with extrapolation between
    sweeps; every accepted step lowers the error, so a run ends no worse than it started."""

    def __init__(self, W, num_blocks, scale, rank, delta, momentum, steps, tol, rtol, auto_dtype, progress):
        self.W, self.num_blocks, self.scale, self.rank = W, num_blocks, scale, rank
        self.dtype = scale.dtype
        self.A = _Target(W, num_blocks, self.dtype, scale)
        self.delta, self.momentum, self.steps, self.tol, self.rtol = delta, momentum, steps, tol, rtol
        self.auto_dtype, self.progress = auto_dtype, progress
        bo, bi = num_blocks
        # Bound the bo*bi*r*r Gram buffer of the S step to about 2^27 elements (0.5 GB in float32).
        self.row_chunk = max(1, min(bo, (1 << 27) // max(1, bi * rank * rank)))

    def exact_target(self) -> _Target:
        return self.A if self.A.dtype == torch.float64 else _Target(self.W, self.num_blocks, torch.float64, self.scale)

    def _retarget(self, dtype: torch.dtype) -> None:
        if self.A.dtype != dtype:
            self.A = _Target(self.W, self.num_blocks, dtype, self.scale)

    def s_step(self, U, S, V, rel_err):
        AV = self.A.times_v(V)
        S, fit = _s_step(U, S, V, AV, self.delta, rel_err, self.row_chunk)
        norm2 = self.A.norm2
        err = float(torch.sqrt((norm2 + fit).clamp_min(0) / norm2)) if norm2 > 0 else 0.0
        if err < EXACT_BELOW:
            err = self.A.relative_error(U, S, V)
        return S, AV, err

    def run(self, U, S, V, init_err: float | None) -> _Run:
        # An automatic-dtype fit begins in float32 again (a restart), or in float64 from a near-exact start.
        near_exact = self.auto_dtype and init_err is not None and init_err < FLOAT64_BELOW
        self._retarget(torch.float64 if near_exact else self.dtype)
        U, S, V = (t.to(self.A.dtype).contiguous() for t in (U, S, V))
        momentum, momentum_max = self.momentum, 1.0
        S, AV, rel_err = self.s_step(U, S, V, 1.0 if init_err is None else init_err)
        history = [rel_err]
        if self.progress is not None:
            self.progress(1, self.steps, rel_err)
        prev_U = prev_V = None
        stalled = False
        for step in range(1, self.steps):
            if rel_err < self.tol:
                break
            if self.auto_dtype and U.dtype != torch.float64 and rel_err < FLOAT64_BELOW:
                self._retarget(torch.float64)
                U, S, V = U.double(), S.double(), V.double()
                prev_U, prev_V = (None if t is None else t.double() for t in (prev_U, prev_V))
                AV = self.A.times_v(V)
            if rel_err <= 100 * torch.finfo(U.dtype).eps:  # exact to working precision
                break
            if self.rtol > 0 and len(history) > STALL_WINDOW:
                if history[-1 - STALL_WINDOW] - rel_err <= self.rtol * STALL_WINDOW * rel_err:
                    stalled = True
                    break
            cross = (AV * S.transpose(0, 1)[:, :, None]).sum(0)  # [i, p, r] = sum_j A_ij V_j diag(s_ij)
            U_new = _factor_step(U, cross, V.mT @ V, S, self.delta, rel_err)
            cross = (self.A.t_times_u(U_new) * S[:, :, None]).sum(0)  # [j, q, r] = sum_i A_ij^T U_i diag(s_ij)
            V_new = _factor_step(V, cross, U_new.mT @ U_new, S.transpose(0, 1), self.delta, rel_err)
            del cross
            U_new, S, V_new = _balance(U_new, S, V_new)
            accepted = False
            if prev_U is not None and momentum > 0:
                # Extrapolate along the last sweep's direction (heuristic extrapolation with restarts, as for
                # CP-ALS): alternating steps crawl through long flat valleys ("swamps"); this leaves them in a few.
                U_try = U_new + momentum * (U_new - prev_U)
                V_try = V_new + momentum * (V_new - prev_V)
                S_try, AV_try, err_try = self.s_step(U_try, S, V_try, rel_err)
                if err_try < rel_err:
                    U, V, S, AV, rel_err, accepted = U_try, V_try, S_try, AV_try, err_try, True
                    momentum_max = min(1.0, momentum_max * 1.05)
                    momentum = min(momentum_max, momentum * 1.2)
                else:
                    momentum_max, momentum = momentum, momentum / 2
            if not accepted:
                U, V = U_new, V_new
                S, AV, rel_err = self.s_step(U, S, V, rel_err)
            prev_U, prev_V = U_new, V_new
            history.append(rel_err)
            if self.progress is not None:
                self.progress(step + 1, self.steps, rel_err)
        return _Run(U, S, V, rel_err, history, stalled)


BLAST_SWEEPS = 4  # measured beside MONARCH_SWEEPS; 4 sweeps took 0.1 s of a 4 s, 100-step fit there


def blast_whitened(
    weight: torch.Tensor,
    num_blocks: tuple[int, int],
    rank: int,
    gram: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    sweeps: int = BLAST_SWEEPS,
    **options,
):
    """BLAST factors minimizing the damped output error tr(E (G + lambda I) E^T).

    First the per-input-block objective sum_j tr(E_:j (G_jj + lambda I) E_:j^T): whitening input block j by
    G_jj + lambda I = L_j L_j^T keeps the structure, since block (i, j) of W' = W blockdiag(L_j) is W_ij L_j and
    U_i diag(s_ij) V'_j^T L_j^-1 = U_i diag(s_ij) (L_j^-T V'_j)^T. So W' is fitted by :func:`blast_factorize` (its
    init, steps, damping and tolerance unchanged; ``options`` are its keywords) and only V changes:
    V_j = L_j^-T V'_j. The full Gram's off-diagonal blocks G_jk couple the column blocks and have no such fold
    (a joint S or V step on them is a (b_in r)-sized system per block row); ``sweeps`` rounds of exact
    block-coordinate descent on the full objective follow instead, each never worse (:func:`_blast_sweep`).
    ``result.history`` holds the whitened relative error of each step, then the full damped output error after
    each sweep; ``relative_error`` and ``output_relative_error`` are the weight's and the undamped calibration
    output's, computed exactly at the end.
    """
    bo, bi = num_blocks
    out, inn = weight.shape
    shapes.check_block_count(bi, inn, "in_features")
    check_gram(gram, inn)
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    t0 = time.perf_counter()
    dt = _compute_dtype(weight, options.get("compute_dtype"))
    w = weight.to(dt)
    g = gram.to(device=w.device, dtype=dt)
    L = _input_block_whitening(g, bi, damping, dt)  # [j, q, q]
    white = torch.einsum("ojq,jqk->ojk", w.view(out, bi, inn // bi), L).reshape(out, inn)
    U, S, Vw, result = blast_factorize(white, num_blocks, rank, **options)  # compute_dtype None: automatic
    U, S, Vw = U.to(dt), S.to(dt), Vw.to(dt)
    V = _solve_lower_t(L, Vw)
    if sweeps:
        Gd = damped_gram(g, damping, dt)
        WG = w @ Gd
        norm2 = (WG * w).sum()
        approx = functional.blast_to_dense(U, S, V)
        for _ in range(sweeps):
            U, S, V, approx = _blast_sweep(w, WG, Gd, L, U, S, V, approx)
            E = w - approx
            result.history.append(float(torch.sqrt(((E @ Gd) * E).sum().clamp_min(0) / norm2)) if norm2 > 0 else 0.0)
    approx = functional.blast_to_dense(U, S, V)
    result.relative_error = _relative_error(w, approx)
    result.output_relative_error = output_relative_error(w, approx, g)
    _sync(weight.device)
    result.seconds = time.perf_counter() - t0
    return U.to(weight.dtype), S.to(weight.dtype), V.to(weight.dtype), result


def _ridge(G: torch.Tensor) -> torch.Tensor:
    """A vanishing damping for the exact steps' r x r systems: defined even when a factor has a zero column."""
    return 1e3 * torch.finfo(G.dtype).eps * torch.diagonal(G, dim1=-2, dim2=-1).mean(-1) + torch.finfo(G.dtype).tiny


def _blast_sweep(W, WG, Gd, L, U, S, V, approx):
    """One round of exact block-coordinate descent on tr(E Gd E^T), E = W - W_hat (Gd the damped Gram):

    - every U_i at once: W_hat_i = U_i C_i with C_i = [diag(s_ij) V_j^T]_j, so U_i = W_i Gd C_i^T (C_i Gd C_i^T)^-1;
    - then each column block j in turn: with the other blocks fixed the objective is, up to a constant,
      tr((T_j - W_hat_:j) Gd_jj (T_j - W_hat_:j)^T) with T_j = W_:j + R_j Gd_jj^-1, R_j = sum_{k != j} E_:k Gd_kj.
      V_j: W_hat_:j = M_j V_j^T with M_j = [U_i diag(s_ij)]_i, and a free right factor absorbs the whitening:
      V_j^T = (M_j^T M_j)^-1 M_j^T T_j. Then s_:j, block row by block row:
      (U_i^T U_i * V_j^T Gd_jj V_j) s_ij = diag(U_i^T T_ij Gd_jj V_j).
    Each step minimizes the full objective over its factor exactly, so no step raises it."""
    bo, p, r = U.shape
    bi, q, _ = V.shape
    out, inn = W.shape
    # U step, all block rows at once.
    H = torch.einsum("jqr,jqn->jrn", V, Gd.view(bi, q, inn))  # V_j^T Gd[j rows, :]
    CG = torch.einsum("ijr,jrn->irn", S, H)  # C_i Gd (bo, r, in)
    CGC = torch.einsum("irjq,jqc,ijc->irc", CG.view(bo, r, bi, q), V, S)
    WGC = torch.einsum("ipjq,jqc,ijc->ipc", WG.view(bo, p, bi, q), V, S)
    U = _damped_right_solve(WGC, CGC, _ridge(CGC))
    approx = functional.blast_to_dense(U, S, V)
    for j in range(bi):
        cols = slice(j * q, (j + 1) * q)
        E = W - approx
        Gjj = Gd[cols, cols]
        R = E @ Gd[:, cols] - E[:, cols] @ Gjj
        T = W[:, cols] + torch.cholesky_solve(R.mT, L[j]).mT  # W_:j + R_j Gd_jj^-1
        M = (U * S[:, j, None, :]).reshape(out, r)  # rows of block i: U_i diag(s_ij)
        MtM = M.mT @ M
        V[j] = _damped_right_solve((T.mT @ M).unsqueeze(0), MtM.unsqueeze(0), _ridge(MtM).reshape(1)).squeeze(0)
        T4 = T.view(bo, p, q)
        VGV = V[j].mT @ Gjj @ V[j]  # (r, r)
        A = (U.mT @ U) * VGV  # (bo, r, r)
        rhs = torch.einsum("ipr,ipq,qr->ir", U, T4 @ Gjj, V[j])
        S[:, j] = _damped_right_solve(rhs.unsqueeze(-2), A, _ridge(A)).squeeze(-2)
        approx[:, cols] = torch.einsum("ipr,ir,qr->ipq", U, S[:, j], V[j]).reshape(out, q)
    return U, S, V, approx
