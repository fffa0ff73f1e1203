"""Joint tuning of BLAST's one-token pair (V+S producer x U consumer) on the reference paper's LLM layers.

    python bench/tune_one.py [--models llama-7b,llama-3.2-1b] [--json OUT.json] [--configs OUT_TABLE.json]

The launcher's tuner picks the producer with a default consumer, then the consumer for the producer's split count;
at N = 1 the two interact (more partials: more programs streaming V, more for U to sum), so this times every pair
(CUDA-graph replay medians, L2 flushed) and keeps the fastest. It also times a plain streaming read of each stage's
bytes: what one kernel moving that much can do on this GPU, ramp and tail included.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import machine
from layers import LAYERS, factors, read_kernel, rel_error, setting, time_us, write_json

from blrdeploy.kernels import launch
from blrdeploy.kernels.configs import ConfigTable, space
from blrdeploy.structures import functional as ref


def stream_us(nbytes: int) -> float:
    """A read-only kernel over ``nbytes`` of bf16 (4 programs per SM, 16 KB steps), cold L2: a floor for one launch."""
    programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    per = max(8192, nbytes // 2 // programs // 8192 * 8192)
    x = torch.randn(programs * per, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(programs * 8192, device="cuda")
    return time_us(lambda: read_kernel[(programs,)](x, out, per, 1, BLOCK=8192, num_warps=8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-7b,llama-3.2-1b")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--configs", dest="configs_path")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    arch = launch.device_arch(torch.device("cuda"))
    vs_space = [c for c in space("blast_vs", arch, "one") if c.BM == 1]
    u_space = [c for c in space("gemm", arch, "one") if c.BM == 1]
    table = ConfigTable(arch, source=f"bench/tune_one.py on {machine().get('gpu')}")
    one = torch.zeros(1, device="cuda")
    result = {"machine": machine(), "empty_us": time_us(lambda: one.add_(1)), "layers": []}
    for model, label, pattern, out_f, in_f, _ in LAYERS:
        if model not in args.models.split(","):
            continue
        b, r = setting(model, pattern, "blast")
        U, S, V = factors("blast", out_f, in_f, b, r, gen, dtype)
        x = torch.randn(1, in_f, generator=gen, device="cuda").to(dtype)
        expected = ref.blast_reference(x.double(), U.double(), S.double(), V.double(), None)
        dense_W = torch.randn(out_f, in_f, generator=gen, device="cuda").to(dtype)
        row = {
            "model": model,
            "layer": label,
            "dense_us": time_us(lambda: torch.nn.functional.linear(x, dense_W)),  # noqa: B023
            "stream_vs_us": stream_us(V.numel() * 2 + S.numel() * 2),
            "stream_u_us": stream_us(U.numel() * 2),
            "stream_all_us": stream_us((U.numel() + S.numel() + V.numel()) * 2),
            "pairs": [],
        }
        best = None
        for vs in vs_space:
            for u in u_space:
                with launch.forced(blast_vs=vs, gemm=u):
                    try:
                        y = launch.blast_forward(x, U, S, V)
                        err = rel_error(y, expected)
                        us = time_us(lambda: launch.blast_forward(x, U, S, V))  # noqa: B023
                    except Exception as e:
                        row["pairs"].append({"vs": vs.to_dict(), "u": u.to_dict(), "error": str(e)[:200]})
                        continue
                row["pairs"].append({"vs": vs.to_dict(), "u": u.to_dict(), "us": us, "rel_error": err})
                if err < 2e-2 and (best is None or us < best[0]):
                    best = (us, vs, u)
        if best is None:
            print(f"{model} {label}: no pair ran within tolerance", flush=True)
            continue
        us, vs, u = best
        split = launch.vs_partials(vs, 1, r, b, x.device, dtype)[1]
        if launch.vs_reduces(vs, split):  # U reads one w
            split = 1
        shape_key = f"{b}x{in_f // b}->{b}x{out_f // b}|r{r}|bfloat16"
        table.put(f"blast_vs|{shape_key}|N1", vs)
        table.put(f"gemm|blast_u|{shape_key}|split{split}|N1", u)
        row.update(best_us=us, best_vs=vs.to_dict(), best_u=u.to_dict(), split=split)
        result["layers"].append(row)
        top = sorted((p for p in row["pairs"] if "us" in p), key=lambda p: p["us"])[:5]
        print(json.dumps({k: v for k, v in row.items() if k != "pairs"}), flush=True)
        for p in top:
            print("   ", round(p["us"], 2), tuple(p["vs"].values()), tuple(p["u"].values()), flush=True)
        if args.json_path:
            write_json(args.json_path, result)
    if args.configs_path:
        table.save(args.configs_path)
    print(
        f"\n{'layer':32s} {'dense':>7s} {'best':>7s} {'dense/best':>10s} "
        f"{'stream V+S':>10s} {'stream U':>9s} {'stream all':>10s}"
    )
    for row in result["layers"]:
        print(
            f"{row['model'] + ' ' + row['layer']:32s} {row['dense_us']:7.1f} {row['best_us']:7.1f} "
            f"{row['dense_us'] / row['best_us']:10.2f} {row['stream_vs_us']:10.1f} {row['stream_u_us']:9.1f} "
            f"{row['stream_all_us']:10.1f}"
        )
    print(f"empty graph {result['empty_us']:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
