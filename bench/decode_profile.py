"""Where a decode step's time goes: one greedy batch-1 step of a built-in LLM (dense and BLR) as a CUDA graph,
timed over many replays and profiled kernel by kernel.

    python bench/decode_profile.py [--model llama-7b] [--structure blast] [--modes graph,compile] [--json OUT]
                                   [--without-blocks]

Per variant and mode it prints ms per token, the GPU time summed per kernel class (``prefill_profile.kernel_class``:
our BLR kernels, dense GEMV / GEMM, attention, everything else; before the ninth session inductor kernels named
after ``blast_linear`` counted as BLR, and attention as other) and the idle time between kernels (step time minus
the kernels' sum; negative where kernels overlap: a dependent launch's consumer is timed from its early start).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import machine
from layers import write_json
from prefill_profile import profile_replays

from blrdeploy.conversion.siblings import fuse_siblings, fuse_swiglu
from blrdeploy.measure.bench import Decoder, capture_graph, resolve
from blrdeploy.models.families import FAMILIES


@torch.no_grad()
def profile_step(model, prompt, mode: str, tokens: int = 64) -> dict:
    dec = Decoder(model, prompt, tokens, mode)
    dec.prefill()
    graph, _ = capture_graph(dec.step, prompt.device)
    dec.prefill()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(tokens - 1):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / (tokens - 1)
    dec.prefill()
    steps = 8
    by_class, by_name, ordered = profile_replays(graph, steps)
    count = len(ordered)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:20]
    # One step's kernels in launch order, each averaged over the profiled steps: a block's launches side by side.
    ordered.sort()
    per_step = count // steps
    sequence = [
        (ordered[i][1][:40], round(sum(ordered[s * per_step + i][2] for s in range(steps)) / steps, 2))
        for i in range(per_step)
    ]
    del graph, dec
    return {
        "mode": mode,
        "ms_per_token": ms,
        "kernels_per_token": count / steps,
        "kernel_us": {k: round(v, 1) for k, v in by_class.items()},
        "idle_us": round(1e3 * ms - sum(by_class.values()), 1),
        "top": [(n, round(v, 1)) for n, v in top],
        "sequence": sequence,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--structure", default="blast")
    ap.add_argument("--modes", default="graph,compile")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument(
        "--without-blocks",
        action="store_true",
        help="BLR model without fused blocks (blrdeploy.conversion.blocks), its siblings still stacked: an A/B",
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    # Without blocks: built unfused, then stacked here as fuse_family would, minus its last step (fuse_blocks).
    target = resolve(args.model, args.structure, device=device, fuse_siblings=not args.without_blocks)
    family = FAMILIES[target.family]
    prompt = torch.randint(0, 1000, (1, 16), device=device, generator=torch.Generator(device).manual_seed(0))
    result = {"machine": machine(), "model": args.model, "structure": args.structure, "runs": []}
    for variant in target.variants:
        model = variant.build().eval()
        if args.without_blocks and variant.layers:
            fuse_siblings(model, family.siblings)
            fuse_swiglu(model, family.swiglu_mlps)
        for mode in args.modes.split(","):
            row = {"variant": variant.name, **profile_step(model, prompt, mode)}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.json_path:
                write_json(args.json_path, result)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(f"\n{'variant':10s} {'mode':8s} {'ms/tok':>7s} {'tok/s':>7s} {'kernels':>7s} "
          f"{'blr µs':>8s} {'dense µs':>8s} {'attn µs':>8s} {'other µs':>8s} {'idle µs':>8s}")  # fmt: skip
    for r in result["runs"]:
        k = r["kernel_us"]
        print(
            f"{r['variant']:10s} {r['mode']:8s} {r['ms_per_token']:7.3f} "
            f"{1e3 / r['ms_per_token']:7.1f} {r['kernels_per_token']:7.0f} {k.get('blr', 0):8.0f} "
            f"{k.get('dense-linear', 0):8.0f} {k.get('attention', 0):8.0f} {k.get('other', 0):8.0f} "
            f"{r['idle_us']:8.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
