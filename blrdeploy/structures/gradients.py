"""The backward of each structure's op as batched GEMMs: what healing (``blrdeploy heal``) spends most of a step on.

The generic backward (``ops._register_autograd``) re-runs the reference forward and lets autograd differentiate
its einsums: a whole forward more than needed, plus the permuted copies of autograd's einsum backward (CPU
measurements in bench/NOTES.md, 2026-12-08; ``bench/heal_step.py`` times both per layer shape). Here each gradient
is one ``torch.bmm``/``mm`` (cuBLAS on a GPU, the CPU's BLAS elsewhere) over the op's saved inputs, and only the
intermediates the weight gradients need are recomputed (BLAST's V and S stages, low-rank's x V, Monarch's first
stage), never the output. Nothing extra is kept between forward and backward, so the activation memory heal plans
for is unchanged.

Each function takes the op's inputs, the output's gradient and which inputs need one, and returns the gradients in
the inputs' order (None where not needed). Layouts are those of :mod:`blrdeploy.structures.functional`; stacked
siblings (a leading L on the factors) are left to the generic backward, since heal trains layers unstacked.
"""

from __future__ import annotations

import torch

Grad = torch.Tensor | None


def _bias_grad(g2: torch.Tensor, wanted: bool) -> Grad:
    return g2.sum(0) if wanted else None


def blast(
    x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None,
    grad: torch.Tensor, needs: tuple[bool, ...],
) -> tuple[Grad, ...]:  # fmt: skip
    """U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r). With z_j = x_j V_j and w_i = sum_j S_ij * z_j:
    dU_i = g_i^T w_i, dw_i = g_i U_i, dS_ij = sum_n dw_i * z_j, dz_j = sum_i S_ij * dw_i, dV_j = x_j^T dz_j,
    dx_j = dz_j V_j^T."""
    b_out, p, r = U.shape
    b_in, q, _ = V.shape
    x2 = x.reshape(-1, b_in * q)
    g2 = grad.reshape(-1, b_out * p)
    n = x2.shape[0]
    xb = x2.view(n, b_in, q).transpose(0, 1)  # (b_in, n, q), a view
    gb = g2.view(n, b_out, p).transpose(0, 1)  # (b_out, n, p)
    need_x, need_U, need_S, need_V, need_bias = needs
    # The S stage is a GEMM batched over the rank on operands permuted to (r, ., .); bmm copies the ones whose
    # last two dims have no unit stride (z, dw: n x b x r each), which is memory-bound and small beside the GEMMs.
    z = torch.bmm(xb, V) if need_U or need_S else None  # (b_in, n, r)
    dU = None
    if need_U:
        # (r, n, b_in) @ (r, b_in, b_out) -> w as (b_out, n, r)
        w = torch.bmm(z.permute(2, 1, 0), S.permute(2, 1, 0)).permute(2, 1, 0)
        dU = torch.bmm(gb.transpose(1, 2), w)  # (b_out, p, r)
        del w
    dS = dx = dV = None
    if need_S or need_x or need_V:
        dw = torch.bmm(gb, U)  # (b_out, n, r)
        if need_S:
            # (r, b_out, n) @ (r, n, b_in) -> (b_out, b_in, r)
            dS = torch.bmm(dw.permute(2, 0, 1), z.permute(2, 1, 0)).permute(1, 2, 0)
        if need_x or need_V:
            # (r, n, b_out) @ (r, b_out, b_in) -> dz as (b_in, n, r)
            dz = torch.bmm(dw.permute(2, 1, 0), S.permute(2, 0, 1)).permute(2, 1, 0)
            if need_V:
                dV = torch.bmm(xb.transpose(1, 2), dz)  # (b_in, q, r)
            if need_x:
                dx = torch.bmm(dz, V.transpose(1, 2)).transpose(0, 1).reshape(x.shape)  # (b_in, n, q) -> x's shape
    return dx, dU, dS, dV, _bias_grad(g2, need_bias)


def lowrank(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor,
    needs: tuple[bool, ...],
) -> tuple[Grad, ...]:  # fmt: skip
    """U (out, r), V (in, r), y = (x V) U^T: dU = g^T (x V), dz = g U, dV = x^T dz, dx = dz V^T."""
    x2 = x.reshape(-1, V.shape[0])
    g2 = grad.reshape(-1, U.shape[0])
    need_x, need_U, need_V, need_bias = needs
    dU = g2.T @ (x2 @ V) if need_U else None
    dx = dV = None
    if need_x or need_V:
        dz = g2 @ U
        dV = x2.T @ dz if need_V else None
        dx = (dz @ V.T).reshape(x.shape) if need_x else None
    return dx, dU, dV, _bias_grad(g2, need_bias)


def monarch(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor,
    needs: tuple[bool, ...],
) -> tuple[Grad, ...]:  # fmt: skip
    """w1 (b, R, in/b), w2 (b, out/b, R): h_k = x_k w1_k^T, the permutation P (h's flat index f to block f % b,
    row f // b), o_l = (P h)_l w2_l^T, output row s*b + l from block l. Backward: go_l from the interleaved rows,
    dw2_l = go_l^T (P h)_l, d(P h)_l = go_l w2_l, dh = P^T d(P h), dw1_k = dh_k^T x_k, dx_k = dh_k w1_k."""
    b, R, in_blk = w1.shape
    out_blk = w2.shape[1]
    x2 = x.reshape(-1, b * in_blk)
    g2 = grad.reshape(-1, b * out_blk)
    n = x2.shape[0]
    need_x, need_w1, need_w2, need_bias = needs
    xb = x2.view(n, b, in_blk).transpose(0, 1)  # (b, n, in_blk)
    go = g2.view(n, out_blk, b).permute(2, 0, 1)  # (b, n, out_blk): go[l, n, s] = g[n, s*b + l]
    dw2 = None
    if need_w2:
        h = torch.bmm(xb, w1.transpose(1, 2))  # (b, n, R), h[k, n, t] is flat index k*R + t
        ph = h.permute(1, 0, 2).reshape(n, R, b).permute(2, 0, 1)  # (b, n, R): ph[l, n, s] = flat[n, s*b + l]
        dw2 = torch.bmm(go.transpose(1, 2), ph)  # (b, out_blk, R)
        del h, ph
    dx = dw1 = None
    if need_x or need_w1:
        dph = torch.bmm(go, w2)  # (b, n, R)
        dh = dph.permute(1, 2, 0).reshape(n, b, R).transpose(0, 1)  # P^T: back to (b, n, R) in h's layout
        dw1 = torch.bmm(dh.transpose(1, 2), xb) if need_w1 else None  # (b, R, in_blk)
        dx = torch.bmm(dh, w1).transpose(0, 1).reshape(x.shape) if need_x else None  # (b, n, in_blk) -> x's shape
    return dx, dw1, dw2, _bias_grad(g2, need_bias)
