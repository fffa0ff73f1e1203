"""Layer benchmark: cuBLAS dense, torch.compile of the PyTorch reference, our kernels, and the roofline
floor, for the reference paper's layer configs, on one CUDA GPU.

    python bench/layers.py [--models llama-7b,gpt2-s] [--structures blast,monarch] [--n 1,16,1024]
                           [--no-compile] [--no-pdl] [--retune] [--json OUT.json] [--configs OUT_TABLE.json]

Per (layer, structure, N) it prints the medians of ``triton.testing.do_bench`` (L2 flushed between runs) in µs,
each function captured once into a CUDA graph and replayed (GPU time, not Python's launch overhead), and the ratios
that decide the targets: dense/ours (>1: we are faster), compile/ours, ours/floor. The floor is
max(bytes/BW, FLOPs/peak) with bytes = x + factors + y once and FLOPs = 2·N·params, using ceilings measured at the
start of the same run (a 1 GiB device copy, an 8192³ bf16 matmul). Our kernels are autotuned on first use; the
chosen configs can be written as a table (``--configs``) that ``blrdeploy.kernels.use_table`` loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from common import machine
from triton.testing import do_bench

from blrdeploy.kernels import dispatch, launch
from blrdeploy.models.families import BUILTIN
from blrdeploy.structures import functional as ref

# (model, label, pattern of the model's paper preset, out, in, has bias)
LAYERS = [
    ("llama-7b", "q/k/v/o 4096>4096", "*.q_proj", 4096, 4096, False),
    ("llama-7b", "gate/up 4096>11008", "*.up_proj", 11008, 4096, False),
    ("llama-7b", "down 11008>4096", "*.down_proj", 4096, 11008, False),
    ("llama-3.2-1b", "q/o 2048>2048", "*.q_proj", 2048, 2048, False),
    ("llama-3.2-1b", "k/v 2048>512", "*.k_proj", 512, 2048, False),
    ("llama-3.2-1b", "gate/up 2048>8192", "*.up_proj", 8192, 2048, False),
    ("llama-3.2-1b", "down 8192>2048", "*.down_proj", 2048, 8192, False),
    ("gpt2-s", "c_attn 768>2304", "*.attn.c_attn", 2304, 768, True),
    ("gpt2-s", "c_fc 768>3072", "*.mlp.c_fc", 3072, 768, True),
    ("gpt2-s", "c_proj 3072>768", "*.mlp.c_proj", 768, 3072, True),
    ("vit-b-16", "q/k/v 768>768", "*.attention.attention.query", 768, 768, True),
    ("vit-b-16", "fc1 768>3072", "*.intermediate.dense", 3072, 768, True),
    ("vit-b-16", "fc2 3072>768", "*.output.dense", 768, 3072, True),
    ("dit-xl-2", "q/k/v 1152>1152", "*.attn1.to_q", 1152, 1152, True),
    ("dit-xl-2", "fc1 1152>4608", "*.ff.net.0.proj", 4608, 1152, True),
]
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)  # issue #23: the regimes users run, decode to long prefill
TOKENS_DIT = (*TOKENS, 16384)
STRUCTURES = ("blast", "monarch", "lowrank")
OPS = {
    "blast": (torch.ops.blrdeploy.blast_linear, ref.blast_reference),
    "monarch": (torch.ops.blrdeploy.monarch_linear, ref.monarch_reference),
    "lowrank": (torch.ops.blrdeploy.lowrank_linear, ref.lowrank_reference),
}


def setting(model: str, pattern: str, structure: str) -> tuple[int | None, int]:
    for p, b, r in BUILTIN[model].paper[structure]:
        if p == pattern:
            return b, r
    raise KeyError(f"{model} has no paper setting for {pattern}")


def factors(structure: str, out_f: int, in_f: int, b: int | None, r: int, gen, dtype) -> list[torch.Tensor]:
    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dtype)

    if structure == "blast":
        U = rand(b, out_f // b, r, scale=r**-0.5)
        return [U, rand(b, b, r, scale=1.0), rand(b, in_f // b, r, scale=in_f**-0.5)]
    if structure == "monarch":
        return [rand(b, r, in_f // b, scale=(in_f // b) ** -0.5), rand(b, out_f // b, r, scale=r**-0.5)]
    return [rand(out_f, r, scale=r**-0.5), rand(in_f, r, scale=in_f**-0.5)]


@dataclass
class Ceilings:
    copy_gbs: float  # device-to-device copy, bytes read + written per second
    matmul_tflops: float  # bf16 8192^3
    l2_read_gbs: float  # reads that hit L2 (not a floor term: it bounds kernels that re-read operands)
    empty_us: float  # a graph of one 1-element kernel timed like the layers: the fixed cost in every number

    @classmethod
    def measure(cls) -> Ceilings:
        one = torch.zeros(1, device="cuda")
        return cls(_copy_gbs(), _matmul_tflops(), _l2_read_gbs(), time_us(lambda: one.add_(1)))

    def floor_us(self, bytes_: float, flops: float) -> float:
        return max(bytes_ / self.copy_gbs / 1e3, flops / self.matmul_tflops / 1e6)


def _copy_gbs(numel: int = 2**29) -> float:  # 1 GiB of bf16
    a = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * a.element_size() / ms / 1e6


def _matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * n**3 / ms / 1e9


@triton.jit
def read_kernel(x_ptr, out_ptr, per_program, repeats, BLOCK: tl.constexpr):
    base = x_ptr + tl.program_id(0) * per_program
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(repeats):
        for i in range(0, per_program, BLOCK):
            acc += tl.load(base + i + tl.arange(0, BLOCK), cache_modifier=".cg").to(tl.float32)  # skip L1
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)


def _l2_read_gbs(megabytes: int = 16, repeats: int = 50) -> float:
    programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    per = megabytes * 2**20 // 2 // programs // 1024 * 1024
    x = torch.randn(programs * per, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(programs * 1024, device="cuda")
    ms = do_bench(lambda: read_kernel[(programs,)](x, out, per, repeats, BLOCK=1024), return_mode="median")
    return repeats * x.numel() * 2 / ms / 1e6


def time_us(fn, graph: bool = True) -> float:
    """Median GPU time of ``fn``. With ``graph`` its launches are captured once into a CUDA graph and the replays
    are timed, so the number is the GPU's work and not Python's launch overhead (as a served model runs)."""
    if not graph:
        return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return 1e3 * do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def kernel_us(fn, calls: int = 10) -> dict[str, float]:
    """Cold-L2 GPU time of each kernel ``fn`` launches, in launch order (torch.profiler), to see which stage a
    layer spends its time in."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    kernels = [
        (e.name, e.time_range.elapsed_us())
        for e in prof.events()
        if e.device_type.name == "CUDA" and "Fill" not in e.name and "elementwise" not in e.name
    ]
    per_call = len(kernels) // calls
    times: dict[str, float] = {}
    for i, (name, us) in enumerate(kernels[: per_call * calls]):
        key = f"{i % per_call}:{name[:32]}"
        times[key] = times.get(key, 0.0) + us / calls
    return {k: round(v, 2) for k, v in times.items()}


def write_json(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def save_tuned(path: str, machine_info: dict, tool: str) -> None:
    """The launch configs tuned in this process, as a table for this GPU (``bench/merge_table.py`` merges it)."""
    table = launch.active_table()
    table.arch = int(machine_info["capability"].replace(".", ""))
    table.source = f"tuned by {tool} on {machine_info.get('gpu')}"
    table.save(path)


def rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.double() - expected).norm() / expected.norm())


def run(args) -> dict:
    ceilings = Ceilings.measure()
    print(f"ceilings: {asdict(ceilings)}", flush=True)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    switches = dispatch.current()
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "dtype": "bfloat16",
        "pdl": switches.use_pdl,
        "blast_fused_max_n": switches.blast_fused_max_n,
        "many_tokens_fused": switches.many_tokens_fused,
        "monarch_direct_max_n": switches.monarch_direct_max_n,
        "mix": args.mix,
        "ceilings": asdict(ceilings),
        "rows": rows,
    }
    torch._dynamo.config.cache_size_limit = 1024  # one compile per layer shape, not a fallback to eager
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    compiled = {s: torch.compile(OPS[s][1]) for s in args.structures}
    for model, label, pattern, out_f, in_f, has_bias in LAYERS:
        if model not in args.models:
            continue
        W = torch.randn(out_f, in_f, generator=gen, device="cuda").mul_(in_f**-0.5).to(dtype)
        bias = torch.randn(out_f, generator=gen, device="cuda").to(dtype) if has_bias else None
        tokens = [n for n in (TOKENS_DIT if model == "dit-xl-2" else TOKENS) if n in args.n or not args.n]
        dense_us = {}
        for structure in args.structures:
            b, r = setting(model, pattern, structure)
            fs = factors(structure, out_f, in_f, b, r, gen, dtype)
            params = sum(f.numel() for f in fs)
            op, reference = OPS[structure]
            for n in tokens:
                x = torch.randn(n, in_f, generator=gen, device="cuda").to(dtype)
                row = dict(model=model, layer=label, structure=structure, b=b, r=r, n=n, params=params)
                try:
                    with launch.tuning(remeasure=args.retune):
                        y = op(x, *fs, bias)
                    expected = reference(x.double(), *(f.double() for f in fs), None if bias is None else bias.double())
                    row["rel_error"] = rel_error(y, expected)
                    row["ours_us"] = time_us(lambda: op(x, *fs, bias))  # noqa: B023 (timed at once)
                    if args.eager:
                        row["ours_eager_us"] = time_us(lambda: op(x, *fs, bias), graph=False)  # noqa: B023
                    if args.profile:
                        row["kernels"] = kernel_us(lambda: op(x, *fs, bias))  # noqa: B023
                except Exception as e:  # one failing case must not lose the rest of the table
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                if n not in dense_us:
                    dense_us[n] = time_us(lambda: F.linear(x, W, bias))  # noqa: B023
                row["dense_us"] = dense_us[n]
                if args.compile:
                    fn = compiled[structure]
                    try:
                        fn(x, *fs, bias)
                        row["compile_us"] = time_us(lambda: fn(x, *fs, bias))  # noqa: B023
                    except Exception as e:
                        row["compile_error"] = f"{type(e).__name__}: {e}"[:300]
                io = 2 * n * (in_f + out_f) + (0 if bias is None else 2 * out_f)
                row["floor_us"] = ceilings.floor_us(io + 2 * params, 2 * n * params)
                row["dense_floor_us"] = ceilings.floor_us(io + 2 * out_f * in_f, 2 * n * out_f * in_f)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json_path:  # rewritten after every row: a run cut short keeps what it measured
                    write_json(args.json_path, result)
    return result


def fmt(v, spec=".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(result: dict) -> None:
    m, c = result["machine"], result["ceilings"]
    print(
        f"\n{m.get('gpu', '?')}  commit {m['commit']}  torch {m['torch']}  triton {m['triton']}  "
        f"copy {c['copy_gbs']:.0f} GB/s  matmul {c['matmul_tflops']:.0f} TFLOP/s  L2 read {c['l2_read_gbs']:.0f} GB/s"
        f"  one-kernel graph {c['empty_us']:.1f} µs  (times in µs, medians)"
    )
    head = f"{'layer':30s} {'struct':8s} {'N':>6s} {'dense':>8s} {'compile':>8s} {'ours':>8s} {'floor':>7s}"
    print(head + f" {'dense/ours':>10s} {'comp/ours':>9s} {'ours/floor':>10s} {'relerr':>8s}")
    for r in result["rows"]:
        ours = r.get("ours_us")

        def ratio(a, ours=ours):
            return a / ours if ours and a else None

        print(
            f"{r['model'] + ' ' + r['layer']:30s} {r['structure']:8s} {r['n']:6d} {fmt(r['dense_us']):>8s} "
            f"{fmt(r.get('compile_us')):>8s} {fmt(ours):>8s} {fmt(r['floor_us']):>7s} "
            f"{fmt(ratio(r['dense_us']), '.2f'):>10s} {fmt(ratio(r.get('compile_us')), '.2f'):>9s} "
            f"{fmt(ours / r['floor_us'] if ours else None, '.2f'):>10s} {fmt(r.get('rel_error'), '.1e'):>8s}"
            + (f"  ERROR {r['error'][:80]}" if "error" in r else "")
        )


def main(argv=None) -> int:
    paragraphs = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(
        description=paragraphs[0], epilog=paragraphs[2], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    models = sorted({m for m, *_ in LAYERS})
    ap.add_argument("--models", default=",".join(models), help=f"comma-separated; default all of {models}")
    ap.add_argument("--structures", default=",".join(STRUCTURES), help="comma-separated; default all three")
    ap.add_argument(
        "--n",
        default="",
        help="token counts to run (comma-separated); default 1,4,16,64,256,1024,4096 (DiT: and 16384)",
    )
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline")
    ap.add_argument("--no-pdl", dest="pdl", action="store_false", help="no programmatic dependent launches")
    ap.add_argument(
        "--blast-fused-max-n",
        type=int,
        default=dispatch.BLAST_FUSED_MAX_N,
        help=f"BLAST runs V+S fused up to this N (default {dispatch.BLAST_FUSED_MAX_N}), else V GEMM, mix, U GEMM "
        "(layers with b_out <= 4 stay fused unless --many-staged)",
    )
    ap.add_argument(
        "--many-staged", action="store_true", help="every BLAST layer staged above --blast-fused-max-n (A/B switch)"
    )
    ap.add_argument(
        "--monarch-direct-max-n",
        type=int,
        default=dispatch.MONARCH_DIRECT_MAX_N,
        help=f"Monarch stores interleaved outputs directly up to this N (default {dispatch.MONARCH_DIRECT_MAX_N}), "
        "else block-major plus an interleave pass",
    )
    ap.add_argument(
        "--mix",
        choices=("dot", "fma"),
        default="dot",
        help="BLAST's S stage for many tokens: batched MMAs (default) or CUDA-core FMAs",
    )
    ap.add_argument("--eager", action="store_true", help="also time our op without a CUDA graph (launch overhead)")
    ap.add_argument("--profile", action="store_true", help="also record each kernel's time (torch.profiler)")
    ap.add_argument("--json", dest="json_path", help="write rows, ceilings and machine here")
    ap.add_argument("--configs", dest="configs_path", help="write the tuned launch configs here")
    ap.add_argument(
        "--retune", action="store_true", help="tune every layer afresh instead of using the shipped config table"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/layers.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.models = args.models.split(",")
    args.structures = args.structures.split(",")
    unknown = [m for m in args.models if m not in models] + [s for s in args.structures if s not in STRUCTURES]
    if unknown:
        print(f"unknown model or structure: {', '.join(unknown)}", file=sys.stderr)
        return 2
    args.n = [int(v) for v in args.n.split(",") if v]
    with dispatch.switched(
        use_pdl=args.pdl,
        blast_fused_max_n=args.blast_fused_max_n,
        many_tokens_fused=not args.many_staged,
        monarch_direct_max_n=args.monarch_direct_max_n,
        mix_dot=args.mix == "dot",
    ):
        result = run(args)
    if args.json_path:
        write_json(args.json_path, result)
    if args.configs_path:
        save_tuned(args.configs_path, result["machine"], "bench/layers.py")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
