"""Healing's step time and peak memory on one CUDA GPU (issue #22), and where a step's time goes.

    python bench/heal_step.py [--model llama-3.2-1b] [--structure blast] [--batch 4] [--seq-len 2048]
                              [--steps 6] [--json OUT.json]
    python bench/heal_step.py --layers-of CHECKPOINT [--batch 4] [--seq-len 256] [--json OUT.json]

A built-in model with random weights, converted with the paper preset (sizes are what matter for speed). The step
timed is heal's own (blrdeploy.conversion.heal.train_step): the teacher's bfloat16 forward, the float32 student's
forward under bfloat16 autocast, the chunked KL of the next-token distributions, the backward, clipping and AdamW.
Beside it, in the same run:
- the same step with a dense student whose every converted linear is trained in full (what fine-tuning the dense
  model would cost the user instead);
- with and without --checkpointing, each with its measured peak memory next to heal's planned estimate;
- per converted layer shape at the step's token count, forward+backward of one layer in bfloat16: cuBLAS dense
  (torch.nn.functional.linear), the BLR op as heal runs it (our forward kernel, the backward's batched GEMMs of
  blrdeploy.structures.gradients), and the reference alone forward and backward (einsums, cuBLAS): says whether
  the backward is the bottleneck;
- the CUDA time of one BLR step by kernel family (torch.profiler).
--layers-of times only that layer table, for the distinct layer shapes of a converted checkpoint (its
blr_config.json), on the GPU or, without one, on the CPU in float32 (what heal's CPU steps run).
Steps: medians of the wall clock around each synchronized step (the host's share of a step is the user's time too),
after a warm step; layers: medians of CUDA events. Causal LMs only (the loss is heal's next-token KL). Prints a short
table last; --json writes everything.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from common import machine
from torch import nn

from blrdeploy.conversion import heal as healing
from blrdeploy.conversion.calibration import forward_kwargs
from blrdeploy.conversion.checkpoint import blr_module
from blrdeploy.conversion.convert import is_linear
from blrdeploy.measure.bench import median_ms, resolve
from blrdeploy.models.sources import builtin_config
from blrdeploy.structures import functional as ref

# a GPU is what this measures; on a CPU (a smoke run of a *-tiny model) the same code runs in float32, timed by
# the wall clock, without memory figures
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32


def _steps_ms(student, teacher, params, ids, kwargs, steps: int) -> list[float]:
    optimizer = healing.make_optimizer(params, dict.fromkeys(params, 1e-5))
    times = []
    for i in range(steps + 1):  # the first warms the kernels and makes AdamW's state
        _sync()
        start = time.perf_counter()
        healing.train_step(student, teacher, ids, kwargs, True, params, optimizer, 1.0, DTYPE, GPU)
        _sync()
        if i:  # wall clock around a synchronized step: the host's share of a step is the user's time too
            times.append(1e3 * (time.perf_counter() - start))
    return times


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _dense_trainable(model: nn.Module, converted: set[str]) -> dict[str, nn.Parameter]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if n in converted and is_linear(m)}


def step_table(a, teacher, target, converted, config) -> list[dict]:
    rows = []
    ids = torch.randint(0, config["vocab_size"], (a.batch, a.seq_len), device=DEVICE)
    dense_variant, blr_variant = target.variants
    for kind in ("blr", "dense"):
        for checkpointing in (True, False):
            gc.collect()  # a checkpointed student is a reference cycle (its blocks' wrapped forwards): free it now
            if GPU:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            student = (blr_variant if kind == "blr" else dense_variant).build().float()
            params = (healing.trainable(student, False) if kind == "blr"
                      else _dense_trainable(student, converted))  # fmt: skip
            for p in params.values():
                p.requires_grad_(True)
            if checkpointing:
                healing._checkpoint_blocks(student, sorted(converted))
            try:
                times = _steps_ms(student, teacher, params, ids, forward_kwargs(student), a.steps)
                error = None
            except torch.cuda.OutOfMemoryError as exc:
                times, error = [], str(exc).splitlines()[0]
            peak = torch.cuda.max_memory_allocated() if GPU else 0
            ms = statistics.median(times) if times else None
            rows.append({"student": kind, "checkpointing": checkpointing, "ms_per_step": ms, "steps": times,
                         "tokens_per_second": a.batch * a.seq_len / ms * 1e3 if ms else None,
                         "peak_bytes": peak, "trained_params": sum(p.numel() for p in params.values()),
                         "error": error})  # fmt: skip
            print(f"{kind:5} checkpointing={checkpointing!s:5} {ms and round(ms, 1)} ms/step, peak "
                  f"{peak / 2**30:.1f} GiB {error or ''}", file=sys.stderr, flush=True)  # fmt: skip
            del student, params
    return rows


OPS = {  # structure -> (the op heal runs, its float reference)
    "blast": (torch.ops.blrdeploy.blast_linear, ref.blast_reference),
    "monarch": (torch.ops.blrdeploy.monarch_linear, ref.monarch_reference),
    "lowrank": (torch.ops.blrdeploy.lowrank_linear, ref.lowrank_reference),
}


def layer_table(layers: list[dict], tokens: int) -> list[dict]:
    """One row per distinct (in, out, structure, blocks, rank) among ``layers``, with how many layers it stands for."""
    rows = {}
    for entry in layers:
        key = (entry["in_features"], entry["out_features"], entry["structure"], str(entry.get("num_blocks")),
               entry.get("rank"))  # fmt: skip (BLAST's blocks are a list when read from a blr_config.json)
        if key not in rows:
            rows[key] = _layer_row(entry, tokens) | {"count": 0}
        rows[key]["count"] += 1
    return list(rows.values())


def _layer_row(entry: dict, tokens: int) -> dict:
    """Forward and forward+backward of one layer on ``tokens`` rows: cuBLAS dense, the op, the reference."""
    module = blr_module(entry).to_empty(device=DEVICE).to(DTYPE)
    module.reset_parameters()
    factors = [p.detach().requires_grad_(True) for n, p in module.named_parameters() if n != "bias"]
    x = torch.randn(tokens, entry["in_features"], device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (torch.randn(entry["out_features"], entry["in_features"], device=DEVICE, dtype=DTYPE) * 0.02).requires_grad_()
    g = torch.randn(tokens, entry["out_features"], device=DEVICE, dtype=DTYPE)
    op, reference = OPS[entry["structure"]]

    def fwd_bwd(forward, weights):
        def run():
            torch.autograd.grad(forward(), [x, *weights], g)

        return run

    row = {"layer": entry["name"], "in": entry["in_features"], "out": entry["out_features"],
           "structure": entry["structure"], "tokens": tokens, "params": entry["params"]}  # fmt: skip
    row["dense_fwd_ms"] = median_ms(lambda: F.linear(x, w), DEVICE, 0.2)
    row["dense_fwd_bwd_ms"] = median_ms(fwd_bwd(lambda: F.linear(x, w), [w]), DEVICE, 0.3)
    row["ours_fwd_ms"] = median_ms(lambda: op(x, *factors, None), DEVICE, 0.2)
    row["ours_fwd_bwd_ms"] = median_ms(fwd_bwd(lambda: op(x, *factors, None), factors), DEVICE, 0.3)
    row["reference_fwd_bwd_ms"] = median_ms(fwd_bwd(lambda: reference(x, *factors, None), factors), DEVICE, 0.3)
    print(f"{entry['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")),
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def profile_step(a, teacher, target, converted, config) -> dict[str, float]:
    """CUDA time (ms) of one BLR heal step by kernel family."""
    gc.collect()
    student = target.variants[1].build().float()
    params = healing.trainable(student, False)
    for p in params.values():
        p.requires_grad_(True)
    ids = torch.randint(0, config["vocab_size"], (a.batch, a.seq_len), device=DEVICE)
    optimizer = healing.make_optimizer(params, dict.fromkeys(params, 1e-5))
    args = (student, teacher, ids, forward_kwargs(student), True, params, optimizer, 1.0, DTYPE, GPU)
    healing.train_step(*args)
    _sync()
    activity = torch.profiler.ProfilerActivity.CUDA if GPU else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        healing.train_step(*args)
        _sync()
    families = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        family = ("ours (triton forward)" if "blast" in name or "monarch" in name or "lowrank" in name
                  else "gemm (cublas)" if "gemm" in name or "cutlass" in name or "sm90" in name or "nvjet" in name
                  else "attention" if "flash" in name or "attention" in name or "fmha" in name
                  else "elementwise/reduce/copy")  # fmt: skip
        families[family] += (event.device_time_total if GPU else event.self_cpu_time_total) / 1e3
    del student, params, optimizer
    return dict(families)


def layers_only(a) -> None:
    with open(f"{a.layers_of}/blr_config.json") as f:
        layers = json.load(f)["layers"]
    rows = layer_table(layers, a.batch * a.seq_len)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "checkpoint": a.layers_of, "threads": torch.get_num_threads(),
                       "tokens": a.batch * a.seq_len, "layers": rows}, f, indent=1)  # fmt: skip
    _print_layers(rows)
    total = {k: sum(r[k] * r["count"] for r in rows) for k in ("dense_fwd_bwd_ms", "ours_fwd_bwd_ms")}
    print(
        f"all {sum(r['count'] for r in rows)} layers, fwd+bwd: dense {total['dense_fwd_bwd_ms']:.0f} ms, "
        f"ours {total['ours_fwd_bwd_ms']:.0f} ms"
    )


def _print_layers(rows: list[dict]) -> None:
    print("layer shape            | count | dense fwd+bwd | ours fwd | ours fwd+bwd | reference fwd+bwd (ms)")
    for r in rows:
        print(f"{r['structure']} {r['in']}>{r['out']:<12} | {r['count']:5} | {r['dense_fwd_bwd_ms']:13.3f} | "
              f"{r['ours_fwd_ms']:8.3f} | {r['ours_fwd_bwd_ms']:12.3f} | {r['reference_fwd_bwd_ms']:.3f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--structure", default="blast")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", default=None)
    p.add_argument("--layers-of", default=None, help="a converted checkpoint: time only its layer shapes")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.layers_of:
        layers_only(a)
        return
    target = resolve(a.model, a.structure, preset="auto", device=DEVICE, dtype=torch.float32, fuse_siblings=False)
    teacher_target = resolve(a.model, a.structure, preset="auto", device=DEVICE, dtype=DTYPE, fuse_siblings=False)
    teacher = teacher_target.variants[0].build().requires_grad_(False)
    config = builtin_config(a.model)[2]
    layers = target.variants[1].layers
    converted = {e["name"] for e in layers}
    dense_params, blr_params = target.variants[0].params, target.variants[1].params
    cfg = {"layers": layers, "summary": {"params_before": dense_params, "params_after": blr_params}}
    windows = torch.zeros(1, a.seq_len, dtype=torch.long)
    plans = {}
    for ck in (True, False):
        options = healing.HealOptions(batch=a.batch, checkpointing=ck)
        plans[ck] = healing.plan(cfg, config, windows, options, str(DEVICE), True)
    steps = step_table(a, teacher, target, converted, config)
    layer_rows = layer_table(layers, a.batch * a.seq_len)
    profile = profile_step(a, teacher, target, converted, config)
    result = {"machine": machine(), "model": a.model, "structure": a.structure, "batch": a.batch,
              "seq_len": a.seq_len, "dense_params": dense_params, "blr_params": blr_params,
              "plan": {str(k): v for k, v in plans.items()}, "steps": steps, "layers": layer_rows,
              "profile_blr_step_ms": profile}  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    gib = 2**30
    print(f"\n{a.model} {a.structure} ({target.note}), {a.batch} x {a.seq_len} tokens, {result['machine'].get('gpu')}")
    print("student | ckpt  | ms/step | tokens/s | peak GiB | planned GiB")
    for r in steps:
        planned = plans[r["checkpointing"]]
        est = (planned["bytes_weights_and_optimizer"] + planned["bytes_activations"]) / gib
        est = est if r["student"] == "blr" else None
        print(f"{r['student']:7} | {r['checkpointing']!s:5} | {r['ms_per_step'] or float('nan'):7.1f} | "
              f"{r['tokens_per_second'] or 0:8,.0f} | {r['peak_bytes'] / gib:8.1f} | "
              f"{'' if est is None else f'{est:.1f}'}")  # fmt: skip
    _print_layers(layer_rows)
    print("one BLR step, CUDA ms by family: " + ", ".join(f"{k} {v:.1f}" for k, v in profile.items()))


if __name__ == "__main__":
    main()
