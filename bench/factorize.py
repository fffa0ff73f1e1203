"""Time dense -> BLR conversion of the reference paper's layers (what converting a model costs).

    python bench/factorize.py [--device cuda] [--steps 300] [--json OUT.json]

Prints one row per layer and structure: seconds, relative error reached, peak GPU memory. Weights are seeded
Gaussians at nn.Linear's scale (no hub here); trained weights change the error, not the time per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from common import commit

from blrdeploy import BlastLinear, LowRankLinear, MonarchLinear

# (name, out, in, BLAST b, BLAST r, Monarch R): the reference paper's Llama-7B settings
LAYERS = [
    ("llama7b.qkvo 4096x4096", 4096, 4096, 16, 1024, 1024),
    ("llama7b.up 11008x4096", 11008, 4096, 16, 1488, 1536),
]
SMALL = [("smoke 512x512", 512, 512, 4, 64, 64)]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    layer = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return layer, seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--small", action="store_true", help="a 512x512 layer only (CPU smoke run)")
    ap.add_argument("--variants", action="store_true", help="also BLAST with svd init and without momentum")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for name, out, inn, b, r, R in SMALL if args.small else LAYERS:
        g = torch.Generator(device=device).manual_seed(0)
        W = torch.randn(out, inn, generator=g, device=device) / (3 * inn) ** 0.5
        variants = {"blast": {}}
        if args.variants:
            variants.update({"blast init=svd": {"init": "svd"}, "blast momentum=0": {"momentum": 0.0}})
        lowrank_r = r * (out + inn + b * b) // (out + inn)  # same parameter count as BLAST
        jobs = [(k, BlastLinear.from_dense, (W, b, r), dict(steps=args.steps, **kw)) for k, kw in variants.items()]
        jobs += [
            ("monarch", MonarchLinear.from_dense, (W, b, R), {}),
            ("lowrank", LowRankLinear.from_dense, (W, lowrank_r), {}),
        ]
        W_warm = W[:256, :256]  # first-call costs (cuSOLVER handles, kernels) out of the timings
        BlastLinear.from_dense(W_warm, 4, 16, steps=3)
        MonarchLinear.from_dense(W_warm, 4, 16)
        for structure, build, fn_args, kwargs in jobs:
            layer, seconds, peak = timed(lambda: build(*fn_args, **kwargs), device)  # noqa: B023 (called at once)
            fit = layer.fit_result
            rows.append(
                dict(
                    layer=name,
                    structure=structure,
                    steps=fit.steps,
                    seconds=seconds,
                    ms_per_step=1e3 * seconds / max(fit.steps, 1),
                    relative_error=fit.relative_error,
                    peak_gib=peak,
                    params=layer.num_params(),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
            del layer
    meta = dict(device=gpu, torch=torch.__version__, commit=commit(), date=time.strftime("%Y-%m-%d"), steps=args.steps)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\n{meta}")
    head = ("layer", "structure", "steps", "seconds", "ms/step", "rel.err", "peak GiB")
    print(f"{head[0]:26s} {head[1]:18s}" + "".join(f" {h:>8s}" for h in head[2:]))
    for r in rows:
        print(
            f"{r['layer']:26s} {r['structure']:18s} {r['steps']:8d} {r['seconds']:8.2f} {r['ms_per_step']:8.1f} "
            f"{r['relative_error']:8.4f} {r['peak_gib']:8.2f}"
        )


if __name__ == "__main__":
    main()
