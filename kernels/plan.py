"""Launch planning: which kernel specializations and launch configs the launchers use for a BLR layer shape at
each token bucket, planned for a target GPU without one (the launchers run on meta tensors and a
:class:`~.runtime.Recorder` collects what they would launch), and the launch configs measured on the GPU at hand.

Bundles (``blrdeploy.exporters.bundle``) compile and ship what a :class:`Plan` names. The layers reach this module
as plain :class:`LayerShape` values, so nothing here knows a module class or a checkpoint: the structures and
exporters above extract the shapes and hand them down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .configs import BUCKETS, ConfigTable, bucket

Progress = Callable[[str, int, int], None]  # (stage, done, total) of a long step: measuring, compiling, writing


class PlanTarget(Protocol):
    """What a plan depends on of its GPU (a device profile and a ``runtime.Target`` both qualify)."""

    arch: int  # compute capability, e.g. 87
    sm_count: int
    pdl: bool  # whether dependent launches are used


def gpu_arch(device: torch.device | None = None) -> int | None:
    """The compute capability (e.g. 90) of the GPU at hand, or None without a CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def representative_tokens(bucket: int) -> int:
    """The token count a bucket is planned at: odd, so every stride that depends on it is planned unspecialized
    (a cubin compiled for the odd count also serves the even ones; see runtime.Spec)."""
    return 1 if bucket == 1 else bucket - 1


def buckets_up_to(max_tokens: int) -> list[int]:
    """The token buckets a forward of at most ``max_tokens`` tokens can fall in."""
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    return [b for b in BUCKETS if b <= bucket(max_tokens)]


@dataclass(frozen=True)
class LayerShape:
    """What a BLR layer's kernels depend on: structure, factor shapes and whether it has a bias."""

    structure: str
    factors: tuple[tuple[str, tuple[int, ...]], ...]
    bias: bool
    in_features: int
    out_features: int

    @property
    def key(self) -> str:
        dims = ",".join(f"{n}{'x'.join(map(str, s))}" for n, s in self.factors)
        return f"{self.structure}:{dims}{':bias' if self.bias else ''}"

    def tensors(self, device, dtype, n: int, seed: int | None = None) -> tuple:
        """(x, *factors, bias) of this shape: empty on the meta device, seeded random elsewhere."""
        g = None if seed is None else torch.Generator(device=device).manual_seed(seed)

        def make(*shape, scale=1.0):
            if str(device) == "meta":
                return torch.empty(*shape, device=device, dtype=dtype)
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        factors = [make(*s, scale=s[-1] ** -0.5) for _, s in self.factors]
        return (make(n, self.in_features), *factors, make(self.out_features) if self.bias else None)


def launcher(structure: str) -> Callable:
    """The launcher that runs a structure's forward: called as ``launcher(s)(x, *factors, bias)``."""
    from . import launch  # deferred: loads Triton

    return {"blast": launch.blast_forward, "monarch": launch.monarch_forward, "lowrank": launch.lowrank_forward}[
        structure
    ]


@dataclass
class Plan:
    """Per layer shape and bucket: the specs launched and the configs chosen."""

    specs: dict[str, dict[int, list]] = field(default_factory=dict)  # shape key -> bucket -> [Spec]
    configs: dict[str, dict[int, dict]] = field(default_factory=dict)  # shape key -> bucket -> {table key: Config}

    def all_specs(self) -> list:
        seen = {}
        for per_bucket in self.specs.values():
            for specs in per_bucket.values():
                seen.update(dict.fromkeys(specs))
        return list(seen)

    def table(self, arch: int, source: str) -> ConfigTable:
        entries = {
            k: c for per_bucket in self.configs.values() for cfgs in per_bucket.values() for k, c in cfgs.items()
        }
        return ConfigTable(arch, entries, source)


def plan(shapes: list[LayerShape], target: PlanTarget, dtype: torch.dtype, buckets: list[int], table=None) -> Plan:
    """What the launchers would launch on ``target`` for each shape and bucket, with configs from ``table``
    (then the shipped table of the architecture, then the heuristic defaults)."""
    from . import launch, runtime  # deferred: loads Triton

    result = Plan()
    previous = launch.use_table(table if table is not None else ConfigTable(target.arch))
    try:
        for shape in shapes:
            for b in buckets:
                recorder = runtime.Recorder()
                with runtime.using(recorder, runtime.Target(target.arch, target.sm_count, target.pdl)):
                    launcher(shape.structure)(*shape.tensors("meta", dtype, representative_tokens(b)))
                result.specs.setdefault(shape.key, {})[b] = list(recorder.specs)
                result.configs.setdefault(shape.key, {})[b] = dict(recorder.configs)
    finally:
        launch.use_table(previous)
    return result


def measure(
    shapes: list[LayerShape], dtype: torch.dtype, buckets: list[int], progress: Progress | None = None
) -> ConfigTable:
    """Tune every config key of these shapes on the GPU at hand (timed, not looked up): a ConfigTable."""
    from . import launch  # deferred: loads Triton

    table = ConfigTable(gpu_arch(), source=f"measured on {torch.cuda.get_device_name()}")
    previous = launch.use_table(table)
    try:
        total = len(shapes) * len(buckets)
        for i, (shape, b) in enumerate((s, b) for s in shapes for b in buckets):
            if progress:
                progress("measuring launch configs", i, total)
            with launch.tuning(remeasure=True), torch.no_grad():
                launcher(shape.structure)(*shape.tensors("cuda", dtype, b, seed=i))
            torch.cuda.synchronize()
        if progress:
            progress("measuring launch configs", total, total)
    finally:
        launch.use_table(previous)
    return table


def config_sources(the_plan: Plan, arch: int, measured: ConfigTable | None) -> dict[str, str]:
    """Where each config of a plan came from: the measured table, the architecture's shipped table, or the
    heuristic defaults (in the order the launchers look them up)."""
    from . import launch  # deferred: loads Triton

    shipped = launch.shipped_table(arch)
    sources = {}
    for per_bucket in the_plan.configs.values():
        for cfgs in per_bucket.values():
            for key in cfgs:
                if measured is not None and measured.get(key) is not None:
                    sources[key] = measured.source
                elif shipped.get(key) is not None:
                    sources[key] = f"shipped table for sm_{arch}"
                else:
                    sources[key] = "heuristic default"
    return sources
