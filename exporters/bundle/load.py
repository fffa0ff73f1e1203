"""A bundle at run time: checking it fits this GPU and driver, sending every BLR launch to its cubins
(``activate``), loading its model (``load_bundle``), checking the sample input against its expected output
(``sample_check``), and every check of a bundle at once (``verify``, what ``blrdeploy verify-bundle`` reports)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from blrdeploy.conversion.checkpoint import CheckpointError, load
from blrdeploy.kernels import plan as launch_plan
from blrdeploy.kernels.configs import ConfigTable
from blrdeploy.kernels.cubin import CudaError, Kernel, driver_version
from blrdeploy.kernels.dtypes import DTYPES
from blrdeploy.measure import devices
from blrdeploy.models.outputs import Check, compare, model_output

from .format import BundleError, ChecksumError, open_bundle, read_listed, target_of, verify_files


def check_gpu(target: devices.Device, gpu_arch: int, gpu_name: str) -> None:
    """Cubins run on the architecture they were compiled for only."""
    if gpu_arch != target.arch:
        raise BundleError(
            f"this bundle is for {target.description} (sm_{target.arch}); this GPU is {gpu_name} (sm_{gpu_arch}). "
            f"Package the checkpoint for this GPU instead (blrdeploy package CHECKPOINT --target ...)"
        )


def check_driver(manifest: dict) -> None:
    """The cubins' assembler (ptxas) must not be of a newer CUDA major version than the driver."""
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
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in cache:
            cache[index] = Kernel(image, descriptor, torch.device("cuda", index), spec)
        return cache[index]

    return load_kernel


def shipped_kernels(root: Path, manifest: dict, allow_jit: bool = False):
    """The bundle's cubins as a launch backend; every cubin and descriptor is read (and checked) now, so a later
    change on disk cannot reach a launch."""
    from blrdeploy.kernels import runtime  # deferred: loads Triton

    variants = {}
    for stem in manifest["kernels"]:
        image = read_listed(root, manifest, f"{stem}.cubin")
        try:
            descriptor = json.loads(read_listed(root, manifest, f"{stem}.json"))
            spec = runtime.Spec.from_json(descriptor["spec"])
        except (ValueError, KeyError) as e:
            raise BundleError(f"kernel descriptor {stem}.json is unusable: {e}") from None
        variants[spec] = _loader(image, descriptor, spec)
    return runtime.ShippedKernels(
        variants, allow_jit=allow_jit, where=f"bundle {root}", max_tokens=manifest["buckets"][-1]
    )


def activate(bundle: Bundle, allow_jit: bool = False, device: torch.device | None = None) -> None:
    """Process-wide: every BLR launch goes to the bundle's cubins, planned as packaged, with its config table."""
    from blrdeploy.kernels import launch, runtime  # deferred: loads Triton

    try:
        table = ConfigTable.load(bundle.root / bundle.manifest["launch_configs"]["file"])
    except (OSError, ValueError) as e:
        raise BundleError(str(e)) from None
    kernels = shipped_kernels(bundle.root, bundle.manifest, allow_jit)
    if device is not None:  # load every module now: a driver that refuses them fails here, not mid-forward
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
    root, manifest = open_bundle(path)
    verify_files(root, manifest)
    bundle = Bundle(root, manifest, target_of(manifest))
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BundleError("no CUDA GPU is available; load the bundle with device='cpu' for the reference path")
        check_gpu(bundle.target, launch_plan.gpu_arch(device), torch.cuda.get_device_name(device))
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


def sample_check(model: torch.nn.Module, bundle: Bundle) -> tuple[Check, torch.Tensor]:
    """The bundle's sample input through ``model`` against the expected output: (the check, the output)."""
    inputs = load_file(str(bundle.root / bundle.manifest["sample"]["input"]))
    expected = load_file(str(bundle.root / bundle.manifest["sample"]["expected"]))["output"]
    out = model_output(model, inputs)
    return compare("sample output", out, expected, bundle.manifest["sample"]["tolerance"]), out


# ------------------------------------------------------------------------------------------------ verifying


@dataclass
class Verification:
    """Every check of a bundle as {"check", "ok" (None: skipped), "detail"}, and whether it is usable at all."""

    checks: list[dict] = field(default_factory=list)
    target: devices.Device | None = None
    manifest: dict | None = None
    error: str | None = None  # why the bundle is unusable (missing, unreadable, of another format, wrong GPU)
    failed: bool = False  # a check failed: a file changed, the manifest changed, the sample's output differs

    @property
    def code(self) -> int:
        """The exit code: 0 passed, 1 a check failed, 2 unusable."""
        return 2 if self.error is not None else 1 if self.failed else 0

    def fail(self, check: str, detail: str) -> None:
        self.checks.append({"check": check, "ok": False, "detail": detail})
        self.failed = True


def verify(path: str | Path) -> Verification:
    """Every file against its sha256 and the manifest against its own; on a GPU also its architecture and the
    sample input -> expected output through the shipped kernels (the process's kernels are restored after)."""
    result = Verification()
    try:
        _verify(path, result)
    except ValueError as exc:  # BundleError: unusable; the checks made so far are kept
        result.error = str(exc)
    return result


def _verify(path: str | Path, result: Verification) -> None:
    try:
        root, result.manifest = open_bundle(path)
        result.target = target_of(result.manifest)
        n = verify_files(root, result.manifest)
        result.checks.append({"check": "checksums", "ok": True, "detail": f"{n} files match the manifest"})
    except ChecksumError as exc:
        result.fail("checksums", str(exc))
        return
    if not torch.cuda.is_available():
        result.checks.append({"check": "architecture and sample", "ok": None, "detail": "skipped: no CUDA GPU here"})
        return
    name = torch.cuda.get_device_name()
    check_gpu(result.target, launch_plan.gpu_arch(), name)
    result.checks.append({"check": "architecture", "ok": True, "detail": f"sm_{result.target.arch} = {name}"})
    try:
        model, bundle = load_bundle(root, "cuda")
        try:
            check, _ = sample_check(model, bundle)
        finally:
            bundle.close()
    except (ChecksumError, RuntimeError) as exc:  # a kernel missing, or refused by the driver
        result.fail("sample", f"{type(exc).__name__}: {exc}")
        return
    detail = (
        f"relative error {check.relative_error:.3e} (tolerance {check.tolerance:.0e}), "
        f"{bundle.kernels.jit_launches} JIT launches"
    )
    result.checks.append({"check": "sample", "ok": check.ok, "detail": detail})
    result.failed = not check.ok
