"""Building a bundle (``package``) and re-measuring one's launch configs in place (``retune``): the model's layer
shapes handed to the launch planner (``blrdeploy.kernels.plan``), the plan's kernels compiled, the checkpoint cast
to the target's dtype, the sample and ONNX reference written, and the manifest committed last."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blrdeploy.conversion.checkpoint import (
    BLR_CONFIG,
    CheckpointError,
    blr_module,
    copy_tokenizer,
    load,
    read_blr_config,
    tool_versions,
)
from blrdeploy.conversion.checkpoint import verify as verify_checkpoint
from blrdeploy.files import OutputError, atomic_directory, check_output_dir, check_output_file, file_sha256
from blrdeploy.kernels import plan as launch_plan
from blrdeploy.kernels.dtypes import DTYPES, dtype_named
from blrdeploy.kernels.plan import LayerShape, Plan, Progress
from blrdeploy.measure import devices
from blrdeploy.models.outputs import TOLERANCE, model_output, sample_inputs
from blrdeploy.structures.modules import BLRLinear

from .compile import compile_specs
from .format import (
    CHECKPOINT,
    FORMAT_VERSION,
    ONNX_FILE,
    SAMPLE_EXPECTED,
    SAMPLE_INPUT,
    BundleError,
    archive_path,
    bundle_files,
    is_archive_of,
    kernels_dir,
    make_archive,
    open_bundle,
    spec_stem,
    target_of,
    verify_files,
    write_manifest,
)
from .load import check_gpu

BUNDLE = "a blrdeploy bundle"  # what --overwrite may replace, in its refusal

# ------------------------------------------------------------------------------------------------ layer shapes


def layer_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """Layer name -> shape of every BLR layer of a model."""
    return {name: _shape_of(m) for name, m in model.named_modules() if isinstance(m, BLRLinear)}


def layer_shapes_of_checkpoint(blr_config: dict) -> dict[str, LayerShape]:
    """The same from a checkpoint's blr_config.json, with the modules built on the meta device (no weights read)."""
    try:
        return {layer["name"]: _shape_of(blr_module(layer)) for layer in blr_config["layers"]}
    except CheckpointError as e:
        raise BundleError(str(e)) from e


def _shape_of(m: BLRLinear) -> LayerShape:
    factors = tuple((k, tuple(v.shape)) for k, v in m.factors().items())
    return LayerShape(m.structure, factors, m.bias is not None, m.in_features, m.out_features)


# ------------------------------------------------------------------------------------------------ packaging


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
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_dir(out, overwrite, bundle_files, BUNDLE)  # before minutes of compiling, not after
    if archive:
        tarball = archive_path(out)
        if tarball.exists() and not is_archive_of(tarball, out):  # --overwrite is for our bundle, not a user's file
            raise OutputError(f"refusing to overwrite {tarball}: it is not an archive of the bundle {out.name}")
        check_output_file(tarball, overwrite, "--archive")
    device = target if isinstance(target, devices.Device) else devices.get(target)
    dtype_name = dtype or device.dtype
    torch_dtype = dtype_named(dtype_name, "--dtype")
    buckets = launch_plan.buckets_up_to(max_tokens)
    cfg = _checked_config(checkpoint)
    shapes_by_layer = layer_shapes_of_checkpoint(cfg)
    shapes = list(dict.fromkeys(shapes_by_layer.values()))
    measured = _measured_if_asked(tune, device, shapes, torch_dtype, buckets, progress)
    the_plan = launch_plan.plan(shapes, device, torch_dtype, buckets, measured)
    specs = the_plan.all_specs()
    t0 = time.perf_counter()
    compiled = compile_specs(specs, device.arch, jobs, progress)
    compile_s = time.perf_counter() - t0
    sources = launch_plan.config_sources(the_plan, device.arch, measured)
    with atomic_directory(out, overwrite, bundle_files, BUNDLE) as tmp:
        if progress:
            progress("writing the bundle", 0, 1)
        bundle_cfg = _copy_checkpoint(checkpoint, cfg, tmp / CHECKPOINT, torch_dtype)
        stems = _write_kernels(tmp, device.arch, specs, compiled)
        table_file = _write_table(tmp, the_plan, device.arch)
        sample = _sample(tmp / CHECKPOINT, bundle_cfg, tmp)
        sample["tolerance"] = TOLERANCE[torch_dtype]
        onnx_entry = _onnx_reference(tmp, progress) if with_onnx else None
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
        write_manifest(tmp, manifest)
    if archive:
        make_archive(out)
    elif overwrite and is_archive_of(archive_path(out), out):
        archive_path(out).unlink()  # the replaced bundle's archive would no longer match it; a user's file stays
    if progress:
        progress("writing the bundle", 1, 1)
    return manifest


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
    check_gpu(target, launch_plan.gpu_arch(), torch.cuda.get_device_name())
    dtype = DTYPES[manifest["dtype"]]
    try:
        shapes_by_layer = layer_shapes_of_checkpoint(read_blr_config(root / manifest["checkpoint"]["dir"]))
    except CheckpointError as e:
        raise BundleError(str(e)) from e
    shapes = list(dict.fromkeys(shapes_by_layer.values()))
    buckets = manifest["buckets"]
    measured = launch_plan.measure(shapes, dtype, buckets, progress)
    the_plan = launch_plan.plan(shapes, target, dtype, buckets, measured)
    specs = the_plan.all_specs()
    have = set(manifest["kernels"])
    new = [s for s in specs if f"{kernels_dir(target.arch)}/{spec_stem(s)}" not in have]
    compiled = compile_specs(new, target.arch, jobs, progress) if new else []
    _write_kernels(root, target.arch, new, compiled)
    stems = {s: f"{kernels_dir(target.arch)}/{spec_stem(s)}" for s in specs}
    sources = launch_plan.config_sources(the_plan, target.arch, measured)
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
    write_manifest(root, manifest, leaving=old_files)
    for rel in old_files:  # after the commit point: a crash before it leaves the old bundle whole
        (root / rel).unlink(missing_ok=True)
    return manifest


# ------------------------------------------------------------------------------------------------ the parts


def _checked_config(checkpoint: Path) -> dict:
    """The checkpoint's blr_config.json, its weights checked against their sha256; it must have a BLR layer."""
    try:
        verify_checkpoint(checkpoint)
        cfg = read_blr_config(checkpoint)
    except CheckpointError as e:
        raise BundleError(str(e)) from e
    if not cfg["layers"]:
        raise BundleError(f"{checkpoint} has no BLR layer: there is nothing for the kernels to run")
    return cfg


def _measured_if_asked(tune: bool | None, device: devices.Device, shapes, dtype, buckets, progress):
    """The launch configs measured on the GPU at hand when ``tune`` (None: when it is the target's architecture),
    else None; measuring for another architecture is refused."""
    here = launch_plan.gpu_arch()
    if tune is None:
        tune = here == device.arch
    if tune and here != device.arch:
        found = "no CUDA GPU" if here is None else f"an sm_{here} GPU"
        raise BundleError(
            f"measuring launch configs for {device.name} (sm_{device.arch}) needs that GPU; found {found}"
        )
    return launch_plan.measure(shapes, dtype, buckets, progress) if tune else None


def _onnx_reference(root: Path, progress: Progress | None) -> dict:
    """The float32 ONNX reference of the bundle's checkpoint; its manifest entry."""
    if progress:
        progress("exporting the ONNX reference", 0, 1)
    from blrdeploy.exporters.onnx import export_checkpoint  # deferred: loads onnx, which only this step needs

    export_checkpoint(root / CHECKPOINT, root / ONNX_FILE)
    return {"file": ONNX_FILE}


def _copy_checkpoint(src: Path, cfg: dict, dst: Path, dtype: torch.dtype) -> dict:
    """The checkpoint with floating tensors cast to ``dtype``; refuses non-finite weights, naming the tensor."""
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
    versions = {**tool_versions("triton"), "python": platform.python_version()}
    with contextlib.suppress(Exception):
        import onnx  # deferred: slow to import, and optional here

        versions["onnx"] = onnx.__version__
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas_version  # deferred: loads Triton

        try:
            text = get_ptxas_version(arch)  # Triton >= 3.9 picks the assembler by architecture
        except TypeError:
            text = get_ptxas_version()
        found = re.search(r"release (\S+),", text)
        versions["ptxas"] = found.group(1) if found else "unknown"
    return versions


def _write_kernels(root: Path, arch: int, specs: list, compiled: list) -> dict:
    """Writes cubins and descriptors under root; returns spec -> file stem (relative to the bundle)."""
    kdir = root / kernels_dir(arch)
    kdir.mkdir(parents=True, exist_ok=True)
    stems = {}
    for spec, (cubin, descriptor) in zip(specs, compiled, strict=True):
        stem = spec_stem(spec)
        (kdir / f"{stem}.cubin").write_bytes(cubin)
        (kdir / f"{stem}.json").write_text(json.dumps(descriptor, indent=1))
        stems[spec] = f"{kernels_dir(arch)}/{stem}"
    return stems


def _write_table(root: Path, the_plan: Plan, arch: int) -> str:
    """The config table under a name of its content, so a rewrite never touches the file a manifest lists."""
    table = the_plan.table(arch, "bundle plan")
    digest = hashlib.sha256(json.dumps(table.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    rel = f"{kernels_dir(arch)}/launch_configs-{digest}.json"
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


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def package_summary(manifest: dict, output: Path, archive: bool) -> dict:
    """What ``blrdeploy package`` reports of the bundle it wrote at ``output`` (and its archive, if made)."""
    return {
        "bundle": str(output),
        "archive": str(archive_path(output)) if archive else None,
        "target": manifest["target"]["name"],
        "arch": f"sm_{manifest['target']['arch']}",
        "dtype": manifest["dtype"],
        "kernels": len(manifest["kernels"]),
        "compile_seconds": manifest["compile_seconds"],
        "launch_configs": manifest["launch_configs"]["sources"],
        "buckets": manifest["buckets"],
        "files": len(manifest["files"]),
        "bytes": sum((output / f).stat().st_size for f in manifest["files"]),
    }
