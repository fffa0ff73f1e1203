"""Monarch's output interleave for many tokens: ``y[n, s*b + l] = o[n, l, s]``.

Stage 2 computes block l's outputs s = 0..out/b-1, which land b elements apart in y. Stored directly, every 2-byte
element is its own L2 sector write and half-filled sectors reach memory (on an H100, Llama-7B q/k/v/o at 4096
tokens: stage 2 took ~350 µs of a layer whose two GEMMs do the work of ~90 µs). For many tokens stage 2 therefore
writes o block-major with whole-line stores and this kernel interleaves it in one pass at copy speed; few tokens
keep the direct store, where the extra launch would cost more than the scattered writes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def interleave_kernel(
    o_ptr, y_ptr,
    N, B, S,
    s_on, s_ol, s_os,
    s_yn,
    B_P2: tl.constexpr,  # b rounded up to a power of two
    BM: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BM + tl.arange(0, BM)
    rs = tl.program_id(1) * BS + tl.arange(0, BS)
    rl = tl.arange(0, B_P2)
    rn64 = rn.to(tl.int64)
    n_mask = rn < N
    s_mask = rs < S
    l_mask = rl < B
    tile = tl.load(
        o_ptr + rn64[:, None, None] * s_on + rl[None, :, None] * s_ol + rs[None, None, :] * s_os,
        mask=n_mask[:, None, None] & l_mask[None, :, None] & s_mask[None, None, :],
    )
    # Loaded along s (o's rows), stored along l: the pointers are built in (n, s, l) order so the store runs
    # contiguously through y's row and the compiler moves the tile between the two layouts on chip.
    tl.store(
        y_ptr + rn64[:, None, None] * s_yn + rs[None, :, None] * B + rl[None, None, :],
        tl.permute(tile, (0, 2, 1)),
        mask=n_mask[:, None, None] & s_mask[None, :, None] & l_mask[None, None, :],
    )


def interleave_tile(b_pow2: int) -> tuple[int, int]:
    """(BM, BS): a (BM, b, BS) tile of 16K elements."""
    return 16, max(16, 1024 // b_pow2)
