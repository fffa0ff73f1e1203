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

Sibling layers (L layers of one shape reading the same input, see ``blrdeploy.siblings``) run as one launch: grid
axis 1 walks (layer, rank tile) pairs, each layer's V and S found ``s_vl`` / ``s_sl`` apart, and layer l's mix lands
in output blocks l*b_out ... so the U stage sees one grouped GEMM of L*b_out groups.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .gemm import gemv


@triton.jit
def _vs_weights(v_ptr, s_ptr, j, kk, rr, ri, r_mask, i_mask, Q, s_vj, s_vq, s_vr, s_si, s_sj, s_sr):
    """Input block j's V tile at reduction rows kk, and its column of S for every output block."""
    vb = tl.load(
        v_ptr + j * s_vj + kk[:, None] * s_vq + rr[None, :] * s_vr,
        mask=(kk < Q)[:, None] & r_mask[None, :],
        other=0.0,
    )
    s = tl.load(s_ptr + ri[:, None] * s_si + j * s_sj + rr[None, :] * s_sr, mask=i_mask[:, None] & r_mask[None, :], other=0.0)
    return vb, s


@triton.jit
def _vs_mix(acc, xa, vb, s, IEEE: tl.constexpr, BM: tl.constexpr):
    """acc[i] += S[i, j] * (x_j @ V[j]) for one reduction step of input block j."""
    if BM == 1:  # one token row
        z = gemv(xa, vb)
    elif IEEE:
        z = tl.dot(xa, vb, input_precision="ieee")
    else:
        z = tl.dot(xa, vb)
    return acc + s.to(tl.float32)[:, None, :] * z[None, :, :]


@triton.jit
def blast_vs_kernel(
    # operands: x (N, b_in*q), V (L, b_in, q, r), S (L, b_out, b_in, r), w (split, N, L*b_out, r); with REDUCE
    # red (N, L*b_out, r) float32 and one int32 arrival counter per (token tile, layer and rank tile)
    x_ptr, v_ptr, s_ptr, w_ptr, red_ptr, cnt_ptr,
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
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    if LAUNCH_DEPS:
        gdc_launch_dependents()
    _vs_tile(
        x_ptr, v_ptr, s_ptr, w_ptr, red_ptr, cnt_ptr,
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(1), tl.num_programs(2),
        N, Q, R, B_IN, B_OUT_REAL, J_PER_SPLIT,
        s_xn, s_xk, s_vl, s_vj, s_vq, s_vr, s_sl, s_si, s_sj, s_sr, s_ws, s_wn, s_wi, s_wr, s_rn, s_ri, s_rr,
        B_OUT, IEEE, False, REDUCE, BM, BR, BK,
    )  # fmt: skip


@triton.jit
def _vs_tile(
    x_ptr, v_ptr, s_ptr, w_ptr, red_ptr, cnt_ptr,
    pid_n, pid_lr, pid_s, n_lr, n_split,  # this program's (token tile, layer and rank tile, split) of how many
    N, Q, R, B_IN, B_OUT_REAL, J_PER_SPLIT,
    s_xn, s_xk, s_vl, s_vj, s_vq, s_vr, s_sl, s_si, s_sj, s_sr, s_ws, s_wn, s_wi, s_wr, s_rn, s_ri, s_rr,
    B_OUT: tl.constexpr, IEEE: tl.constexpr, WAIT: tl.constexpr, REDUCE: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    r_tiles = tl.cdiv(R, BR)
    layer = (pid_lr // r_tiles).to(tl.int64)
    pid_r = pid_lr % r_tiles
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
    j_start = pid_s * J_PER_SPLIT
    k_steps = tl.cdiv(Q, BK)
    n_steps = (tl.minimum(j_start + J_PER_SPLIT, B_IN) - j_start) * k_steps
    t_loop = 0
    if WAIT:
        # Peeled first step: V and S do not depend on the previous kernel, so they are in flight while this
        # program waits for x (with one input block per program, that is its whole share of the weights).
        vb, s = _vs_weights(v_ptr, s_ptr, j_start, rk, rr, ri, r_mask, i_mask, Q, s_vj, s_vq, s_vr, s_si, s_sj, s_sr)
        gdc_wait()
        xa = tl.load(x_base + (j_start * Q + rk)[None, :] * s_xk, mask=n_mask[:, None] & (rk < Q)[None, :], other=0.0)
        acc = _vs_mix(acc, xa, vb, s, IEEE, BM)
        t_loop = 1
    for t in range(t_loop, n_steps):
        j = j_start + t // k_steps
        kk = (t % k_steps) * BK + rk
        xa = tl.load(x_base + (j * Q + kk)[None, :] * s_xk, mask=n_mask[:, None] & (kk < Q)[None, :], other=0.0)
        vb, s = _vs_weights(v_ptr, s_ptr, j, kk, rr, ri, r_mask, i_mask, Q, s_vj, s_vq, s_vr, s_si, s_sj, s_sr)
        acc = _vs_mix(acc, xa, vb, s, IEEE, BM)
    w = w_ptr + pid_s * s_ws + rn.to(tl.int64)[None, :, None] * s_wn + ri[:, None, None] * s_wi + rr[None, None, :] * s_wr
    mask = i_mask[:, None, None] & n_mask[None, :, None] & r_mask[None, None, :]
    tl.store(w, acc.to(w_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        counter = cnt_ptr + pid_n * n_lr + pid_lr
        tl.debug_barrier()  # every thread's partial is stored before the one arriving thread's release
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == n_split - 1:
            total = tl.zeros((B_OUT, BM, BR), dtype=tl.float32)
            w_tile = w - pid_s * s_ws
            for part in range(0, n_split):  # stored by other programs: read through L2, never a stale L1 line
                total += tl.load(w_tile + part * s_ws, mask=mask, other=0.0, cache_modifier=".cg")
            red = red_ptr + rn.to(tl.int64)[None, :, None] * s_rn + ri[:, None, None] * s_ri + rr[None, None, :] * s_rr
            tl.store(red, total, mask=mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero again for the next launch


@triton.jit
def blast_one_kernel(
    # operands: as blast_vs_kernel's, then U (L*b_out, p, r), y (1, L*b_out*p), bias (L*b_out*p,), and this
    # launch's set of int32 sync counters: tickets handed out, V+S programs done, U programs through, and at READY
    # the flag the last V+S program raises
    x_ptr, v_ptr, s_ptr, w_ptr, red_ptr, cnt_ptr, u_ptr, y_ptr, bias_ptr, sync_ptr,
    N, Q, R, B_IN, B_OUT_REAL, J_PER_SPLIT, P,
    # the V+S programs: (layer and rank tiles) x splits of them; the U programs: groups x column tiles
    N_LR, N_SPLIT, N_U,
    s_xn, s_xk,
    s_vl, s_vj, s_vq, s_vr,
    s_sl, s_si, s_sj, s_sr,
    s_ws, s_wn, s_wi, s_wr,
    s_rn, s_ri, s_rr,
    s_ug, s_up, s_ur,
    B_OUT: tl.constexpr,
    WAIT: tl.constexpr,  # dependent launch: fetch weights, then wait for the kernel that writes x
    REDUCE: tl.constexpr,
    A_SPLIT: tl.constexpr,  # without REDUCE, the U stage sums this many partials of w while loading
    HAS_BIAS: tl.constexpr,
    READY: tl.constexpr,  # the ready flag's offset in the sync set: a cache line of its own
    BACKOFF_NS: tl.constexpr,  # pause between polls of the ready flag (0: none, and the interpreter's only choice)
    BR: tl.constexpr, BK: tl.constexpr,  # the V+S tile (one token: BM = 1)
    UBN: tl.constexpr, UBK: tl.constexpr,  # the U tile
):  # fmt: skip
    """One token through a BLAST layer (or stacked siblings) in one launch: the first N_VS programs to start run the
    V+S tiles, the rest run U tiles, each fetching its U weights before it waits for the V+S programs' count.

    Programs take their role from a ticket (an atomic count), not their program id: a program holding a U ticket
    only spins once every V+S ticket is held by a program already running, so the wait cannot starve them
    whatever order the hardware dispatches programs in. The last U program through resets the counters; a launch
    lets the next kernel start only after its own wait (the previous kernel done), so no more than two of these
    launches are ever in flight, and the launcher alternates between two counter sets."""
    n_vs = N_LR * N_SPLIT
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if ticket < n_vs:
        _vs_tile(
            x_ptr, v_ptr, s_ptr, w_ptr, red_ptr, cnt_ptr,
            0, ticket // N_SPLIT, ticket % N_SPLIT, N_LR, N_SPLIT,
            N, Q, R, B_IN, B_OUT_REAL, J_PER_SPLIT,
            s_xn, s_xk, s_vl, s_vj, s_vq, s_vr, s_sl, s_si, s_sj, s_sr, s_ws, s_wn, s_wi, s_wr, s_rn, s_ri, s_rr,
            B_OUT, False, WAIT, REDUCE, 1, BR, BK,
        )  # fmt: skip
        if WAIT:
            gdc_launch_dependents()  # after _vs_tile's wait: the kernel before this one is done
        tl.debug_barrier()  # every thread's stores precede the one thread's release
        if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_vs - 1:
            tl.atomic_xchg(sync_ptr + READY, 1, sem="release", scope="gpu")
    else:
        u_tile = ticket - n_vs
        c_tiles = tl.cdiv(P, UBN)
        g = (u_tile // c_tiles).to(tl.int64)
        rc = (u_tile % c_tiles) * UBN + tl.arange(0, UBN)
        rk = tl.arange(0, UBK)
        c_mask = rc < P
        b_base = u_ptr + g * s_ug + rc[None, :] * s_up
        if REDUCE:
            a_base = red_ptr + g * s_ri
            s_ak = s_rr
        else:
            a_base = w_ptr + g * s_wi
            s_ak = s_wr
        # the first step's U tile (with UBK >= r the program's whole share) is fetched before anything is waited on
        b = tl.load(b_base + rk[:, None] * s_ur, mask=(rk < R)[:, None] & c_mask[None, :], other=0.0)
        if WAIT:
            gdc_wait()
            gdc_launch_dependents()
        # Poll the ready flag (its own cache line, written once) with plain loads and a pause between them: atomics
        # on the done count from hundreds of waiting programs queued the V+S programs' own increments behind them.
        ready = tl.load(sync_ptr + READY, volatile=True)
        while ready == 0:
            if BACKOFF_NS > 0:
                ready = tl.inline_asm_elementwise(
                    f"nanosleep.u32 {BACKOFF_NS}; ld.volatile.global.u32 $0, [$1];", "=r,l", [sync_ptr + READY],
                    dtype=tl.int32, is_pure=False, pack=1,
                )
            else:
                ready = tl.load(sync_ptr + READY, volatile=True)
        tl.atomic_add(sync_ptr + READY, 0, sem="acquire", scope="gpu")  # the V+S programs' stores are visible
        through = tl.atomic_add(sync_ptr + 2, 1, sem="relaxed", scope="gpu")
        if through == N_U - 1:  # every ticket is taken and every program is past the wait: reset for next time
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 2, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + READY, 0, sem="relaxed", scope="gpu")
        acc = tl.zeros((1, UBN), dtype=tl.float32)
        for t in range(0, tl.cdiv(R, UBK)):
            kk = t * UBK + rk
            k_mask = kk < R
            if t > 0:
                b = tl.load(b_base + kk[:, None] * s_ur, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
            # written by other programs of this launch: read through L2, never a stale L1 line
            a = tl.load(a_base + kk[None, :] * s_ak, mask=k_mask[None, :], other=0.0, cache_modifier=".cg")
            a = a.to(tl.float32)
            for part in tl.static_range(1, A_SPLIT):
                a += tl.load(a_base + part * s_ws + kk[None, :] * s_ak, mask=k_mask[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
            acc += gemv(a, b)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + g * P + rc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + g * P + rc[None, :], acc.to(y_ptr.dtype.element_ty), mask=c_mask[None, :])


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
):  # fmt: skip
    """The S stage as a batched matrix product on the tensor cores: for each rank r, (tokens x b_in) @ S[:, :, r]^T."""
    rn = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    rj = tl.arange(0, BJ)
    ri = tl.arange(0, BI)
    n_mask = (rn < N)[None, :, None]
    r_mask = (rr < R)[:, None, None]
    rn64 = rn.to(tl.int64)[None, :, None]
    z = tl.load(
        z_ptr + rr[:, None, None] * s_zr + rn64 * s_zn + rj[None, None, :] * s_zj,
        mask=r_mask & n_mask & (rj < B_IN)[None, None, :],
        other=0.0,
    )
    st = tl.load(
        s_ptr + rr[:, None, None] * s_sr + rj[None, :, None] * s_sj + ri[None, None, :] * s_si,
        mask=r_mask & (rj < B_IN)[None, :, None] & (ri < B_OUT)[None, None, :],
        other=0.0,
    )
    w = tl.dot(z, st)
    tl.store(
        w_ptr + rr[:, None, None] * s_wr + rn64 * s_wn + ri[None, None, :] * s_wi,
        w.to(w_ptr.dtype.element_ty),
        mask=r_mask & n_mask & (ri < B_OUT)[None, None, :],
    )
