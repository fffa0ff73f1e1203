"""Sequential calibration (``convert --calibration --sequential``): each layer fitted on the inputs it will see in
the converted model, to the outputs the dense model gives.

The one-shot calibration (``conversion.calibration``) fits every layer to the dense model's own inputs. Once the
layers before it are converted, a layer sees other inputs: the errors add up along the depth, and at high
compression they compound. Here the model is converted block by block (the stack of decoder or encoder layers, an
``nn.ModuleList``), and inside a block group by group in the order the forward reaches them (q/k/v, o, gate/up,
down). For a group, two forwards per calibration batch stop at the group's input: the dense block on the dense
hidden states gives X_d, the partly converted block on the converted hidden states gives X_c. Each layer then takes

    min over W_hat of  ||X_c W_hat^T - X_d W^T||^2 + lambda ||W_hat - W||^2

whose structured minimizer is the whitened fit (``structures.factorize``, ``gram=`` G_c) of the compensated weight

    M = W (C^T + lambda I) (G_c + lambda I)^-1,   G_c = X_c^T X_c,  C = X_c^T X_d,

lambda = damping x mean diag(G_c), the same damping as the one-shot fits. With no drift (X_c = X_d) M is W: the
one-shot fit. The ridge pulls toward W, not toward zero: where the calibration text says little, the dense weight
stands. Each layer's recorded output error is against the dense model's output on the dense inputs, so it includes
the drift of everything before it.

The block's inputs other than the hidden state (attention masks, position embeddings) are captured per block and per
batch from one dense forward, so models whose blocks differ in those (sliding-window layers) are served too. The
cost is about three extra forwards of the model over the calibration text, plus the fits. Kept in memory: the dense
and converted hidden states of the calibration batches (two copies of (tokens, width)) and, for the block being
converted, the dense inputs of its layers (tokens x the sum of its groups' widths).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from blrdeploy.conversion.calibration import forward_kwargs
from blrdeploy.structures import factorize as fz

Fit = Callable[[str, torch.Tensor, torch.Tensor], nn.Module]  # (layer name, target, G_c) -> the swapped-in layer


class _Stop(BaseException):
    """Raised by a capture hook: the forward has reached what it was run for. A BaseException, so that a model's own
    ``except Exception`` fallbacks do not swallow it."""


@dataclass
class LayerStats:
    """The sums one layer's sequential fit needs, over the calibration rows."""

    gram_c: torch.Tensor  # X_c^T X_c
    cross: torch.Tensor  # X_c^T X_d
    gram_d: torch.Tensor  # X_d^T X_d
    rows: int


def block_stack(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.ModuleList, dict[int, list[str]]]:
    """(name, the ModuleList of blocks holding every layer in ``names``, {block index: its layers in ``names``}).
    The outermost such list is taken (a block's own lists, experts say, are inside it). A ValueError when a layer
    lies outside every list: a model that is not a stack of blocks cannot be converted block by block."""
    names = list(names)
    lists = sorted(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n), key=lambda x: x[0].count(".")
    )
    if not names:
        raise ValueError("--sequential: no layer to convert")
    outside = names[0]
    for list_name, blocks in lists:
        prefix = list_name + "."
        by_block: dict[int, list[str]] = {}
        for name in names:
            head = name[len(prefix) :].split(".")[0] if name.startswith(prefix) else ""
            if not head.isdigit():
                outside = name if by_block else outside  # the first misfit of a list that held the others
                break
            by_block.setdefault(int(head), []).append(name)
        else:
            return list_name, blocks, by_block
    raise ValueError(
        f"--sequential converts a model block by block; layer {outside} is not inside one stack of blocks "
        "(an nn.ModuleList) with the others: --exclude it, or convert without --sequential"
    )


def _capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, last: int, batches, device
) -> tuple[list, list[list]]:
    """One dense forward per batch, up to block ``last``: the first block's hidden-state input per batch, and per
    block per batch the call it got (the other args, the kwargs, and whether the hidden state came as a keyword)."""
    hidden: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in range(last + 1)]

    def hook_for(index):
        def hook(module, args, kwargs):
            if index > last:
                raise _Stop  # the rest of the model is not needed
            keyword = not args
            kwargs = dict(kwargs)
            state = kwargs.pop("hidden_states") if keyword else args[0]
            if index == 0:
                hidden.append(state.detach())
            calls[index].append((args[1:], kwargs, keyword))

        return hook

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    extra = forward_kwargs(model)
    try:
        with torch.no_grad():
            for batch in batches:
                kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                try:
                    model(**kwargs, **extra)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    short = next((i for i, c in enumerate(calls) if len(c) != len(hidden)), None)
    if short is not None or not hidden:
        raise ValueError(
            f"--sequential: the model's forward did not call block {short or 0} once per batch; convert without "
            "--sequential"
        )
    return hidden, calls


def _hidden(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, Mapping):  # a ModelOutput
        return next(iter(output.values()))
    return output


def _call(block: nn.Module, hidden: torch.Tensor, call):
    args, kwargs, keyword = call
    return block(*args, hidden_states=hidden, **kwargs) if keyword else block(hidden, *args, **kwargs)


def _run_to(block: nn.Module, layer: nn.Module | None, hidden: torch.Tensor, call, name: str = "") -> torch.Tensor:
    """The block's output on ``hidden``, or with ``layer`` the input that layer receives (the forward stops there)."""
    if layer is None:
        return _hidden(_call(block, hidden, call))
    box: list[torch.Tensor] = []

    def grab(module, inputs):
        box.append(inputs[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(grab)
    try:
        _call(block, hidden, call)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise ValueError(
            f"--sequential: the block did not call layer {name} on this batch; convert without --sequential"
        )
    return box[0]


def _dense_pass(
    block: nn.Module, leaders: list[str], hidden: list, calls: list, prefix: str
) -> tuple[dict[str, list], list]:
    """({leader: its input per batch}, the block's output per batch): the dense block run once per batch."""
    inputs: dict[str, list] = {name: [] for name in leaders}
    handles = [
        block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in leaders
    ]
    try:
        outputs = [_run_to(block, None, h, c) for h, c in zip(hidden, calls, strict=True)]
    finally:
        for h in handles:
            h.remove()
    for name, seen in inputs.items():
        if len(seen) != len(hidden):  # a routed expert, or one module called twice: no one X per batch
            raise ValueError(
                f"--sequential needs each layer called once per block forward; {prefix}{name} was called "
                f"{len(seen)} times in {len(hidden)} batches: --exclude it, or convert without --sequential"
            )
    return inputs, outputs


def _groups(block: nn.Module, relative: list[str], hidden: torch.Tensor, call, prefix: str) -> list[list[str]]:
    """The block's layers in the order its forward calls them, those reading one input tensor grouped."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [
        block.get_submodule(r).register_forward_pre_hook(lambda m, a, r=r: order.append((r, a[0]))) for r in relative
    ]
    try:
        _run_to(block, None, hidden, call)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in order:
        if any(name in g for g in groups):
            continue
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    missing = [r for r in relative if not any(r in g for g in groups)]
    if missing:
        raise ValueError(
            f"--sequential: the block's forward never calls {prefix}{missing[0]}; --exclude it, or convert without "
            "--sequential"
        )
    return groups


def _accumulate(stats: LayerStats | None, xc: torch.Tensor, xd: torch.Tensor, dtype, name: str) -> LayerStats:
    if xc.shape != xd.shape:
        raise ValueError(
            f"--sequential: layer {name} saw inputs of shape {tuple(xd.shape)} in the dense model and "
            f"{tuple(xc.shape)} in the converted one (routed tokens?); --exclude it, or convert without --sequential"
        )
    same = xc is xd
    xc = xc.reshape(-1, xc.shape[-1]).to(dtype)
    xd = xc if same else xd.reshape(-1, xd.shape[-1]).to(dtype)
    gc = xc.T @ xc
    cr, gd = (gc, gc) if same else (xc.T @ xd, xd.T @ xd)  # no drift yet: one product, not three
    if stats is None:
        return LayerStats(gc, cr.clone() if same else cr, gd.clone() if same else gd, xc.shape[0])
    stats.gram_c += gc
    stats.cross += cr
    stats.gram_d += gd
    stats.rows += xc.shape[0]
    return stats


def compensation(stats: LayerStats, damping: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(K, G_c / rows) with K = (G_c + lambda I)^-1 (C + lambda I), float64: the compensated target of every layer
    reading this input is M = W K^T (one solve per group, not per layer). K is None when the layer only ever saw
    zeros (every fit then has zero output error: the target stays W). Solved through the damped Cholesky factor
    (``structures.factorize.whitening``), which adds the least jitter a singular Gram needs (``--damping 0``)."""
    n = max(1, stats.rows)
    gc, cross = stats.gram_c.double() / n, stats.cross.double() / n
    gc = (gc + gc.T) / 2
    if not bool(torch.diagonal(gc).gt(0).any()):
        return None, gc
    lam = damping * torch.diagonal(gc).mean()
    L = fz.whitening(gc, damping)
    rhs = cross.clone()
    rhs.diagonal().add_(lam)
    return torch.cholesky_solve(rhs, L), gc


def target_of(weight: torch.Tensor, k: torch.Tensor | None, gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M = W K^T, G_c), in at least float32: a bf16 model's M and G_c rounded to bf16 would lose the digits the
    whitening needs."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    m = weight.double() if k is None else weight.double() @ k.T
    return m.to(dtype), gc.to(dtype)


def compensated_target(weight: torch.Tensor, stats: LayerStats, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, G_c / rows): the weight whose whitened fit minimizes ||X_c W_hat^T - X_d W^T||^2 + lambda ||W_hat - W||^2,
    and the Gram to whiten it with (the module docstring has the algebra)."""
    return target_of(weight, *compensation(stats, damping))


def drift_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats) -> float:
    """||X_c W_hat^T - X_d W^T|| / ||X_d W^T||: the layer's output in the converted model against the dense model's."""
    w, a = weight.double(), approx.double()
    gc, cr, gd = stats.gram_c.double(), stats.cross.double(), stats.gram_d.double()
    den = ((w @ gd) * w).sum()
    num = ((a @ gc) * a).sum() - 2 * ((a @ cr) * w).sum() + den
    if den <= 0:
        return float(num > 0)
    return float(torch.sqrt(num.clamp_min(0) / den))


def convert_sequential(
    model: nn.Module,
    names: list[str],
    batches: list,
    fit: Fit,
    *,
    damping: float = fz.DEFAULT_DAMPING,
    dense_weight: Callable[[nn.Module], torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], list[list[str]]]:
    """Converts the layers ``names`` of ``model`` block by block, group by group, through ``fit(name, target,
    gram)`` (which swaps the fitted layer into the model and returns it). ``dense_weight(module)`` is a dense
    layer's weight as (out, in). Returns each layer's output error against the dense model
    (:func:`drift_error`) and the groups of layers that read one input. ``progress(blocks done, blocks in all)``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # float64 sums: drift_error subtracts nearly equal traces, which float32 sums would leave at ~1e-2 of noise
    acc_dtype = torch.float64
    list_name, blocks, by_block = block_stack(model, names)
    last = max(by_block)
    hidden_d, calls = _capture_block_inputs(model, blocks, last, batches, device)
    hidden_c = hidden_d  # the same tensors until the first converted block
    errors: dict[str, float] = {}
    groups_seen: list[list[str]] = []
    with torch.no_grad():
        for index in range(last + 1):
            block = blocks[index]
            mine = by_block.get(index, [])
            if not mine:
                same = hidden_c is hidden_d
                hidden_d = [_run_to(block, None, h, c) for h, c in zip(hidden_d, calls[index], strict=True)]
                hidden_c = hidden_d if same else [
                    _run_to(block, None, h, c) for h, c in zip(hidden_c, calls[index], strict=True)
                ]  # fmt: skip
                continue
            dense_block = copy.deepcopy(block)
            prefix = f"{list_name}.{index}."
            relative = [n[len(prefix) :] for n in mine]
            groups = _groups(block, relative, hidden_c[0], calls[index][0], prefix)
            groups_seen += [[prefix + r for r in g] for g in groups]
            # One dense pass gives every group's X_d and the block's dense output: the dense block never changes.
            dense_inputs, new_d = _dense_pass(dense_block, [g[0] for g in groups], hidden_d, calls[index], prefix)
            untouched = hidden_c is hidden_d  # nothing converted before this group: X_c is X_d
            for group in groups:
                stats = None
                leader = block.get_submodule(group[0])
                for xd, hc, call in zip(dense_inputs.pop(group[0]), hidden_c, calls[index], strict=True):
                    xc = xd if untouched else _run_to(block, leader, hc, call, prefix + group[0])
                    stats = _accumulate(stats, xc, xd, acc_dtype, prefix + group[0])
                k, gc = compensation(stats, damping)
                for rel in group:
                    w = dense_weight(dense_block.get_submodule(rel))
                    layer = fit(prefix + rel, *target_of(w, k, gc))
                    errors[prefix + rel] = drift_error(w, layer.to_dense().detach().to(w), stats)
                del stats, k, gc
                untouched = False
            hidden_c = [_run_to(block, None, h, c) for h, c in zip(hidden_c, calls[index], strict=True)]
            hidden_d = new_d
            del dense_block
            if progress is not None:
                progress(index + 1, last + 1)
    return errors, groups_seen
