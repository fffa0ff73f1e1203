"""Kernels against the float64 reference: on the GPU when there is one, else under Triton's interpreter.

Every buffer a launcher allocates is poisoned with NaN first, so an element the kernels never write fails the
check; inputs are fresh random draws with odd sizes that no tile divides, and strided (non-contiguous) rows.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_rel_close

from blrdeploy.kernels import Config, ConfigTable, configs, dispatch, launch, replay, runtime
from blrdeploy.structures import functional

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    real = launch.new_buffer

    def new_buffer(shape, like, dtype=None):
        return real(shape, like, dtype).fill_(float("nan"))

    monkeypatch.setattr(launch, "new_buffer", new_buffer)


def _rand(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _strided_input(gen, n, features, dtype):
    """Rows 3 elements longer than the layer's input, so x is a non-contiguous view."""
    return _rand(gen, n, features + 3, dtype=dtype)[:, :features]


def _blast(gen, dtype, n, b_in, q, b_out, p, r, bias=True, layers=None):
    """One layer, or ``layers`` stacked siblings (a leading L on every factor, L*b_out*p outputs)."""
    x = _strided_input(gen, n, b_in * q, dtype)
    lead = () if layers is None else (layers,)
    U = _rand(gen, *lead, b_out, p, r, dtype=dtype, scale=r**-0.5)
    S = _rand(gen, *lead, b_out, b_in, r, dtype=dtype)
    V = _rand(gen, *lead, b_in, q, r, dtype=dtype, scale=(b_in * q) ** -0.5)
    b = _rand(gen, (layers or 1) * b_out * p, dtype=dtype) if bias else None
    return launch.blast_forward, functional.blast_reference, (x, U, S, V, b)


def _blast_fused(gen, dtype, n, b_in, q, b_out, p, r, bias=True, layers=None, swiglu=False, norm=False, res=False):
    """A BLAST layer with a pre-norm block's pieces inside: its input silu(gate) * up of x = [gate | up] (N,
    2*b_in*q, strided) or RMSNorm(x); a residual (N, out, strided) added to its output."""
    _, _, (x, U, S, V, b) = _blast(gen, dtype, n, b_in, q, b_out, p, r, bias, layers)
    if swiglu:
        x = _strided_input(gen, n, 2 * b_in * q, dtype)
    g = (1 + 0.2 * _rand(gen, b_in * q, dtype=torch.float64)).to(dtype) if norm else None
    residual = _strided_input(gen, n, (layers or 1) * b_out * p, dtype) if res else None
    fused = dict(norm_eps=1e-5 if norm else None, swiglu=swiglu)

    def forward(x, U, S, V, b, g, residual):
        norm = None if g is None else (g, fused["norm_eps"])
        return launch.blast_forward(x, U, S, V, b, swiglu=fused["swiglu"], norm=norm, residual=residual)

    def reference(x, U, S, V, b, g, residual):
        eps = fused["norm_eps"] or 0.0
        return functional.blast_fused_reference(x, U, S, V, b, swiglu, norm_weight=g, eps=eps, residual=residual)

    return forward, reference, (x, U, S, V, b, g, residual)


def _monarch(gen, dtype, n, b, R, in_blk, out_blk, bias=True):
    x = _strided_input(gen, n, b * in_blk, dtype)
    w1 = _rand(gen, b, R, in_blk, dtype=dtype, scale=in_blk**-0.5)
    w2 = _rand(gen, b, out_blk, R, dtype=dtype, scale=R**-0.5)
    bb = _rand(gen, b * out_blk, dtype=dtype) if bias else None
    return launch.monarch_forward, functional.monarch_reference, (x, w1, w2, bb)


def _lowrank(gen, dtype, n, in_f, out_f, r, bias=True, layers=None):
    """One layer, or ``layers`` stacked siblings (a leading L on U and V, L*out_f outputs)."""
    x = _strided_input(gen, n, in_f, dtype)
    lead = () if layers is None else (layers,)
    U = _rand(gen, *lead, out_f, r, dtype=dtype, scale=r**-0.5)
    V = _rand(gen, *lead, in_f, r, dtype=dtype, scale=in_f**-0.5)
    b = _rand(gen, (layers or 1) * out_f, dtype=dtype) if bias else None
    return launch.lowrank_forward, functional.lowrank_reference, (x, U, V, b)


CASES = {
    "blast-1tok": lambda g, dt: _blast(g, dt, 1, 3, 20, 2, 24, 17),
    "blast-odd": lambda g, dt: _blast(g, dt, 37, 4, 9, 3, 11, 33, bias=False),
    "blast-b5": lambda g, dt: _blast(g, dt, 19, 5, 16, 5, 16, 48),
    "blast-many": lambda g, dt: _blast(g, dt, 97, 3, 24, 5, 8, 40),  # above BLAST_FUSED_MAX_N: V GEMM, mix, U
    "blast-b5-1tok": lambda g, dt: _blast(g, dt, 1, 5, 16, 5, 16, 48),
    "blast-stack3-1tok": lambda g, dt: _blast(g, dt, 1, 3, 20, 2, 24, 17, layers=3),  # sibling layers stacked
    "blast-stack2-odd": lambda g, dt: _blast(g, dt, 37, 4, 9, 3, 11, 33, bias=False, layers=2),
    "blast-stack2-many": lambda g, dt: _blast(g, dt, 97, 3, 24, 5, 8, 40, layers=2),  # one layer at a time
    "blast-stack3-few-many": lambda g, dt: _blast(g, dt, 97, 3, 24, 3, 8, 40, layers=3),  # b_out <= 4: fused
    "blast-b2-many": lambda g, dt: _blast(g, dt, 131, 3, 24, 2, 8, 40),  # a lone layer too, no tile divides 131
    # a pre-norm block's pieces inside the layer: SwiGLU or RMSNorm as V+S loads x, the residual in U's epilogue
    "blast-swiglu-1tok": lambda g, dt: _blast_fused(g, dt, 1, 3, 20, 2, 24, 17, swiglu=True),
    "blast-swiglu-odd": lambda g, dt: _blast_fused(g, dt, 37, 4, 9, 3, 11, 33, bias=False, swiglu=True),
    "blast-swiglu-many": lambda g, dt: _blast_fused(g, dt, 97, 3, 24, 5, 8, 40, swiglu=True),  # one pass first
    "blast-swiglu-few-many": lambda g, dt: _blast_fused(g, dt, 97, 3, 24, 1, 8, 40, swiglu=True),  # in V+S
    "blast-norm-res-1tok": lambda g, dt: _blast_fused(g, dt, 1, 3, 20, 2, 24, 17, norm=True, res=True),
    "blast-norm-odd": lambda g, dt: _blast_fused(g, dt, 37, 4, 80, 3, 11, 33, bias=False, norm=True),  # 2 chunks
    "blast-norm-stack3-1tok": lambda g, dt: _blast_fused(g, dt, 1, 3, 20, 2, 24, 17, layers=3, norm=True),
    "blast-norm-stack2-odd": lambda g, dt: _blast_fused(g, dt, 37, 4, 80, 3, 11, 33, layers=2, norm=True),
    "blast-res-stack2-odd": lambda g, dt: _blast_fused(g, dt, 37, 4, 9, 3, 11, 33, layers=2, res=True),
    "blast-norm-res-many": lambda g, dt: _blast_fused(g, dt, 97, 3, 24, 5, 8, 40, layers=2, norm=True, res=True),
    "blast-norm-res-few-many": lambda g, dt: _blast_fused(
        g, dt, 97, 3, 24, 3, 8, 40, layers=2, norm=True, res=True
    ),  # fused V+S at many tokens: the norm in its 16+-row tiles
    "monarch-1tok": lambda g, dt: _monarch(g, dt, 1, 2, 8, 12, 10),
    "monarch-wide-1tok": lambda g, dt: _monarch(g, dt, 1, 2, 64, 12, 10),
    "monarch-odd": lambda g, dt: _monarch(g, dt, 23, 3, 9, 7, 5, bias=False),
    "monarch-b4": lambda g, dt: _monarch(g, dt, 70, 4, 32, 16, 24),  # above MONARCH_DIRECT_MAX_N: interleave pass
    "monarch-wide": lambda g, dt: _monarch(g, dt, 21, 2, 64, 12, 10),  # chunk of 32: contiguous A steps
    "lowrank-1tok": lambda g, dt: _lowrank(g, dt, 1, 30, 21, 5),
    "lowrank-long-1tok": lambda g, dt: _lowrank(g, dt, 1, 100, 21, 5),  # 7 partials with 16-long steps
    "monarch-long-1tok": lambda g, dt: _monarch(g, dt, 1, 2, 8, 40, 10),  # 3 partials, then a chunked A
    "lowrank-odd": lambda g, dt: _lowrank(g, dt, 41, 19, 26, 12, bias=False),
    "lowrank-stack3-1tok": lambda g, dt: _lowrank(g, dt, 1, 100, 21, 5, layers=3),  # split partials, 3 groups
    "lowrank-stack2-odd": lambda g, dt: _lowrank(g, dt, 41, 19, 26, 12, bias=False, layers=2),
}


def _check(fn, ref, args, dtype, what):
    out = fn(*args)
    expected = ref(*(a.double() if a is not None else None for a in args))
    assert_rel_close(out, expected, TOL[dtype], what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_float64(case, dtype, gen):
    fn, ref, args = CASES[case](gen, dtype)
    _check(fn, ref, args, dtype, f"{case} {dtype}")


def _every_config():
    seen = []
    for kernel in configs.KERNELS:
        for arch in (86, 90):
            for cfg in configs.space(kernel, arch):
                if (kernel, cfg) not in seen:
                    seen.append((kernel, cfg))
    return seen


@pytest.mark.parametrize("kernel,cfg", _every_config(), ids=lambda v: v if isinstance(v, str) else repr(v)[7:-1])
def test_every_config(kernel, cfg, gen):
    """Each shipped launch config computes the same function (float16: the dtype the interpreter can run)."""
    dtype = torch.float16
    if cfg.BM == 1:  # the one-token tier: served only N = 1 (one program per row is slow under the interpreter)
        cases = (
            ["blast-1tok", "blast-b5-1tok", "blast-stack3-1tok", "blast-swiglu-1tok", "blast-norm-res-1tok"]
            if kernel == "blast_vs"
            else ["blast-1tok", "monarch-wide-1tok", "lowrank-1tok", "lowrank-stack3-1tok"]
        )
    elif kernel == "blast_vs":
        cases = ["blast-odd", "blast-b5", "blast-stack2-odd", "blast-swiglu-odd", "blast-norm-odd"]
    else:
        cases = ["blast-1tok", "blast-many", "monarch-b4", "monarch-wide", "lowrank-odd", "lowrank-stack2-odd"]
    with launch.forced(**{kernel: cfg}):
        for case in cases:
            fn, ref, args = CASES[case](gen, dtype)
            _check(fn, ref, args, dtype, f"{case} with {kernel} {cfg}")


def test_bad_inputs_are_refused(gen):
    fn, _, (x, U, S, V, b) = CASES["blast-odd"](gen, torch.float32)
    with pytest.raises(ValueError, match="x has shape"):
        fn(x[:, :-1], U, S, V, b)
    with pytest.raises(ValueError, match="S has shape"):
        fn(x, U, S[:, :-1], V, b)
    with pytest.raises(ValueError, match="bias has shape"):
        fn(x, U, S, V, torch.zeros(5, device=DEVICE))
    with pytest.raises(TypeError, match="U is torch.float16 but the input is torch.float32"):
        fn(x, U.half(), S, V, b)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        fn(x.double(), U.double(), S.double(), V.double(), b)
    with pytest.raises(ValueError, match="2-D input"):
        fn(x[None], U, S, V, b)
    fn, _, (x, U, S, V, b, g, res) = CASES["blast-swiglu-odd"](gen, torch.float32)
    with pytest.raises(ValueError, match=r"x has shape \(37, 36\); the other factors imply \(37, 72\)"):
        fn(x[:, :36], U, S, V, b, g, res)  # the plain layer's width: gate without up
    fn, _, (x, U, S, V, b, g, res) = CASES["blast-norm-res-1tok"](gen, torch.float32)
    with pytest.raises(ValueError, match=r"norm weight has shape \(59,\); the other factors imply \(60,\)"):
        fn(x, U, S, V, b, g[:-1], res)
    with pytest.raises(ValueError, match=r"residual has shape \(1, 47\); the other factors imply \(1, 48\)"):
        fn(x, U, S, V, b, g, res[:, :-1])
    with pytest.raises(TypeError, match="residual is torch.float16 but the input is torch.float32"):
        fn(x, U, S, V, b, g, res.half())
    with pytest.raises(ValueError, match="norm weight must be contiguous"):
        fn(x, U, S, V, b, torch.stack([g, g], 1)[:, 0], res)
    with pytest.raises(ValueError, match="SwiGLU or RMSNorm on its input, not both"):
        launch.blast_forward(x, U, S, V, b, swiglu=True, norm=(g, 1e-5))
    _, _, (x, w1, w2, bb) = CASES["monarch-odd"](gen, torch.float32)
    with pytest.raises(ValueError, match="w2 has shape"):
        launch.monarch_forward(x, w1, w2[:, :, :-1], bb)


def test_stacked_siblings_need_one_view_of_U(gen):
    """The U stage reads the siblings' U as one (L*b_out, p, r) group array; a U that is not one view is refused
    instead of copied on every call."""
    fn, ref, (x, U, S, V, b) = CASES["blast-stack3-1tok"](gen, torch.float32)
    gapped = torch.empty(U.shape[0], U.shape[1] + 1, *U.shape[2:], dtype=U.dtype, device=U.device)[:, 1:]
    gapped.copy_(U)
    with pytest.raises(ValueError, match="one \\(L\\*b_out, p, r\\) view"):
        fn(x, gapped, S, V, b)
    with pytest.raises(ValueError, match="S has shape"):
        fn(x, U, S[:2], V, b)


def test_stacked_lowrank_shapes_are_checked(gen):
    fn, _, (x, U, V, b) = CASES["lowrank-stack3-1tok"](gen, torch.float32)
    with pytest.raises(ValueError, match="V has shape"):
        fn(x, U, V[:2], b)
    with pytest.raises(ValueError, match="V has shape"):
        fn(x, U, V[0], b)
    with pytest.raises(ValueError, match="bias has shape"):
        fn(x, U, V, b[:-1])


def test_zero_tokens(gen):
    fn, _, (x, U, S, V, b) = CASES["blast-odd"](gen, torch.float32)
    assert fn(x[:0], U, S, V, b).shape == (0, U.shape[0] * U.shape[1])


def test_config_table_round_trip_and_corrupt_file(tmp_path):
    table = ConfigTable(90, {"gemm|k|N16": Config(16, 32, 64, 4, 3)}, source="test")
    path = tmp_path / "configs.json"
    table.save(path)
    again = ConfigTable.load(path)
    assert again.entries == table.entries and again.arch == 90 and again.source == "test"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match="corrupt kernel config table"):
        ConfigTable.load(path)
    path.write_text(json.dumps({"format": 1, "entries": {"k": {"BM": "x"}}}))
    with pytest.raises(ValueError, match="entry 'k'"):
        ConfigTable.load(path)


def test_table_entry_is_used(gen):
    """A config from the table is the one launched: a deliberately invalid one (BN not a power of two) fails."""
    fn, _, args = CASES["lowrank-odd"](gen, torch.float32)
    key = f"gemm|lowrank_1|19->26|r12|float32|N{configs.bucket(41)}"
    previous = launch.use_table(ConfigTable(entries={key: Config(16, 24, 32, 4, 2)}))
    try:
        with pytest.raises(Exception, match="power of 2"):  # noqa: B017 (interpreter and compiler differ)
            fn(*args)
    finally:
        launch.use_table(previous)
    fn(*args)


def test_shipped_tables_hold_only_shipped_configs():
    """A shipped table may only name configs of its architecture's curated space: those are the ones CI compiles
    ahead of time (test_aot) and runs under the interpreter."""
    tables = sorted((Path(configs.__file__).parent / "tables").glob("sm_*.json"))
    assert tables, "no shipped config table"
    for path in tables:
        table = ConfigTable.load(path)
        arch = int(path.stem.removeprefix("sm_"))
        assert table.arch == arch and table.entries, path
        for key, cfg in table.entries.items():
            kernel = key.split("|")[0]
            if cfg == configs.CUBLAS:  # a stage on cuBLAS: nothing to compile; only low-rank offers it
                assert "|lowrank_" in key, f"{path.name}: {key} -> cuBLAS, which only low-rank stages run"
                continue
            assert cfg in configs.space(kernel, arch), f"{path.name}: {key} -> {cfg} is not in the sm_{arch} space"
            # A consumer keyed by its producer's partial count must be a tile that can sum that many.
            split = next((int(part[5:]) for part in key.split("|") if part.startswith("split")), 1)
            assert split <= configs.max_partials(cfg.BM, arch), f"{path.name}: {key} -> {cfg} cannot sum {split}"


@pytest.mark.parametrize("n", [1, 16, 200])
def test_buckets(n):
    b = configs.bucket(n)
    assert b >= n and b in configs.BUCKETS
    assert configs.bucket(10**6) == configs.BUCKETS[-1]


def test_split_reductions(gen):
    """Small-N producers split their reduction into float32 partials that the next stage sums: force a short step
    so every structure's split path runs (the GPU's own SM count decides the split in production)."""
    dtype = torch.float32
    small = Config(16, 32, 16, 4, 2, split=0)
    with launch.forced(gemm=small, blast_vs=Config(16, 32, 16, 4, 2, split=2)):
        for case in (
            "blast-1tok", "blast-b5", "blast-stack2-odd", "blast-swiglu-odd", "blast-norm-odd",
            "blast-res-stack2-odd", "blast-norm-stack2-odd", "monarch-1tok", "monarch-b4", "lowrank-1tok",
            "lowrank-odd",
        ):  # fmt: skip
            fn, ref, args = CASES[case](gen, dtype)
            _check(fn, ref, args, dtype, f"{case} split")
    with launch.forced(gemm=Config(1, 16, 16, 4, 2, split=0), blast_vs=Config(1, 16, 16, 4, 2, split=5)):
        for case in (
            "blast-1tok",
            "blast-b5-1tok",
            "blast-stack3-1tok",
            "blast-swiglu-1tok",
            "blast-norm-res-1tok",
            "blast-norm-stack3-1tok",
            "monarch-1tok",
            "lowrank-1tok",
            "lowrank-long-1tok",
            "lowrank-stack3-1tok",
            "monarch-long-1tok",
        ):
            fn, ref, args = CASES[case](gen, dtype)
            _check(fn, ref, args, dtype, f"{case} one-token split")


@pytest.mark.parametrize("reduce", [1, 0], ids=["summed-once", "summed-by-U"])
def test_blast_split_partials_summed_once(reduce, gen, monkeypatch):
    """A ``reduce`` config: the last V+S program of each tile sums the split partials (the U stage reads one w), and
    the arrival counters are back at zero after every launch, so the next layer finds them ready. Otherwise U sums
    them while loading."""
    seen = []
    real = runtime.launch
    monkeypatch.setattr(
        runtime, "launch", lambda k, g, a, c, *more, **kw: seen.append((k, c)) or real(k, g, a, c, *more, **kw)
    )
    vs_cfg = Config(1, 16, 16, 4, 2, split=5, reduce=reduce)
    with launch.forced(blast_vs=vs_cfg, gemm=Config(1, 16, 16, 4, 2, split=0)):
        for case in ("blast-b5-1tok", "blast-stack3-1tok", "blast-b5-1tok"):
            fn, ref, args = CASES[case](gen, torch.float32)
            _check(fn, ref, args, torch.float32, f"{case} reduce={reduce}")
    vs = [c for k, c in seen if k == "blast_vs"]
    assert vs and all(c["REDUCE"] == bool(reduce) for c in vs)
    assert all((c["A_SPLIT"] == 1) == bool(reduce) for k, c in seen if k == "gemm")
    if reduce:
        assert launch.pooled_counters(torch.device(DEVICE)).count_nonzero() == 0


# Layer-sized cases for the GPU, on shapes no tile divides; splits and dependent launches take their production
# paths. Every config in bfloat16 at the small-N limit and a large odd count; every dtype at N = 1, a few, and many.
GPU_SHAPES = {
    "blast": lambda g, dt, n: _blast(g, dt, n, 8, 96, 6, 200, 200),
    "monarch": lambda g, dt, n: _monarch(g, dt, n, 8, 200, 96, 136),
    "lowrank": lambda g, dt, n: _lowrank(g, dt, n, 768, 1000, 232),
    "blast-stacked": lambda g, dt, n: _blast(g, dt, n, 8, 96, 6, 200, 200, layers=3),
    "blast-stacked-few-blocks": lambda g, dt, n: _blast(g, dt, n, 3, 96, 3, 200, 200, layers=3),  # fused at 1000
    "blast-swiglu": lambda g, dt, n: _blast_fused(g, dt, n, 8, 96, 6, 200, 200, swiglu=True),
    "blast-norm-res-stacked": lambda g, dt, n: _blast_fused(
        g, dt, n, 8, 96, 6, 200, 200, layers=3, norm=True, res=True
    ),
    "lowrank-stacked": lambda g, dt, n: _lowrank(g, dt, n, 768, 1000, 232, layers=2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("structure", ["blast", "blast-stacked-few-blocks", "monarch", "lowrank"])
def test_gpu_every_config_layer_sized(structure, gen):
    arch = launch.device_arch(torch.device("cuda"))
    b_out_pow2 = 4 if structure == "blast-stacked-few-blocks" else 8  # b_out <= 4: fused V+S at 1000 tokens too
    for n in (1, 16, 1000):
        for kernel in configs.KERNELS if structure.startswith("blast") else ("gemm",):
            for cfg in configs.space(kernel, arch, configs.tier(n), b_out_pow2=b_out_pow2):
                forced = {kernel: cfg}
                if kernel == "gemm" and cfg.BM > 1:  # a 16-row consumer sums at most max_partials(16)
                    forced["blast_vs"] = configs.space("blast_vs", arch, "small")[0]
                with launch.forced(**forced):
                    fn, ref, args = GPU_SHAPES[structure](gen, torch.bfloat16, n)
                    _check(fn, ref, args, torch.bfloat16, f"{structure} N={n} {kernel} {cfg}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("structure", list(GPU_SHAPES))
def test_gpu_dtypes_layer_sized(structure, dtype, gen):
    for n in (1, 3, 16, 200, 1000):
        fn, ref, args = GPU_SHAPES[structure](gen, dtype, n)
        _check(fn, ref, args, dtype, f"{structure} N={n} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_driver_launches_match_float64(case, gen):
    """runtime.DriverKernels (compiled once, launched through the CUDA driver) computes what the JIT path does, for
    every kernel case, first call and replayed plan alike."""
    with runtime.using(runtime.DriverKernels(), None):
        for dtype in (torch.float32, torch.bfloat16):
            for call in ("first", "replayed"):
                before = replay.counts["replayed"]
                fn, ref, args = CASES[case](gen, dtype)
                _check(fn, ref, args, dtype, f"{case} {dtype}, driver launch, {call}")
                both = len(args) == 7 and args[4] is not None and args[6] is not None  # planned every call
                assert replay.counts["replayed"] - before == (call == "replayed" and not both)


@pytest.mark.gpu
def test_gpu_tuning_fills_the_table(gen):
    previous = launch.use_table(ConfigTable())
    try:
        with launch.tuning():
            fn, ref, args = GPU_SHAPES["blast"](gen, torch.bfloat16, 16)
            _check(fn, ref, args, torch.bfloat16, "tuned blast")
        keys = sorted(launch.active_table().entries)
        assert any(k.startswith("blast_vs|") for k in keys) and any(k.startswith("gemm|blast_u") for k in keys), keys
    finally:
        launch.use_table(previous)


def test_a_16_row_consumer_refuses_too_many_partials(gen):
    """One-token producers may split into 16 partials; a 16-row consumer tile cannot sum more than max_partials of
    them (shared memory): a clear error, which the tuner skips, instead of the compiler's out-of-resources."""
    fn, _, args = CASES["blast-b5-1tok"](gen, torch.float32)
    with (
        launch.forced(blast_vs=Config(1, 16, 16, 4, 2, split=5), gemm=Config(16, 16, 16, 4, 2, split=0)),
        pytest.raises(ValueError, match="sums at most 4 partials"),
    ):
        fn(*args)


@pytest.mark.parametrize("reduce", [0, 1])
def test_a_norm_over_split_partials_is_finished_by_the_u_stage(reduce, gen, monkeypatch):
    """Split V+S programs store partial sums of squares; the U stage scales its rows by 1/rms of their sum, so the
    norm leaves the reduction to the config (forcing one cost 5-10 µs a launch where the tuned config sums none)."""
    launched, keys = [], []
    real_launch, real_choose = runtime.launch, launch.choose_config
    monkeypatch.setattr(
        runtime,
        "launch",
        lambda k, g, a, c, *more, **kw: launched.append((k, c)) or real_launch(k, g, a, c, *more, **kw),
    )
    monkeypatch.setattr(
        launch, "choose_config", lambda kernel, key, *a, **kw: keys.append(key) or real_choose(kernel, key, *a, **kw)
    )
    with launch.forced(blast_vs=Config(1, 16, 16, 4, 2, split=5, reduce=reduce)):
        fn, ref, args = CASES["blast-norm-res-1tok"](gen, torch.float32)  # b_in = 3: three partials
        _check(fn, ref, args, torch.float32, f"norm with a split config, reduce={reduce}")
    assert [c["REDUCE"] for k, c in launched if k == "blast_vs"] == [bool(reduce)]
    assert [(c["A_SPLIT"], c["RMS_SPLIT"]) for k, c in launched if k == "gemm"] == [(1 if reduce else 3, 3)]
    split = 1 if reduce else 3
    assert [k for k in keys if k.startswith("blast_u|")] == [f"blast_u|3x20->2x24|r17|float32|split{split}"]


def test_many_tokens_run_staged_except_few_output_blocks():
    """Above BLAST_FUSED_MAX_N: V GEMM -> mix -> U, except with b_out <= 4; the bench switch turns that off."""
    many = dispatch.BLAST_FUSED_MAX_N + 1
    assert not dispatch.blast_staged(dispatch.BLAST_FUSED_MAX_N, 16)
    assert dispatch.blast_staged(many, 8) and dispatch.blast_staged(100_000, 16)
    assert not dispatch.blast_staged(many, 4) and not dispatch.blast_staged(100_000, 2)
    assert not dispatch.blast_staged(many, 3) and dispatch.blast_staged(many, 5)  # b_out rounded up to a power of 2
    with dispatch.switched(many_tokens_fused=False):
        assert dispatch.blast_staged(many, 4)
    assert not dispatch.blast_staged(many, 4)


def test_switches_hold_for_their_block_only():
    assert dispatch.current() == dispatch.Switches()
    with dispatch.switched(use_pdl=False) as outer:
        assert dispatch.current() is outer and not outer.use_pdl and outer.mix_dot
        with dispatch.switched(mix_dot=False):
            assert not dispatch.current().use_pdl and not dispatch.current().mix_dot
        assert dispatch.current() is outer
    with pytest.raises(RuntimeError), dispatch.switched(reduce_splits=False):
        raise RuntimeError  # restored on the way out of an error too
    assert dispatch.current() == dispatch.Switches()
    with pytest.raises(TypeError), dispatch.switched(use_pld=False):  # a misspelt switch is an error, not a no-op
        pass


def test_switches_reach_the_launchers(gen, monkeypatch):
    """The launchers take the path the switches in force pick: staged BLAST for few output blocks, the CUDA-core
    mix, Monarch's interleave pass below 64 tokens; and the defaults again after the block."""
    launched = []
    real_launch = runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda k, *a, **kw: launched.append(k) or real_launch(k, *a, **kw))
    blast = CASES["blast-stack3-few-many"](gen, torch.float16)
    monarch = CASES["monarch-odd"](gen, torch.float32)  # 23 tokens
    with dispatch.switched(many_tokens_fused=False, mix_dot=False, monarch_direct_max_n=16):
        _check(*blast, torch.float16, "stacked, b_out 3, 97 tokens, staged, CUDA-core mix")
        assert launched == ["gemm", "blast_mix", "gemm"] * 3
        launched.clear()
        _check(*monarch, torch.float32, "monarch, 23 tokens, interleave pass")
        assert launched == ["gemm", "gemm", "interleave"]
    launched.clear()
    _check(*blast, torch.float16, "stacked, b_out 3, 97 tokens")
    _check(*monarch, torch.float32, "monarch, 23 tokens")
    assert launched == ["blast_vs", "gemm", "gemm", "gemm"]


def test_stacked_few_blocks_run_fused_at_many_tokens(gen, monkeypatch):
    launched = []
    real_launch = runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda k, *a, **kw: launched.append(k) or real_launch(k, *a, **kw))
    fn, ref, args = CASES["blast-stack3-few-many"](gen, torch.float32)
    _check(fn, ref, args, torch.float32, "stacked, b_out 3, 97 tokens")
    assert launched == ["blast_vs", "gemm"]


def test_float16_norm_over_many_rows_cannot_overflow_before_the_scale(gen):
    """A 16+-row V+S tile needs x * g in float16 before 1/rms scales it: a residual stream's outliers times g pass
    65504. So float16 with a norm takes the one-pass prologue above one token (normalized first, as unfused)."""
    fn, ref, args = CASES["blast-norm-res-few-many"](gen, torch.float16)
    x, *rest = args
    x = (x.double() * 3000 / x.double().abs().max()).half()  # one row element at 3000, g up to ~1.6: 4800
    g = rest[4]
    g.mul_(20)  # x * g up to ~96000 > 65504; the normalized input is ~20 at most
    for n in (37, 97):  # a 16-row tile of the fused stage, and the many-token path of b_out <= 4
        call = (x[:n], *rest[:5], rest[5][:n])
        _check(fn, ref, call, torch.float16, f"float16 norm with outliers, N={n}")


@pytest.mark.parametrize("one_pass", [0, 8])
def test_mix_walks_several_token_tiles_per_program(one_pass, gen, monkeypatch):
    """The many-token S mix: a program keeps its S tile and walks token tiles (here 2 programs for 7 tiles, the
    last one partial), or takes one tile when there are few. float16: the interpreter's bfloat16 dot is inexact."""
    monkeypatch.setattr(launch, "MIX_DOT_ONE_PASS", one_pass)
    monkeypatch.setattr(launch, "MIX_DOT_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(launch, "device_sm_count", lambda device: 8)  # the interpreter's count, on a GPU too
    grids = []
    real_launch = runtime.launch
    monkeypatch.setattr(runtime, "launch", lambda k, g, *a, **kw: grids.append((k, g)) or real_launch(k, g, *a, **kw))
    fn, ref, args = CASES["blast-many"](gen, torch.float16)
    _check(fn, ref, args, torch.float16, f"staged, one pass up to {one_pass} tiles an SM")
    (grid,) = [g for k, g in grids if k == "blast_mix_dot"]
    assert grid == ((2, 5) if one_pass == 0 else (7, 5))  # (16, 8) tiles: 7 token x 5 rank tiles


def test_mix_tile_rule():
    """The largest tile giving 2 tiles an SM (else the smallest); a program a tile up to MIX_DOT_ONE_PASS tiles an
    SM, else MIX_DOT_PROGRAMS_PER_SM programs an SM; tiles that overflow the chip's shared memory are never used."""
    tiles = configs.mix_dot_tiles(90, 16, 16)
    assert tiles == list(configs.MIX_DOT_TILES)
    assert launch.mix_dot_launch(1024, 1488, tiles, 132) == (64, 32, 4, (16, 47))  # 5.7 tiles an SM: one each
    assert launch.mix_dot_launch(384, 192, tiles, 132) == (16, 8, 8, (24, 24))
    assert launch.mix_dot_launch(16384, 256, tiles, 132) == (64, 32, 4, (66, 8))  # 15.5 tiles an SM: 4 an SM walk
    assert launch.mix_dot_launch(20, 8, tiles, 132) == (16, 8, 8, (2, 1))  # fewer tokens than a tile
    assert configs.mix_dot_tiles(86, 32, 32) == [(32, 16, 4), (16, 8, 8)]  # 64 x 32 needs 192 KB for 32 blocks
    assert configs.mix_dot_tiles(90, 128, 128) == []  # the CUDA-core mix then
    for arch in (86, 87, 90):
        for blocks in (16, 32, 64):
            for bm, br, _ in configs.mix_dot_tiles(arch, blocks, blocks):
                assert configs.mix_dot_shared(bm, br, blocks, blocks) <= configs.SHARED_LIMIT[arch]


def test_a_bundle_records_every_mix_tile(gen):
    """The mix tile follows the token count, and a bundle is packaged at one count per bucket: packaging records
    every tile that fits, so any count of the bucket finds its kernel."""
    recorder = runtime.Recorder()
    x, U, S, V = CASES["blast-many"](gen, torch.float16)[2][:4]
    with runtime.using(recorder, runtime.Target(87, 16, False)):
        launch.blast_forward(x, U, S, V)
    mixes = [s for s in recorder.specs if s.kernel == "blast_mix_dot"]
    tiles = {(dict(s.constexprs)["BM"], dict(s.constexprs)["BR"], s.num_warps) for s in mixes}
    assert tiles == set(configs.mix_dot_tiles(87, 16, 16)) and len(tiles) == 3


# ------------------------------------------------------------------------ launch plans (kernels/replay.py, #23)


def _watch_launches(monkeypatch) -> list:
    """Every launch from here on, as what a plan fixes: kernel, grid, constexprs, warps, stages, dependent launch,
    and each argument (an integer, or a tensor's dtype)."""
    seen, real = [], runtime.launch

    def launch_(kernel, grid, args, constexprs, num_warps, num_stages, pdl=False):
        fixed = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
        seen.append((kernel, grid, tuple(constexprs.items()), num_warps, num_stages, pdl, fixed))
        return real(kernel, grid, args, constexprs, num_warps, num_stages, pdl)

    monkeypatch.setattr(runtime, "launch", launch_)
    return seen


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied to a view with the same strides one row further into its storage: another address."""
    rows = torch.full((x.shape[0] + 1, x.stride(0)), float("nan"), dtype=x.dtype, device=x.device)
    rows[1:, : x.shape[1]] = x
    return rows[1:, : x.shape[1]]


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_launch_plan_is_the_planned_call(case, gen, monkeypatch):
    """The second call of a kind replays the first one's plan: no config is chosen again, the launches are the
    same, and on fresh inputs at other addresses (and fresh poisoned buffers) the output is the float64
    reference's. The one kind planned every call: a residual and a bias together (their sum is computed on the
    side, not launched)."""
    seen = _watch_launches(monkeypatch)
    fn, ref, first = CASES[case](gen, torch.float32)
    fn(*first)
    planned, plans = list(seen), list(replay._plans.values())
    assert len(plans) == 1
    both = len(first) == 7 and first[4] is not None and first[6] is not None
    assert (plans[0] is None) == both
    seen.clear()
    chosen, real_choose = [], launch.choose_config
    monkeypatch.setattr(launch, "choose_config", lambda *a, **k: chosen.append(a[1]) or real_choose(*a, **k))
    _, _, second = CASES[case](gen, torch.float32)
    second = (_shifted(second[0]), *second[1:])
    before = dict(replay.counts)
    out = fn(*second)
    assert replay.counts["replayed"] - before["replayed"] == (0 if both else 1)
    assert (chosen == []) != both and seen == planned
    expected = ref(*(a.double() if a is not None else None for a in second))
    assert_rel_close(out, expected, TOL[torch.float32], f"{case}, replayed")


def test_launch_plans_follow_what_the_decisions_depend_on(gen):
    """A new plan for a new token count, strides, switch, table or table entry; none while configs are forced,
    while tuning, or while a bundle is being recorded."""
    fn, _, (x, U, S, V, b) = CASES["blast-odd"](gen, torch.float32)

    def delta(call) -> dict:
        before = dict(replay.counts)
        call()
        return {k: v - before[k] for k, v in replay.counts.items() if v != before[k]}

    assert delta(lambda: fn(x, U, S, V, b)) == {"planned": 1}
    assert delta(lambda: fn(x, U, S, V, b)) == {"replayed": 1}
    assert delta(lambda: fn(x[:5], U, S, V, b)) == {"planned": 1}
    assert delta(lambda: fn(x.contiguous(), U, S, V, b)) == {"planned": 1}
    bias = torch.zeros(U.shape[0] * U.shape[1], device=DEVICE)  # blast-odd has none
    assert delta(lambda: fn(x, U, S, V, bias)) == {"planned": 1}
    with dispatch.switched(use_pdl=False):
        assert delta(lambda: fn(x, U, S, V, b)) == {"planned": 1}
    table = ConfigTable(90)
    previous = launch.use_table(table)
    try:
        assert delta(lambda: fn(x, U, S, V, b)) == {"planned": 1}
        assert delta(lambda: fn(x, U, S, V, b)) == {"replayed": 1}
        table.put("unrelated|key", Config(16, 16, 16, 4, 2))
        assert delta(lambda: fn(x, U, S, V, b)) == {"planned": 1}
    finally:
        launch.use_table(previous)
    with launch.forced(gemm=Config(16, 16, 16, 4, 2)):
        assert delta(lambda: fn(x, U, S, V, b)) == {"unplanned": 1}
    with launch.tuning():
        assert delta(lambda: fn(x, U, S, V, b)) == {"unplanned": 1}
    with runtime.using(runtime.Recorder(), None):
        assert delta(lambda: fn(x, U, S, V, b)) == {"unplanned": 1}
    # swapping tables back cleared the plans (they would keep the old table alive): planned once more, then replayed
    assert delta(lambda: fn(x, U, S, V, b)) == {"planned": 1}
    assert delta(lambda: fn(x, U, S, V, b)) == {"replayed": 1}


# ---------------------------------------------------------------------- cuBLAS stages (configs.CUBLAS, #23)


CUBLAS_CASES = {
    "lowrank-odd": CASES["lowrank-odd"],
    "lowrank-stack2-odd": CASES["lowrank-stack2-odd"],
    "lowrank-stack2-bias": lambda g, dt: _lowrank(g, dt, 23, 19, 26, 12, layers=2),  # the bias slices too
}


@pytest.mark.parametrize("case", list(CUBLAS_CASES))
def test_lowrank_engine_follows_the_table(case, gen, monkeypatch):
    """Above one token 16-bit low-rank stages run on cuBLAS unless the table names a Triton config for them; at
    one token on Triton unless it names cuBLAS; float32 on Triton (IEEE, whatever torch's TF32 settings). Every
    way matches float64, buffers poisoned."""
    seen = _watch_launches(monkeypatch)
    fn, ref, args = CUBLAS_CASES[case](gen, torch.float16)
    _check(fn, ref, args, torch.float16, f"{case}, cuBLAS")
    assert [s[0] for s in seen] == ["torch_bmm", "torch_bmm"]  # stacked siblings: one batched GEMM a stage
    seen.clear()
    _check(*CUBLAS_CASES[case](gen, torch.float32), torch.float32, f"{case}, float32")
    assert [s[0] for s in seen] == ["gemm", "gemm"]
    seen.clear()
    n, shape_key = args[0].shape[0], _lowrank_key(args)
    triton = configs.default("gemm", 90, n)
    table = ConfigTable(90, {f"gemm|lowrank_1|{shape_key}|N{configs.bucket(n)}": triton,
                             f"gemm|lowrank_2|{shape_key}|split1|N{configs.bucket(n)}": triton})  # fmt: skip
    previous = launch.use_table(table)
    try:
        seen.clear()
        _check(fn, ref, args, torch.float16, f"{case}, Triton from the table")
        assert [s[0] for s in seen] == ["gemm", "gemm"]
        one = (args[0][:1], *args[1:])
        table.put(f"gemm|lowrank_1|{shape_key}|N1", configs.CUBLAS)
        seen.clear()
        _check(fn, ref, one, torch.float16, f"{case}, one token, cuBLAS first stage from the table")
        assert [s[0] for s in seen] == ["torch_bmm", "gemm"]
    finally:
        launch.use_table(previous)


class _CublasTable(ConfigTable):
    """A table naming cuBLAS for every grouped-GEMM stage of ``prefix``'s layers, whatever the shape or bucket."""

    def __init__(self, prefix: str) -> None:
        super().__init__(90)
        self.prefix = prefix

    def get(self, key):
        return configs.CUBLAS if key.startswith(f"gemm|{self.prefix}") else super().get(key)


BLAST_CUBLAS_CASES = {  # case: (cuBLAS launches per layer, a Triton GEMM left, dtype)
    "blast-many": (2, False, torch.float16),  # staged: V and U
    "blast-stack2-many": (2, False, torch.float16),  # one layer at a time
    "blast-b2-many": (1, False, torch.float16),  # b_out <= 4: fused V+S, then U on cuBLAS
    "blast-norm-res-many": (2, False, torch.float16),  # the norm in its own pass first, the residual U's addend
    "blast-norm-odd": (1, False, torch.float16),  # float16 takes the norm in a pass first too: U is plain
    # V+S split into float32 partials: U must sum them, so the table's choice falls back to Triton
    "blast-1tok": (0, True, torch.float16),
    "blast-norm-odd-bf16": (0, True, torch.bfloat16),  # U applies 1/rms from V+S's partial sums: falls back too
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.skipif(not CUDA, reason="bfloat16 kernels are checked on a GPU"))
     if c.endswith("-bf16") else c for c in BLAST_CUBLAS_CASES],
)  # fmt: skip
def test_blast_gemms_on_cublas_from_the_table(case, gen, monkeypatch):
    """A table may put BLAST's V and U GEMMs on cuBLAS (issue #23: the engine per stage is measured, not fixed);
    where cuBLAS cannot express the stage (partial sums, a norm) the choice falls back to the Triton default. Every
    way matches float64 with poisoned buffers, one layer and stacked siblings, with a bias and with a residual."""
    per_layer, triton_gemm, dtype = BLAST_CUBLAS_CASES[case]
    fn, ref, args = CASES[case.removesuffix("-bf16")](gen, dtype)
    layers = 1 if args[1].dim() == 3 else args[1].shape[0]
    previous = launch.use_table(_CublasTable("blast_"))
    try:
        seen = _watch_launches(monkeypatch)
        _check(fn, ref, args, dtype, f"{case}, BLAST GEMMs on cuBLAS")
    finally:
        launch.use_table(previous)
    kernels = [s[0] for s in seen]
    assert kernels.count("torch_bmm") == per_layer * (layers if per_layer == 2 else 1), kernels
    assert ("gemm" in kernels) == triton_gemm, kernels
    seen.clear()
    _check(*CASES[case.removesuffix("-bf16")](gen, torch.float32), torch.float32, f"{case}, float32")
    assert "torch_bmm" not in [s[0] for s in seen]


def _lowrank_key(args) -> str:
    x, U, V = args[:3]
    lead = U.shape[0] if U.dim() == 3 else None
    return f"{V.shape[-2]}->{U.shape[-2]}|r{U.shape[-1]}|{'' if lead is None else f'L{lead}|'}float16"


def test_cublas_config_round_trips_and_ships_no_kernel(tmp_path):
    """A cuBLAS choice is saved and loaded like any config (a Triton config's JSON has no engine field, as before
    engines existed); planning a bundle records the choice and no kernel spec for it."""
    table = ConfigTable(90, {"a": configs.CUBLAS, "b": Config(16, 64, 64, 4, 3)})
    table.save(tmp_path / "t.json")
    loaded = ConfigTable.load(tmp_path / "t.json")
    assert (
        loaded.entries == table.entries
        and "engine" not in json.loads((tmp_path / "t.json").read_text())["entries"]["b"]
    )
    recorder = runtime.Recorder()
    x, U, V = torch.empty(40, 64, device="meta"), torch.empty(48, 16, device="meta"), torch.empty(64, 16, device="meta")
    with runtime.using(recorder, runtime.Target(87, 8, False)):
        launch.lowrank_forward(x.half(), U.half(), V.half())
    assert not recorder.specs and set(recorder.configs.values()) == {configs.CUBLAS}


def test_a_tensor_in_two_roles_records_no_plan(gen):
    """The residual passed as the input too: the call is planned, not recorded (a launch argument's role would be
    ambiguous); the same kind with distinct tensors then records, and replays right when they alias again."""
    fn, ref, (x, U, S, V, _, _, other) = _blast_fused(gen, torch.float32, 37, 3, 11, 3, 11, 20, bias=False, res=True)
    assert x.shape == other.shape and x.stride() == other.stride()  # 33 features in and out

    def both(x, residual):
        return fn(x, U, S, V, None, None, residual), ref(
            *(t.double() for t in (x, U, S, V)), None, None, residual.double()
        )

    before = dict(replay.counts)
    out, expected = both(x, x)
    assert not replay._plans and replay.counts["planned"] == before["planned"] + 1
    assert_rel_close(out, expected, TOL[torch.float32], "the residual is the input, first call")
    both(x, other)
    assert len(replay._plans) == 1 and next(iter(replay._plans.values())) is not None
    out, expected = both(x, x)
    assert replay.counts["replayed"] == before["replayed"] + 1
    assert_rel_close(out, expected, TOL[torch.float32], "the residual is the input, replayed")


def test_cublas_stage_reads_factors_that_require_grad(gen):
    """A direct launcher call with trainable factors: the cuBLAS stages only read them, as the kernels do."""
    x, U, V, b = CASES["lowrank-odd"](gen, torch.float16)[2]
    U, V = (torch.nn.Parameter(t) for t in (U, V))
    out = launch.lowrank_forward(x, U, V)
    assert not out.requires_grad
    assert_rel_close(out, functional.lowrank_reference(x.double(), U.double(), V.double(), None), TOL[torch.float16])


def test_options_a_plan_cannot_key_are_decided_every_call(gen):
    """A scalar-tensor eps (read on the host into the launch) and a list option are planned every call, never
    replayed with another call's value."""
    fn, ref, (x, U, S, V, b, g, res) = CASES["blast-norm-odd"](gen, torch.float32)
    before = dict(replay.counts)
    for eps in (1e-5, 10.0):
        out = launch.blast_forward(x, U, S, V, b, norm=(g, torch.tensor(eps)))
        expected = functional.blast_fused_reference(*(t.double() if t is not None else None for t in (x, U, S, V, b)),
                                                    False, norm_weight=g.double(), eps=eps, residual=None)  # fmt: skip
        assert_rel_close(out, expected, TOL[torch.float32], f"tensor eps {eps}")
    launch.blast_forward(x, U, S, V, b, norm=[g, 1e-5])
    assert replay.counts["replayed"] == before["replayed"] and not any(replay._plans.values())


def test_table_format_is_1_without_cublas_and_2_with(tmp_path):
    """Old runtimes read a table that names no cuBLAS stage; one that does says so by its format."""
    plain = ConfigTable(90, {"a": Config(16, 64, 64, 4, 3)})
    assert plain.to_json()["format"] == 1
    with_cublas = ConfigTable(90, {"a": configs.CUBLAS})
    assert with_cublas.to_json()["format"] == 2
    (tmp_path / "t.json").write_text(json.dumps({**with_cublas.to_json(), "format": 3}))
    with pytest.raises(ValueError, match="not a blrdeploy kernel config table"):
        ConfigTable.load(tmp_path / "t.json")
