"""The grouped GEMM every BLR stage except BLAST's first reduces to.

``out[s, n, g, c] = sum_{k in split s} A[n, g, k] * B[g, c, k] (+ bias)`` for groups g, with every operand
addressed by strides so that no stage needs a transpose or permutation copy:

* BLAST U stage: A = the mixed intermediate w (optionally the sum of split partials), B = U; after an RMSNorm the
  V+S stage split, each row is scaled by 1/rms from the splits' partial sums of squares (``RMS_SPLIT``).
* Monarch stage 1: B rows are read in a permuted order, so the intermediate is written in the order stage 2 wants.
* Monarch stage 2: A is gathered in chunks from every stage-1 block; the output is stored interleaved (stride b),
  so the b groups of one output tile run side by side (``G_FAST``) and their 2-byte stores meet in L2 as whole
  sectors instead of being written back to memory half-filled.
* Low-rank: two calls with one group; at small N the first splits its long reduction (``K_PER`` < K) into float32
  partials that the second sums while loading A, so ~130 programs stream the weights instead of ~30.

Small N (decode) is weight-bandwidth bound: a second kernel's programs launch while the first is still running
(programmatic dependent launch on sm_90), fetch their first B tile, and only then wait for the A the first kernel
writes (``WAIT``), so the weight stream never stops at the kernel boundary.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _step(t, k_start, k_end, rk, A_CHUNK: tl.constexpr, BK: tl.constexpr):
    """Reduction step t: (A's chunk, A's k within it, B's k, mask). A chunked A walks each chunk in steps of BK
    (the last one masked), so every load is a contiguous run whatever the chunk length."""
    if A_CHUNK > 0:
        steps_per_chunk = tl.cdiv(A_CHUNK, BK)
        chunk = t // steps_per_chunk
        u = (t % steps_per_chunk) * BK + rk
        return chunk, u, chunk * A_CHUNK + u, u < A_CHUNK
    kk = k_start + t * BK + rk
    return 0, kk, kk, kk < k_end


@triton.jit
def _load_a(a_base, chunk, u, k_mask, n_mask, s_ak, s_ac, s_as, A_SPLIT: tl.constexpr):
    a_koff = chunk * s_ac + u * s_ak
    a_mask = n_mask[:, None] & k_mask[None, :]
    a = tl.load(a_base + a_koff[None, :], mask=a_mask, other=0.0)
    if A_SPLIT > 1:
        a = a.to(tl.float32)
        for s in tl.static_range(1, A_SPLIT):
            a += tl.load(a_base + s * s_as + a_koff[None, :], mask=a_mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _inv_rms(sq_ptr, rn, n_mask, N, NORM_D, RMS_SPLIT: tl.constexpr, EPS: tl.constexpr):
    """1/rms of rows rn from RMS_SPLIT partial sums of squares (split, N); unrolled so the loads issue together."""
    sum_sq = tl.zeros(rn.shape, dtype=tl.float32)
    for s in tl.static_range(RMS_SPLIT):
        sum_sq += tl.load(sq_ptr + s * N + rn, mask=n_mask, other=0.0)
    return tl.rsqrt(sum_sq / NORM_D + EPS)


@triton.jit
def gemv(a, b):
    """One token row: a (1, BK) times b (BK, BN) as multiply-and-reduce on the CUDA cores, in float32. A 16-row MMA
    tile would spend 15/16 of its registers and shared memory on masked rows; here every register holds weights."""
    return tl.sum(tl.trans(a).to(tl.float32) * b.to(tl.float32), axis=0)[None, :]


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr, GEMV: tl.constexpr):
    if GEMV:
        return acc + gemv(a, b)
    if IEEE:
        return tl.dot(a.to(b.dtype), b, acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def grouped_gemm_kernel(
    # operands
    a_ptr, b_ptr, out_ptr, bias_ptr,
    sq_ptr,  # RMS_SPLIT: the V+S stage's partial sums of squares of its input rows (RMS_SPLIT, N), float32
    # sizes: rows, reduction, columns per group; reduction length per split (programs on grid axis 2 are
    # group * n_splits + split); RMS_SPLIT: the normed row's length
    N, K, C, K_PER, NORM_D,
    # strides: A (row, group, k, chunk, split partial), B (group, column, k), out (split, row, group, column), bias
    # (row, group, column): row stride 0 for a bias vector, the residual's own for a residual added in the epilogue
    s_an, s_ag, s_ak, s_ac, s_as,
    s_bg, s_bc, s_bk,
    s_os, s_on, s_og, s_oc,
    s_biasn, s_biasg, s_biasc,
    A_CHUNK: tl.constexpr,  # >0: A's k lives at chunk k // A_CHUNK (stride s_ac), offset k % A_CHUNK (no k-split)
    A_SPLIT: tl.constexpr,  # A is the sum of this many partials, s_as apart (summed in fp32 while loading)
    PERM_M: tl.constexpr,  # >0: output column c reads B row (c % PERM_M) * PERM_B + c // PERM_M
    PERM_B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS_SPLIT: tl.constexpr,  # >0: rows are scaled by 1/sqrt(sum of RMS_SPLIT partials / NORM_D + EPS), before bias
    EPS: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dot instead of tf32
    WAIT: tl.constexpr,  # dependent launch: fetch the first B tile, then wait for the kernel that writes A
    LAUNCH_DEPS: tl.constexpr,  # let the next kernel's programs launch now (they wait for this one's writes)
    G_FAST: tl.constexpr,  # groups on grid axis 0, rows on axis 2: programs that run together cover all groups
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    if LAUNCH_DEPS:
        gdc_launch_dependents()
    if G_FAST:
        pid_gs = tl.program_id(0)
        pid_n = tl.program_id(2)
    else:
        pid_gs = tl.program_id(2)
        pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_splits = tl.cdiv(K, K_PER)
    g = (pid_gs // n_splits).to(tl.int64)
    split = pid_gs % n_splits
    k_start = split * K_PER
    k_end = tl.minimum(k_start + K_PER, K)
    rn = pid_n * BM + tl.arange(0, BM)
    rc = pid_c * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_mask = rn < N
    c_mask = rc < C
    if PERM_M > 0:
        brow = (rc % PERM_M) * PERM_B + rc // PERM_M
    else:
        brow = rc
    a_base = a_ptr + g * s_ag + rn.to(tl.int64)[:, None] * s_an
    b_base = b_ptr + g * s_bg + brow.to(tl.int64)[None, :] * s_bc
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if A_CHUNK > 0:
        n_steps = (K // A_CHUNK) * tl.cdiv(A_CHUNK, BK)
    else:
        n_steps = tl.cdiv(k_end - k_start, BK)
    t_loop = 0
    if WAIT:
        # Peeled first step: the weight tile is independent of the previous kernel, so it is in flight while
        # this program waits; with BK >= K it is the program's whole share of the weights.
        chunk, u, kk, k_mask = _step(0, k_start, k_end, rk, A_CHUNK, BK)
        b = tl.load(b_base + kk[:, None] * s_bk, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        gdc_wait()
        if RMS_SPLIT > 0:  # written by the kernel waited for; its loads overlap the weight stream
            inv_rms = _inv_rms(sq_ptr, rn, n_mask, N, NORM_D, RMS_SPLIT, EPS)
        a = _load_a(a_base, chunk, u, k_mask, n_mask, s_ak, s_ac, s_as, A_SPLIT)
        acc = _mma(a, b, acc, IEEE, BM == 1)
        t_loop = 1
    elif RMS_SPLIT > 0:
        inv_rms = _inv_rms(sq_ptr, rn, n_mask, N, NORM_D, RMS_SPLIT, EPS)
    for t in range(t_loop, n_steps):
        chunk, u, kk, k_mask = _step(t, k_start, k_end, rk, A_CHUNK, BK)
        a = _load_a(a_base, chunk, u, k_mask, n_mask, s_ak, s_ac, s_as, A_SPLIT)
        b = tl.load(b_base + kk[:, None] * s_bk, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, IEEE, BM == 1)
    if RMS_SPLIT > 0:
        acc *= inv_rms[:, None]
    if HAS_BIAS:
        if split == 0:
            bias = tl.load(
                bias_ptr + rn.to(tl.int64)[:, None] * s_biasn + g * s_biasg + rc[None, :] * s_biasc,
                mask=n_mask[:, None] & c_mask[None, :],
                other=0.0,
            )
            acc += bias.to(tl.float32)
    out = out_ptr + split * s_os + g * s_og + rn.to(tl.int64)[:, None] * s_on + rc[None, :] * s_oc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])
