"""Roofline predictions: per BLR layer and token count, the bytes and FLOPs of dense, of the PyTorch reference and
of our kernels' launch sequence, and the time each takes on a device profile (``blrdeploy.measure.devices``).

A stage's time is max(bytes / bandwidth, FLOPs / peak): memory and math fully overlapped, no launch overhead, no
cache reuse between stages. Element size is the model dtype's (2 bytes); float32 split partials are ignored.
Modeled stages:

* dense: read x and W, write y.
* PyTorch reference (``blrdeploy.structures.functional``): every einsum reads its operands and writes its result,
  and every intermediate is also copied once more (read + write) because the next einsum batches over another axis.
* our kernels: the path ``blrdeploy.kernels.dispatch`` picks, as the launchers do. BLAST fuses V and S (z never
  reaches memory) where ``blast_staged`` says so (few tokens, or few output blocks), otherwise runs V, the S mix and
  U; Monarch's permutation is folded into the index maps (one interleave pass added where ``monarch_direct`` says
  no); low-rank is two GEMMs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from blrdeploy.files import check_output_file
from blrdeploy.kernels.dispatch import blast_staged, monarch_direct
from blrdeploy.measure import devices
from blrdeploy.measure.bench import resolve
from blrdeploy.measure.devices import Device
from blrdeploy.measure.plots import require_matplotlib, roofline_png

PATHS = ("dense", "pytorch", "kernels")
# The reference paper's token counts per family (prefill / batch), plus single-token decode for the LLMs.
DEFAULT_TOKENS = {"llama": [1, 1024], "gpt2": [1, 384], "vit": [197, 197 * 64], "dit": [16384]}


@dataclass(frozen=True)
class Stage:
    name: str
    bytes: float
    flops: float

    def seconds(self, device: Device) -> float:
        return max(self.bytes / (device.bandwidth_gbs * 1e9), self.flops / (device.fp16_tflops * 1e12))


def _blocks(layer: dict) -> tuple[int, int]:
    b = layer.get("num_blocks")
    if isinstance(b, (list, tuple)):
        return int(b[0]), int(b[1])
    return int(b), int(b)


def stages(layer: dict, path: str, n: int, elem: int = 2) -> list[Stage]:
    """The memory and math of ``path`` for one layer (a blr_config.json layer entry) at ``n`` tokens."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; one of {', '.join(PATHS)}")
    i, o, r = layer["in_features"], layer["out_features"], layer.get("rank")
    bias = o * elem if layer.get("bias") else 0
    e = elem
    if path == "dense":
        return [Stage("dense", e * (n * i + i * o + n * o) + bias, 2 * n * i * o)]
    structure = layer["structure"]
    if structure == "lowrank":
        return [
            Stage("V", e * (n * i + i * r + n * r), 2 * n * i * r),
            Stage("U", e * (n * r + r * o + n * o) + bias, 2 * n * r * o),
        ]
    if structure == "blast":
        b_out, b_in = _blocks(layer)
        z, w, s = n * b_in * r, n * b_out * r, b_out * b_in * r
        v = Stage("V", e * (n * i + i * r + z), 2 * n * i * r)
        mix = Stage("S", e * (z + s + w), 2 * n * s)
        u = Stage("U", e * (w + o * r + n * o) + bias, 2 * n * r * o)
        if path == "kernels":
            if not blast_staged(n, b_out):
                return [Stage("V+S", e * (n * i + i * r + s + w), v.flops + mix.flops), u]
            return [v, mix, u]
        copies = [Stage("copy z", 2 * e * z, 0), Stage("copy w", 2 * e * w, 0)]
        return [v, copies[0], mix, copies[1], u]
    if structure == "monarch":
        b, _ = _blocks(layer)
        h = n * b * r  # stage 1 maps each of the b input blocks to R values
        s1 = Stage("stage 1", e * (n * i + r * i + h), 2 * n * i * r)
        s2 = Stage("stage 2", e * (h + o * r + n * o) + bias, 2 * n * r * o)
        if path == "kernels":
            if monarch_direct(n):
                return [s1, s2]
            return [s1, s2, Stage("interleave", 2 * e * n * o, 0)]
        return [s1, Stage("permute h", 2 * e * h, 0), s2, Stage("interleave", 2 * e * n * o, 0)]
    raise ValueError(f"unknown structure {structure!r}")


@dataclass
class Row:
    layer: str  # a representative name
    count: int  # layers of this shape
    shape: str
    tokens: int
    flops: dict  # path -> FLOPs of one layer
    bytes: dict  # path -> bytes of one layer
    seconds: dict  # path -> predicted seconds of one layer

    @property
    def intensity(self) -> dict:
        return {p: self.flops[p] / self.bytes[p] for p in PATHS}

    def to_json(self) -> dict:
        return {**asdict(self), "intensity": self.intensity}


def _shape_key(layer: dict) -> tuple:
    return (layer["structure"], layer["in_features"], layer["out_features"], str(layer.get("num_blocks")),
            layer["rank"], bool(layer.get("bias")))  # fmt: skip


def predict(layers: list[dict], device: Device, tokens: list[int]) -> list[Row]:
    """One row per distinct layer shape and token count."""
    groups: dict[tuple, list[dict]] = {}
    for layer in layers:
        groups.setdefault(_shape_key(layer), []).append(layer)
    rows = []
    for n in tokens:
        for members in groups.values():
            layer = members[0]
            per = {p: stages(layer, p, n) for p in PATHS}
            b = layer.get("num_blocks")
            rows.append(
                Row(
                    layer=layer["name"],
                    count=len(members),
                    shape=f"{layer['structure']} {layer['in_features']}>{layer['out_features']} "
                    + (f"b{b} " if b else "") + f"r{layer['rank']}",
                    tokens=n,
                    flops={p: sum(s.flops for s in st) for p, st in per.items()},
                    bytes={p: sum(s.bytes for s in st) for p, st in per.items()},
                    seconds={p: sum(s.seconds(device) for s in st) for p, st in per.items()},
                )
            )  # fmt: skip
    return rows


def totals(rows: list[Row], kept: list[dict] = (), device: Device | None = None) -> dict[int, dict]:
    """Per token count: predicted seconds of all converted layers per path and dense's speedup over each; with
    ``kept`` (the linears both models keep dense, e.g. the LM head) also the seconds of all linear layers and the
    speedup over them, which is the model's as far as its linears go (attention and norms are not modeled)."""
    out: dict[int, dict] = {}
    for row in rows:
        t = out.setdefault(row.tokens, dict.fromkeys(PATHS, 0.0))
        for p in PATHS:
            t[p] += row.count * row.seconds[p]
    for n, t in out.items():
        t["speedup_kernels"] = t["dense"] / t["kernels"]
        t["speedup_pytorch"] = t["dense"] / t["pytorch"]
        if kept and device is not None:
            t["kept_dense"] = sum(s.seconds(device) for layer in kept for s in stages(layer, "dense", n))
            t["speedup_all_linears"] = (t["dense"] + t["kept_dense"]) / (t["kernels"] + t["kept_dense"])
    return out


def measured_speedups(bench_result: dict) -> dict[int, dict]:
    """From ``blrdeploy bench --json``: per token count, dense's best time over the BLR model's best (prefill),
    and at one token the BLR model's best decode tokens/s over dense's."""
    variants = bench_result.get("variants") if isinstance(bench_result, dict) else None
    variants = variants or []
    if len(variants) != 2 or any(v.get("error") for v in variants):
        raise ValueError("the bench result must hold a dense and a BLR model that both ran")
    dense, blr = variants
    out: dict[int, dict] = {}
    for n in dict.fromkeys(r["tokens"] for r in blr["prefill"]):
        mine = min(r["ms"] for r in blr["prefill"] if r["tokens"] == n)
        theirs = [r["ms"] for r in dense["prefill"] if r["tokens"] == n]
        if theirs:
            out[n] = {"speedup": min(theirs) / mine, "what": "prefill, best mode each"}
    if blr["decode"] and dense["decode"]:
        best = max(r["tokens_per_s"] for r in blr["decode"]) / max(r["tokens_per_s"] for r in dense["decode"])
        out[1] = {"speedup": best, "what": "decode tokens/s, best mode each"}
    return out


@dataclass
class ModelReport:
    """A model's predicted rows and per-token-count totals on one device, beside what bench measured if given."""

    model: str
    device: Device
    rows: list[Row]
    totals: dict[int, dict]  # as totals(), each with "measured": bench's speedup at that N, or None
    measured_on: str | None = None  # the device of the bench result given, None without one

    def to_json(self) -> dict:
        return {"model": self.model, "target": self.device.to_json(), "rows": [r.to_json() for r in self.rows],
                "totals": self.totals}  # fmt: skip


def model_report(
    model: str, target: str | Device, structure: str = "blast", tokens: Sequence[int] | None = None,
    png: str | Path | None = None, measured: str | Path | None = None, overwrite: bool = False,
) -> ModelReport:  # fmt: skip
    """Predicts every BLR layer of ``model`` (a converted checkpoint directory, or a built-in model's conversion plan
    for ``structure``: the paper's preset where it has one, else half the parameters) on ``target`` (a device
    profile or its name) at ``tokens`` (default: the reference paper's counts for the family). With ``measured``,
    a ``blrdeploy bench --json`` result of the same model, its speedups stand beside the predicted ones; with
    ``png``, the roofline figure is written there. Nothing is allocated: the model is a skeleton on the meta
    device. A one-line ValueError for what cannot be predicted."""
    if png is not None:  # before any work; --overwrite to replace a file already there
        check_output_file(png, overwrite, "--png", suffixes=(".png",))
        require_matplotlib("--png")
    device = target if isinstance(target, Device) else devices.get(target)
    resolved = resolve(model, structure)
    layers = resolved.variants[1].layers
    bench_result, seen = _measured(Path(measured), model, resolved.structure) if measured is not None else (None, None)
    counts = list(tokens) if tokens else DEFAULT_TOKENS.get(resolved.family or "", [1, 1024])
    if not layers:
        raise ValueError(f"{model} has no BLR layer to predict")
    if any(n < 1 for n in counts):
        raise ValueError("--tokens must be positive integers")
    rows = predict(layers, device, counts)
    sums = totals(rows, resolved.kept, device)
    for n, t in sums.items():
        t["measured"] = None if seen is None else seen.get(n)
    if png is not None:
        roofline_png(rows, device, png)
    measured_on = None if bench_result is None else str(bench_result.get("device", "its device"))
    return ModelReport(model, device, rows, sums, measured_on)


def _measured(path: Path, model: str, structure: str) -> tuple[dict, dict[int, dict]]:
    """A bench --json result, checked to be one of ``model`` converted to ``structure``, and its speedups."""
    try:
        result = json.loads(path.read_text())
        speedups = measured_speedups(result)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--measured {path}: not a blrdeploy bench --json result ({exc})") from None
    benched = (result.get("model"), result.get("structure"))
    if benched != (model, structure) and not _same_checkpoint(benched[0], model):
        raise ValueError(f"--measured {path} is a bench of {benched[0]!r} ({benched[1]}), not {model!r} "
                         f"({structure})")  # fmt: skip
    return result, speedups


def _same_checkpoint(benched: str | None, model: str) -> bool:
    """Whether bench's model and roofline's are one checkpoint directory, however the path was written."""
    if not benched or not Path(model).is_dir():
        return False
    return Path(benched).resolve() == Path(model).resolve()
