"""Launch configurations: the curated space per architecture, the token buckets, and the table of chosen ones.

A config is what Triton specializes a kernel on besides dtypes: tile sizes, warps, pipeline stages, and how many
programs share one reduction (``split``). The table maps a key (kernel, layer shape, dtype, token bucket) to the
config chosen for it: timed on the GPU at hand while :func:`blrdeploy.kernels.tuning` is on, or read from a file
(a bundle ships one per target), else the heuristic default of the bucket.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from blrdeploy.files import atomic_write_text

TABLE_FORMAT = 2  # 2: entries may name cuBLAS (engine 1); a table without one is still written as format 1
_READABLE_FORMATS = (1, 2)
BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384)  # a token count N is served by the first bucket >= N
SMALL_N = 16  # up to here the layer is memory-bound: few token rows, split the work over weights instead


@dataclass(frozen=True)
class Config:
    BM: int  # token rows per program
    BN: int  # output columns (grouped GEMM) or ranks (BLAST V+S) per program
    BK: int  # reduction step
    num_warps: int
    num_stages: int
    # Programs sharing one reduction, each writing a float32 partial that the next stage sums while loading (or,
    # with ``reduce``, the last of them sums): BLAST V+S splits the input blocks, a small-N GEMM producer its
    # reduction. 0 = enough to fill the GPU.
    split: int = 1
    # BLAST V+S with split > 1: 1 = the last program of each tile sums the partials once, so the U stage reads one
    # w instead of every partial (less L2 traffic on large layers, a serial step more on small ones).
    reduce: int = 0
    # 1 = the stage runs on cuBLAS (one strided-batched torch.bmm on the kernel's views), not a Triton kernel:
    # :data:`CUBLAS`. A choice of engine is a config like any other, so the table records per layer shape and token
    # bucket which one won.
    engine: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        try:
            return cls(**{k: int(v) for k, v in d.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"not a kernel config: {d!r} ({e})") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.engine:
            del d["engine"]  # Triton: tables read the same as before engines existed
        return d


CUBLAS = Config(0, 0, 0, 0, 0, engine=1)  # its tile fields mean nothing


def bucket(n: int) -> int:
    for b in BUCKETS:
        if n <= b:
            return b
    return BUCKETS[-1]


# The curated spaces, in three tiers by token count. Every entry is compiled ahead of time for sm_86/87/90 in CI,
# so keep them few.
# One token (decode at batch 1) is a matrix-vector product: BM = 1 selects the kernels' multiply-and-reduce path,
# whose tiles hold only weights (a 16-row MMA tile spends most of its registers and shared memory on masked rows),
# so each program can keep a large share of the weights in flight. The small tier is tried too. These tiles are not
# pipelined through shared memory (Triton keeps the multiply-and-reduce operands in registers; num_stages changes
# nothing), so they fit every architecture and may sum many partials (max_partials).
# Small N is weight-bandwidth bound: 16-row tiles (the tensor cores' minimum), narrow columns, and small enough
# shared memory per program that several programs per SM keep weight loads in flight (with one single-step 32 KB
# tile per program, Llama-7B q/k/v/o Monarch at N=1 moved its 16.8 MB at 0.9 TB/s on an H200). Large N:
# tensor-core tiles.
# sm_86 (A40) and sm_87 (Orin) have 100/164 KB of shared memory per block against sm_90's 227 KB: fewer stages.
_GEMM_ONE = [
    Config(1, 16, 512, 4, 3, split=0),
    Config(1, 32, 256, 4, 3, split=0),
    Config(1, 64, 128, 4, 3, split=0),
    Config(1, 16, 1024, 8, 2, split=0),
    Config(1, 8, 1024, 4, 2, split=0),
    Config(1, 32, 512, 8, 2, split=0),
    Config(1, 8, 2048, 8, 1, split=0),
    Config(1, 16, 2048, 8, 1, split=0),
]
_GEMM_SMALL = [
    Config(16, 64, 128, 4, 4, split=0),
    Config(16, 64, 64, 4, 6, split=0),
    Config(16, 32, 128, 4, 4, split=0),
    Config(16, 128, 64, 4, 4, split=0),
    Config(16, 32, 256, 4, 3, split=0),
    Config(16, 16, 128, 4, 4, split=0),
    Config(16, 16, 256, 4, 3, split=0),
]
_GEMM_LARGE_90 = [
    Config(128, 128, 64, 8, 3),
    Config(128, 256, 64, 8, 3),
    Config(64, 128, 64, 4, 4),
    Config(128, 64, 64, 4, 4),
]
_GEMM_LARGE_8X = [Config(128, 128, 32, 8, 3), Config(64, 128, 64, 4, 3), Config(128, 64, 32, 4, 3)]
# BLAST V+S holds b_out accumulators of BM x BR: the large tiles are filtered by VS_ACC_LIMIT for the layer's b_out.
# Its one-token tiles walk V's q rows (BK) with r contiguous (BR); split > 4 gives each program fewer input blocks.
_VS_ONE = [
    Config(1, 32, 256, 4, 3, split=0),
    Config(1, 64, 128, 4, 3, split=0),
    Config(1, 64, 256, 8, 2, split=0),
    Config(1, 32, 256, 4, 2, split=8),
    Config(1, 64, 256, 8, 2, split=16),
    Config(1, 128, 64, 4, 4, split=0),
    Config(1, 32, 256, 8, 2, split=16),
    Config(1, 64, 256, 8, 2, split=4),
    Config(1, 32, 256, 4, 2, split=8, reduce=1),
    Config(1, 64, 256, 8, 2, split=16, reduce=1),
    Config(1, 32, 256, 8, 2, split=16, reduce=1),
    Config(1, 64, 256, 8, 2, split=4, reduce=1),
]
_VS_SMALL = [
    Config(16, 32, 128, 4, 4, split=0),
    Config(16, 64, 64, 4, 4, split=0),
    Config(16, 32, 64, 4, 6, split=0),
    Config(16, 16, 256, 4, 3, split=0),
    Config(16, 64, 128, 4, 3, split=0),
]
_VS_LARGE_90 = [
    Config(64, 32, 128, 8, 3),
    Config(32, 64, 128, 8, 3),
    Config(64, 32, 256, 8, 2),
    Config(64, 64, 128, 8, 3),
    Config(128, 64, 64, 8, 3),
]
_VS_LARGE_8X = [Config(64, 32, 64, 8, 2), Config(32, 64, 64, 4, 2), Config(64, 64, 64, 8, 2)]
VS_ACC_LIMIT = 32768  # b_out_pow2 * BM * BR fp32 accumulators: 128 registers a thread at 8 warps

# BLAST's many-token S mix as batched MMAs: (BM, BR, num_warps), largest first; the launcher takes the first that
# fits the chip's shared memory (mix_dot_shared) and gives 2 tiles an SM. Up to MIX_DOT_ONE_PASS tiles an SM each
# program takes one; beyond, MIX_DOT_PROGRAMS_PER_SM programs an SM walk them (H100, bench/NOTES.md: Llama-7B's 4-6
# tiles an SM ran fastest one each, DiT's 16-23 1.1-1.15x faster with 4 programs an SM).
MIX_DOT_TILES = ((64, 32, 4), (32, 16, 4), (16, 8, 8))
MIX_DOT_STAGES = 2
MIX_DOT_ONE_PASS = 8
MIX_DOT_PROGRAMS_PER_SM = 4
SHARED_LIMIT = {86: 101376, 87: 166912, 89: 101376, 90: 232448}  # bytes a program may opt in to, per arch


def mix_dot_shared(bm: int, br: int, bj: int, bi: int) -> int:
    """Shared memory of the mix tile (BM, BR) over blocks padded to bj x bi: the z and S operands' staging, as the
    compiler reported it for 16 and 32 blocks (tests/test_aot checks every shipped variant)."""
    return 2 * br * bj * (bm + bi)


def mix_dot_tiles(arch: int, bj: int, bi: int) -> list[tuple[int, int, int]]:
    """The mix tiles that fit ``arch``'s shared memory for blocks padded to bj x bi (powers of two, at least the
    MMA's 16), largest first; none for very many blocks, which take the CUDA-core mix."""
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    return [t for t in MIX_DOT_TILES if mix_dot_shared(t[0], t[1], bj, bi) <= limit]


KERNELS = ("gemm", "blast_vs")
TIERS = ("one", "small", "large")
_SMALL_SMEM_ARCHS = (86, 89)  # ~100 KB of shared memory per program, against 163 KB (sm_80/87) and 227 KB (sm_90)


def max_partials(bm: int, arch: int) -> int:
    """How many float32 partials a consumer tile of ``bm`` rows may sum while loading its A operand, so how many a
    producer may write. A 16-row tile pipelines one (16, BK) load per partial through shared memory: 4 fit sm_87
    and sm_90, 2 fit sm_86 (tests/test_aot checks every shipped config against each chip's limit). One-token
    tiles hold their operands in registers: 16."""
    if bm == 1:
        return 16
    return 2 if arch in _SMALL_SMEM_ARCHS else 4


def tier(n: int) -> str:
    """The tier of configs serving ``n`` tokens."""
    return "one" if n == 1 else "small" if n <= SMALL_N else "large"


def vs_fits(cfg: Config, b_out_pow2: int) -> bool:
    return b_out_pow2 * cfg.BM * cfg.BN <= VS_ACC_LIMIT


def space(kernel: str, arch: int, which: str | None = None, b_out_pow2: int | None = None) -> list[Config]:
    """The configs tried for ``kernel`` on compute capability ``arch`` (e.g. 90): all, or those of one tier
    (``which``; the one-token tier also tries the small one's); ``b_out_pow2`` drops the BLAST V+S tiles whose
    accumulators would not fit for that many output blocks."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    if which not in (None, *TIERS):
        raise ValueError(f"unknown tier {which!r}; known: {', '.join(TIERS)}")
    hopper = arch >= 90
    if kernel == "gemm":
        one, small, large = _GEMM_ONE, _GEMM_SMALL, _GEMM_LARGE_90 if hopper else _GEMM_LARGE_8X
    else:
        one, small, large = _VS_ONE, _VS_SMALL, _VS_LARGE_90 if hopper else _VS_LARGE_8X
    configs = {None: [*one, *small, *large], "one": [*one, *small], "small": small, "large": large}[which]
    if kernel == "blast_vs" and b_out_pow2 is not None:
        configs = [c for c in configs if vs_fits(c, b_out_pow2)]
    return list(configs)


def default(kernel: str, arch: int, n: int, b_out_pow2: int | None = None) -> Config:
    return space(kernel, arch, tier(n), b_out_pow2)[0]


class ConfigTable:
    """Chosen configs by key; ``source`` says where they came from ("measured on <gpu>" or a file)."""

    def __init__(self, arch: int | None = None, entries: dict[str, Config] | None = None, source: str = "") -> None:
        self.arch = arch
        self.entries: dict[str, Config] = dict(entries or {})
        self.source = source
        self.version = 0  # bumped by every put: launch plans (kernels/replay.py) made before it are stale

    def get(self, key: str) -> Config | None:
        return self.entries.get(key)

    def put(self, key: str, config: Config) -> None:
        self.entries[key] = config
        self.version += 1

    def to_json(self) -> dict:
        return {
            "format": TABLE_FORMAT if any(c.engine for c in self.entries.values()) else 1,
            "arch": self.arch,
            "source": self.source,
            "entries": {k: c.to_dict() for k, c in sorted(self.entries.items())},
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "config table") -> ConfigTable:
        if (
            not isinstance(data, dict)
            or data.get("format") not in _READABLE_FORMATS
            or not isinstance(data.get("entries"), dict)
        ):
            raise ValueError(f"{where}: not a blrdeploy kernel config table (formats {_READABLE_FORMATS})")
        entries = {}
        for k, v in data["entries"].items():
            try:
                entries[k] = Config.from_dict(v)
            except ValueError as e:
                raise ValueError(f"{where}: entry {k!r}: {e}") from None
        return cls(data.get("arch"), entries, data.get("source", ""))

    def save(self, path: str | os.PathLike) -> None:
        """Atomic: the file is either the old table or the complete new one."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConfigTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no kernel config table at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt kernel config table ({e})") from None
        return cls.from_json(data, str(path))
