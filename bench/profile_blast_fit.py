"""Where a BLAST fit's time goes: torch.profiler over a few steps of the Llama-7B attention layer fit.

python bench/profile_blast_fit.py [--steps 20] [--tf32]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from blrdeploy import BlastLinear

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--tf32", action="store_true")
ap.add_argument("--shape", default="4096x4096x16x1024")
args = ap.parse_args()
out, inn, b, r = map(int, args.shape.split("x"))
torch.backends.cuda.matmul.allow_tf32 = args.tf32
W = torch.randn(out, inn, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
BlastLinear.from_dense(W, b, r, steps=2)  # warm-up
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    layer = BlastLinear.from_dense(W, b, r, steps=args.steps)
    torch.cuda.synchronize()
fit = layer.fit_result
print(f"tf32={args.tf32} steps={args.steps} seconds={fit.seconds:.2f} err={fit.relative_error:.4f}")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
