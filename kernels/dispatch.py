"""Which kernel path a layer takes, as pure functions of its shape: the launchers follow them, and the roofline
model (``blrdeploy.measure.roofline``) predicts with the same ones, so the thresholds live here once.

The switches exist for benchmarks and tests that measure what a path brings; they are a frozen value, changed only
for the length of a ``with switched(...)`` block (per thread and task), never by assigning module globals.
No torch and no Triton here: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

# Above this many tokens BLAST runs V GEMM -> S mix -> U GEMM instead of fused V+S -> U, except with few output
# blocks (b_out, rounded up to a power of two, <= FUSED_MANY_MAX_BOUT): the fused tiles then keep their full size,
# and fusing saves the intermediate's round trips and a launch, and stacked siblings' 3 launches each (the staged
# path runs them one layer at a time). Measured on ViT-B (b = 3) and GPT-2 S (b = 6, slower fused), bench/NOTES.md.
BLAST_FUSED_MAX_N = 64
FUSED_MANY_MAX_BOUT = 4
# Above this many tokens Monarch's stage 2 writes block-major and a second pass interleaves.
MONARCH_DIRECT_MAX_N = 64
# Programmatic dependent launch (griddepcontrol: the next kernel starts while this one drains) exists from sm_90 on.
PDL_MIN_ARCH = 90


@dataclass(frozen=True)
class Switches:
    """Kernel-path switches; the defaults are what ships. Benchmarks flip one to measure what it brings."""

    use_pdl: bool = True  # programmatic dependent launch for small N on sm_90+
    mix_dot: bool = True  # BLAST's S stage for many tokens as batched MMAs (else CUDA-core FMAs)
    reduce_splits: bool = True  # a V+S config may sum its split partials once (Config.reduce)
    many_tokens_fused: bool = True  # False: every BLAST layer runs staged above blast_fused_max_n
    blast_fused_max_n: int = BLAST_FUSED_MAX_N
    monarch_direct_max_n: int = MONARCH_DIRECT_MAX_N


_current: contextvars.ContextVar[Switches] = contextvars.ContextVar("blrdeploy_kernel_switches", default=Switches())  # noqa: B039 (frozen)


def current() -> Switches:
    """The switches in force here."""
    return _current.get()


@contextlib.contextmanager
def switched(**changes) -> Iterator[Switches]:
    """``with switched(use_pdl=False): ...`` runs the block with those switches changed, then restores them."""
    token = _current.set(dataclasses.replace(_current.get(), **changes))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): block counts are padded to one in the kernels."""
    return 1 << max(0, n - 1).bit_length()


def blast_staged(n_tokens: int, b_out: int, switches: Switches | None = None) -> bool:
    """Whether BLAST runs V GEMM -> S mix -> U GEMM (else fused V+S -> U) for ``n_tokens`` tokens and ``b_out``
    output blocks."""
    s = switches if switches is not None else current()
    few_blocks = pow2_at_least(b_out) <= FUSED_MANY_MAX_BOUT
    return n_tokens > s.blast_fused_max_n and not (s.many_tokens_fused and few_blocks)


def monarch_direct(n_tokens: int, switches: Switches | None = None) -> bool:
    """Whether Monarch's stage 2 writes the interleaved output directly (else block-major, then one more pass)."""
    s = switches if switches is not None else current()
    return n_tokens <= s.monarch_direct_max_n
