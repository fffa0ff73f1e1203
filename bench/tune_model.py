"""Tune the launch configs a built-in LLM's one-token forward uses, stacked siblings included, and write them as a
table (merge it into the shipped one with ``bench/merge_table.py``):

    python bench/tune_model.py llama-7b [--structure lowrank] [--retune] --configs OUT_TABLE.json

The BLR variant is built on the GPU as ``blrdeploy bench`` builds it (siblings stacked) and runs one decode-sized
forward under ``blrdeploy.kernels.tuning()``: each layer shape the active and shipped tables lack (every one with
``--retune``) is timed over its curated configs.
"""

from __future__ import annotations

import argparse
import sys

import torch
from blrdeploy.kernels import launch
from common import machine
from layers import save_tuned

from blrdeploy.bench import resolve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a built-in LLM, e.g. llama-7b")
    ap.add_argument("--structure", default="blast")
    ap.add_argument("--retune", action="store_true", help="tune every shape, even those the shipped table has")
    ap.add_argument("--configs", required=True, help="write the tuned configs here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    model = resolve(args.model, args.structure, device="cuda").variants[1].build().eval()
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.no_grad(), launch.tuning(remeasure=args.retune):
        model(input_ids=ids)
    save_tuned(args.configs, machine(), "bench/tune_model.py")
    print(f"{len(launch.active_table().entries)} configs tuned into {args.configs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
