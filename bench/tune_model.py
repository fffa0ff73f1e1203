"""Tune the launch configs a built-in model's forward uses, stacked siblings and fused pieces included, and write
them as a table (merge it into the shipped one with ``bench/merge_table.py``):

    python bench/tune_model.py llama-7b [--structure lowrank] [--retune] [--batch B [--seq N]] --configs OUT.json

The BLR variant is built on the GPU as ``blrdeploy bench`` builds it and runs one forward under
``blrdeploy.kernels.tuning()``: an LLM's one-token decode step, or with ``--batch`` a prefill of the model's
seeded inputs (``--seq`` tokens a sequence for LLMs). Each layer shape the active and shipped tables lack (every one
with ``--retune``) is timed over its curated configs.
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import machine
from layers import save_tuned

from blrdeploy.kernels import launch
from blrdeploy.measure.bench import prefill_inputs, resolve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a built-in model, e.g. llama-7b")
    ap.add_argument("--structure", default="blast")
    ap.add_argument("--retune", action="store_true", help="tune every shape, even those the shipped table has")
    ap.add_argument("--batch", type=int, help="tune a prefill of this batch instead of a one-token decode step")
    ap.add_argument("--seq", type=int, help="with --batch: tokens a sequence (LLMs)")
    ap.add_argument("--configs", required=True, help="write the tuned configs here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    target = resolve(args.model, args.structure, device="cuda")
    model = target.variants[1].build().eval()
    if args.batch:
        feed = prefill_inputs(target, model, args.batch, args.seq, 0, "cuda")
    else:
        feed = {"input_ids": torch.zeros(1, 1, dtype=torch.long, device="cuda")}
    with torch.no_grad(), launch.tuning(remeasure=args.retune):
        model(**feed)
    save_tuned(args.configs, machine(), "bench/tune_model.py")
    print(f"{len(launch.active_table().entries)} configs tuned into {args.configs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
