"""Start-up of a packaged bundle against the JIT path, on the GPU at hand.

    python bench/bundle_startup.py --model gpt2-s --target h100 [--workdir DIR] [--json OUT.json]

Converts MODEL (the reference paper's preset, a short BLAST fit: the weights' quality does not matter here),
packages it for TARGET, then runs ``blrdeploy run`` in fresh processes: the bundle with an empty Triton cache
(which must stay empty: nothing compiles), the checkpoint through Triton's JIT with an empty cache (cold: every
kernel compiles) and again with that cache filled (warm). Prints start-up (load + first forward), steady forward
time, files left in each Triton cache, and whether the bundle's output equals the JIT path's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import commit, machine
from safetensors.torch import load_file


def _cli(*args: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "blrdeploy", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout) if "--json" in args else {}


def _files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--structure", default="blast")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--steps", type=int, default=30, help="BLAST fit steps of the conversion")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bundle-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = work / f"{args.model}-{args.structure}", work / f"{args.model}-{args.target}"
    if not ckpt.exists():
        preset = ["--preset", "paper"] if args.structure != "lowrank" else []
        _cli("convert", args.model, "--structure", args.structure, *preset, "--steps", str(args.steps),
             "--device", "cuda", "-o", str(ckpt), "--json")  # fmt: skip
    t0 = time.perf_counter()
    pkg = _cli("package", str(ckpt), "--target", args.target, "-o", str(bundle), "--overwrite", "--no-tune",
               "--max-tokens", str(args.max_tokens), "--json")  # fmt: skip
    package_s = time.perf_counter() - t0
    rows = []
    caches = {name: work / f"triton-cache-{name}" for name in ("bundle", "jit")}
    for cache in caches.values():
        cache.mkdir(exist_ok=True)
        for f in cache.rglob("*"):
            if f.is_file():
                f.unlink()
    runs = [
        ("bundle", ["run", "--bundle", str(bundle)], caches["bundle"]),
        ("jit cold", ["run", str(ckpt)], caches["jit"]),
        ("jit warm", ["run", str(ckpt)], caches["jit"]),
    ]
    for label, cmd, cache in runs:
        out = work / f"out-{label.replace(' ', '-')}.safetensors"
        r = _cli(*cmd, "--output", str(out), "--json", env={"TRITON_CACHE_DIR": str(cache)})
        rows.append({"run": label, **r, "triton_cache_files": _files(cache)})
    outs = {r["run"]: load_file(r["output_file"])["output"] for r in rows}
    diff = (outs["bundle"].double() - outs["jit cold"].double()).abs().max().item()
    verify = subprocess.run(
        [sys.executable, "-m", "blrdeploy", "verify-bundle", str(bundle), "--json"], capture_output=True, text=True
    )
    result = {
        "commit": commit(),
        "machine": machine(),
        "model": args.model,
        "structure": args.structure,
        "target": args.target,
        "package": {**pkg, "wall_seconds": round(package_s, 1)},
        "runs": rows,
        "bundle_vs_jit_max_abs": diff,
        "bitwise_equal": bool(torch.equal(outs["bundle"], outs["jit cold"])),
        "verify_bundle": {"exit": verify.returncode, **json.loads(verify.stdout or "{}")},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"{args.model} {args.structure} -> {args.target} on {result['machine'].get('gpu')} at {result['commit']}")
    print(f"package: {pkg['kernels']} kernels, compile {pkg['compile_seconds']} s, total {package_s:.1f} s")
    print(f"{'run':10} {'start-up s':>10} {'load s':>8} {'first fwd s':>11} {'fwd ms':>8} {'cache files':>11}")
    for r in rows:
        print(
            f"{r['run']:10} {r['startup_seconds']:10.2f} {r['load_seconds']:8.2f} {r['first_forward_seconds']:11.2f} "
            f"{r['forward_ms']:8.2f} {r['triton_cache_files']:11d}"
        )
    print(f"bundle vs JIT output: max abs diff {diff:.3e}, bitwise equal: {result['bitwise_equal']}")
    print(f"verify-bundle exit {verify.returncode}: {[c['detail'] for c in result['verify_bundle'].get('checks', [])]}")


if __name__ == "__main__":
    main()
