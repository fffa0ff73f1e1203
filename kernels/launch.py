"""Launchers: one forward per structure, each a fixed sequence of two or three kernels chosen by the token count,
with strides set up so that no stage copies or transposes an operand (the one extra pass is Monarch's output
interleave above 64 tokens, see ``monarch.py``). Inputs are 2-D ``(N, in)`` with any strides; the factors are in
their canonical layouts (blrdeploy.structures.functional) and in the input's dtype.

Configs come from the active :class:`ConfigTable` (see :func:`use_table`), else from the table shipped for the GPU's
architecture (``tables/sm_XX.json``), else, while :func:`tuning` is on, from timing the curated space on the GPU at
hand, else from the bucket's heuristic default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import dispatch, replay, runtime
from .blast import mix_tile
from .configs import (
    CUBLAS,
    MIX_DOT_ONE_PASS,
    MIX_DOT_PROGRAMS_PER_SM,
    MIX_DOT_STAGES,
    SMALL_N,
    Config,
    ConfigTable,
    bucket,
    default,
    max_partials,
    mix_dot_tiles,
    space,
    tier,
)
from .dispatch import PDL_MIN_ARCH, Switches, blast_staged, monarch_direct, pow2_at_least
from .dtypes import DTYPES, NAMES
from .monarch import interleave_tile

_state = threading.local()
_table = ConfigTable()


def _cdiv(a: int, b: int) -> int:
    # Host-side arithmetic in plain Python: triton.cdiv / next_power_of_2 are JIT-aware wrappers costing ~5 µs a
    # call, ~10 calls per layer forward, which an eager (no CUDA graph) model pays on every layer.
    return -(-a // b)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_table(table: ConfigTable) -> ConfigTable:
    """Make ``table`` the one configs are looked up in (and tuned into); returns the previous one."""
    global _table
    previous, _table = _table, table
    replay.clear()  # plans keyed on the old table would keep it alive
    return previous


def active_table() -> ConfigTable:
    return _table


@contextlib.contextmanager
def tuning(enabled: bool = True, remeasure: bool = False) -> Iterator[None]:
    """While on, a key missing from the active table is tuned on the spot (time every candidate, keep the
    fastest); with ``remeasure`` even one the shipped table has. Never turn it on inside CUDA-graph capture or
    torch.compile tracing: tuning launches and synchronizes."""
    previous = getattr(_state, "tuning", False), getattr(_state, "remeasure", False)
    _state.tuning, _state.remeasure = enabled, enabled and remeasure
    try:
        yield
    finally:
        _state.tuning, _state.remeasure = previous


def device_arch(device: torch.device) -> int:
    """The compute capability (e.g. 90) launches on ``device`` plan for: the planned target's, else the GPU's."""
    target = runtime.target()
    return target.arch if target is not None else _physical_arch(device)


def device_sm_count(device: torch.device) -> int:
    """The SM count launches on ``device`` plan for (split counts): the planned target's, else the GPU's."""
    target = runtime.target()
    return target.sm_count if target is not None else _physical_sm_count(device)


@functools.cache
def _physical_arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90  # the interpreter: any config runs
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache
def _physical_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few programs exercise the split paths
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _pdl_supported() -> bool:
    # deferred: the NVIDIA backend is asked only on a CUDA device, once
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def _pdl(device: torch.device, n: int, switches: Switches) -> bool:
    """Programmatic dependent launch: sm_90+, a compiled (not interpreted) kernel, a Triton that supports it, and
    small N only: there the kernel boundary is a large share of a few-µs layer, while for large N the consumer's
    peeled first step would cost the software pipeline more than the overlap brings."""
    target = runtime.target()
    if target is not None:  # a planned target: the bundle's cubins are launched with or without it as planned
        return switches.use_pdl and n <= SMALL_N and target.pdl
    return (
        switches.use_pdl
        and n <= SMALL_N
        and device.type == "cuda"
        and not interpreting()
        and device_arch(device) >= PDL_MIN_ARCH
        and _pdl_supported()
    )


@contextlib.contextmanager
def forced(**configs: Config) -> Iterator[None]:
    """Use these configs (by kernel: ``gemm=``, ``blast_vs=``) whatever the table says: for tests and benchmarks."""
    previous = getattr(_state, "forced", {})
    _state.forced = {**previous, **configs}
    try:
        yield
    finally:
        _state.forced = previous


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer a launcher writes comes from here (tests poison them to prove every element is written)."""
    buffer = torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)
    replay.note_buffer(buffer)
    return buffer


def _plan_environment() -> tuple | None:
    """What a launcher's decisions depend on beyond its arguments (see ``replay``); None while nothing may be
    recorded: tuning or forced configs (tests, benchmarks) choose per call, and a recorder writes each call down."""
    if getattr(_state, "tuning", False) or getattr(_state, "forced", None):
        return None
    backend = runtime.backend()
    if isinstance(backend, runtime.Recorder):
        return None
    return backend, runtime.target(), dispatch.current(), _table, _table.version


# Launchers are replayed from their plans (kernels/replay.py); the allocator is looked up at each call.
_planned = replay.planned(lambda shape, like, dtype: new_buffer(shape, like, dtype), _plan_environment)


@functools.cache
def shipped_table(arch: int) -> ConfigTable:
    """The configs tuned for this architecture that ship with the package (``tables/sm_XX.json``), if any: the
    reference paper's layers then run tuned without tuning on the user's GPU."""
    path = Path(__file__).parent / "tables" / f"sm_{arch}.json"
    return ConfigTable.load(path) if path.is_file() else ConfigTable(arch)


def gpu_time_ms(fn: Callable[[], None]) -> float:
    """GPU time of ``fn``'s launches, replayed from a CUDA graph with L2 flushed in between: timing the Python
    launch path instead would measure ~100 µs of overhead and pick at random among small-N configs."""
    # deferred: triton.testing is needed only when timing (tuning, benchmarks)
    from triton.testing import do_bench

    fn()  # compiles; a config the compiler refuses raises here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=5, rep=20, return_mode="median")


def choose_config(
    kernel: str, key: str, n: int, device: torch.device, run: Callable[[Config], None], b_out_pow2: int | None = None,
    cublas: bool = False, fallback: Config | None = None,
) -> Config:  # fmt: skip
    """The config of ``kernel`` for layer ``key`` at ``n`` tokens (see the module docstring for where it comes
    from); ``run`` launches with a candidate, for tuning. ``cublas``: the stage may also run on cuBLAS
    (:data:`~.configs.CUBLAS`, a candidate when tuning); ``fallback``: the choice when no table has one (else the
    bucket's heuristic default). A bundle's recorder notes the choice."""
    full_key = f"{kernel}|{key}|N{bucket(n)}"
    chosen = _resolve(kernel, full_key, n, device, run, b_out_pow2, cublas, fallback)
    recorder = runtime.backend()
    if isinstance(recorder, runtime.Recorder):
        recorder.configs[full_key] = chosen
    return chosen


def _resolve(
    kernel: str, full_key: str, n: int, device: torch.device, run: Callable[[Config], None], b_out_pow2: int | None,
    cublas: bool = False, fallback: Config | None = None,
) -> Config:  # fmt: skip
    force = getattr(_state, "forced", {}).get(kernel)
    if force is not None:
        return force
    arch = device_arch(device)
    found = _table.get(full_key)
    shipped_ok = not getattr(_state, "remeasure", False)
    if found is None and shipped_ok and (device.type == "cuda" or runtime.target() is not None):
        found = shipped_table(arch).get(full_key)
    if found is not None:
        return found
    if not getattr(_state, "tuning", False) or device.type != "cuda":
        return fallback if fallback is not None else default(kernel, arch, n, b_out_pow2)
    best, best_ms, error = None, float("inf"), None
    for cfg in [*space(kernel, arch, tier(n), b_out_pow2), *([CUBLAS] if cublas else [])]:
        try:
            ms = gpu_time_ms(lambda cfg=cfg: run(cfg))
        except Exception as e:  # a config the compiler or the chip refuses (e.g. shared memory): not a candidate
            error = e
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no launch config of {kernel} runs for {full_key} on sm_{arch}: {error}")
    _table.put(full_key, best)
    return best


def _splits(cfg: Config, programs: int, steps: int, device: torch.device) -> int:
    """How many programs share one reduction of ``steps`` steps: the config's, or (0) enough to fill the GPU; at
    most what a consumer tile of the same height can sum (:func:`~.configs.max_partials`)."""
    want = cfg.split if cfg.split > 0 else round(device_sm_count(device) / max(1, programs))
    return max(1, min(want, steps, max_partials(cfg.BM, device_arch(device))))


def vs_partials(
    cfg: Config, N: int, r: int, b_in: int, device: torch.device, dtype: torch.dtype, layers: int = 1
) -> tuple[int, int]:
    """BLAST V+S with ``cfg`` (``layers`` stacked siblings): (input blocks per program, float32 partials written)."""
    cfg = _effective(cfg, dtype)
    programs = _cdiv(N, cfg.BM) * _cdiv(r, cfg.BN) * layers
    per = _cdiv(b_in, _splits(cfg, programs, b_in, device))
    return per, _cdiv(b_in, per)


def _effective(cfg: Config, dtype: torch.dtype, chunk: int = 0) -> Config:
    """The config as launched: float32 operands take half the reduction step (the tiles' shared memory is sized
    for 2-byte types), and a chunked A operand no longer a step than the chunk's power-of-two ceiling."""
    bk = cfg.BK // 2 if dtype == torch.float32 else cfg.BK
    if chunk:
        bk = min(bk, pow2_at_least(chunk))
    return dataclasses.replace(cfg, BK=max(16, bk))


def _check(
    x: torch.Tensor, factors: dict[str, torch.Tensor], expected: dict[str, tuple], bias: torch.Tensor | None, out: int
) -> None:
    if x.dim() != 2:
        raise ValueError(f"kernels take 2-D input (N, in); got shape {tuple(x.shape)}")
    for name, shape in {"x": (x.shape[0], *expected.pop("x")), **expected}.items():
        actual = tuple(x.shape if name == "x" else factors[name].shape)
        if actual != tuple(shape):
            raise ValueError(f"{name} has shape {actual}; the other factors imply {tuple(shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; the layer has {out} outputs")
    if x.dtype not in DTYPES.values():
        raise TypeError(f"kernels run {', '.join(NAMES[:-1])} and {NAMES[-1]}; got {x.dtype}")
    for name, t in {**factors, **({} if bias is None else {"bias": bias})}.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but the input is {x.dtype}: cast the layer or the input")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if bias is not None and bias.stride(0) != 1:
        raise ValueError("bias must be contiguous")


def _gemm_split(cfg: Config, N: int, K: int, C: int, G: int, like: torch.Tensor) -> tuple[int, int]:
    """(splits, reduction length per split) for a producer launch; 1 split when the config's split is 1 (or the
    stage runs on cuBLAS, which reduces in one pass)."""
    if cfg.engine:
        return 1, K
    device = like.device
    cfg = _effective(cfg, like.dtype)
    programs = _cdiv(N, cfg.BM) * _cdiv(C, cfg.BN) * G
    splits = _splits(cfg, programs, _cdiv(K, cfg.BK), device)
    k_per = _cdiv(_cdiv(K, splits), cfg.BK) * cfg.BK
    return _cdiv(K, k_per), k_per


# ------------------------------------------------------------------------------------------------ constexprs
# What each kernel is specialized on besides dtypes, built in one place: for the launches below, and for the
# ahead-of-time compile of every shipped config (aot.compile_variant), which must build the kernels these launch.
# Keyword defaults are the plain layer's (no split, no prologue, no epilogue, no dependent launch).


def gemm_constexprs(
    cfg: Config, dtype: torch.dtype, *, a_chunk: int = 0, a_split: int = 1, perm: tuple[int, int] = (0, 0),
    bias: bool = False, rms_split: int = 0, eps: float = 0.0, wait: bool = False, launch_deps: bool = False,
    g_fast: bool = False,
) -> dict:  # fmt: skip
    """The grouped GEMM's constexprs for the tile ``cfg`` (as launched: see :func:`_effective`) on ``dtype``
    operands; the keywords as :func:`_gemm`'s, ``rms_split`` the partial sums of squares of a norm before it."""
    return dict(A_CHUNK=a_chunk, A_SPLIT=a_split, PERM_M=perm[0], PERM_B=perm[1], HAS_BIAS=bias,
                RMS_SPLIT=rms_split, EPS=eps, IEEE=dtype == torch.float32, WAIT=wait, LAUNCH_DEPS=launch_deps,
                G_FAST=g_fast, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK)  # fmt: skip


def blast_vs_constexprs(
    cfg: Config, dtype: torch.dtype, b_out_pow2: int, *, launch_deps: bool = False, reduce: bool = False,
    swiglu: bool = False, rms_norm: bool = False, eps: float = 0.0,
) -> dict:  # fmt: skip
    """BLAST's fused V+S constexprs for the tile ``cfg`` (its BN is the rank tile) and ``b_out_pow2`` output
    blocks: ``reduce`` sums the split partials in the kernel, ``swiglu``/``rms_norm`` prologue the input."""
    return dict(B_OUT=b_out_pow2, IEEE=dtype == torch.float32, LAUNCH_DEPS=launch_deps, REDUCE=reduce,
                SWIGLU=swiglu, RMS_NORM=rms_norm, EPS=eps, BM=cfg.BM, BR=cfg.BN, BK=cfg.BK)  # fmt: skip


def mix_dot_config(tile: tuple[int, int, int]) -> Config:
    """The launch config of the batched-MMA S mix with ``tile`` = (BM, BR, num_warps) of
    :func:`~.configs.mix_dot_tiles`."""
    bm, br, warps = tile
    return Config(bm, br, 0, warps, MIX_DOT_STAGES)


def mix_dot_constexprs(cfg: Config, bj: int, bi: int) -> dict:
    """The batched-MMA S mix's constexprs for :func:`mix_dot_config` ``cfg``, ``bj`` x ``bi`` blocks (padded)."""
    return dict(BJ=bj, BI=bi, STAGES=cfg.num_stages, BM=cfg.BM, BR=cfg.BN)


def mix_config(b_out_pow2: int) -> Config:
    """The CUDA-core S mix's launch config: its tile follows the output blocks, never tuned."""
    return Config(*mix_tile(b_out_pow2), 0, num_warps=4, num_stages=3)


def mix_constexprs(cfg: Config, b_out_pow2: int) -> dict:
    return dict(B_OUT=b_out_pow2, BM=cfg.BM, BR=cfg.BN)


def interleave_config(b_pow2: int) -> Config:
    """Monarch's interleave pass's launch config: its tile follows the block count, never tuned."""
    return Config(*interleave_tile(b_pow2), 0, num_warps=4, num_stages=3)


def interleave_constexprs(cfg: Config, b_pow2: int) -> dict:
    return dict(B_P2=b_pow2, BM=cfg.BM, BS=cfg.BN)


# ---------------------------------------------------------------------------------------------------- launches


def _gemm(
    a, a_strides, b, b_strides, out, out_strides, *, N, K, C, G, cfg: Config, pdl: bool, k_per=None,
    bias=None, bias_strides=(0, 0, 0), a_chunk=0, a_split=1, perm=(0, 0), producer=False, consumer=False,
    g_fast=False, rms=None,
) -> None:  # fmt: skip
    """One grouped GEMM launch; ``out_strides`` = (split partial, row, group, column), ``bias_strides`` = (row,
    group, column): a bias vector has row stride 0, a residual its own. ``rms`` = (partial sums of squares
    (splits, N) float32, row length, eps): each row is scaled by its 1/rms before the bias. A ``producer``'s output
    feeds the ``consumer`` launched right after it, which may then start early when ``pdl`` (see :func:`_pdl`).

    With :data:`~.configs.CUBLAS` the launch is one strided-batched cuBLAS GEMM on the same views, where cuBLAS can
    express it: a plain A (no chunks, partials or norm) and an unpermuted B. Elsewhere the table's cuBLAS choice
    falls back to the bucket's Triton default (a table tuned before a stage changed shape must not break it)."""
    if cfg.engine:
        plain = not a_chunk and a_split == 1 and perm == (0, 0) and rms is None and k_per in (None, K)
        if plain:
            s_an, s_ag, s_ak = a_strides[:3]
            _, s_on, s_og, s_oc = out_strides
            d_n, d_g, d_c = bias_strides
            runtime.launch(
                "torch_bmm", None,
                (a, b, out, out if bias is None else bias, G, N, K, C, s_ag, s_an, s_ak,
                 b_strides[0], b_strides[2], b_strides[1], s_og, s_on, s_oc, d_g, d_n, d_c),
                {"HAS_BIAS": bias is not None}, 0, 0,
            )  # fmt: skip
            return
        cfg = default("gemm", device_arch(out.device), N)
    most = max_partials(cfg.BM, device_arch(out.device))
    if a_split > most:
        raise ValueError(
            f"launch config {cfg} sums at most {most} partials (shared memory) but the producer wrote "
            f"{a_split}: pair a one-token producer with a one-token (BM=1) consumer"
        )
    cfg = _effective(cfg, b.dtype, a_chunk)
    k_per = K if k_per is None else k_per
    grid = (_cdiv(N, cfg.BM), _cdiv(C, cfg.BN), G * _cdiv(K, k_per))
    if g_fast:
        grid = grid[::-1]
    runtime.launch(
        "gemm", grid,
        (a, b, out, bias if bias is not None else out, out if rms is None else rms[0], N, K, C, k_per,
         0 if rms is None else rms[1], *a_strides, *b_strides, *out_strides, *bias_strides),
        gemm_constexprs(cfg, b.dtype, a_chunk=a_chunk, a_split=a_split, perm=perm, bias=bias is not None,
                        rms_split=0 if rms is None else rms[0].shape[0], eps=0.0 if rms is None else float(rms[2]),
                        wait=consumer and pdl, launch_deps=producer and pdl, g_fast=g_fast),
        cfg.num_warps, cfg.num_stages, pdl=consumer and pdl,
    )  # fmt: skip


def _dtype_key(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _partials(splits: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An intermediate of ``splits`` float32 partial sums, or one tensor in the input's dtype."""
    return new_buffer((splits, *shape), like, torch.float32 if splits > 1 else None)


COUNTERS = 1 << 14  # arrival counters kept per device: tiles of one V+S launch, ceil(N/BM) * L * ceil(r/BR)
_counter_pool: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, needed: int) -> torch.Tensor:
    """The V+S split reduction's arrival counters on ``device``: zeroed once, and every launch leaves the ones it
    used at zero, so one pool serves every layer (launches on a device's stream run one after another; BLR layers
    of one device must not run concurrently on two streams). A launch that needs more, or one captured into a CUDA
    graph before the pool exists (memory allocated in a capture holds no zeros until replay, and belongs to the
    graph), gets counters of its own, zeroed right before it."""
    pool = _counter_pool.get(device)
    if pool is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        pool = _counter_pool[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    if pool is None or needed > pool.numel():
        return torch.zeros(needed, dtype=torch.int32, device=device)
    replay.note_constant(pool)
    return pool


def pooled_counters(device: torch.device) -> torch.Tensor | None:
    """The arrival-counter pool of ``device``, if a launch made one (tests check it is left at zero)."""
    return _counter_pool.get(device)


def mix_dot_launch(
    n: int, r: int, tiles: list[tuple[int, int, int]], sms: int
) -> tuple[int, int, int, tuple[int, int]]:
    """(BM, BR, num_warps, grid) of the batched-MMA mix over ``n`` tokens and ``r`` ranks on ``sms`` SMs: the
    largest of ``tiles`` (:func:`~.configs.mix_dot_tiles`) giving 2 tiles an SM; one program a tile, or above
    MIX_DOT_ONE_PASS tiles an SM, MIX_DOT_PROGRAMS_PER_SM programs an SM, each walking its rank tile's token tiles."""
    bm, br, warps = next((t for t in tiles if _cdiv(n, t[0]) * _cdiv(r, t[1]) >= 2 * sms), tiles[-1])
    n_tiles, r_tiles = _cdiv(n, bm), _cdiv(r, br)
    if n_tiles * r_tiles > MIX_DOT_ONE_PASS * sms:
        n_tiles = min(n_tiles, _cdiv(MIX_DOT_PROGRAMS_PER_SM * sms, r_tiles))
    return bm, br, warps, (n_tiles, r_tiles)


def vs_reduces(cfg: Config, partials: int, switches: Switches | None = None) -> bool:
    """Whether a V+S launch with ``cfg`` writing ``partials`` sums them itself, so that U reads one w."""
    reduce_splits = (switches if switches is not None else dispatch.current()).reduce_splits
    return partials > 1 and bool(cfg.reduce) and reduce_splits


def _input_prologue(x: torch.Tensor, width: int, swiglu: bool, norm: tuple[torch.Tensor, float] | None):
    """silu(gate) * up or RMSNorm of x (N, width, or 2*width for SwiGLU) in one pass: the layer's input."""
    out = new_buffer((x.shape[0], width), x)
    block = 1024 if swiglu else pow2_at_least(width)  # a norm's program holds its whole row
    runtime.launch(
        "input_prologue", (x.shape[0], _cdiv(width, block)),
        (x, x if norm is None else norm[0], out, width, x.stride(0), x.stride(1), out.stride(0)),
        dict(SWIGLU=swiglu, RMS_NORM=norm is not None, EPS=0.0 if norm is None else float(norm[1]), BLOCK=block),
        num_warps=4 if swiglu else 8, num_stages=1,
    )  # fmt: skip
    return out


@_planned
def blast_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
    swiglu: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (N, b_in*q); U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r) -> (N, b_out*p). Or L stacked sibling
    layers of that shape reading the same x: U (L, b_out, p, r), S (L, b_out, b_in, r), V (L, b_in, q, r), bias
    (L*b_out*p,) -> (N, L*b_out*p), layer l in columns l*b_out*p ...

    What a pre-norm residual block puts around the layer can run inside it (see ``blast.py``):
    ``swiglu``: x (N, 2*b_in*q) is a gated MLP's [gate | up] and the input is silu(gate) * up; ``norm`` = (g, eps):
    the input is RMSNorm(x) with weight g (b_in*q,); ``residual`` (N, L*b_out*p) is added in the U stage's
    epilogue. The fused V+S stage applies the first two as it loads x; the staged path (and float16 with a norm
    above one token) in one pass first, as unfused.

    Few tokens, and any number for b_out <= 4: V and S fused (z stays on chip), then U; stacked layers share both
    launches. Otherwise (:func:`~.dispatch.blast_staged`), per layer: V as a grouped GEMM writing z, the S mix at
    memory speed, then U (see ``blast_mix_kernel`` for why)."""
    lead = U.shape[:1] if U.dim() == 4 else ()  # stacked siblings: L
    L, b_out, p, r = U.shape if lead else (1, *U.shape)
    b_in, q = V.shape[len(lead) : len(lead) + 2]
    m = b_out * p
    if swiglu and norm is not None:
        raise ValueError("a BLAST layer takes SwiGLU or RMSNorm on its input, not both")
    factors = {"U": U, "S": S, "V": V}
    expected = {"x": ((2 if swiglu else 1) * b_in * q,), "S": (*lead, b_out, b_in, r), "V": (*lead, b_in, q, r)}
    if norm is not None:
        factors["norm weight"], expected["norm weight"] = norm[0], (b_in * q,)
        if norm[0].dim() == 1 and norm[0].stride(0) != 1:
            raise ValueError("the norm weight must be contiguous")
    if residual is not None:
        factors["residual"], expected["residual"] = residual, (x.shape[0], L * m)
    _check(x, factors, expected, bias, L * m)
    if not lead:
        U, S, V = U[None], S[None], V[None]
    N = x.shape[0]
    b_out_pow2 = pow2_at_least(b_out)
    switches = dispatch.current()
    staged = blast_staged(N, b_out, switches)
    # The V GEMM's tiles take no prologue: one pass first. Nor does float16 take the norm in a 16+-row V+S tile:
    # the tensor cores need x * g in float16 before 1/rms scales it, and a residual stream's outliers times g can
    # pass 65504 where the normalized input would not.
    fp16_norm = norm is not None and x.dtype == torch.float16 and N > 1
    if fp16_norm or (staged and (swiglu or norm is not None)):
        x, swiglu, norm = _input_prologue(x, b_in * q, swiglu, norm), False, None
    if residual is not None and bias is not None:
        residual, bias = residual + bias, None  # the epilogue adds one addend; no model here has both
    y = new_buffer((N, L * m), x)
    if N == 0:
        return y
    shape_key = f"{b_in}x{q}->{b_out}x{p}|r{r}|{_dtype_key(x)}"  # one layer's shape: the many-token launches
    # The prologues share the plain layer's configs: they add a few KB of input loads to a stream of weights.
    vs_key = f"{b_in}x{q}->{b_out}x{p}|r{r}|{'' if L == 1 else f'L{L}|'}{_dtype_key(x)}"
    pdl = _pdl(x.device, N, switches)

    def vs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w (partials or their sum) and, for a norm over split programs, their partial sums of squares."""
        per, partials = vs_partials(cfg, N, r, b_in, x.device, x.dtype, L)
        cfg = _effective(cfg, x.dtype)
        w = _partials(partials, (N, L * b_out, r), x)
        grid = (_cdiv(N, cfg.BM), L * _cdiv(r, cfg.BN), w.shape[0])
        counters = _counters(x.device, grid[0] * grid[1]) if vs_reduces(cfg, partials, switches) else None
        red = w[0] if counters is None else new_buffer((N, L * b_out, r), x, torch.float32)
        sq = new_buffer((partials, N), x, torch.float32) if norm is not None else x
        runtime.launch(
            "blast_vs", grid,
            (x, V, S, w, red, w if counters is None else counters, x if norm is None else norm[0], sq,
             N, q, r, b_in, b_out, per,
             x.stride(0), x.stride(1), *V.stride(), *S.stride(), *w.stride(), *red.stride()),
            blast_vs_constexprs(cfg, x.dtype, b_out_pow2, launch_deps=pdl, reduce=counters is not None,
                                swiglu=swiglu, rms_norm=norm is not None, eps=0.0 if norm is None else float(norm[1])),
            cfg.num_warps, cfg.num_stages,
        )  # fmt: skip
        return w if counters is None else red[None], sq if norm is not None and partials > 1 else None

    def v(V: torch.Tensor, cfg: Config) -> torch.Tensor:
        z = new_buffer((N, b_in, r), x)
        _gemm(
            x, (x.stride(0), q * x.stride(1), x.stride(1), 0, 0), V, (V.stride(0), V.stride(2), V.stride(1)),
            z, (0, *z.stride()), N=N, K=q, C=r, G=b_in, cfg=cfg, pdl=pdl,
        )  # fmt: skip
        return z

    def mix(z: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        w = new_buffer((1, N, b_out, r), x)
        bj, bi = max(16, pow2_at_least(b_in)), max(16, b_out_pow2)  # the MMA's smallest K and N
        tiles = mix_dot_tiles(device_arch(x.device), bj, bi)
        args = (z, S, w, N, r, b_in, b_out, *z.stride(), *S.stride(), *w.stride()[1:])
        if switches.mix_dot and x.dtype != torch.float32 and tiles:
            bm, br, warps, grid = mix_dot_launch(N, r, tiles, device_sm_count(x.device))
            # The tile follows N, and a bundle is packaged at one N a bucket: it records them all.
            packaging = isinstance(runtime.backend(), runtime.Recorder)
            for tile in tiles if packaging else [(bm, br, warps)]:
                cfg = mix_dot_config(tile)
                runtime.launch(
                    "blast_mix_dot", grid, args, mix_dot_constexprs(cfg, bj, bi), cfg.num_warps, cfg.num_stages
                )  # fmt: skip
            return w
        cfg = mix_config(b_out_pow2)
        runtime.launch(
            "blast_mix", (_cdiv(N, cfg.BM), _cdiv(r, cfg.BN)), args, mix_constexprs(cfg, b_out_pow2),
            cfg.num_warps, cfg.num_stages,
        )  # fmt: skip
        return w

    def addend(lo: int, hi: int) -> tuple[torch.Tensor | None, tuple[int, int, int]]:
        """What the U stage adds to output columns lo:hi, with (row, group, column) strides."""
        if residual is not None:
            res = residual[:, lo:hi]
            return res, (res.stride(0), p * res.stride(1), res.stride(1))
        return (None, (0, 0, 0)) if bias is None else (bias[lo:hi], (0, p, 1))

    def u(w: torch.Tensor, U: torch.Tensor, y: torch.Tensor, add, cfg: Config, sq: torch.Tensor | None = None):
        _gemm(
            w, (w.stride(1), w.stride(2), w.stride(3), 0, w.stride(0)), U, U.stride(),
            y, (0, y.stride(0), p, 1), N=N, K=r, C=p, G=U.shape[0], cfg=cfg, pdl=pdl,
            bias=add[0], bias_strides=add[1], a_split=w.shape[0], consumer=True,
            rms=None if sq is None else (sq, b_in * q, norm[1]),
        )  # fmt: skip

    # The V and U GEMMs may also run on cuBLAS (a tuning candidate, recorded per shape and bucket; issue #23): the
    # kernels stay the default, as an H100 sweep timed torch.bmm on these views no faster (bench/NOTES.md,
    # "The staged layer's pieces against cuBLAS"). float32 stays on the kernels (IEEE, whatever TF32 says).
    cublas = x.dtype != torch.float32
    if staged:  # compute-bound: one layer at a time, each into its columns of y
        for layer in range(L):
            Vl, Sl, Ul = V[layer], S[layer], U[layer]
            cfg = choose_config("gemm", f"blast_v|{shape_key}", N, x.device, lambda c, Vl=Vl: v(Vl, c), cublas=cublas)
            w = mix(v(Vl, cfg), Sl)
            yl, al = y[:, layer * m : (layer + 1) * m], addend(layer * m, (layer + 1) * m)
            key = f"blast_u|{shape_key}|split1"
            cfg = choose_config("gemm", key, N, x.device, lambda c, w=w, Ul=Ul, yl=yl, al=al: u(w, Ul, yl, al, c),
                                cublas=cublas)  # fmt: skip
            u(w, Ul, yl, al, cfg)
        return y
    try:
        U_all = U.view(L * b_out, p, r)
    except RuntimeError as exc:
        raise ValueError("stacked U must be one (L*b_out, p, r) view: store the siblings' U contiguously") from exc
    add = addend(0, L * m)
    u_default = default("gemm", device_arch(x.device), N)

    def vs_then_u(cfg: Config) -> None:  # what tuning V+S times: the U stage reading its output included
        w, sq = vs(cfg)
        u(w, U_all, y, add, u_default, sq)

    w, sq = vs(choose_config("blast_vs", vs_key, N, x.device, vs_then_u, b_out_pow2))
    u_key = f"blast_u|{vs_key}|split{w.shape[0]}"
    plain = cublas and w.shape[0] == 1 and sq is None  # what cuBLAS can read: one w, no norm to apply
    u(w, U_all, y, add, choose_config("gemm", u_key, N, x.device, lambda c: u(w, U_all, y, add, c, sq), cublas=plain),
      sq)  # fmt: skip
    return y


@_planned
def monarch_forward(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (N, b*in_blk); w1 (b, R, in_blk), w2 (b, out_blk, R) -> (N, out_blk*b), outputs interleaved as canonical.

    Stage 1 reads w1's rows in the order l*m + u <- u*b + l (m = R/b), so block k's output is stored grouped by the
    stage-2 block l it feeds; stage 2 then gathers its input as b contiguous chunks of m, one from each stage-1
    block, and stores output s of block l at column s*b + l. The permutation costs no pass over memory."""
    b, R, in_blk = w1.shape
    out_blk = w2.shape[1]
    _check(x, {"w1": w1, "w2": w2}, {"x": (b * in_blk,), "w2": (b, out_blk, R)}, bias, b * out_blk)
    if R % b:
        raise ValueError(f"Monarch width R={R} must be a multiple of the number of blocks b={b}")
    m = R // b
    N = x.shape[0]
    y = new_buffer((N, out_blk * b), x)
    if N == 0:
        return y
    shape_key = f"b{b}|{in_blk}->{out_blk}|R{R}|{_dtype_key(x)}"
    switches = dispatch.current()
    pdl = _pdl(x.device, N, switches)
    # Few tokens: stage 2 stores straight into y's interleaved columns. Many: block-major o, then one interleave pass.
    direct = monarch_direct(N, switches)

    def stage1(cfg: Config) -> torch.Tensor:
        splits, k_per = _gemm_split(cfg, N, in_blk, R, b, x)
        h = _partials(splits, (N, b, R), x)
        _gemm(
            x, (x.stride(0), in_blk * x.stride(1), x.stride(1), 0, 0), w1, w1.stride(),
            h, h.stride(), N=N, K=in_blk, C=R, G=b, cfg=cfg, pdl=pdl, k_per=k_per, perm=(m, b), producer=True,
        )  # fmt: skip
        return h

    def stage2(h: torch.Tensor, cfg: Config) -> None:
        o = y if direct else new_buffer((N, b, out_blk), x)
        _gemm(
            h, (h.stride(1), m * h.stride(3), h.stride(3), h.stride(2), h.stride(0)), w2, w2.stride(),
            o, (0, y.stride(0), 1, b) if direct else (0, *o.stride()), N=N, K=R, C=out_blk, G=b, cfg=cfg, pdl=pdl,
            bias=bias, bias_strides=(0, 1, b), a_chunk=m, a_split=h.shape[0], consumer=True, g_fast=direct,
        )  # fmt: skip
        if not direct:
            b_pow2 = pow2_at_least(b)
            tile = interleave_config(b_pow2)
            runtime.launch(
                "interleave", (_cdiv(N, tile.BM), _cdiv(out_blk, tile.BN)),
                (o, y, N, b, out_blk, *o.stride(), y.stride(0)), interleave_constexprs(tile, b_pow2),
                tile.num_warps, tile.num_stages,
            )  # fmt: skip

    h = stage1(choose_config("gemm", f"monarch_1|{shape_key}", N, x.device, stage1))
    stage2(h, choose_config("gemm", f"monarch_2|{shape_key}|split{h.shape[0]}", N, x.device, lambda c: stage2(h, c)))
    return y


@_planned
def lowrank_forward(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (N, in); U (out, r), V (in, r) -> (N, out). Or L stacked sibling layers of that shape reading the same x:
    U (L, out, r), V (L, in, r), bias (L*out,) -> (N, L*out), layer l in columns l*out ...: both stages are
    grouped GEMMs over the L layers (every group of the first reads the same x)."""
    lead = U.shape[:1] if U.dim() == 3 else ()
    L, out_f, r = U.shape if lead else (1, *U.shape)
    in_f = V.shape[-2]
    _check(x, {"U": U, "V": V}, {"x": (in_f,), "V": (*lead, in_f, r)}, bias, L * out_f)
    if not lead:
        U, V = U[None], V[None]
    N = x.shape[0]
    y = new_buffer((N, L * out_f), x)
    if N == 0:
        return y
    shape_key = f"{in_f}->{out_f}|r{r}|{'' if L == 1 else f'L{L}|'}{_dtype_key(x)}"
    pdl = _pdl(x.device, N, dispatch.current())
    # Above one token both 16-bit stages default to cuBLAS: two torch GEMMs of the same rank beat ours at 16+ tokens
    # on every reference layer measured (issue #23's H200 table: Llama-7B q at 64 tokens 18.1 against 51.0 µs, down
    # 29.2 against 119.2); at one token ours tie them (17.0 against 17.2) and keep split-K and dependent launches.
    # float32 stays on the kernels, which compute it in IEEE float32 whatever torch's TF32 settings say.
    engine = CUBLAS if N > 1 and x.dtype != torch.float32 else None

    def stage1(cfg: Config) -> torch.Tensor:
        splits, k_per = _gemm_split(cfg, N, in_f, r, L, x)
        t = _partials(splits, (N, L, r), x)
        _gemm(
            x, (x.stride(0), 0, x.stride(1), 0, 0), V, (V.stride(0), V.stride(2), V.stride(1)),
            t, t.stride(), N=N, K=in_f, C=r, G=L, cfg=cfg, pdl=pdl, k_per=k_per, producer=True,
        )  # fmt: skip
        return t

    def stage2(t: torch.Tensor, cfg: Config) -> None:
        _gemm(
            t, (t.stride(1), t.stride(2), t.stride(3), 0, t.stride(0)), U, U.stride(),
            y, (0, y.stride(0), out_f, 1), N=N, K=r, C=out_f, G=L, cfg=cfg, pdl=pdl,
            bias=bias, bias_strides=(0, out_f, 1), a_split=t.shape[0], consumer=True,
        )  # fmt: skip

    key1, key2 = f"lowrank_1|{shape_key}", f"lowrank_2|{shape_key}"
    t = stage1(choose_config("gemm", key1, N, x.device, stage1, cublas=True, fallback=engine))
    split = t.shape[0]
    cfg2 = choose_config("gemm", f"{key2}|split{split}", N, x.device, lambda c: stage2(t, c), cublas=split == 1,
                         fallback=engine if split == 1 else None)  # fmt: skip
    stage2(t, cfg2)
    return y
