"""Per-device bundles: everything a GPU needs to run a converted model without compiling anything.

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
on meta tensors (``blrdeploy.kernels.plan``), planned for the target's architecture and SM count, and compiles
what that plan launches with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``: no GPU needed. Loading
verifies every checksum, refuses a GPU of another architecture, and sends every launch to the shipped cubins
through the CUDA driver.

The modules, each importing only those above it in this list:

- ``format``: the format's constants and file layout, the manifest and its checksums, the archive, opening and
  verifying a bundle, ``BundleError`` / ``ChecksumError``.
- ``compile``: the plan's kernel specializations compiled to cubins in a pool of worker processes.
- ``load``: the runtime: GPU and driver checks, ``activate`` (launches go to the cubins), ``load_bundle``,
  ``sample_check``, and ``verify`` (every check at once, as ``blrdeploy verify-bundle`` reports them).
- ``packaging``: ``package`` (build a bundle) and ``retune`` (re-measure its launch configs in place), and the
  model's layer shapes handed to the launch planner.
- ``run``: ``run_model``, what ``blrdeploy run`` does with a bundle or a checkpoint (the model-agnostic parts
  are ``blrdeploy.measure.runner``'s).

Callers use the names below (``from blrdeploy.exporters import bundle; bundle.package(...)``). Nothing here loads
Triton at import: the kernel modules that do are imported where they are used.
"""

from .compile import compile_specs
from .format import (
    CHECKPOINT,
    FORMAT_VERSION,
    MANIFEST,
    ONNX_FILE,
    SAMPLE_EXPECTED,
    SAMPLE_INPUT,
    BundleError,
    ChecksumError,
    archive_path,
    make_archive,
    open_bundle,
    target_of,
    verify_files,
)
from .load import (
    Bundle,
    Verification,
    activate,
    check_driver,
    check_gpu,
    load_bundle,
    sample_check,
    shipped_kernels,
    verify,
)
from .packaging import layer_shapes, layer_shapes_of_checkpoint, package, package_summary, retune
from .run import RunOutcome, run_model

__all__ = [
    "CHECKPOINT",
    "FORMAT_VERSION",
    "MANIFEST",
    "ONNX_FILE",
    "SAMPLE_EXPECTED",
    "SAMPLE_INPUT",
    "Bundle",
    "BundleError",
    "ChecksumError",
    "RunOutcome",
    "Verification",
    "activate",
    "archive_path",
    "check_driver",
    "check_gpu",
    "compile_specs",
    "layer_shapes",
    "layer_shapes_of_checkpoint",
    "load_bundle",
    "make_archive",
    "open_bundle",
    "package",
    "package_summary",
    "retune",
    "run_model",
    "sample_check",
    "shipped_kernels",
    "target_of",
    "verify",
    "verify_files",
]
