"""BLAST's V and S stages fused: the first intermediate z = x_j @ V[j] never reaches memory.

A program owns a tile of tokens x ranks and walks the input blocks j; each z_j tile goes straight from the tensor
cores (for one token, the CUDA cores' multiply-and-reduce) into the running mix ``w[i] += S[i, j] * z_j`` for every
output block i, held on chip as a (B_OUT, BM, BR) accumulator. Recomputing z per output block would multiply the V
stage's FLOPs by b_out; holding all b_out accumulators instead bounds BM*BR, which is what the tile configs trade.

The (block, reduction step) pairs form one flat loop, so the software pipeline keeps weight loads in flight across
block boundaries; the mix is applied per step, which is the same sum (it is linear) and costs nothing extra when a
block's q rows fit one step (BK >= q), the usual case.

For few tokens the input blocks are split over SPLIT programs (grid axis 2) that each write a float32 partial of
w. With ``REDUCE`` the last of a tile's SPLIT programs to finish (an arrival counter per tile, left at zero for the
next launch) sums the tile's partials into one float32 w; otherwise the U stage sums them while loading. Summing
once matters: every U program re-reads its rows of w, and at one token SPLIT partials of them were more L2 traffic
than the U weights themselves.

Sibling layers (L layers of one shape reading the same input, see ``conversion.siblings``) run as one launch: grid
axis 1 walks (layer, rank tile) pairs, each layer's V and S found ``s_vl`` / ``s_sl`` apart, and layer l's mix lands
in output blocks l*b_out ... so the U stage sees one grouped GEMM of L*b_out groups.

Two prologues take a pre-norm transformer block's small kernels into the weight stream (one launch each saved at
one token, where a launch costs more than its bytes):

* ``SWIGLU``: the layer is a gated MLP's down projection and x holds the stacked gate and up outputs side by side,
  (N, 2*b_in*q); each x tile is loaded as silu(gate) * up, computed in float32 and rounded once to x's dtype (as
  inductor's fused pointwise kernel does; a one-token row is not rounded at all).
* ``RMS_NORM``: the layer reads RMSNorm(x) = g * x / rms(x). Each x tile is loaded times g; since the V and S
  stages are linear, 1/rms(x) scales the accumulator once at the end. The mean square comes from the x tiles the
  program loads anyway: a program that walks every input block scales its own accumulator; split programs store
  their partial sums of squares beside their partial w, and the U stage, linear too, scales its rows by 1/rms of
  their sum (the grouped GEMM's ``RMS_SPLIT``). Finishing the norm in the program that sums the split partials
  instead forced that serial reduction on every norm layer: 5–10 µs more per launch on Llama-3.2-1B, whose tuned
  configs do not reduce (bench/NOTES.md). The norm weight is addressed like the x tile and the squares are summed
  elementwise, reduced once after the loop: a broadcast weight vector and a reduction in every step made this
  launch ~5.7 µs slower at one token on Llama-7B.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .gemm import gemv


@triton.jit
def blast_vs_kernel(
    # operands: x (N, b_in*q), V (L, b_in, q, r), S (L, b_out, b_in, r), w (split, N, L*b_out, r); with REDUCE
    # red (N, L*b_out, r) float32 and one int32 arrival counter per (token tile, layer and rank tile)
    x_ptr, v_ptr, s_ptr, w_ptr, red_ptr, cnt_ptr,
    g_ptr, sq_ptr,  # RMS_NORM: the norm's weight (b_in*q,); split programs' partial sums of squares (split, N) fp32
    # sizes; J_PER_SPLIT input blocks per program on grid axis 2
    N, Q, R, B_IN, B_OUT_REAL, J_PER_SPLIT,
    # strides
    s_xn, s_xk,
    s_vl, s_vj, s_vq, s_vr,
    s_sl, s_si, s_sj, s_sr,
    s_ws, s_wn, s_wi, s_wr,
    s_rn, s_ri, s_rr,
    B_OUT: tl.constexpr,  # b_out rounded up to a power of two
    IEEE: tl.constexpr,
    LAUNCH_DEPS: tl.constexpr,  # let the U stage's programs launch now (they wait for w)
    REDUCE: tl.constexpr,  # the last program of a tile sums the split partials into red
    SWIGLU: tl.constexpr,  # x is [gate | up], (N, 2*B_IN*Q): the input is silu(gate) * up
    RMS_NORM: tl.constexpr,  # the input is g * x / sqrt(mean(x^2) + EPS)
    EPS: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    if LAUNCH_DEPS:
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    r_tiles = tl.cdiv(R, BR)
    layer = (tl.program_id(1) // r_tiles).to(tl.int64)
    pid_r = tl.program_id(1) % r_tiles
    pid_s = tl.program_id(2)
    v_ptr += layer * s_vl
    s_ptr += layer * s_sl
    w_ptr += layer * B_OUT_REAL * s_wi
    red_ptr += layer * B_OUT_REAL * s_ri
    rn = pid_n * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    ri = tl.arange(0, B_OUT)
    n_mask = rn < N
    r_mask = rr < R
    i_mask = ri < B_OUT_REAL
    x_base = x_ptr + rn.to(tl.int64)[:, None] * s_xn
    acc = tl.zeros((B_OUT, BM, BR), dtype=tl.float32)
    sq_tile = tl.zeros((BM, BK), dtype=tl.float32)  # squares summed elementwise, reduced once after the loop
    j_start = pid_s * J_PER_SPLIT
    k_steps = tl.cdiv(Q, BK)
    n_steps = (tl.minimum(j_start + J_PER_SPLIT, B_IN) - j_start) * k_steps
    for t in range(0, n_steps):
        j = j_start + t // k_steps
        kk = (t % k_steps) * BK + rk
        k_mask = kk < Q
        x_mask = n_mask[:, None] & k_mask[None, :]
        xa = tl.load(x_base + (j * Q + kk)[None, :] * s_xk, mask=x_mask, other=0.0)
        if SWIGLU:
            up = tl.load(x_base + (B_IN * Q + j * Q + kk)[None, :] * s_xk, mask=x_mask, other=0.0)
            gate = xa.to(tl.float32)
            xa = gate * tl.sigmoid(gate) * up.to(tl.float32)
            if BM > 1:  # the tensor cores take x's dtype; one token row multiplies in float32 anyway
                xa = xa.to(x_ptr.dtype.element_ty)
        if RMS_NORM:  # g addressed as an x tile: the same register layout, so no shuffle through shared memory
            g = tl.load(g_ptr + rn[:, None] * 0 + (j * Q + kk)[None, :], mask=x_mask, other=0.0)
            xf = xa.to(tl.float32)
            sq_tile += xf * xf
            xa = xf * g.to(tl.float32)
            if BM > 1:  # rounded before 1/rms: a float16 row all below 6e-5 would lose bits (bfloat16 would not)
                xa = xa.to(x_ptr.dtype.element_ty)
        vb = tl.load(
            v_ptr + j * s_vj + kk[:, None] * s_vq + rr[None, :] * s_vr,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if BM == 1:  # one token row
            z = gemv(xa, vb)
        elif IEEE:
            z = tl.dot(xa, vb, input_precision="ieee")
        else:
            z = tl.dot(xa, vb)
        s = tl.load(
            s_ptr + ri[:, None] * s_si + j * s_sj + rr[None, :] * s_sr,
            mask=i_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc += s.to(tl.float32)[:, None, :] * z[None, :, :]
    if RMS_NORM:
        sum_sq = tl.sum(sq_tile, axis=1)
        if tl.num_programs(2) == 1:  # this program walked the whole row
            acc *= tl.rsqrt(sum_sq / (B_IN * Q) + EPS)[None, :, None]
        else:  # the U stage scales by 1/rms of the splits' sum; every rank tile stores the same values (x is shared)
            tl.store(sq_ptr + pid_s * N + rn, sum_sq, mask=n_mask)
    w = (
        w_ptr
        + pid_s * s_ws
        + rn.to(tl.int64)[None, :, None] * s_wn
        + ri[:, None, None] * s_wi
        + rr[None, None, :] * s_wr
    )
    mask = i_mask[:, None, None] & n_mask[None, :, None] & r_mask[None, None, :]
    tl.store(w, acc.to(w_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        n_split = tl.num_programs(2)
        counter = cnt_ptr + pid_n * tl.num_programs(1) + tl.program_id(1)
        tl.debug_barrier()  # every thread's partial is stored before the one arriving thread's release
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == n_split - 1:
            total = tl.zeros((B_OUT, BM, BR), dtype=tl.float32)
            w_tile = w - pid_s * s_ws
            for s in range(0, n_split):  # stored by other programs: read through L2, never a stale L1 line
                total += tl.load(w_tile + s * s_ws, mask=mask, other=0.0, cache_modifier=".cg")
            red = red_ptr + rn.to(tl.int64)[None, :, None] * s_rn + ri[:, None, None] * s_ri + rr[None, None, :] * s_rr
            tl.store(red, total, mask=mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero again for the next launch


def mix_tile(b_out_pow2: int) -> tuple[int, int]:
    """(BM, BR) of the mix kernel: b_out accumulators of BM x BR float32, 16K in all (128 registers a thread)."""
    return 16, max(16, min(128, 1024 // b_out_pow2))


@triton.jit
def blast_mix_kernel(
    # operands: z (N, b_in, r) from the V-stage GEMM, S (b_out, b_in, r), w (N, b_out, r)
    z_ptr, s_ptr, w_ptr,
    N, R, B_IN, B_OUT_REAL,
    s_zn, s_zj, s_zr,
    s_si, s_sj, s_sr,
    s_wn, s_wi, s_wr,
    B_OUT: tl.constexpr,  # b_out rounded up to a power of two
    BM: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """The S stage alone, for many tokens: ``w[n, i, r] = sum_j S[i, j, r] * z[n, j, r]``, one pass over z and w.
    The fused V+S kernel's b_out accumulators shrink its tensor-core tiles until x and V are re-read from L2 more
    often than this pass costs (measured on an H200, Llama-7B q/k/v/o at 4096 tokens: 538 µs for fused V+S
    against 190 µs for the whole dense layer)."""
    rn = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    ri = tl.arange(0, B_OUT)
    n_mask = rn < N
    r_mask = rr < R
    i_mask = ri < B_OUT_REAL
    z_base = z_ptr + rn.to(tl.int64)[:, None] * s_zn + rr[None, :] * s_zr
    acc = tl.zeros((B_OUT, BM, BR), dtype=tl.float32)
    for j in range(0, B_IN):
        z = tl.load(z_base + j * s_zj, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        s = tl.load(
            s_ptr + ri[:, None] * s_si + j * s_sj + rr[None, :] * s_sr,
            mask=i_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc += s.to(tl.float32)[:, None, :] * z.to(tl.float32)[None, :, :]
    w = w_ptr + rn.to(tl.int64)[None, :, None] * s_wn + ri[:, None, None] * s_wi + rr[None, None, :] * s_wr
    tl.store(
        w, acc.to(w_ptr.dtype.element_ty), mask=i_mask[:, None, None] & n_mask[None, :, None] & r_mask[None, None, :]
    )


@triton.jit
def blast_mix_dot_kernel(
    z_ptr, s_ptr, w_ptr,
    N, R, B_IN, B_OUT,
    s_zn, s_zj, s_zr,
    s_si, s_sj, s_sr,
    s_wn, s_wi, s_wr,
    BJ: tl.constexpr, BI: tl.constexpr,  # b_in, b_out rounded up to powers of two >= 16 (the MMA's minimum)
    BM: tl.constexpr, BR: tl.constexpr,
    STAGES: tl.constexpr,  # z tiles in flight per program
):  # fmt: skip
    """The S stage as a batched matrix product on the tensor cores: for each rank r, (tokens x b_in) @ S[:, :, r]^T.

    A program owns a rank tile and walks token tiles (grid axis 0 strides them), loading its S tile once: with 16-23
    tiles an SM (DiT-XL/2's layers) 4 programs an SM walking them ran 1.1-1.15x faster than a program a tile, and the
    64 x 32 tile 1.15-1.35x faster than the 32 x 32 one before (H100, bench/NOTES.md). It still moves its bytes at
    1.5-1.8 TB/s, two thirds of a copy's speed."""
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    rj = tl.arange(0, BJ)
    ri = tl.arange(0, BI)
    r_mask = (rr < R)[:, None, None]
    st = tl.load(
        s_ptr + rr[:, None, None] * s_sr + rj[None, :, None] * s_sj + ri[None, None, :] * s_si,
        mask=r_mask & (rj < B_IN)[None, :, None] & (ri < B_OUT)[None, None, :],
        other=0.0,
    )
    for t in tl.range(tl.program_id(0), tl.cdiv(N, BM), tl.num_programs(0), num_stages=STAGES):
        rn = t * BM + tl.arange(0, BM)
        n_mask = (rn < N)[None, :, None]
        rn64 = rn.to(tl.int64)[None, :, None]
        z = tl.load(
            z_ptr + rr[:, None, None] * s_zr + rn64 * s_zn + rj[None, None, :] * s_zj,
            mask=r_mask & n_mask & (rj < B_IN)[None, None, :],
            other=0.0,
        )
        w = tl.dot(z, st)
        tl.store(
            w_ptr + rr[:, None, None] * s_wr + rn64 * s_wn + ri[None, None, :] * s_wi,
            w.to(w_ptr.dtype.element_ty),
            mask=r_mask & n_mask & (ri < B_OUT)[None, None, :],
        )


@triton.jit
def input_prologue_kernel(
    x_ptr, g_ptr, out_ptr,
    W, s_xn, s_xk, s_on,
    SWIGLU: tl.constexpr,  # x is [gate | up], (N, 2*W): out = silu(gate) * up
    RMS_NORM: tl.constexpr,  # out = g * RMSNorm(x), rounded as Llama's norm (BLOCK covers the row)
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The many-token path's input prologue, one pass over x (the V GEMM's tiles take none): what the fused V+S stage
    applies while loading at few tokens, and what one inductor kernel did before the layer took it over."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < W
    x = tl.load(x_ptr + row * s_xn + cols * s_xk, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.load(x_ptr + row * s_xn + (W + cols) * s_xk, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.sigmoid(x) * up
    else:
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / W + EPS)).to(out_ptr.dtype.element_ty)
        y = normed.to(tl.float32) * tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_on + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
