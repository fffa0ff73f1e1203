"""BLAST's V and S stages fused: the first intermediate z = x_j @ V[j] never reaches memory.

A program owns a tile of tokens x ranks and walks the input blocks j; each z_j tile goes straight from the tensor
cores into the running mix ``w[i] += S[i, j] * z_j`` for every output block i, held on chip as a
(B_OUT, BM, BR) accumulator. Recomputing z per output block would multiply the V stage's FLOPs by b_out; holding
all b_out accumulators instead bounds BM*BR, which is what the tile configs trade.

For few tokens the input blocks are split over SPLIT programs (grid axis 2) that each write a float32 partial of
w; the U stage sums the partials while loading them, so the small-N path needs no atomics and no zeroing launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def blast_vs_kernel(
    x_ptr, v_ptr, s_ptr, w_ptr,
    N, Q, R, B_IN, B_OUT_REAL, J_PER_SPLIT,
    s_xn, s_xk,
    s_vj, s_vq, s_vr,
    s_si, s_sj, s_sr,
    s_ws, s_wn, s_wi, s_wr,
    B_OUT: tl.constexpr,  # b_out rounded up to a power of two
    IEEE: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    ri = tl.arange(0, B_OUT)
    n_mask = rn < N
    r_mask = rr < R
    x_base = x_ptr + rn.to(tl.int64)[:, None] * s_xn
    acc = tl.zeros((B_OUT, BM, BR), dtype=tl.float32)
    j_start = pid_s * J_PER_SPLIT
    j_end = tl.minimum(j_start + J_PER_SPLIT, B_IN)
    for j in range(j_start, j_end):
        z = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, Q, BK):
            kk = k0 + rk
            k_mask = kk < Q
            xa = tl.load(x_base + (j * Q + kk)[None, :] * s_xk, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            vb = tl.load(
                v_ptr + j * s_vj + kk[:, None] * s_vq + rr[None, :] * s_vr,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            if IEEE:
                z = tl.dot(xa, vb, z, input_precision="ieee")
            else:
                z = tl.dot(xa, vb, z)
        s = tl.load(
            s_ptr + ri[:, None] * s_si + j * s_sj + rr[None, :] * s_sr,
            mask=(ri[:, None] < B_OUT_REAL) & r_mask[None, :],
            other=0.0,
        )
        acc += s.to(tl.float32)[:, None, :] * z[None, :, :]
    w = (
        w_ptr
        + pid_s * s_ws
        + rn.to(tl.int64)[None, :, None] * s_wn
        + ri[:, None, None] * s_wi
        + rr[None, None, :] * s_wr
    )
    mask = (ri[:, None, None] < B_OUT_REAL) & n_mask[None, :, None] & r_mask[None, None, :]
    tl.store(w, acc.to(w_ptr.dtype.element_ty), mask=mask)
