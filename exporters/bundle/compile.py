"""Compiling a plan's kernel specializations ahead of time for the target's architecture, in parallel worker
processes: ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` needs no GPU."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from blrdeploy.kernels.plan import Progress

from .format import BundleError


def _compile_one(spec_json: dict, arch: int) -> tuple[bytes, dict]:
    """One worker's task: a (cubin, descriptor) pair (module-level, so the spawned worker can unpickle it)."""
    from blrdeploy.kernels import aot, runtime  # deferred: loads Triton, in the worker only

    return aot.compile_spec(runtime.Spec.from_json(spec_json), arch)


def compile_specs(specs: list, arch: int, jobs: int | None = None, progress: Progress | None = None) -> list:
    """(cubin, descriptor) per spec, compiled in parallel worker processes (spawned: safe after CUDA init)."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    results = [None] * len(specs)
    if progress:
        progress("compiling kernels", 0, len(specs))
    with _worker_environment(), ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_compile_one, s.to_json(), arch): i for i, s in enumerate(specs)}
        for done, future in enumerate(as_completed(futures), 1):
            spec = specs[futures[future]]
            try:
                results[futures[future]] = future.result()
            except Exception as e:  # the worker's compiler error, reported per kernel
                raise BundleError(
                    f"compiling {spec.kernel} {dict(spec.constexprs)} warps={spec.num_warps} "
                    f"stages={spec.num_stages} for sm_{arch} failed: {type(e).__name__}: {str(e)[:500]}"
                ) from None
            if progress:
                progress("compiling kernels", done, len(specs))
    return results


@contextlib.contextmanager
def _worker_environment():
    """What the spawned compile workers inherit: no TRITON_INTERPRET (under the interpreter Triton compiles
    nothing) and FMA contraction stated (Triton's default, which Triton 3.9 warns about when unset)."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
