"""Each structure's forward, its PyTorch reference and its dense form: the canonical definitions the kernels, the
ONNX functions and the fits all agree with (the ``*_reference`` functions below are the authority).

As ``torch.nn.Linear``: weight W (out, in), y = x @ W.T + bias, N tokens (every leading dim flattened).

- **BLAST**, a b_out x b_in grid of blocks of p = out/b_out rows and q = in/b_in columns, rank r: U (b_out, p, r),
  S (b_out, b_in, r), V (b_in, q, r); block (i, j) of W is U[i] diag(S[i, j]) V[j]^T. Forward in three stages:
  z_j = x_j V[j] (V), w_i = sum_j S[i, j] * z_j (S), y_i = w_i U[i]^T (U). r (out + in + b_out b_in) parameters.
- **Monarch** (Dao et al.'s form), b blocks of width R (R % b == 0): w1 (b, R, in/b) and w2 (b, out/b, R), both
  block-diagonal; h = per-block x_k w1[k]^T, then h's flat index f goes to block f % b, row f // b, then per-block
  o_l = h_l w2[l]^T; output row s*b + l comes from block l (interleaved). R (in + out) parameters; equivalently b x b
  blocks of rank R/b each.
- **Low-rank**: U (out, r), V (in, r), y = (x V) U^T.

Block sizes must divide the dimensions: anything else is an error naming valid choices, never silent padding.

A module's forward calls exactly one of ``blast_linear``, ``monarch_linear``, ``lowrank_linear``: during ONNX export
that is one opaque ``com.blrdeploy`` node, otherwise the structure's op ``torch.ops.blrdeploy.*`` (see
:mod:`blrdeploy.structures.ops`), which runs the Triton kernels on CUDA and the ``*_reference`` function elsewhere. The
references accept any leading dims and compute in the input's dtype.
"""

from __future__ import annotations

import torch


def _flatten(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dim, the layer expects {in_features}")
    return x.reshape(-1, in_features)


ONNX_DOMAIN = "com.blrdeploy"


def _onnx_node(op: str, x: torch.Tensor, factors: list[torch.Tensor], out_features: int, bias) -> torch.Tensor:
    """During ONNX export each layer becomes one opaque com.blrdeploy node (its function body is attached by
    blrdeploy.exporters); the bias stays a standard Add so the node is the pure structured product."""
    y = torch.onnx.ops.symbolic(
        f"{ONNX_DOMAIN}::{op}", [x, *factors], {}, dtype=x.dtype, shape=[*x.shape[:-1], out_features], version=1
    )
    return y if bias is None else y + bias


def _refuse_stacked(U: torch.Tensor, unstacked_dims: int) -> None:
    if U.dim() != unstacked_dims:
        raise ValueError("stacked sibling layers have no ONNX op: export the model before fuse_siblings")


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def blast_reference(
    x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r); x (..., b_in*q) -> (..., b_out*p). Stacked siblings
    (a leading L on each factor, bias (L*b_out*p,)) give (..., L*b_out*p), layer l's outputs in the l-th slice."""
    if U.dim() == 3:
        U, S, V = U[None], S[None], V[None]
    b_in, q, _ = V.shape[1:]
    xf = _flatten(x, b_in * q)
    z = torch.einsum("njq,ljqr->nljr", xf.view(-1, b_in, q), V)  # V stage
    w = torch.einsum("nljr,lijr->nlir", z, S)  # S stage: per-rank mixing across blocks
    y = torch.einsum("nlir,lipr->nlip", w, U)  # U stage
    return _finish(y.flatten(1), x, bias)  # flatten, not reshape(n, -1): n may be 0


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a gated MLP's stacked gate and up outputs, x (..., 2*h) = [gate | up] -> (..., h)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama's: normalized in float32, rounded to x's dtype, then scaled by the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def blast_fused_reference(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
    swiglu_input: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """A BLAST layer (factors as in :func:`blast_reference`) with what a pre-norm residual block puts around it:
    its input ``swiglu(x)`` (``swiglu_input``: x holds a gated MLP's gate and up outputs) or ``rms_norm(x,
    norm_weight, eps)``, and ``residual`` added to its output."""
    if swiglu_input and norm_weight is not None:
        raise ValueError("a BLAST layer takes SwiGLU or RMSNorm on its input, not both")
    if swiglu_input:
        if x.shape[-1] % 2:
            raise ValueError(f"a SwiGLU input holds gate and up side by side: an even width, got {x.shape[-1]}")
        x = swiglu(x)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    y = blast_reference(x, U, S, V, bias)
    return y if residual is None else y + residual


def blast_to_dense(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    b_out, p, _ = U.shape
    b_in, q, _ = V.shape
    return torch.einsum("ipr,ijr,jqr->ipjq", U, S, V).reshape(b_out * p, b_in * q)


def monarch_reference(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """w1 (b, R, in/b), w2 (b, out/b, R); output rows interleaved: y[s*b + l] comes from block l."""
    b, R, in_blk = w1.shape
    xf = _flatten(x, b * in_blk)
    n = xf.shape[0]
    h = torch.einsum("nkp,kqp->nkq", xf.view(n, b, in_blk), w1).reshape(n, b * R)
    h = h.view(n, R, b).transpose(1, 2)  # flat index f -> (f % b, f // b)
    o = torch.einsum("nlr,lsr->nls", h, w2)
    return _finish(o.transpose(1, 2).flatten(1), x, bias)


def monarch_to_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # Block (l, k) of the row-interleaved matrix is sum_t w2[l, :, k*m+t] (x) w1[k, t*b+l, :], m = R/b.
    b, R, in_blk = w1.shape
    out_blk = w2.shape[1]
    m = R // b
    left = w2.reshape(b, out_blk, b, m)  # [l, s, k, t]
    right = w1.reshape(b, m, b, in_blk)  # [k, t, l, p]
    blocks = torch.einsum("lskt,ktlp->slkp", left, right)
    return blocks.reshape(out_blk * b, b * in_blk)


def lowrank_reference(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """U (out, r), V (in, r): y = (x @ V) @ U.T. Stacked siblings (U (L, out, r), V (L, in, r), bias (L*out,)) give
    (..., L*out), layer l's outputs in the l-th slice."""
    if U.dim() == 2:
        U, V = U[None], V[None]
    xf = _flatten(x, V.shape[1])
    y = torch.einsum("nlr,lor->nlo", torch.einsum("ni,lir->nlr", xf, V), U)
    return _finish(y.flatten(1), x, bias)


def lowrank_to_dense(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return U @ V.T


def blast_linear(
    x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r); x (..., b_in*q) -> (..., b_out*p). Stacked siblings
    as in :func:`blast_reference`."""
    if torch.onnx.is_in_onnx_export():
        _refuse_stacked(U, 3)
        return _onnx_node("BlastLinear", x, [U, S, V], U.shape[0] * U.shape[1], bias)
    if ops.dispatch_free(x, U, S, V, bias) and x.is_cuda:  # eager: the op's CUDA implementation, straight
        return ops.blast_cuda(x, U, S, V, bias)
    return torch.ops.blrdeploy.blast_linear(x, U, S, V, bias)


def blast_linear_fused(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    swiglu_input: bool = False,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`blast_fused_reference` as one op (``blrdeploy::blast_linear_fused``): on the kernels the SwiGLU or
    RMSNorm is applied as the first stage loads its input and the residual added as the last stores its output.
    Only fused models call it (:mod:`blrdeploy.conversion.siblings`, :mod:`blrdeploy.conversion.blocks`), so it has
    no ONNX op."""
    if torch.onnx.is_in_onnx_export():
        raise ValueError("a fused BLAST layer has no ONNX op: export the model before fuse_siblings")
    if ops.dispatch_free(x, U, S, V, bias, norm_weight, residual) and x.is_cuda:
        return ops.blast_fused_cuda(x, U, S, V, bias, swiglu_input, norm_weight, eps, residual)
    return torch.ops.blrdeploy.blast_linear_fused(x, U, S, V, bias, swiglu_input, norm_weight, eps, residual)


def monarch_linear(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """w1 (b, R, in/b), w2 (b, out/b, R); output rows interleaved: y[s*b + l] comes from block l."""
    if torch.onnx.is_in_onnx_export():
        return _onnx_node("MonarchLinear", x, [w1, w2], w1.shape[0] * w2.shape[1], bias)
    if ops.dispatch_free(x, w1, w2, bias) and x.is_cuda:
        return ops.monarch_cuda(x, w1, w2, bias)
    return torch.ops.blrdeploy.monarch_linear(x, w1, w2, bias)


def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """U (out, r), V (in, r): y = (x @ V) @ U.T. Stacked siblings as in :func:`lowrank_reference`."""
    if torch.onnx.is_in_onnx_export():
        _refuse_stacked(U, 2)
        return _onnx_node("LowRankLinear", x, [U, V], U.shape[0], bias)
    if ops.dispatch_free(x, U, V, bias) and x.is_cuda:
        return ops.lowrank_cuda(x, U, V, bias)
    return torch.ops.blrdeploy.lowrank_linear(x, U, V, bias)


# The ops the functions above call are registered by ``ops``, which reads this module's references: imported last,
# so that whichever of the two is imported first, both are complete.
from blrdeploy.structures import ops  # noqa: E402, F401
