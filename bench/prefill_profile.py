"""Where a prefill's time goes, and what that allows: one compiled forward of a built-in model (dense and BLR) as a
CUDA graph, timed, then profiled kernel by kernel.

    python bench/prefill_profile.py --model vit-b-16 [--batch 64] [--seq N] [--structure blast] [--json OUT]

Per variant it prints ms per forward and the GPU time summed per kernel class: our BLR kernels, dense linears
(cuBLAS / CUTLASS: the converted layers' dense originals, or the layers both variants keep dense), attention, and
everything else. Then the Amdahl bound: dense ms / (BLR ms - BLR kernels), the speedup the BLR model would reach if
its converted layers took no time at all. A target above that bound cannot be met by faster BLR kernels: the rest
of the forward (attention, norms, activations, the layers kept dense) is the same work in both models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
from common import machine
from layers import write_json
from torch.profiler import ProfilerActivity, profile

from blrdeploy.measure.bench import capture_graph, median_ms, prefill_inputs, resolve, tokens_of


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention", "softmax")):
        return "attention"
    if low.startswith("triton_"):  # inductor's fused kernels, named after every op they took in (blast_linear too)
        return "other"
    if any(k in low for k in ("blast", "grouped_gemm", "interleave", "input_prologue")):
        return "blr"
    if any(k in low for k in ("gemv", "gemm", "nvjet", "cutlass", "sm90_xmma", "splitk")):
        return "dense-linear"
    return "other"


def profile_replays(graph, steps: int) -> tuple[dict[str, float], dict[str, float], list[tuple[int, str, float]]]:
    """Replays ``graph`` ``steps`` times under the profiler: GPU µs per replay summed by kernel class and by kernel
    name (70 characters), and every kernel as (start, name, µs)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    kernels = []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.time_range.elapsed_us()
        by_class[kernel_class(e.name)] += us / steps
        by_name[e.name[:70]] += us / steps
        kernels.append((e.time_range.start, e.name, us))
    return by_class, by_name, kernels


@torch.no_grad()
def profile_prefill(model, feed: dict, steps: int = 5) -> dict:
    forward = torch.compile(model.forward, dynamic=False)
    device = next(model.parameters()).device
    graph, _ = capture_graph(lambda: forward(**feed), device)
    ms = median_ms(graph.replay, device, budget_s=2.0)
    by_class, by_name, kernels = profile_replays(graph, steps)
    del graph
    return {
        "ms": ms,
        "kernels": len(kernels) / steps,
        "kernel_us": {k: round(v, 1) for k, v in sorted(by_class.items())},
        "idle_us": round(1e3 * ms - sum(by_class.values()), 1),
        "top": [(n, round(v, 1)) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-b-16")
    ap.add_argument("--structure", default="blast")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (LLMs)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    target = resolve(args.model, args.structure, device=device)
    result = {"machine": machine(), "model": args.model, "structure": args.structure, "batch": args.batch,
              "seq": args.seq, "runs": []}  # fmt: skip
    for variant in target.variants:
        model = variant.build().eval()
        feed = prefill_inputs(target, model, args.batch, args.seq, 0, device)
        row = {"variant": variant.name, "tokens": tokens_of(target, feed, model), **profile_prefill(model, feed)}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        del model, feed
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    dense, blr = result["runs"][0], result["runs"][-1]
    rest_ms = blr["ms"] - blr["kernel_us"].get("blr", 0.0) / 1e3
    result["bound_if_blr_free"] = dense["ms"] / rest_ms
    result["measured_speedup"] = dense["ms"] / blr["ms"]
    if args.json_path:
        write_json(args.json_path, result)
    print(f"\n{args.model} batch {args.batch}: {'variant':8s} {'ms':>8s} {'blr':>8s} {'linear':>8s} {'attn':>8s} "
          f"{'other':>8s} {'idle':>8s}  (µs)")  # fmt: skip
    for r in result["runs"]:
        k = r["kernel_us"]
        print(
            f"{'':{len(args.model) + 11}s} {r['variant']:8s} {r['ms']:8.3f} {k.get('blr', 0):8.0f} "
            f"{k.get('dense-linear', 0):8.0f} {k.get('attention', 0):8.0f} {k.get('other', 0):8.0f} {r['idle_us']:8.0f}"
        )
    print(
        f"measured {result['measured_speedup']:.2f}x; with the BLR layers free at most "
        f"{result['bound_if_blr_free']:.2f}x (dense ms / BLR ms without its BLR kernels)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
