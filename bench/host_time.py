"""Host time of one BLR layer call in eager mode (issue #23): what Python spends per call, beside
``torch.nn.functional.linear`` of the same layer in the same run.

    python bench/host_time.py [--models llama-7b,llama-3.2-1b] [--tokens 1,16] [--json OUT.json]

On a GPU every call is issued while the GPU is held busy by one long sleep kernel, so no call waits for the GPU
and the wall time of a loop of calls is host time alone (a few hundred launches, well inside the launch queue).
Per layer (the reference paper's preset), µs per call:

- ``linear``: ``F.linear`` with the dense weight;
- ``call``: the user's path, ``blrdeploy.structures.functional.<structure>_linear`` as a module's forward calls it
  (in eager no-grad calls the op's CUDA implementation directly, see ``ops.dispatch_free``; launch plan, launches);
- ``op``: ``torch.ops.blrdeploy.<structure>_linear`` through torch's dispatcher, as compiled graphs call it;
- ``launcher``: the launcher alone (``blrdeploy.kernels.<structure>_forward``), its plan replayed;
- ``planning``: the launcher deciding everything again (the launch plans bypassed), as every call did before;
- ``launches``: the same kernel launches issued with their arguments ready (Triton's or the driver's launch path);
- ``beyond``: ``call`` - ``launches``, the host cost the issue bounds at 25 µs;
- ``driver_*``: the same through the CUDA driver's launch path (``runtime.DriverKernels``) instead of Triton's.

Without a GPU (``--device cpu``) launches go to a backend that runs nothing, so ``launches`` is 0 and the other
columns are the Python around them: planning against replay on this CPU, not a GPU's figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from common import machine
from layers import LAYERS, OPS, STRUCTURES, factors, setting

from blrdeploy.kernels import launch, replay, runtime
from blrdeploy.structures import functional

LAUNCHERS = {"blast": "blast_forward", "monarch": "monarch_forward", "lowrank": "lowrank_forward"}


class _Nothing:
    """A backend that launches nothing (the CPU mode)."""

    name = "nothing"

    def launch(self, *args) -> None:
        pass


class _Keep:
    """A backend that keeps every launch's arguments, and runs them."""

    name = "keep"

    def __init__(self, inner) -> None:
        self.inner, self.launches = inner, []

    def launch(self, *args) -> None:
        self.launches.append(args)
        self.inner.launch(*args)


def host_us(fn, calls: int, cuda: bool) -> float:
    """Median over 5 rounds of the wall time per call of ``calls`` calls, the GPU held busy meanwhile."""
    fn()
    rounds = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)  # ~100 ms of one spinning thread: longer than the loop below
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        if cuda:
            torch.cuda.synchronize()
    return sorted(rounds)[2]


def measure(model, label, pattern, out_f, in_f, bias, structure, n, device, dtype, calls) -> dict:
    cuda = device.type == "cuda"
    b, r = setting(model, pattern, structure)
    fs = factors(structure, out_f, in_f, b, r, torch.Generator(device).manual_seed(0), dtype)
    x = torch.randn(n, in_f, device=device, dtype=dtype)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype)
    bv = torch.zeros(out_f, device=device, dtype=dtype) if bias else None
    launcher = getattr(launch, LAUNCHERS[structure])
    op = OPS[structure][0]
    call = getattr(functional, f"{structure}_linear")  # what a module's forward calls
    row = {"model": model, "layer": label, "structure": structure, "tokens": n}
    with torch.no_grad():
        row["linear"] = host_us(lambda: F.linear(x, w, bv), calls, cuda)
        # On a GPU both launch paths: Triton's JIT (the default) and the driver's (runtime.DriverKernels).
        backends = {"": runtime.JitKernels(), "driver_": runtime.DriverKernels()} if cuda else {"": _Nothing()}
        for prefix, backend in backends.items():
            with runtime.using(backend, None):
                if cuda:
                    row[prefix + "call"] = host_us(lambda: call(x, *fs, bv), calls, cuda)
                    row[prefix + "op"] = host_us(lambda: op(x, *fs, bv), calls, cuda)
                row[prefix + "launcher"] = host_us(lambda: launcher(x, *fs, bv), calls, cuda)
                row[prefix + "planning"] = host_us(lambda: launcher.__wrapped__(x, *fs, bv), calls, cuda)
                kept = _Keep(backend)
                with runtime.using(kept, None):
                    launcher.__wrapped__(x, *fs, bv)
                row["kernels"] = [k[0] for k in kept.launches]

                def launches_only(kept=kept) -> None:
                    for args in kept.launches:
                        runtime.launch(*args)

                row[prefix + "launches"] = host_us(launches_only, calls, cuda) if cuda else 0.0
            if cuda:
                row[prefix + "beyond"] = row[prefix + "call"] - row[prefix + "launches"]
                row[prefix + "call_over_linear"] = row[prefix + "call"] / row["linear"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,llama-3.2-1b")
    ap.add_argument("--structures", default=",".join(STRUCTURES))
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16
    models, structures = a.models.split(","), a.structures.split(",")
    rows = []
    for model, label, pattern, out_f, in_f, bias in LAYERS:
        if model not in models:
            continue
        for structure in structures:
            for n in (int(t) for t in a.tokens.split(",")):
                try:
                    rows.append(measure(model, label, pattern, out_f, in_f, bias, structure, n, device, dtype, a.calls))
                except KeyError:  # no paper setting for this structure
                    continue
                print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "plans": dict(replay.counts), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    cols = ["linear", "call", "op", "launcher", "planning", "launches", "beyond", "driver_call", "driver_launches"]
    print(f"\nhost µs per call, {result['machine'].get('gpu') or 'CPU (no launches)'}")
    print("layer                      | structure | N    | " + " | ".join(f"{c:>8}" for c in cols))
    for r in rows:
        cells = " | ".join(f"{r[c]:8.1f}" if c in r else f"{'-':>8}" for c in cols)
        print(f"{r['model'] + ' ' + r['layer']:26} | {r['structure']:9} | {r['tokens']:4} | {cells}")


if __name__ == "__main__":
    main()
