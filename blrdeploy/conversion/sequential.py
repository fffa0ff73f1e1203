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


class _Stop(Exception):
    """Raised by a capture hook: the forward has reached what it was run for."""


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
    for list_name, blocks in lists:
        prefix = list_name + "."
        by_block: dict[int, list[str]] = {}
        for name in names:
            head = name[len(prefix) :].split(".")[0] if name.startswith(prefix) else ""
            if not head.isdigit():
                break
            by_block.setdefault(int(head), []).append(name)
        else:
            return list_name, blocks, by_block
    raise ValueError(
        f"--sequential converts a model block by block; layer {names[0]} is not inside one stack of blocks "
        "(an nn.ModuleList) with all the others"
    )


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches, device) -> tuple[list, list[list]]:
    """One dense forward per batch: the first block's hidden-state input per batch, and per block per batch the
    (other args, kwargs) it was called with."""
    hidden: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in blocks]

    def hook_for(index):
        def hook(module, args, kwargs):
            if index == 0:
                hidden.append(args[0].detach())
            calls[index].append((args[1:], kwargs))

        return hook

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    extra = forward_kwargs(model)
    try:
        with torch.no_grad():
            for batch in batches:
                kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                model(**kwargs, **extra)
    finally:
        for h in handles:
            h.remove()
    if any(len(c) != len(hidden) for c in calls):
        raise ValueError("--sequential: the model's forward did not call every block once per batch")
    return hidden, calls


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_to(block: nn.Module, layer: nn.Module | None, hidden: torch.Tensor, call) -> torch.Tensor:
    """The block's output on ``hidden``, or with ``layer`` the input that layer receives (the forward stops there)."""
    args, kwargs = call
    if layer is None:
        return _hidden(block(hidden, *args, **kwargs))
    box: list[torch.Tensor] = []

    def grab(module, inputs):
        box.append(inputs[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(grab)
    try:
        block(hidden, *args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise ValueError("--sequential: a layer the block was expected to call was not reached")
    return box[0]


def _dense_pass(block: nn.Module, leaders: list[str], hidden: list, calls: list) -> tuple[dict[str, list], list]:
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
    return inputs, outputs


def _groups(block: nn.Module, relative: list[str], hidden: torch.Tensor, call) -> list[list[str]]:
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
        raise ValueError(f"--sequential: the block's forward never calls {missing[0]}")
    return groups


def _accumulate(stats: LayerStats | None, xc: torch.Tensor, xd: torch.Tensor, dtype) -> LayerStats:
    xc = xc.reshape(-1, xc.shape[-1]).to(dtype)
    xd = xd.reshape(-1, xd.shape[-1]).to(dtype)
    gc, cr, gd = xc.T @ xc, xc.T @ xd, xd.T @ xd
    if stats is None:
        return LayerStats(gc, cr, gd, xc.shape[0])
    stats.gram_c += gc
    stats.cross += cr
    stats.gram_d += gd
    stats.rows += xc.shape[0]
    return stats


def compensated_target(weight: torch.Tensor, stats: LayerStats, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, G_c / rows): the weight whose whitened fit minimizes ||X_c W_hat^T - X_d W^T||^2 + lambda ||W_hat - W||^2,
    and the Gram to whiten it with (the module docstring has the algebra)."""
    n = max(1, stats.rows)
    gc, cross = stats.gram_c.double() / n, stats.cross.double() / n
    gc = (gc + gc.T) / 2
    lam = damping * torch.diagonal(gc).mean()
    eye = torch.eye(gc.shape[0], dtype=gc.dtype, device=gc.device)
    w = weight.double()
    # M^T = (G_c + lambda I)^-1 (C + lambda I) W^T
    m = torch.linalg.solve(gc + lam * eye, (cross + lam * eye) @ w.T).T
    # at least float32: a bf16 model's M and G_c rounded to bf16 would lose the digits the whitening needs
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return m.to(dtype), gc.to(dtype)


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
) -> dict[str, float]:
    """Converts the layers ``names`` of ``model`` block by block, group by group, through ``fit(name, target,
    gram)`` (which swaps the fitted layer into the model and returns it). ``dense_weight(module)`` is a dense
    layer's weight as (out, in). Returns each layer's output error against the dense model
    (:func:`drift_error`). ``progress(blocks done, blocks in all)``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    list_name, blocks, by_block = block_stack(model, names)
    hidden_d, calls = _capture_block_inputs(model, blocks, batches, device)
    hidden_c = hidden_d  # the same tensors until the first converted block
    errors: dict[str, float] = {}
    last = max(by_block)
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
            groups = _groups(block, relative, hidden_c[0], calls[index][0])
            # One dense pass gives every group's X_d and the block's dense output: the dense block never changes.
            dense_inputs, new_d = _dense_pass(dense_block, [g[0] for g in groups], hidden_d, calls[index])
            untouched = hidden_c is hidden_d  # nothing converted before this group: X_c is X_d
            for group in groups:
                stats = None
                for xd, hc, call in zip(dense_inputs.pop(group[0]), hidden_c, calls[index], strict=True):
                    xc = xd if untouched else _run_to(block, block.get_submodule(group[0]), hc, call)
                    stats = _accumulate(stats, xc, xd, acc_dtype)
                for rel in group:
                    w = dense_weight(dense_block.get_submodule(rel))
                    target, gram = compensated_target(w, stats, damping)
                    layer = fit(prefix + rel, target, gram)
                    errors[prefix + rel] = drift_error(w, layer.to_dense().detach().to(w), stats)
                del stats
                untouched = False
            hidden_c = [_run_to(block, None, h, c) for h, c in zip(hidden_c, calls[index], strict=True)]
            hidden_d = new_d
            del dense_block
            if progress is not None:
                progress(index + 1, last + 1)
    return errors
