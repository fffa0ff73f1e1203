"""BLAST fit cost and quality on a real model's layers: old vs new defaults (issue 21, deliverable 5).

    OMP_NUM_THREADS=1 python bench/blast_fit.py [--weights model.safetensors] [--layers 15:q,15:down] [--rho 0.5]
        [--old OLD_factorize.py] [--whole] [--json OUT.json]

Per layer and configuration: steps, wall and CPU seconds, the relative error reached (weight-only; with
``--grams FILE``, a torch.save'd {layer name: XᵀX}, the calibrated fit's output error too), and the machine's
load average next to each timing (the development machine is shared). ``--old`` loads an earlier
factorize.py (``git show <commit>:blrdeploy/structures/factorize.py > /tmp/old_factorize.py``) to time its
defaults: from_dense's float64 on the CPU ("old f64") and convert's float32 ("old f32"). ``--whole`` fits
every block linear of the model with the new defaults (float32, as convert runs them) and reports the total.
Without ``--weights``: random matrices with a decaying spectrum at SmolLM2-135M's shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch
from common import commit

from blrdeploy.structures import budget
from blrdeploy.structures import factorize as fz

PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}  # fmt: skip  (out, in) of SmolLM2-135M
GRAM_OF = {"k": "q", "v": "q", "up": "gate"}  # layers that read one input share its Gram


def load(path: str | None):
    if path and os.path.exists(path):
        from safetensors.torch import load_file  # deferred: only for real weights

        sd = load_file(path)
        return lambda layer, name: sd[f"model.layers.{layer}.{PROJ[name]}.weight"]

    def synthetic(layer: int, name: str) -> torch.Tensor:
        out, inn = SHAPES[name]
        g = torch.Generator().manual_seed(1000 * layer + list(PROJ).index(name))
        P, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
        Q, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g))
        k = min(out, inn)
        return (P[:, :k] * torch.logspace(0, -1.5, k)) @ Q[:, :k].T / 30

    return synthetic


def fit(blast_factorize, W, choice, options, gram=None):
    load_avg = os.getloadavg()[0]
    c0, w0 = time.process_time(), time.perf_counter()
    extra = {} if gram is None else {"gram": gram}
    *_, res = blast_factorize(W, (choice.num_blocks,) * 2, choice.rank, **options, **extra)
    row = dict(steps=res.steps, seconds=time.perf_counter() - w0, cpu_seconds=time.process_time() - c0,
               relative_error=res.relative_error, load=load_avg)  # fmt: skip
    if res.output_relative_error is not None:
        row["output_relative_error"] = res.output_relative_error
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="/work/data/lm/model.safetensors")
    ap.add_argument("--layers", default="15:q,15:k,15:o,15:gate,15:down,2:q,2:down,28:up")
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--old", help="an earlier factorize.py to time its defaults beside the new ones")
    ap.add_argument("--grams", help="torch.save'd {'model.layers.N.<proj>': XᵀX} for calibrated fits")
    ap.add_argument("--whole", action="store_true", help="fit every block linear with the new defaults")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    weight = load(args.weights)
    grams = torch.load(args.grams) if args.grams else None
    configs = {"new": (fz.blast_factorize, {"compute_dtype": torch.float32})}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_factorize", args.old)
        old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up there
        spec.loader.exec_module(old)
        f32 = {"compute_dtype": torch.float32}
        configs = {"old f64": (old.blast_factorize, {}), "old f32": (old.blast_factorize, f32), **configs}
    rows = []
    for item in args.layers.split(","):
        layer, name = item.split(":")
        W = weight(int(layer), name)
        choice = budget.choose_blocks_and_rank(*W.shape, args.rho)
        gram = None if grams is None else grams[f"model.layers.{layer}.{PROJ[GRAM_OF.get(name, name)]}"]
        for label, (fn, options) in configs.items():
            row = dict(layer=item, shape=list(W.shape), b=choice.num_blocks, r=choice.rank, config=label,
                       **fit(fn, W, choice, options, gram))  # fmt: skip
            rows.append(row)
            out = f" out {row['output_relative_error']:.4f}" if "output_relative_error" in row else ""
            print(f"{item:8s} {W.shape[0]}x{W.shape[1]} b{choice.num_blocks} r{choice.rank} {label:8s} steps "
                  f"{row['steps']:4d} {row['seconds']:6.2f} s (cpu {row['cpu_seconds']:6.2f}) err "
                  f"{row['relative_error']:.4f}{out} load {row['load']:.2f}", flush=True)  # fmt: skip
    whole = None
    if args.whole:
        t0, c0, load0, steps, errs = time.perf_counter(), time.process_time(), os.getloadavg()[0], 0, []
        for layer in range(30):
            for name in PROJ:
                W = weight(layer, name)
                choice = budget.choose_blocks_and_rank(*W.shape, args.rho)
                row = fit(fz.blast_factorize, W, choice, {"compute_dtype": torch.float32})
                steps, errs = steps + row["steps"], errs + [row["relative_error"]]
        whole = dict(layers=len(errs), seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                     mean_steps=steps / len(errs), mean_relative_error=sum(errs) / len(errs),
                     load_start=load0, load_end=os.getloadavg()[0])  # fmt: skip
        print("whole model:", json.dumps(whole))
    source = args.weights if os.path.exists(args.weights or "") else "synthetic"
    meta = dict(commit=commit(), torch=torch.__version__, threads=torch.get_num_threads(), rho=args.rho,
                weights=source, date=time.strftime("%Y-%m-%d"))  # fmt: skip
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows, "whole": whole}, f, indent=1)


if __name__ == "__main__":
    main()
