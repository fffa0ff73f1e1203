"""Per-device bundles (DESIGN §4): everything a GPU needs to run a converted model without compiling anything.

A bundle directory holds::

    manifest.json          format, target profile, tool versions, layer -> kernel -> config plan, sha256 of every
                           file, and the sha256 of its own content (so a changed byte anywhere is caught)
    checkpoint/            the converted checkpoint, weights in the target's dtype (the kernels read the factors'
                           canonical layouts in place, so that is also the kernels' layout)
    kernels/sm_XX/         one cubin + JSON launch descriptor per kernel specialization the model needs,
                           launch_configs.json (the config table for every layer and token bucket)
    onnx/model.onnx        the float32 ONNX reference (optional)
    sample/                a seeded input and the float32 CPU reference output of the bundle's own weights

Packaging plans every BLR layer at one token count per bucket up to ``max_tokens`` with the launchers' own code
on meta tensors (:class:`~blrdeploy.kernels.runtime.Recorder`), planned for the target's architecture and SM
count, and compiles what that plan launches with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``: no
GPU needed. Loading verifies every checksum, refuses a GPU of another architecture, and sends every launch to the
shipped cubins through the CUDA driver.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from blrdeploy.conversion.checkpoint import (
    BLR_CONFIG,
    CheckpointError,
    atomic_directory,
    atomic_write_text,
    copy_tokenizer,
    file_sha256,
    read_blr_config,
    read_format_file,
    tool_versions,
)
from blrdeploy.conversion.checkpoint import verify as verify_checkpoint
from blrdeploy.measure import devices

# 2: the manifest carries its own checksum; 3: the grouped GEMM takes a norm's row scale and BLAST layers with
# b_out <= 4 run fused V+S above 64 tokens, so a version-2 bundle lacks kernels this launcher asks for; 4: the
# many-token S mix walks token tiles (a STAGES constexpr) in tiles chosen by N, which a version-3 bundle lacks
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
SELF_SUM = "manifest_sha256"  # the manifest's own checksum, over its canonical JSON without this field
CHECKPOINT = "checkpoint"
SAMPLE_INPUT, SAMPLE_EXPECTED = "sample/input.safetensors", "sample/expected.safetensors"
ONNX_FILE = "onnx/model.onnx"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, truncated, of another format, or for another GPU."""


class ChecksumError(BundleError):
    """A file of the bundle does not match the checksum its manifest records."""


def _kernels_dir(arch: int) -> str:
    return f"kernels/sm_{arch}"


def representative_tokens(bucket: int) -> int:
    """The token count a bucket is planned at: odd, so every stride that depends on it is planned unspecialized
    (a cubin compiled for the odd count also serves the even ones; see runtime.Spec)."""
    return 1 if bucket == 1 else bucket - 1


# ------------------------------------------------------------------------------------------------ planning


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


def layer_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """Layer name -> shape of every BLR layer of a model."""
    from blrdeploy.structures.modules import _BLRLinear

    return {name: _shape_of(m) for name, m in model.named_modules() if isinstance(m, _BLRLinear)}


def layer_shapes_of_checkpoint(blr_config: dict) -> dict[str, LayerShape]:
    """The same from a checkpoint's blr_config.json, with the modules built on the meta device (no weights read)."""
    from blrdeploy.conversion.checkpoint import blr_module

    try:
        return {layer["name"]: _shape_of(blr_module(layer)) for layer in blr_config["layers"]}
    except CheckpointError as e:
        raise BundleError(str(e)) from e


def _shape_of(m) -> LayerShape:
    factors = tuple((k, tuple(v.shape)) for k, v in m.factors().items())
    return LayerShape(m.structure, factors, m.bias is not None, m.in_features, m.out_features)


def _forward(structure: str):
    from blrdeploy.kernels import launch

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

    def table(self, arch: int, source: str):
        from blrdeploy.kernels import ConfigTable

        entries = {
            k: c for per_bucket in self.configs.values() for cfgs in per_bucket.values() for k, c in cfgs.items()
        }
        return ConfigTable(arch, entries, source)


def buckets_up_to(max_tokens: int) -> list[int]:
    from blrdeploy.kernels import BUCKETS, bucket

    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    return [b for b in BUCKETS if b <= bucket(max_tokens)]


def plan(shapes: list[LayerShape], device: devices.Device, dtype: torch.dtype, buckets: list[int], table=None) -> Plan:
    """What the launchers would launch on ``device`` for each shape and bucket, with configs from ``table``
    (then the shipped table of the architecture, then the heuristic defaults)."""
    from blrdeploy.kernels import ConfigTable, launch, runtime

    result = Plan()
    previous = launch.use_table(table if table is not None else ConfigTable(device.arch))
    try:
        for shape in shapes:
            for b in buckets:
                recorder = runtime.Recorder()
                with runtime.using(recorder, runtime.Target(device.arch, device.sm_count, device.pdl)):
                    _forward(shape.structure)(*shape.tensors("meta", dtype, representative_tokens(b)))
                result.specs.setdefault(shape.key, {})[b] = list(recorder.specs)
                result.configs.setdefault(shape.key, {})[b] = dict(recorder.configs)
    finally:
        launch.use_table(previous)
    return result


def measure(shapes: list[LayerShape], dtype: torch.dtype, buckets: list[int], progress: Progress | None = None):
    """Tune every config key of these shapes on the GPU at hand (timed, not looked up): a ConfigTable."""
    from blrdeploy.kernels import ConfigTable, launch, tuning

    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    table = ConfigTable(10 * major + minor, source=f"measured on {name}")
    previous = launch.use_table(table)
    try:
        total = len(shapes) * len(buckets)
        for i, (shape, b) in enumerate((s, b) for s in shapes for b in buckets):
            if progress:
                progress("measuring launch configs", i, total)
            with tuning(remeasure=True), torch.no_grad():
                _forward(shape.structure)(*shape.tensors("cuda", dtype, b, seed=i))
            torch.cuda.synchronize()
        if progress:
            progress("measuring launch configs", total, total)
    finally:
        launch.use_table(previous)
    return table


def _config_sources(plan_: Plan, arch: int, measured) -> dict[str, str]:
    from blrdeploy.kernels.launch import _shipped

    shipped = _shipped(arch)
    sources = {}
    for per_bucket in plan_.configs.values():
        for cfgs in per_bucket.values():
            for key in cfgs:
                if measured is not None and measured.get(key) is not None:
                    sources[key] = measured.source
                elif shipped.get(key) is not None:
                    sources[key] = f"shipped table for sm_{arch}"
                else:
                    sources[key] = "heuristic default"
    return sources


# ------------------------------------------------------------------------------------------------ compiling


def _compile_one(spec_json: dict, arch: int) -> tuple[bytes, dict]:
    from blrdeploy.kernels import aot, runtime

    return aot.compile_spec(runtime.Spec.from_json(spec_json), arch)


def compile_specs(specs: list, arch: int, jobs: int | None = None, progress: Progress | None = None) -> list:
    """(cubin, descriptor) per spec, compiled in parallel worker processes (spawned: safe after CUDA init)."""
    import multiprocessing

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    results = [None] * len(specs)
    if progress:
        progress("compiling kernels", 0, len(specs))
    with _worker_environment(), ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_compile_one, s.to_json(), arch): i for i, s in enumerate(specs)}
        for done, future in enumerate(as_completed(futures), 1):
            spec = specs[futures[future]]
            try:
                results[futures[future]] = future.result()
            except Exception as e:  # the worker's compiler error, reported per kernel
                raise BundleError(
                    f"compiling {spec.kernel} {dict(spec.constexprs)} warps={spec.num_warps} "
                    f"stages={spec.num_stages} for sm_{arch} failed: {type(e).__name__}: {str(e)[:500]}"
                ) from None
            if progress:
                progress("compiling kernels", done, len(specs))
    return results


@contextlib.contextmanager
def _worker_environment():
    """What the spawned compile workers inherit: no TRITON_INTERPRET (under the interpreter Triton compiles
    nothing) and FMA contraction stated (Triton's default, which Triton 3.9 warns about when unset)."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spec_file(spec) -> str:
    digest = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec.kernel}-{digest}"


def _write_kernels(root: Path, arch: int, specs: list, compiled: list) -> dict:
    """Writes cubins and descriptors under root; returns spec -> file stem (relative to the bundle)."""
    kdir = root / _kernels_dir(arch)
    kdir.mkdir(parents=True, exist_ok=True)
    stems = {}
    for spec, (cubin, descriptor) in zip(specs, compiled, strict=True):
        stem = _spec_file(spec)
        (kdir / f"{stem}.cubin").write_bytes(cubin)
        (kdir / f"{stem}.json").write_text(json.dumps(descriptor, indent=1))
        stems[spec] = f"{_kernels_dir(arch)}/{stem}"
    return stems


# ------------------------------------------------------------------------------------------------ packaging


def _copy_checkpoint(src: Path, cfg: dict, dst: Path, dtype: torch.dtype) -> dict:
    """The checkpoint with floating tensors cast to ``dtype``; refuses non-finite weights, naming the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = src / cfg["weights"]["file"]
    tensors = {}
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.is_floating_point():
                if not torch.isfinite(t).all():
                    raise BundleError(f"{src}: tensor {name} has NaN or infinite values; refusing to package it")
                t = t.to(dtype)
                if not torch.isfinite(t).all():
                    raise BundleError(f"{src}: tensor {name} overflows {str(dtype).removeprefix('torch.')}")
            tensors[name] = t.contiguous()
    dst.mkdir(parents=True)
    if (src / "config.json").is_file():
        shutil.copyfile(src / "config.json", dst / "config.json")
    copy_tokenizer(src, dst)
    save_file(tensors, str(dst / cfg["weights"]["file"]), metadata={"format": "pt", "blrdeploy_format": "1"})
    out = dst / cfg["weights"]["file"]
    cfg = {
        **cfg,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}),
        "weights": {"file": cfg["weights"]["file"], "bytes": out.stat().st_size, "sha256": file_sha256(out)},
        "packaged_from": {"path": str(src), "weights_sha256": cfg["weights"]["sha256"]},
    }
    (dst / BLR_CONFIG).write_text(json.dumps(cfg, indent=2))
    return cfg


def _sample(checkpoint: Path, cfg: dict, root: Path) -> dict:
    """A seeded input and the float32 CPU reference output of the bundle's weights."""
    from safetensors.torch import save_file

    from blrdeploy.conversion.checkpoint import load
    from blrdeploy.models.outputs import model_output, sample_inputs

    model = load(checkpoint, device="cpu", dtype=torch.float32)
    inputs = sample_inputs(model, cfg, batch=1, seed=0)
    expected = model_output(model, inputs)
    (root / "sample").mkdir()
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(root / SAMPLE_INPUT))
    save_file({"output": expected.contiguous()}, str(root / SAMPLE_EXPECTED))
    return {"input": SAMPLE_INPUT, "expected": SAMPLE_EXPECTED, "shape": list(expected.shape)}


def _host_tools(arch: int) -> dict:
    """Versions of what built the bundle; ptxas is the assembler that wrote the cubins (the device's driver must
    be of the same CUDA major version)."""
    import platform
    import re

    versions = {**tool_versions("triton"), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        import onnx

        versions["onnx"] = onnx.__version__
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas_version

        try:
            text = get_ptxas_version(arch)  # Triton >= 3.9 picks the assembler by architecture
        except TypeError:
            text = get_ptxas_version()
        found = re.search(r"release (\S+),", text)
        versions["ptxas"] = found.group(1) if found else "unknown"
    return versions


def package(
    checkpoint: str | Path,
    target: str | devices.Device,
    out: str | Path,
    *,
    dtype: str | None = None,
    max_tokens: int = 16384,
    tune: bool | None = None,
    with_onnx: bool = True,
    archive: bool = False,
    overwrite: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Build a bundle of ``checkpoint`` for ``target`` at ``out``; returns the manifest. ``tune``: measure the
    launch configs on the GPU at hand (None: when it has the target's architecture); else they come from the
    architecture's shipped table and the heuristic defaults. Written atomically; ``archive`` adds OUT.tar.gz."""
    from blrdeploy.models.outputs import TOLERANCE

    checkpoint, out = Path(checkpoint), Path(out)
    device = target if isinstance(target, devices.Device) else devices.get(target)
    dtype_name = dtype or device.dtype
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    torch_dtype = DTYPES[dtype_name]
    buckets = buckets_up_to(max_tokens)
    try:
        verify_checkpoint(checkpoint)
        cfg = read_blr_config(checkpoint)
    except CheckpointError as e:
        raise BundleError(str(e)) from e
    if not cfg["layers"]:
        raise BundleError(f"{checkpoint} has no BLR layer: there is nothing for the kernels to run")
    shapes_by_layer = layer_shapes_of_checkpoint(cfg)
    shapes = list(dict.fromkeys(shapes_by_layer.values()))
    here = _gpu_arch()
    if tune is None:
        tune = here == device.arch
    if tune and here != device.arch:
        found = "no CUDA GPU" if here is None else f"an sm_{here} GPU"
        raise BundleError(
            f"measuring launch configs for {device.name} (sm_{device.arch}) needs that GPU; found {found}"
        )
    measured = measure(shapes, torch_dtype, buckets, progress) if tune else None
    the_plan = plan(shapes, device, torch_dtype, buckets, measured)
    specs = the_plan.all_specs()
    t0 = time.perf_counter()
    compiled = compile_specs(specs, device.arch, jobs, progress)
    compile_s = time.perf_counter() - t0
    sources = _config_sources(the_plan, device.arch, measured)
    with atomic_directory(out, overwrite, MANIFEST) as tmp:
        if progress:
            progress("writing the bundle", 0, 1)
        bundle_cfg = _copy_checkpoint(checkpoint, cfg, tmp / CHECKPOINT, torch_dtype)
        stems = _write_kernels(tmp, device.arch, specs, compiled)
        table_file = _write_table(tmp, the_plan, device.arch)
        sample = _sample(tmp / CHECKPOINT, bundle_cfg, tmp)
        sample["tolerance"] = TOLERANCE[torch_dtype]
        onnx_entry = None
        if with_onnx:
            if progress:
                progress("exporting the ONNX reference", 0, 1)
            from blrdeploy.exporters.onnx import export_checkpoint

            export_checkpoint(tmp / CHECKPOINT, tmp / ONNX_FILE)
            onnx_entry = {"file": ONNX_FILE}
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": device.to_json(),
            "dtype": dtype_name,
            "tool_versions": _host_tools(device.arch),
            "checkpoint": {
                "dir": CHECKPOINT,
                "source": bundle_cfg["source"],
                "packaged_from_sha256": cfg["weights"]["sha256"],
            },
            "buckets": buckets,
            "launch_configs": {
                "file": table_file,
                "measured_on": measured.source.removeprefix("measured on ") if measured is not None else None,
                "sources": _count(sources.values()),
            },
            "kernels": [stems[s] for s in specs],
            "compile_seconds": round(compile_s, 1),
            "plans": _plan_entries(the_plan, shapes, stems, sources),
            "layers": [{"name": n, "structure": s.structure, "plan": s.key} for n, s in shapes_by_layer.items()],
            "onnx": onnx_entry,
            "sample": sample,
        }
        _write_manifest(tmp, manifest)
    if archive:
        make_archive(out)
    elif overwrite:
        archive_path(out).unlink(missing_ok=True)  # the replaced bundle's archive would no longer match it
    if progress:
        progress("writing the bundle", 1, 1)
    return manifest


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _canonical_sum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_manifest(root: Path, manifest: dict, leaving: set[str] = frozenset()) -> None:
    """Checksums every file under root (but the manifest and those ``leaving``), fsyncs them, then writes
    manifest.json with its own checksum in one atomic replace: the single commit point of a bundle."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
        and p.relative_to(root).as_posix() not in leaving
    )  # fmt: skip
    for p in files:
        with p.open("rb") as f:
            os.fsync(f.fileno())
    manifest["files"] = {p.relative_to(root).as_posix(): file_sha256(p) for p in files}
    manifest[SELF_SUM] = _canonical_sum(manifest)
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def archive_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".tar.gz")


def make_archive(bundle: Path) -> Path:
    """BUNDLE.tar.gz beside the directory, written atomically; members are under ``BUNDLE/``."""
    bundle = Path(bundle)
    dest = archive_path(bundle)
    fd, tmp = tempfile.mkstemp(dir=bundle.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(bundle, arcname=bundle.name)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


# ------------------------------------------------------------------------------------------------ reading


def _extract(archive: Path) -> Path:
    """Extracts a bundle archive into a temporary directory (removed at exit) and returns the folder holding its
    manifest (the archive's one top folder, or its root). A truncated or corrupt archive, or a member that is not
    a plain file or folder inside it, is a BundleError."""
    tmp = Path(tempfile.mkdtemp(prefix="blrdeploy-bundle-"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            for m in tar.getmembers():
                parts = [p for p in PurePosixPath(m.name).parts if p != "."]
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise BundleError(f"{archive}: member {m.name!r} is not a plain file inside the bundle folder")
                if parts:
                    members.append(m)
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)  # noqa: S202 (members checked above)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{archive} is truncated or corrupt: {type(e).__name__}: {e}") from None
    if (tmp / MANIFEST).is_file():
        return tmp
    found = [d for d in tmp.iterdir() if (d / MANIFEST).is_file()]
    if len(found) != 1:
        raise BundleError(f"{archive} holds no bundle: no {MANIFEST} at its root or in one top folder")
    return found[0]


def open_bundle(path: str | Path) -> tuple[Path, dict]:
    """(bundle directory, manifest) of a bundle directory or archive; checks the format, not the checksums."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"no such bundle: {path}")
    if path.is_file():
        path = _extract(path)
    try:
        manifest = read_format_file(
            path / MANIFEST, "a blrdeploy bundle", FORMAT_VERSION, (), BundleError, ChecksumError
        )
    except BundleError as exc:
        if "format version" in str(exc):
            raise BundleError(f"{exc}: package the checkpoint again with this blrdeploy") from None
        raise
    if manifest.get(SELF_SUM) != _canonical_sum(manifest):  # before trusting any field of it
        raise ChecksumError(f"{MANIFEST} does not match its own checksum: the manifest was changed or corrupted")
    for key in ("target", "dtype", "files", "kernels", "launch_configs", "checkpoint", "sample", "buckets"):
        if key not in manifest:
            raise BundleError(f"{path / MANIFEST} lacks the {key!r} field")
    return path, manifest


def verify_files(root: Path, manifest: dict) -> int:
    """Every file the manifest lists has its recorded sha256, and the manifest its own; returns the file count.
    Raises ChecksumError naming the first file that differs or is missing."""
    if manifest.get(SELF_SUM) != _canonical_sum(manifest):
        raise ChecksumError(f"{MANIFEST} does not match its own checksum: the manifest was changed or corrupted")
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise ChecksumError(f"{rel} is missing from the bundle")
        if file_sha256(p) != digest:
            raise ChecksumError(f"{rel} does not match its sha256 in the manifest: corrupted or modified")
    return len(manifest["files"])


def target_of(manifest: dict) -> devices.Device:
    try:
        return devices.Device.from_json(manifest["target"], "the bundle's target")
    except (TypeError, ValueError) as e:
        raise BundleError(str(e)) from None


def _gpu_arch(device: torch.device | None = None) -> int | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def check_gpu(target: devices.Device, gpu_arch: int, gpu_name: str) -> None:
    """Cubins run on the architecture they were compiled for only."""
    if gpu_arch != target.arch:
        raise BundleError(
            f"this bundle is for {target.description} (sm_{target.arch}); this GPU is {gpu_name} (sm_{gpu_arch}). "
            f"Package the checkpoint for this GPU instead (blrdeploy package CHECKPOINT --target ...)"
        )


@dataclass
class Bundle:
    root: Path
    manifest: dict
    target: devices.Device
    kernels: object | None = None  # the ShippedKernels backend once activated
    _restore: Callable[[], None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    def close(self) -> None:
        """Give the process back the kernels and config table it had before this bundle was activated."""
        if self._restore is not None:
            self._restore()
            self._restore = None


def _loader(image: bytes, descriptor: dict, spec):
    cache: dict[int, object] = {}

    def load_kernel(device: torch.device):
        from blrdeploy.kernels.cubin import Kernel

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in cache:
            cache[index] = Kernel(image, descriptor, torch.device("cuda", index), spec)
        return cache[index]

    return load_kernel


def _read_listed(root: Path, manifest: dict, rel: str) -> bytes:
    """A file's bytes, checked against the manifest (which must list it): what is launched is what was verified."""
    digest = manifest["files"].get(rel)
    if digest is None:
        raise ChecksumError(f"{rel} is named by the manifest's kernels but not among its checksummed files")
    try:
        data = (root / rel).read_bytes()
    except OSError:
        raise ChecksumError(f"{rel} is missing from the bundle") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumError(f"{rel} does not match its sha256 in the manifest: corrupted or modified")
    return data


def shipped_kernels(root: Path, manifest: dict, allow_jit: bool = False):
    """The bundle's cubins as a launch backend; every cubin and descriptor is read (and checked) now, so a later
    change on disk cannot reach a launch."""
    from blrdeploy.kernels import runtime

    variants = {}
    for stem in manifest["kernels"]:
        image = _read_listed(root, manifest, f"{stem}.cubin")
        try:
            descriptor = json.loads(_read_listed(root, manifest, f"{stem}.json"))
            spec = runtime.Spec.from_json(descriptor["spec"])
        except (ValueError, KeyError) as e:
            raise BundleError(f"kernel descriptor {stem}.json is unusable: {e}") from None
        variants[spec] = _loader(image, descriptor, spec)
    return runtime.ShippedKernels(
        variants, allow_jit=allow_jit, where=f"bundle {root}", max_tokens=manifest["buckets"][-1]
    )


def check_driver(manifest: dict) -> None:
    """The cubins' assembler (ptxas) must not be of a newer CUDA major version than the driver."""
    from blrdeploy.kernels.cubin import driver_version

    tools = manifest["tool_versions"]
    versions = [tools.get("ptxas", ""), tools.get("tuned_with", {}).get("ptxas", "")]  # retune may add cubins
    majors = {int(v.split(".")[0]): v for v in versions if v.split(".")[0].isdigit()}
    if not majors:
        return
    needs = max(majors)
    ptxas = majors[needs]
    driver = driver_version()
    if needs > driver // 1000:
        raise BundleError(
            f"the bundle's cubins were assembled by ptxas {ptxas} (CUDA {needs}); this GPU's driver supports CUDA "
            f"{driver // 1000}.{driver % 1000 // 10}: update the driver, or package with a Triton whose ptxas is "
            f"CUDA {driver // 1000}"
        )


def activate(bundle: Bundle, allow_jit: bool = False, device: torch.device | None = None) -> None:
    """Process-wide: every BLR launch goes to the bundle's cubins, planned as packaged, with its config table."""
    from blrdeploy.kernels import ConfigTable, launch, runtime

    try:
        table = ConfigTable.load(bundle.root / bundle.manifest["launch_configs"]["file"])
    except (OSError, ValueError) as e:
        raise BundleError(str(e)) from None
    kernels = shipped_kernels(bundle.root, bundle.manifest, allow_jit)
    if device is not None:  # load every module now: a driver that refuses them fails here, not mid-forward
        from blrdeploy.kernels.cubin import CudaError

        check_driver(bundle.manifest)
        try:
            for load_kernel in kernels.variants.values():
                load_kernel(device)
        except CudaError as e:
            tools = bundle.manifest["tool_versions"]
            raise BundleError(
                f"{e} (cubins from Triton {tools.get('triton')}, ptxas {tools.get('ptxas')}, "
                f"for sm_{bundle.target.arch})"
            ) from None
    t = bundle.target
    previous_backend = runtime.use(kernels, runtime.Target(t.arch, t.sm_count, t.pdl))
    previous_table = launch.use_table(table)

    def restore() -> None:
        runtime.use(*previous_backend)
        launch.use_table(previous_table)

    bundle.kernels, bundle._restore = kernels, restore


def load_bundle(path: str | Path, device: str | torch.device = "cuda", allow_jit: bool = False):
    """(model, bundle): checksums verified, the GPU's architecture checked, the model loaded in the bundle's
    dtype with its BLR layers on the shipped cubins (nothing is compiled; ``allow_jit`` lets a launch no cubin
    serves compile with a warning instead of failing). ``device="cpu"`` loads it for the PyTorch reference path.
    ``bundle.close()`` gives the process its previous kernels back."""
    from blrdeploy.conversion.checkpoint import load

    root, manifest = open_bundle(path)
    verify_files(root, manifest)
    bundle = Bundle(root, manifest, target_of(manifest))
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BundleError("no CUDA GPU is available; load the bundle with device='cpu' for the reference path")
        check_gpu(bundle.target, _gpu_arch(device), torch.cuda.get_device_name(device))
        activate(bundle, allow_jit, device)
    try:
        model = load(  # the bundle's cubins are planned per layer, not for stacked siblings
            root / manifest["checkpoint"]["dir"], device=device, dtype=bundle.dtype, fuse_siblings=False
        )
    except BaseException as e:
        bundle.close()
        if isinstance(e, CheckpointError):
            raise BundleError(str(e)) from e
        raise
    return model, bundle


def sample_check(model: torch.nn.Module, bundle: Bundle):
    """The bundle's sample input through ``model`` against the expected output: a validators Check."""
    from safetensors.torch import load_file

    from blrdeploy.models.outputs import compare, model_output

    inputs = load_file(str(bundle.root / bundle.manifest["sample"]["input"]))
    expected = load_file(str(bundle.root / bundle.manifest["sample"]["expected"]))["output"]
    out = model_output(model, inputs)
    return compare("sample output", out, expected, bundle.manifest["sample"]["tolerance"]), out


def retune(path: str | Path, jobs: int | None = None, progress: Progress | None = None) -> dict:
    """Measure the bundle's launch configs on the GPU at hand (which must be the bundle's architecture), compile
    the kernels the new plan needs, and rewrite the table and manifest in place. The manifest is the commit
    point: until it is replaced the old one stays valid, and cubins only it used are removed after."""
    root, manifest = open_bundle(path)
    if Path(path).is_file():
        raise BundleError("tune rewrites a bundle directory; extract the archive first")
    verify_files(root, manifest)
    target = target_of(manifest)
    if not torch.cuda.is_available():
        raise BundleError("tune measures launch configs on the GPU: no CUDA GPU is available")
    check_gpu(target, _gpu_arch(), torch.cuda.get_device_name())
    dtype = DTYPES[manifest["dtype"]]
    try:
        shapes_by_layer = layer_shapes_of_checkpoint(read_blr_config(root / manifest["checkpoint"]["dir"]))
    except CheckpointError as e:
        raise BundleError(str(e)) from e
    shapes = list(dict.fromkeys(shapes_by_layer.values()))
    buckets = manifest["buckets"]
    measured = measure(shapes, dtype, buckets, progress)
    the_plan = plan(shapes, target, dtype, buckets, measured)
    specs = the_plan.all_specs()
    have = set(manifest["kernels"])
    new = [s for s in specs if f"{_kernels_dir(target.arch)}/{_spec_file(s)}" not in have]
    compiled = compile_specs(new, target.arch, jobs, progress) if new else []
    _write_kernels(root, target.arch, new, compiled)
    stems = {s: f"{_kernels_dir(target.arch)}/{_spec_file(s)}" for s in specs}
    sources = _config_sources(the_plan, target.arch, measured)
    old_files = {
        f"{stem}{ext}" for stem in set(manifest["kernels"]) - set(stems.values()) for ext in (".cubin", ".json")
    }
    old_files.add(manifest["launch_configs"]["file"])
    table_file = _write_table(root, the_plan, target.arch)
    old_files.discard(table_file)
    manifest.update(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        kernels=[stems[s] for s in specs],
        launch_configs={"file": table_file, "measured_on": measured.source.removeprefix("measured on "),
                        "sources": _count(sources.values())},
        plans=_plan_entries(the_plan, shapes, stems, sources),
    )  # fmt: skip
    manifest["tool_versions"]["tuned_with"] = _host_tools(target.arch)
    _write_manifest(root, manifest, leaving=old_files)
    for rel in old_files:  # after the commit point: a crash before it leaves the old bundle whole
        (root / rel).unlink(missing_ok=True)
    return manifest


def _write_table(root: Path, the_plan: Plan, arch: int) -> str:
    """The config table under a name of its content, so a rewrite never touches the file a manifest lists."""
    table = the_plan.table(arch, "bundle plan")
    digest = hashlib.sha256(json.dumps(table.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    rel = f"{_kernels_dir(arch)}/launch_configs-{digest}.json"
    table.save(root / rel)
    return rel


def _plan_entries(the_plan: Plan, shapes: list[LayerShape], stems: dict, sources: dict) -> dict:
    """Per layer shape and bucket: the cubins launched and the configs chosen (with where each came from)."""
    return {
        shape.key: {
            f"N{b}": {
                "kernels": [stems[s] for s in the_plan.specs[shape.key][b]],
                "configs": {k: {**c.to_dict(), "source": sources[k]} for k, c in cfgs.items()},
            }
            for b, cfgs in the_plan.configs[shape.key].items()
        }
        for shape in shapes
    }
