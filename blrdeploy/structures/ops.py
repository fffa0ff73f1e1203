"""One ``torch.library`` op per structure: ``blrdeploy::blast_linear``, ``::monarch_linear``, ``::lowrank_linear``;
and ``::blast_linear_fused``, a BLAST layer with the SwiGLU or RMSNorm before it and the residual add after it inside.

Each runs the Triton kernels on CUDA (float16, bfloat16, float32) and the PyTorch reference everywhere else, has a
fake implementation so ``torch.compile`` (CUDA graphs included) and ``torch.export`` see through it, and a backward
(batched GEMMs from :mod:`blrdeploy.structures.gradients`, or the reference differentiated where those do not apply),
so converted models can still be fine-tuned and healed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from blrdeploy.kernels.dtypes import DTYPES
from blrdeploy.structures import functional, gradients


def _kernels():
    from blrdeploy.kernels import launch  # deferred: loads Triton, on the first CUDA call; CPU-only use never does

    return launch


def _runtime():
    from blrdeploy.kernels import runtime  # deferred: loads Triton, as _kernels

    return runtime


def _on_kernels(reference: Callable, launcher: str | Callable, x: torch.Tensor, factors, bias, out_features: int):
    if x.dtype not in DTYPES.values():
        return reference(x, *factors, bias)
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    x2 = _runtime().input_for_launch(x2)
    forward = getattr(_kernels(), launcher) if isinstance(launcher, str) else launcher
    y = forward(x2, *factors, bias)
    return y.view(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------- the eager direct call
# Going through torch's dispatcher costs a custom op ~12 µs of host time a call (bench/host_time.py: the `op` column
# against `launcher`), as much as the launch plan's replay: in eager decode, where host time sets the speed (issue
# #23), each layer call skips it when nothing between the call and the CUDA implementation would act. Deciding that
# reads torch's mode stacks, which have no public API: where a probe is missing the op is always dispatched.
_C = torch._C
_PROBES = (
    getattr(_C, "_len_torch_dispatch_stack", None),  # TorchDispatchModes: FakeTensorMode, FlopCounterMode, ...
    getattr(_C, "_is_torch_function_mode_enabled", None),  # TorchFunctionModes: `with torch.device(...)`, ...
    getattr(getattr(_C, "_functorch", None), "peek_interpreter_stack", None),  # vmap, grad, jvp
)
_CAN_SKIP = all(p is not None for p in _PROBES)


def dispatch_free(*tensors: torch.Tensor | None) -> bool:
    """True where the dispatcher would only call the op's CUDA implementation on these (non-None) inputs, so a
    direct call does the same: not being compiled, exported or traced (checked first: a compiler sees a constant
    and never reads the probes), no autocast to cast them, no autograd to record, plain tensors (no subclass such as
    FakeTensor), and no dispatch mode, function mode or functorch transform active. The device is the caller's."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _CAN_SKIP:
        return False
    if torch.is_autocast_enabled("cuda"):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    dispatch_modes, function_modes, transforms = _PROBES
    return not dispatch_modes() and not function_modes() and transforms() is None


def _fake(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _register_autograd(
    op, reference: Callable, by_gemms: Callable | None = None, takes: Callable = lambda *inputs: True
) -> None:
    """The op's backward: ``by_gemms`` (one of :mod:`blrdeploy.structures.gradients`) where ``takes`` accepts the
    inputs, otherwise the reference's own, recomputed on the saved inputs and differentiated."""

    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor, strict=True)]
        ctx.save_for_backward(*(a for a in inputs if isinstance(a, torch.Tensor)))

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if t else ctx.others[i] for i, t in enumerate(ctx.is_tensor)]
        if by_gemms is not None and takes(*inputs):
            return by_gemms(*inputs, grad, tuple(ctx.needs_input_grad))
        args = [
            a.detach().requires_grad_(ctx.needs_input_grad[i]) if t else a
            for i, (a, t) in enumerate(zip(inputs, ctx.is_tensor, strict=True))
        ]
        wanted = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.enable_grad():
            y = reference(*args)
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
        return tuple(next(grads) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args)

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("blrdeploy::blast_linear", mutates_args=())
def blast_linear(
    x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return functional.blast_reference(x, U, S, V, bias)


@blast_linear.register_kernel("cuda")
def blast_cuda(x, U, S, V, bias):
    return _on_kernels(functional.blast_reference, "blast_forward", x, (U, S, V), bias, _stacked_out(U))


@blast_linear.register_fake
def _(x, U, S, V, bias):
    return _fake(x, _stacked_out(U))


def _stacked_out(U: torch.Tensor) -> int:
    """Output features of BLAST or low-rank from U (rank last): b_out*p or out, times L for stacked siblings."""
    return U.numel() // U.shape[-1]


@torch.library.custom_op("blrdeploy::blast_linear_fused", mutates_args=())
def blast_linear_fused(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    swiglu_input: bool,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    return functional.blast_fused_reference(x, U, S, V, bias, swiglu_input, norm_weight, eps, residual)


@blast_linear_fused.register_kernel("cuda")
def blast_fused_cuda(x, U, S, V, bias, swiglu_input, norm_weight, eps, residual):
    out = _stacked_out(U)
    forward = functools.partial(
        _kernels().blast_forward,
        swiglu=swiglu_input,
        norm=None if norm_weight is None else (norm_weight, eps),
        residual=None if residual is None else residual.reshape(-1, out),
    )
    reference = functools.partial(
        functional.blast_fused_reference, swiglu_input=swiglu_input, norm_weight=norm_weight, eps=eps, residual=residual
    )
    return _on_kernels(reference, forward, x, (U, S, V), bias, out)


@blast_linear_fused.register_fake
def _(x, U, S, V, bias, swiglu_input, norm_weight, eps, residual):
    return _fake(x, _stacked_out(U))


@torch.library.custom_op("blrdeploy::monarch_linear", mutates_args=())
def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return functional.monarch_reference(x, w1, w2, bias)


@monarch_linear.register_kernel("cuda")
def monarch_cuda(x, w1, w2, bias):
    return _on_kernels(functional.monarch_reference, "monarch_forward", x, (w1, w2), bias, w1.shape[0] * w2.shape[1])


@monarch_linear.register_fake
def _(x, w1, w2, bias):
    return _fake(x, w1.shape[0] * w2.shape[1])


@torch.library.custom_op("blrdeploy::lowrank_linear", mutates_args=())
def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return functional.lowrank_reference(x, U, V, bias)


@lowrank_linear.register_kernel("cuda")
def lowrank_cuda(x, U, V, bias):
    return _on_kernels(functional.lowrank_reference, "lowrank_forward", x, (U, V), bias, _stacked_out(U))


@lowrank_linear.register_fake
def _(x, U, V, bias):
    return _fake(x, _stacked_out(U))


_register_autograd(blast_linear, functional.blast_reference, gradients.blast, lambda x, U, S, V, bias: U.dim() == 3)
_register_autograd(blast_linear_fused, functional.blast_fused_reference)
_register_autograd(monarch_linear, functional.monarch_reference, gradients.monarch)
_register_autograd(lowrank_linear, functional.lowrank_reference, gradients.lowrank, lambda x, U, V, bias: U.dim() == 2)

# Under autocast (heal's bfloat16 compute over float32 master factors) every floating input, factors included, is
# cast to bfloat16 before the op, as autocast does for torch's own linear: the kernel and the reference's backward
# see one dtype (a bfloat16 input beside float32 factors is refused by the kernels and breaks the backward), and
# the float32 factors get their gradients through the cast.
for _op in (blast_linear, blast_linear_fused, monarch_linear, lowrank_linear):
    for _device in ("cuda", "cpu"):
        torch.library.register_autocast(_op, _device, torch.bfloat16)
