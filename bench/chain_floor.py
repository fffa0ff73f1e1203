"""The linear layers of one batch-1 decode step alone, as one CUDA graph: how fast our BLR chain runs against
cuBLAS on the dense weights, and against plain streaming reads of the same bytes cut into as many launches.

    python bench/chain_floor.py [--models llama-7b,llama-3.2-1b] [--json OUT] [--configs OUT_TABLE.json]

Every layer of every transformer block is launched in decode order (one token, separate inputs, no non-linear
work); the graph is replayed back to back with no cache flush (the weights are far larger than L2), so each number
is what a decode step spends in its linear layers. The read variants put a bound on what launch count costs:

* ``read/launch``: one streaming read per kernel our chain launches, each the bytes that kernel reads;
* ``read/sibling``: the same bytes with sibling layers that share an input (q, k, v; gate, up) read together;
* ``read/op``: one read per sibling group, both stages together: the floor of one launch per op;
* ``read/block``: one read per transformer block.

``ours, siblings`` runs the sibling groups stacked (``blrdeploy.conversion.siblings``); stacked shapes missing from the
shipped table (all of them with ``--retune``) are tuned first, and ``--configs`` writes what was tuned (for
``bench/merge_table.py``). ``U sums`` is the same with the V+S split partials summed by every U program instead of
once (the ``reduce_splits`` kernel switch), on the table's configs for that path.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from common import machine
from layers import read_kernel, save_tuned, setting, write_json
from triton.testing import do_bench

from blrdeploy.kernels import dispatch, launch
from blrdeploy.models.families import BUILTIN


def _llama(hidden: int, intermediate: int, kv_out: int) -> list[tuple]:
    """A Llama block's linear layers in decode order: (name, out, in, paper-preset pattern, sibling group)."""
    return [
        ("q", hidden, hidden, "*.q_proj", "qkv"),
        ("k", kv_out, hidden, "*.k_proj", "qkv"),
        ("v", kv_out, hidden, "*.v_proj", "qkv"),
        ("o", hidden, hidden, "*.o_proj", "o"),
        ("gate", intermediate, hidden, "*.gate_proj", "gateup"),
        ("up", intermediate, hidden, "*.up_proj", "gateup"),
        ("down", hidden, intermediate, "*.down_proj", "down"),
    ]


# (transformer blocks, a block's layers)
MODELS = {"llama-7b": (32, _llama(4096, 11008, 4096)), "llama-3.2-1b": (16, _llama(2048, 8192, 512))}


def _reader(nbytes: int, programs: int):
    """A launch that streams ``nbytes`` of bf16 from its own buffer (so nothing is served from L2)."""
    block = 1024
    per = max(block, -(-nbytes // 2 // programs // block) * block)
    buf = torch.ones(programs * per, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(programs * block, device="cuda")
    return lambda: read_kernel[(programs,)](buf, out, per, 1, BLOCK=block), programs * per * 2


def _graph_us(fns, replays: int = 20) -> float:
    def step():
        for fn in fns:
            fn()

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = do_bench(graph.replay, warmup=3, rep=max(50, replays), return_mode="median")
    return 1e3 * ms


def run_model(name: str, sms: int, retune: bool = False) -> dict:
    blocks, layers = MODELS[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    dense_fns, ours_fns, stage_bytes, sib_bytes, stacked_fns = [], [], [], {}, []
    dense_total = ours_total = 0
    for _ in range(blocks):
        members: dict[tuple, list] = {}
        for _name, out_f, in_f, pattern, group in layers:
            b, r = setting(name, pattern, "blast")
            x = torch.randn(1, in_f, device="cuda", dtype=dtype, generator=gen)
            w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) * in_f**-0.5
            U = torch.randn(b, out_f // b, r, device="cuda", dtype=dtype, generator=gen) * r**-0.5
            S = torch.randn(b, b, r, device="cuda", dtype=dtype, generator=gen)
            V = torch.randn(b, in_f // b, r, device="cuda", dtype=dtype, generator=gen) * in_f**-0.5
            dense_fns.append(lambda x=x, w=w: F.linear(x, w))
            ours_fns.append(lambda x=x, U=U, S=S, V=V: torch.ops.blrdeploy.blast_linear(x, U, S, V, None))
            vs, u = (V.numel() + S.numel()) * 2, U.numel() * 2
            stage_bytes += [vs, u]
            sib_bytes.setdefault(group, [0, 0])
            sib_bytes[group][0] += vs
            sib_bytes[group][1] += u
            dense_total += w.numel() * 2
            ours_total += vs + u
            members.setdefault((group, out_f, in_f), []).append((x, U, S, V))
        for group in members.values():  # in decode order: q/k/v (or k/v after q), o, gate/up, down
            x = group[0][0]
            if len(group) == 1:
                _, U, S, V = group[0]
            else:
                U, S, V = (torch.stack([m[i] for m in group]) for i in (1, 2, 3))
            stacked_fns.append(lambda x=x, U=U, S=S, V=V: torch.ops.blrdeploy.blast_linear(x, U, S, V, None))
        del w
    programs = 4 * sms
    rows = {}

    def record(label, fns, nbytes, launches):
        us = _graph_us(fns) / blocks
        gbs = round(nbytes / blocks / us / 1e3, 1)
        rows[label] = {"us_per_block": round(us, 2), "launches_per_block": launches, "gbs": gbs}
        print(f"{name:14s} {label:14s} {us:8.1f} µs/block  {launches:3d} launches  {gbs:7.1f} GB/s", flush=True)

    record("dense", dense_fns, dense_total, len(layers))
    record("ours", ours_fns, ours_total, 2 * len(layers))
    with dispatch.switched(use_pdl=False):
        record("ours, no PDL", ours_fns, ours_total, 2 * len(layers))
    per_block = len(stacked_fns) // blocks
    with dispatch.switched(reduce_splits=False):
        record("ours, siblings, U sums", stacked_fns, ours_total, 2 * per_block)
    with launch.tuning(remeasure=retune):  # stacked shapes the table lacks (all with --retune), one call per shape
        for fn in stacked_fns[:per_block]:
            fn()
    record("ours, siblings", stacked_fns, ours_total, 2 * per_block)
    del stacked_fns
    per_block_stages = stage_bytes[: 2 * len(layers)]
    readers = [_reader(n, programs)[0] for n in per_block_stages * blocks]
    record("read/launch", readers, ours_total, len(per_block_stages))
    del readers
    sib = [n for pair in sib_bytes.values() for n in pair]
    readers = [_reader(n // blocks, programs)[0] for _ in range(blocks) for n in sib]
    record("read/sibling", readers, ours_total, len(sib))
    del readers
    ops = [sum(pair) for pair in sib_bytes.values()]
    readers = [_reader(n // blocks, programs)[0] for _ in range(blocks) for n in ops]
    record("read/op", readers, ours_total, len(ops))
    del readers
    readers = [_reader(ours_total // blocks, programs)[0] for _ in range(blocks)]
    record("read/block", readers, ours_total, 1)
    del readers
    torch.cuda.empty_cache()
    return {"blocks": blocks, "dense_bytes": dense_total, "ours_bytes": ours_total, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-7b,llama-3.2-1b")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--configs", help="write the launch configs tuned here (stacked shapes) as a table")
    p.add_argument("--retune", action="store_true", help="tune the stacked shapes even where the table has them")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "models": {}}
    with torch.no_grad():
        for name in args.models.split(","):
            if name not in MODELS or name not in BUILTIN:
                print(f"unknown model {name!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
                return 2
            result["models"][name] = run_model(name, sms, args.retune)
    if args.json:
        write_json(args.json, result)
    if args.configs:
        save_tuned(args.configs, result["machine"], "bench/chain_floor.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
