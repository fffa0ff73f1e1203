"""BLAST's many-token staged layer on the reference models' shapes: the S mix kernel's tiles against a copy of the
same bytes, and the layer's V and U stages against cuBLAS batched GEMMs (torch.bmm) and the dense layer. z and w are
laid out as bmm writes them, (b, N, r); the launcher's are (N, b, r).

    python bench/mix_sweep.py [--shapes llama7b-q,...] [--json OUT]

Every mix result is checked against a float32 einsum before it is timed; a wrong config is reported, never ranked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
from common import machine
from layers import write_json

from blrdeploy.kernels import launch
from blrdeploy.kernels.blast import blast_mix_dot_kernel

SHAPES = {  # name: N, b, q, p, r (Llama-7B at 1024 tokens, DiT-XL/2 at 64 x 256, GPT-2 S at 384)
    "llama7b-q": (1024, 16, 256, 256, 1024),
    "llama7b-gate": (1024, 16, 256, 688, 1488),
    "llama7b-down": (1024, 16, 688, 256, 1488),
    "dit-q": (16384, 9, 128, 128, 256),
    "dit-fc1": (16384, 9, 128, 512, 384),
    "gpt2-fc": (384, 6, 128, 512, 192),
}
# (BM, BR, warps, stages) x programs per SM (0: one token tile per program)
TILES = [(64, 32, 4, 2), (32, 32, 4, 3), (64, 16, 8, 2), (32, 16, 4, 3), (16, 8, 8, 3)]
PER_SM = (0, 2, 4, 8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _us(fn) -> float:
    return 1e3 * launch.gpu_time_ms(fn)


def mix(z, S, w, BM, BR, warps, stages, per_sm) -> None:
    b, N, r = z.shape
    bj = max(16, 1 << (b - 1).bit_length())
    r_tiles, n_tiles = _cdiv(r, BR), _cdiv(N, BM)
    sms = torch.cuda.get_device_properties(z.device).multi_processor_count
    grid = (n_tiles if per_sm == 0 else min(n_tiles, _cdiv(per_sm * sms, r_tiles)), r_tiles)
    blast_mix_dot_kernel[grid](
        z, S, w, N, r, b, b, z.stride(1), z.stride(0), z.stride(2), *S.stride(), w.stride(1), w.stride(0),
        w.stride(2), BJ=bj, BI=bj, BM=BM, BR=BR, STAGES=stages, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def sweep_mix(z, S) -> list[dict]:
    ref = torch.einsum("jnr,ijr->inr", z.float(), S.float())
    w = torch.empty_like(z)
    rows = []
    for (BM, BR, warps, stages), per_sm in itertools.product(TILES, PER_SM):
        cfg = dict(BM=BM, BR=BR, warps=warps, stages=stages, per_sm=per_sm)
        try:
            w.fill_(float("nan"))
            mix(z, S, w, BM, BR, warps, stages, per_sm)
            torch.cuda.synchronize()
            err = ((w.float() - ref).abs().max() / ref.abs().max()).item()
            if not err < 2e-2:
                rows.append({**cfg, "error": f"wrong: relative error {err}"})
                continue
            us = _us(lambda cfg=cfg: mix(z, S, w, **cfg))
        except Exception as e:  # noqa: BLE001 - a config the compiler or the chip refuses
            rows.append({**cfg, "error": str(e)[:160]})
            continue
        rows.append({**cfg, "us": us, "tbs": 2 * z.numel() * z.element_size() / us / 1e6})
    return rows


def stages_vs_cublas(x, U, S, V) -> dict:
    """Our staged layer against torch.bmm for its V and U stages (cuBLAS strided-batched) and the dense layer."""
    N = x.shape[0]
    b, q, _ = V.shape
    p = U.shape[1]
    xb = x.view(N, b, q).transpose(0, 1)
    z = torch.bmm(xb, V)
    wb = torch.einsum("jnr,ijr->inr", z.float(), S.float()).to(x.dtype)
    yb = torch.bmm(wb, U.transpose(1, 2))
    dense = torch.randn(b * p, b * q, device=x.device, dtype=x.dtype)
    return {
        "ours_layer_us": _us(lambda: launch.blast_forward(x, U, S, V)),
        "bmm_v_us": _us(lambda: torch.bmm(xb, V)),
        "bmm_u_us": _us(lambda: torch.bmm(wb, U.transpose(1, 2))),
        "permute_us": _us(lambda: yb.transpose(0, 1).reshape(N, b * p)),
        "dense_us": _us(lambda: torch.nn.functional.linear(x, dense)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    result = {"machine": machine(), "rows": []}
    for name in args.shapes.split(","):
        N, b, q, p, r = SHAPES[name]
        x = torch.randn(N, b * q, device=dev, dtype=dt, generator=g)
        V = torch.randn(b, q, r, device=dev, dtype=dt, generator=g) / q**0.5
        S = torch.randn(b, b, r, device=dev, dtype=dt, generator=g) / b**0.5
        U = torch.randn(b, p, r, device=dev, dtype=dt, generator=g) / r**0.5
        z = torch.randn(b, N, r, device=dev, dtype=dt, generator=g)  # (b_in, N, r)
        src, dst = z.clone(), torch.empty_like(z)
        row = {"shape": name, "N": N, "b": b, "q": q, "p": p, "r": r, "copy_us": _us(lambda d=dst, s=src: d.copy_(s))}
        row["mix"] = sweep_mix(z, S)
        row["best"] = sorted((m for m in row["mix"] if "us" in m), key=lambda m: m["us"])[:5]
        row.update(stages_vs_cublas(x, U, S, V))
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "mix"}), flush=True)
        if args.json_path:
            write_json(args.json_path, result)
    print(f"\n{'shape':13s} {'copy':>6s} {'mix':>6s} {'best tile':24s} {'layer':>6s} {'bmmV':>6s} {'bmmU':>6s} "
          f"{'perm':>6s} {'dense':>6s}  (µs)")  # fmt: skip
    for row in result["rows"]:
        best = row["best"][0] if row["best"] else {"us": float("nan")}
        tile = " ".join(f"{k}{best[k]}" for k in ("BM", "BR", "warps", "stages", "per_sm") if k in best)
        print(
            f"{row['shape']:13s} {row['copy_us']:6.1f} {best['us']:6.1f} {tile:24s} {row['ours_layer_us']:6.1f} "
            f"{row['bmm_v_us']:6.1f} {row['bmm_u_us']:6.1f} {row['permute_us']:6.1f} {row['dense_us']:6.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
