"""Where a kernel launch goes: Triton's JIT (the default), a recorder (packaging a bundle: nothing runs, every
specialization a model needs is written down), or cubins compiled ahead of time (a loaded bundle: nothing compiles).

The launchers in ``launch.py`` call :func:`launch` with a kernel's name, grid, runtime arguments and constexprs. A
:class:`Spec` is what a compiled kernel is specialized on: Triton's JIT specializes an integer argument equal to 1
into a constant and marks integers divisible by 16 and 16-byte-aligned pointers (``D``); a spec records the same
per argument, so an ahead-of-time cubin is the kernel the JIT would have built. The token count ``N`` is never
specialized: one cubin then serves every token count of a bucket.

A :class:`Target` pins the architecture and SM count the launchers plan for (split counts, dependent launches),
so a plan recorded on a workstation is the plan a bundle replays on the device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from triton.runtime.jit import JITFunction

from .blast import blast_mix_dot_kernel, blast_mix_kernel, blast_vs_kernel, input_prologue_kernel
from .dtypes import DTYPES, TRITON_NAMES
from .gemm import grouped_gemm_kernel
from .monarch import interleave_kernel

KERNELS = {
    "gemm": grouped_gemm_kernel,
    "blast_vs": blast_vs_kernel,
    "blast_mix": blast_mix_kernel,
    "blast_mix_dot": blast_mix_dot_kernel,
    "interleave": interleave_kernel,
    "input_prologue": input_prologue_kernel,
}
# How a tensor argument's dtype reads in a kernel signature: the dtypes the kernels run in, and int32 for the arrival
# counters of BLAST's V+S split reduction.
TRITON_DTYPES = {**{DTYPES[name]: triton for name, triton in TRITON_NAMES.items()}, torch.int32: "i32"}
UNSPECIALIZED = ("N",)  # arguments whose value varies within a token bucket


def jit_function(kernel) -> JITFunction:
    # Under TRITON_INTERPRET=1, @triton.jit returns an interpreter wrapper; the parameter list is the same.
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


@functools.cache
def runtime_params(kernel: str) -> tuple[str, ...]:
    """Names of the kernel's non-constexpr parameters, in order: what :func:`launch` takes positionally."""
    return tuple(p.name for p in jit_function(KERNELS[kernel]).params if not p.is_constexpr)


@dataclass(frozen=True)
class Spec:
    """One kernel specialization: ``params`` is (name, type, hint) per runtime argument, type ``*bf16``/``i32``,
    hint ``""`` (none), ``"D"`` (divisible by 16 / 16-byte aligned) or ``"1"`` (the constant 1)."""

    kernel: str
    params: tuple[tuple[str, str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    launch_pdl: bool = False

    def family(self) -> tuple:
        """Everything but the hints: specs of one family differ only in what they assume of argument values."""
        return (self.kernel, tuple((n, t) for n, t, _ in self.params), self.constexprs, self.num_warps,
                self.num_stages, self.launch_pdl)  # fmt: skip

    def accepts(self, actual: Spec) -> bool:
        """Whether a kernel compiled for ``self`` is correct for arguments classified as ``actual``."""
        return self.family() == actual.family() and all(
            want == "" or want == have for (_, _, want), (_, _, have) in zip(self.params, actual.params, strict=True)
        )

    def to_json(self) -> dict:
        return {
            "kernel": self.kernel,
            "params": [list(p) for p in self.params],
            "constexprs": dict(self.constexprs),
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "launch_pdl": self.launch_pdl,
        }

    @classmethod
    def from_json(cls, d: dict) -> Spec:
        try:
            return cls(
                d["kernel"],
                tuple((str(n), str(t), str(h)) for n, t, h in d["params"]),
                tuple(sorted(d["constexprs"].items())),
                int(d["num_warps"]),
                int(d["num_stages"]),
                bool(d.get("launch_pdl", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a kernel spec: {json.dumps(d)[:200]} ({e})") from None


def _classify(name: str, value) -> tuple[str, str]:
    if isinstance(value, torch.Tensor):
        if value.dtype not in TRITON_DTYPES:
            raise TypeError(f"argument {name}: no kernels for {value.dtype}")
        return f"*{TRITON_DTYPES[value.dtype]}", "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"argument {name}: expected a tensor or an int, got {type(value).__name__}")
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"argument {name}={value} does not fit the kernels' 32-bit integer arguments")
    if name in UNSPECIALIZED:
        return "i32", ""
    return "i32", "1" if value == 1 else ("D" if value % 16 == 0 else "")


def _fast_classes(kernel: str, args: tuple) -> tuple:
    """What :func:`_classify` depends on, per argument, computed cheaply (a cache key, not a spec)."""
    unspecialized = _unspecialized_index(kernel)
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, torch.Tensor)
        else (0 if i == unspecialized else 1 if a == 1 else 2 if a % 16 == 0 else 3)
        for i, a in enumerate(args)
    )


@functools.cache
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1


@functools.cache
def _unspecialized_index(kernel: str) -> int:
    names = runtime_params(kernel)
    return next((i for i, n in enumerate(names) if n in UNSPECIALIZED), -1)


def spec_of(kernel: str, args: tuple, constexprs: dict, num_warps: int, num_stages: int, launch_pdl: bool) -> Spec:
    names = runtime_params(kernel)
    if len(args) != len(names):
        raise TypeError(f"{kernel} takes {len(names)} runtime arguments, got {len(args)}")
    params = tuple((n, *_classify(n, v)) for n, v in zip(names, args, strict=True))
    return Spec(kernel, params, tuple(sorted(constexprs.items())), num_warps, num_stages, launch_pdl)


# ------------------------------------------------------------------------------------------------ cuBLAS stages
# A stage a launcher gives to cuBLAS goes through :func:`launch` like a kernel, so launch plans replay it and a
# recorder sees it; every backend runs it with torch (a bundle ships no cubin for it, and the recorder no spec).


def _torch_bmm(args: tuple, constexprs: dict) -> None:
    """out[g] = a[g] @ b[g] (+ add[g]) on cuBLAS (strided-batched), every operand a (G, rows, columns) view given
    by pointer and strides, as the grouped GEMM kernel takes them: args = (a, b, out, add, G, N, K, C, a strides,
    b strides, out strides, add strides). A stride may be 0 (every group reads the same x; a bias broadcast over
    the rows); torch copies an operand cuBLAS cannot address as it is (and writes the result back) rather than
    compute a wrong one."""
    a, b, out, add, G, N, K, C, *st = args
    A = a.as_strided((G, N, K), st[0:3])
    B = b.as_strided((G, K, C), st[3:6])
    Y = out.as_strided((G, N, C), st[6:9])
    with torch.no_grad():  # a kernel, as the Triton ones: factors that require grad are only read (out= refuses them)
        if constexprs["HAS_BIAS"]:
            torch.baddbmm(add.as_strided((G, N, C), st[9:12]), A, B, out=Y)
        else:
            torch.bmm(A, B, out=Y)


TORCH_STAGES = {"torch_bmm": _torch_bmm}


def torch_stage(kernel: str, args: tuple, constexprs: dict) -> bool:
    """Runs ``kernel`` if it is a cuBLAS stage (True), else leaves it to the backend (False)."""
    stage = TORCH_STAGES.get(kernel)
    if stage is None:
        return False
    if not args[0].is_meta:  # planning a bundle on meta tensors: nothing to compute
        stage(args, constexprs)
    return True


# --------------------------------------------------------------------------------------------------- backends


class JitKernels:
    """Triton's JIT: compiles on first use of each specialization (cached on disk by Triton)."""

    name = "jit"

    def launch(self, kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl):
        if torch_stage(kernel, args, constexprs):
            return
        extra = {"launch_pdl": True} if launch_pdl else {}
        KERNELS[kernel][grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages, **extra)


class DriverKernels:
    """Triton compiles each specialization once (``aot.compile_spec``, the JIT's specialization, Triton's disk cache
    behind it); every launch goes through the CUDA driver (``cubin.Kernel``), arguments packed into fixed slots,
    not through Triton's per-call argument binding. The launch path of an eager model, where host time per layer
    call sets the speed (issue #23). ``BLRDEPLOY_LAUNCH=driver`` makes it the default backend."""

    name = "driver"

    def __init__(self) -> None:
        self._kernels: dict[tuple, object] = {}

    def launch(self, kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl):
        if torch_stage(kernel, args, constexprs):
            return
        device = args[0].device  # every kernel's first argument is a tensor
        key = (kernel, _fast_classes(kernel, args), tuple(constexprs.items()), num_warps, num_stages, launch_pdl,
               device)  # fmt: skip
        compiled = self._kernels.get(key)
        if compiled is None:
            compiled = self._kernels[key] = self._compile(kernel, args, constexprs, num_warps, num_stages, launch_pdl)
        _launch_cubin(compiled, device, grid, args)

    @staticmethod
    def _compile(kernel, args, constexprs, num_warps, num_stages, launch_pdl):
        from . import aot, cubin  # deferred: aot imports the launchers, which import this module

        device = args[0].device
        spec = spec_of(kernel, args, constexprs, num_warps, num_stages, launch_pdl)
        major, minor = torch.cuda.get_device_capability(device)
        image, descriptor = aot.compile_spec(spec, 10 * major + minor)
        return cubin.Kernel(image, descriptor, device, spec)


def _launch_cubin(kernel, device: torch.device, grid, args: tuple) -> None:
    """Launch a loaded ``cubin.Kernel`` of ``device``; from another current device, inside that device's context
    (where its cubin was loaded)."""
    if _several_gpus() and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel.launch(grid, args)
        return
    kernel.launch(grid, args)


class Recorder:
    """Runs nothing: collects the specs launched and the launch configs chosen (for packaging a bundle)."""

    name = "record"

    def __init__(self) -> None:
        self.specs: dict[Spec, None] = {}  # insertion-ordered set
        self.configs: dict[str, object] = {}

    def launch(self, kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl):
        if kernel in TORCH_STAGES:
            return  # cuBLAS at run time: no kernel to ship
        self.specs[spec_of(kernel, args, constexprs, num_warps, num_stages, launch_pdl)] = None


class MissingKernel(RuntimeError):
    """A launch no shipped cubin serves."""


class ShippedKernels:
    """Cubins compiled ahead of time, launched through the CUDA driver: no Triton compilation, no Triton cache.

    ``variants`` maps a spec to a loader of its compiled kernel for a device. A launch takes the variant whose spec
    equals the arguments' classification, else any variant of the family whose assumptions the arguments meet. With
    ``allow_jit``, a launch nothing serves compiles with Triton's JIT after a warning; otherwise it is an error."""

    name = "shipped"

    def __init__(
        self, variants: dict[Spec, object], allow_jit: bool = False, where: str = "bundle", max_tokens: int = 0
    ) -> None:
        self.variants = dict(variants)
        self.max_tokens = max_tokens  # the largest token bucket planned for (0: unknown)
        self.allow_jit = allow_jit
        self.where = where
        self.by_family: dict[tuple, list[Spec]] = {}
        for s in self.variants:
            self.by_family.setdefault(s.family(), []).append(s)
        self._resolved: dict[tuple, Spec | None] = {}
        self.jit_launches = 0

    def _find(self, actual: Spec) -> Spec | None:
        found = actual if actual in self.variants else None
        if found is None:
            found = next((s for s in self.by_family.get(actual.family(), ()) if s.accepts(actual)), None)
        return found

    def launch(self, kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl):
        if torch_stage(kernel, args, constexprs):
            return
        # The hot path: a cheap key of what specialization depends on, resolved to a variant once.
        key = (kernel, _fast_classes(kernel, args), tuple(constexprs.items()), num_warps, num_stages, launch_pdl)
        try:
            found = self._resolved[key]
        except KeyError:
            actual = spec_of(kernel, args, constexprs, num_warps, num_stages, launch_pdl)
            found = self._resolved[key] = self._find(actual)
        if found is None:
            actual = spec_of(kernel, args, constexprs, num_warps, num_stages, launch_pdl)
            what = f"{kernel} {dict(actual.constexprs)} warps={num_warps} stages={num_stages}"
            if not self.allow_jit:
                classes = ", ".join(f"{n}:{t}" + (f":{h}" if h else "") for n, t, h in actual.params)
                n = dict(zip(runtime_params(kernel), args, strict=True)).get("N", 0)
                why = (
                    f"this launch has {n} tokens, more than the {self.max_tokens} the bundle was packaged for "
                    "(package --max-tokens)"
                    if self.max_tokens and n > self.max_tokens
                    else f"arguments: {classes}"
                )
                raise MissingKernel(
                    f"the {self.where} has no compiled kernel for {what}; {why}. Package the model again, or allow "
                    "JIT compilation (--allow-jit)"
                )
            if self.jit_launches == 0:
                warnings.warn(
                    f"the {self.where} has no compiled kernel for {what}: compiling it with Triton's JIT", stacklevel=3
                )
            self.jit_launches += 1
            JitKernels().launch(kernel, grid, args, constexprs, num_warps, num_stages, launch_pdl)
            return
        device = args[0].device  # every kernel's first argument is a tensor
        _launch_cubin(self.variants[found](device), device, grid, args)


# ------------------------------------------------------------------------------------------------ active state


@dataclass(frozen=True)
class Target:
    """The GPU a plan is made for: compute capability (e.g. 87), SM count, and whether dependent launches are used."""

    arch: int
    sm_count: int
    pdl: bool


_local = threading.local()
# The default launch path: Triton's JIT, or with BLRDEPLOY_LAUNCH=driver the driver path (measured against each
# other by bench/host_time.py before either becomes the only one).
_backend = DriverKernels() if os.environ.get("BLRDEPLOY_LAUNCH") == "driver" else JitKernels()
_target: Target | None = None


def backend():
    return getattr(_local, "backend", None) or _backend


def input_for_launch(x2: torch.Tensor) -> torch.Tensor:
    """The 2-D input ``x2`` as the active backend can launch on it: a bundle's cubins are specialized for a
    contiguous, 16-byte-aligned input, as packaging planned it, so a strided or offset view is copied first."""
    if isinstance(backend(), ShippedKernels) and (
        x2.stride(-1) != 1 or x2.stride(0) != x2.shape[-1] or x2.data_ptr() % 16
    ):
        return x2.clone(memory_format=torch.contiguous_format) if x2.is_contiguous() else x2.contiguous()
    return x2


def target() -> Target | None:
    return getattr(_local, "target", None) or _target


def use(new_backend, new_target: Target | None) -> tuple:
    """Process-wide: launches go to ``new_backend``, planned for ``new_target`` (None: the GPU at hand).
    Returns the previous pair."""
    global _backend, _target
    previous = (_backend, _target)
    _backend, _target = new_backend, new_target
    return previous


@contextlib.contextmanager
def using(new_backend, new_target: Target | None) -> Iterator[None]:
    """This thread only, for the duration of the block (packaging, tests)."""
    previous = (getattr(_local, "backend", None), getattr(_local, "target", None))
    _local.backend, _local.target = new_backend, new_target
    try:
        yield
    finally:
        _local.backend, _local.target = previous


def launch(kernel: str, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int, pdl: bool = False):
    backend().launch(kernel, grid, args, constexprs, num_warps, num_stages, pdl)
