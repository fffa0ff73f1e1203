"""How much the model's loss cares about each layer's output: the weights of the loss-aware ``sensitivity`` allocation.

Converting layer l changes its output on token t by dy_t = dW x_t. To second order, around a trained model (whose
loss gradient is small on average), the loss grows by 1/2 sum_t dy_t^T H_t dy_t, with H_t the loss's curvature in
y_t. The Fisher (Gauss-Newton) stands in for H: E[g_t g_t^T], g_t = dL/dy_t. Averaged over the layer's channels,
H ~ h_l I with

    h_l = mean over tokens of ||dL/dy_l||^2 / out_features,

so the loss cost of layer l is ~ 1/2 h_l sum_t ||dW x_t||^2 = 1/2 h_l * E_l * relative_error^2 * N, E_l the
layer's output energy per token: ``conversion.allocate`` weighs each layer's relative error squared by h_l * E_l.
Equal weights (the unweighted proxy) treat a relative error in a layer the loss barely reads like one in a layer
it reads closely.

h_l comes from one backward pass per batch through the dense model, the weights frozen: the graph runs through the
activations only (each named layer's output made to require grad), and a hook on each output adds ||dL/dy||^2.

The loss L of a batch:

- a causal LM (its output has ``logits`` and it was fed ``input_ids``): the next-token cross-entropy, SUMMED over
  the batch's predicted tokens (padding, ``attention_mask`` 0, and labels -100 left out). The sum, not the mean,
  makes dL/dy_t one token's own gradient: the mean's is the sum's over the batch's token count, which would weigh a
  batch's tokens by 1/count^2 and a short last batch above the others. (Only the scale differs: the allocation
  depends on the ratios of the h_l alone.)
- anything else (an encoder's ``last_hidden_state``, a tensor, a classifier's logits): L = sum(r * out) /
  sqrt(out.shape[-1]), r a seeded standard normal of out's shape. E[g g^T] over r is then J^T J / channels: the
  Gauss-Newton of the output's mean squared error per token (a sum over tokens, again, to be batch-free).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sized

import torch
from torch import nn

from blrdeploy.conversion.calibration import batched, forward_kwargs

SensitivityProgress = Callable[[int, int], None]  # (tokens done, tokens in all)
TOKENS = 8192  # the calibration tokens the backward passes read: two 4096-token halves differed by ~15% per layer
BATCH_TOKENS = 2048  # per backward: ~1.4 MB of saved activations per token on a 135M Llama in float32


def sensitivity_batches(windows: torch.Tensor, tokens: int = TOKENS, batch_tokens: int = BATCH_TOKENS) -> list:
    """The first windows holding about ``tokens`` tokens (at least one), in batches of about ``batch_tokens``."""
    count = max(1, tokens // windows.shape[1])
    return batched(windows[:count], batch_tokens)


def _batch_tokens(batch) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


def _causal_lm(model: nn.Module, output, kwargs: dict) -> bool:
    logits = getattr(output, "logits", None)
    ids = kwargs.get("input_ids")
    if not isinstance(logits, torch.Tensor) or not isinstance(ids, torch.Tensor):
        return False
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        return False
    can_generate = getattr(model, "can_generate", None)  # a masked LM has token logits too, but reads both ways
    return bool(can_generate()) if callable(can_generate) else True


def _next_token_loss(logits: torch.Tensor, kwargs: dict, labels: torch.Tensor | None) -> torch.Tensor:
    targets = (labels if labels is not None else kwargs["input_ids"]).clone()
    mask = kwargs.get("attention_mask")
    if labels is None and isinstance(mask, torch.Tensor) and mask.shape == targets.shape:
        targets[mask == 0] = -100
    shifted = logits[:, :-1].float()
    return nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def _model_output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("last_hidden_state", "logits", "sample"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    first = output[0] if isinstance(output, (tuple, list)) and output else None
    if isinstance(first, torch.Tensor):
        return first
    raise TypeError(f"output_sensitivity cannot find a tensor in the model's output ({type(output).__name__})")


def output_sensitivity(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    seed: int = 0,
    progress: SensitivityProgress | None = None,
) -> dict[str, float]:
    """h_l = mean over tokens of ||dL/dy_l||^2 / out_features for each named layer l (y_l its output), from one
    backward pass per batch through the dense ``model`` (see the module docstring for L and why).

    ``batches``: token ids (windows, seq) or dicts of forward keyword arguments, as ``collect_grams`` takes them;
    moved to the model's device. The model runs in eval mode (dropout off) and its weights get no gradient: every
    parameter's requires_grad and every module's training flag are restored afterwards, also on error. ``seed``
    draws the random projections of a model that is not a causal LM. A ValueError names a layer that the forward
    never called (or that the model lacks); a layer it calls but whose output the loss never reads gets 0.

    Memory: one batch's backward keeps that batch's activations (and its logits, in float32) alive at once; on a
    135M Llama in float32, about 1.4 MB a token. Batch a few thousand tokens at a time, not ``collect_grams``'s
    BATCH_TOKENS."""
    names = list(layer_names)
    modules = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}") from None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    extra = forward_kwargs(model)
    total = sum(_batch_tokens(b) for b in batches) if isinstance(batches, Sized) else None
    sums: dict[str, torch.Tensor] = {}
    tokens = dict.fromkeys(names, 0)

    def hook(name: str):
        def add(grad: torch.Tensor) -> None:
            square = grad.detach().double().square().sum() / grad.shape[-1]
            sums[name] = sums[name] + square if name in sums else square

        def forward_hook(module: nn.Module, args: tuple, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name} returned {type(output).__name__}, not a tensor")
            if not output.requires_grad:
                output.requires_grad_()  # the first layer of the graph: frozen weights and token inputs need none
            output.register_hook(add)
            tokens[name] += output.numel() // max(1, output.shape[-1])

        return forward_hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    handles = []
    done = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        with torch.inference_mode(False), torch.enable_grad():
            for batch in batches:
                kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                labels = kwargs.pop("labels", None)
                output = model(**kwargs, **extra)
                if _causal_lm(model, output, kwargs):
                    loss = _next_token_loss(output.logits, kwargs, labels)
                else:
                    out = _model_output_tensor(output)
                    r = torch.randn(out.shape, generator=generator).to(out.device)  # drawn on the CPU: any device
                    loss = (r * out.float()).sum() / math.sqrt(out.shape[-1])
                if loss.requires_grad:  # else no named layer feeds the loss: every h is 0
                    loss.backward()
                del output, loss
                done += _batch_tokens(kwargs)
                if progress is not None:
                    progress(done, total or done)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
    if done == 0 and not any(tokens.values()):
        raise ValueError("output_sensitivity needs at least one batch")
    missing = [n for n in names if tokens[n] == 0]
    if missing:
        raise ValueError(f"the sensitivity pass never reached layer {missing[0]}: the model's forward does not call it")
    return {n: float(sums[n]) / tokens[n] if n in sums else 0.0 for n in names}
