"""Launch plans: a launcher's decisions, made once per kind of call and replayed after.

Everything a launcher decides (checks, path, configs, split counts, grids, buffer shapes, constexprs, integer
arguments) depends only on its inputs' shapes, strides, dtypes and device, on its options, and on the state it
launches under (backend, target GPU, switches, config table). The first call with a given key runs the launcher
and records what it did; later calls with the same key allocate the same buffers, put this call's tensors where
the recorded ones were, and launch. An eager model calls the same few layer shapes over and over, and the planning
cost 40-90 µs of host time per layer call (bench/NOTES.md, issue #23) against a few µs for the replay.

A call is recorded only when its launches can be replayed exactly: every tensor argument is one of the call's
inputs, a buffer the launcher allocated, or a persistent constant (the arrival-counter pool), or a view of one of
those at a fixed offset. Anything else (a tensor computed on the side) marks the key as one to plan every time.
Nothing is recorded while tuning, while configs are forced, while packaging (the recorder backend) or during CUDA
graph capture; a plan recorded before is replayed during capture.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from . import runtime

MAX_PLANS = 4096  # distinct (shape, token count, state) keys kept; past it the cache starts over
_local = threading.local()
_plans: dict[tuple, Plan | None] = {}  # None: a key whose calls are planned every time
counts = {"planned": 0, "replayed": 0, "unplanned": 0}  # tests read them: a replay does no planning


def clear() -> None:
    """Forget every plan (tests that change launch constants; a changed kernel module)."""
    _plans.clear()


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class _Recording:
    buffers: list[torch.Tensor] = field(default_factory=list)
    constants: list[torch.Tensor] = field(default_factory=list)
    launches: list[tuple] = field(default_factory=list)


def _recording() -> _Recording | None:
    return getattr(_local, "recording", None)


def note_buffer(t: torch.Tensor) -> None:
    """Called by the launchers' allocator: ``t`` is a buffer this call made (replayed as a fresh one)."""
    rec = _recording()
    if rec is not None:
        rec.buffers.append(t)


def note_constant(t: torch.Tensor) -> None:
    """Called for a persistent tensor a launch reads (the counter pool): replayed as the same tensor."""
    rec = _recording()
    if rec is not None:
        rec.constants.append(t)


class _Tee:
    """The active backend, with every launch written down as it goes through."""

    def __init__(self, inner, rec: _Recording) -> None:
        self.inner, self.rec, self.name = inner, rec, inner.name

    def launch(self, kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl):
        self.rec.launches.append((kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl))
        self.inner.launch(kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl)


# ---------------------------------------------------------------------------------------------- the plans

# A tensor argument as replayed: (root index, None) for the root itself (or a view starting where it starts: the
# kernels take every stride as an integer argument, so only the pointer and dtype of a tensor argument matter), or
# (root index, (shape, strides, element offset)) for a view further in.
_Slot = tuple[int, tuple | None]


@dataclass(frozen=True)
class Plan:
    buffers: tuple[tuple[tuple[int, ...], torch.dtype], ...]  # (shape, dtype) of each buffer a launch uses
    constants: tuple[torch.Tensor, ...]
    launches: tuple[tuple, ...]  # (kernel, grid, args template, tensor slots by position, constexprs, warps, ...)
    output: int  # the root index of the returned tensor

    def replay(self, inputs: list[torch.Tensor], allocate: Callable) -> torch.Tensor:
        like = inputs[0]
        roots = [*inputs, *(allocate(shape, like, dtype) for shape, dtype in self.buffers), *self.constants]
        for kernel, grid, template, slots, constexprs, warps, stages, pdl in self.launches:
            args = list(template)
            for pos, (root, view) in slots:
                args[pos] = roots[root] if view is None else _view(roots[root], view)
            runtime.launch(kernel, grid, tuple(args), constexprs, warps, stages, pdl)
        return roots[self.output]


def _view(root: torch.Tensor, view: tuple) -> torch.Tensor:
    shape, strides, offset = view
    return root.as_strided(shape, strides, root.storage_offset() + offset)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address ``t`` can touch."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + max(0, last) * t.element_size()


class _NotReplayable(Exception):
    pass


def _slot(t: torch.Tensor, roots: list[torch.Tensor], n_inputs: int) -> _Slot:
    for i, r in enumerate(roots):
        if t is r:
            return i, None
    # A view: the root whose memory holds its first element. A buffer is fresh memory, so it cannot overlap an
    # input; two inputs may overlap each other, and then which one a view belongs to is not known.
    ptr = t.data_ptr()
    holders = [i for i, r in enumerate(roots) if r.dtype == t.dtype and _span(r)[0] <= ptr <= _span(r)[1]]
    fresh = [i for i in holders if i >= n_inputs]
    if len(fresh) == 1 or (not fresh and len(holders) == 1):
        i = fresh[0] if fresh else holders[0]
        offset = (ptr - roots[i].data_ptr()) // t.element_size()
        return i, None if offset == 0 else (tuple(t.shape), tuple(t.stride()), offset)
    raise _NotReplayable(f"a launch argument of shape {tuple(t.shape)} is none of the call's tensors")


def _make_plan(rec: _Recording, inputs: list[torch.Tensor], result) -> Plan:
    if not isinstance(result, torch.Tensor):
        raise _NotReplayable("the launcher returned no tensor")
    n_inputs, n_buffers = len(inputs), len(rec.buffers)
    roots = [*inputs, *rec.buffers, *rec.constants]
    recorded = []  # (launch, [(position, slot)]) with slots numbered over every root
    for launch in rec.launches:
        args = launch[2]
        recorded.append(
            (launch, [(i, _slot(a, roots, n_inputs)) for i, a in enumerate(args) if isinstance(a, torch.Tensor)])
        )
    output = _slot(result, roots, n_inputs)
    if output[1] is not None or not n_inputs <= output[0] < n_inputs + n_buffers:
        raise _NotReplayable("the launcher's output is not one of its buffers")
    # Replayed roots: the inputs, then only the buffers a launch or the output uses, then the constants.
    used = {output[0]} | {slot[0] for _, slots in recorded for _, slot in slots}
    buffers = [i for i in range(n_inputs, n_inputs + n_buffers) if i in used]
    number = {i: i for i in range(n_inputs)}
    number.update({old: n_inputs + k for k, old in enumerate([*buffers, *range(n_inputs + n_buffers, len(roots))])})
    launches = []
    for (kernel, grid, args, constexprs, warps, stages, pdl), slots in recorded:
        template = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
        renumbered = tuple((pos, (number[root], view)) for pos, (root, view) in slots)
        launches.append((kernel, grid, template, renumbered, constexprs, warps, stages, pdl))
    return Plan(
        buffers=tuple((tuple(roots[i].shape), roots[i].dtype) for i in buffers),
        constants=tuple(rec.constants),
        launches=tuple(launches),
        output=number[output[0]],
    )


# ------------------------------------------------------------------------------------------------ the key


def _describe(value, tensors: list[torch.Tensor]) -> Hashable:
    """What a launcher's decisions can depend on in one argument; collects the tensors in order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return (tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, tuple):
        return tuple(_describe(v, tensors) for v in value)
    return value


def planned(allocate: Callable, environment: Callable[[], Hashable | None]) -> Callable:
    """Decorator for a launcher ``f(x, *tensors_and_options)``. ``allocate(shape, like, dtype)`` makes a buffer
    (the launchers' own allocator, looked up at each call so tests can poison it); ``environment()`` is the
    launch state the launcher's decisions depend on beyond its arguments, or None when nothing may be recorded
    (tuning, forced configs, packaging)."""

    def decorate(launcher: Callable) -> Callable:
        @functools.wraps(launcher)
        def wrapper(*args, **kwargs):
            env = environment()
            if env is None or _recording() is not None:
                counts["unplanned"] += 1
                return launcher(*args, **kwargs)
            tensors: list[torch.Tensor] = []
            key = (launcher, _describe(args, tensors), _describe(tuple(sorted(kwargs.items())), tensors), env)
            try:
                plan = _plans[key]
            except KeyError:
                return _first_call(key, launcher, args, kwargs, tensors)
            except TypeError:  # an option that cannot be a key (a list): decided every call
                counts["unplanned"] += 1
                return launcher(*args, **kwargs)
            if plan is None:
                counts["unplanned"] += 1
                return launcher(*args, **kwargs)
            counts["replayed"] += 1
            return plan.replay(tensors, allocate)

        return wrapper

    return decorate


def _first_call(key: tuple, launcher: Callable, args: tuple, kwargs: dict, tensors: list[torch.Tensor]):
    counts["planned"] += 1
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return launcher(*args, **kwargs)  # memory made in a capture belongs to the graph: record outside one
    if any(t.dim() == 0 for t in tensors):
        # A scalar tensor option (an eps) is read on the host into the launches: its value, not in the key, would
        # be replayed. Such calls are decided every time.
        return launcher(*args, **kwargs)
    if len({id(t) for t in tensors}) < len(tensors):
        # One tensor in two roles (the residual is the input, say): which role a launch argument plays is not
        # known, so nothing is recorded; a later call of the kind with distinct tensors records the plan.
        return launcher(*args, **kwargs)
    rec = _Recording()
    _local.recording = rec
    try:
        with runtime.using(_Tee(runtime.backend(), rec), runtime.target()):
            result = launcher(*args, **kwargs)
    finally:
        _local.recording = None
    try:
        plan = _make_plan(rec, tensors, result)
    except _NotReplayable:
        plan = None
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return result
