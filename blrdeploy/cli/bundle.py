"""CLI commands for device bundles and running models: ``package``, ``verify-bundle``, ``tune``, ``run``.

Each command parses its options, calls one library function (``blrdeploy.exporters.bundle``) and prints. The
options are declared first, as types, so that each command reads as its steps.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from blrdeploy.cli.common import DTYPE_LIST, emit_json, fail, one_line_errors, resolve_device
from blrdeploy.exporters import bundle
from blrdeploy.kernels.configs import BUCKETS
from blrdeploy.measure.runner import Generation, RunError

# ------------------------------------------------------------------------------------------------ options

Jobs = Annotated[int | None, typer.Option(help="Parallel compile processes. Default: one per CPU.")]
CheckpointArg = Annotated[Path, typer.Argument(help="A converted checkpoint directory.")]
Target = Annotated[
    str,
    typer.Option(
        help="Device profile: jetson (Orin Nano 8 GB, sm_87), a40 (sm_86), h100, h200 (sm_90), a NAME.json in "
        "$BLRDEPLOY_DEVICES, or the path of a profile JSON file."
    ),
]
BundleOut = Annotated[Path, typer.Option("--output", "-o", help="The bundle directory to write.")]
Archive = Annotated[bool, typer.Option(help="Also write OUTPUT.tar.gz beside the directory.")]
PackageDtype = Annotated[str | None, typer.Option(help=f"{DTYPE_LIST}. Default: the target's (jetson float16).")]
MaxTokens = Annotated[
    int,
    typer.Option(
        help="Most tokens (batch x sequence) one forward will see: kernels are compiled for every token bucket "
        f"up to it ({', '.join(map(str, BUCKETS))})."
    ),
]
Tune = Annotated[
    bool | None,
    typer.Option(
        help="Measure launch configs on this GPU. Default: when this GPU has the target's architecture; "
        "otherwise configs come from the architecture's shipped table and the heuristic defaults."
    ),
]
Onnx = Annotated[bool, typer.Option(help="Include the float32 ONNX reference (large models: slow).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing bundle at OUTPUT.")]
PackageJson = Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON on stdout.")]

BundlePath = Annotated[Path, typer.Argument(help="A bundle directory or its .tar.gz archive.")]
VerifyJson = Annotated[bool, typer.Option("--json", help="Print the checks as JSON on stdout.")]

TuneBundle = Annotated[Path, typer.Option("--bundle", help="The bundle directory to tune in place.")]
TuneJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]

RunCheckpoint = Annotated[
    Path | None, typer.Argument(help="A converted checkpoint directory (JIT kernels). Or use --bundle.")
]
RunBundle = Annotated[
    Path | None, typer.Option("--bundle", help="A bundle directory or archive: shipped kernels, no compiling.")
]
RunInput = Annotated[
    Path | None,
    typer.Option(
        "--input",
        help="A .safetensors file of the model's inputs by name (input_ids, pixel_values, ...). Default: the "
        "bundle's sample input, or the family's seeded sample (batch 1) for a checkpoint.",
    ),
]
Prompt = Annotated[
    str | None,
    typer.Option(help="LLMs whose checkpoint carries a tokenizer: generate greedily from this text, print text."),
]
MaxNewTokens = Annotated[int, typer.Option(help="With --prompt: tokens to generate.")]
MemoryLimit = Annotated[
    str | None, typer.Option(help="Cap this process's GPU memory, e.g. 8GB or 7.5GiB (as on an 8 GB Jetson).")
]
RunOutput = Annotated[Path | None, typer.Option(help="Write the output tensor to this .safetensors file.")]
RunOverwrite = Annotated[bool, typer.Option(help="Replace a file already at --output.")]
RunDevice = Annotated[str, typer.Option(help="auto, cuda or cpu (cpu: the PyTorch reference path).")]
RunDtype = Annotated[str, typer.Option(help=f"Checkpoint only: {DTYPE_LIST}.")]
AllowJit = Annotated[
    bool, typer.Option(help="Bundle only: compile (with a warning) a launch no shipped kernel serves.")
]
FuseSiblings = Annotated[
    bool,
    typer.Option(
        help="Checkpoint on a GPU: stack sibling layers and fuse the family's blocks (faster). A bundle runs every "
        "layer on its own, as --no-fuse-siblings does."
    ),
]
Repeat = Annotated[int, typer.Option(help="Timed forwards after the first.")]
RunJson = Annotated[bool, typer.Option("--json", help="Print timings and the result as JSON on stdout.")]


# ------------------------------------------------------------------------------------------------ commands


def package(
    checkpoint: CheckpointArg,
    target: Target,
    output: BundleOut,
    archive: Archive = False,
    dtype: PackageDtype = None,
    max_tokens: MaxTokens = BUCKETS[-1],
    tune: Tune = None,
    onnx: Onnx = True,
    jobs: Jobs = None,
    overwrite: Overwrite = False,
    as_json: PackageJson = False,
) -> None:
    """Build a per-device bundle: weights in the target's dtype, every kernel the model needs compiled ahead of
    time for the target's architecture (no GPU needed), the launch configs per layer and token bucket, the ONNX
    reference and a sample input/expected output, and a manifest with the sha256 of every file."""
    t0 = time.perf_counter()
    with one_line_errors():
        manifest = bundle.package(
            checkpoint, target, output, dtype=dtype, max_tokens=max_tokens, tune=tune, with_onnx=onnx,
            archive=archive, overwrite=overwrite, jobs=jobs, progress=_stage_printer(not as_json),
        )  # fmt: skip
    summary = {**bundle.package_summary(manifest, output, archive), "seconds": round(time.perf_counter() - t0, 1)}
    if as_json:
        emit_json(summary)
    else:
        _print_package(summary, output)


def verify_bundle(path: BundlePath, as_json: VerifyJson = False) -> None:
    """Check a bundle: every file against its sha256, the manifest against its own; on a GPU also its
    architecture and the sample input -> expected output through the shipped kernels.
    Exit code: 0 pass; 1 a check failed (a file inside missing, truncated or changed; the manifest changed; the
    sample's output differs); 2 unusable (no such bundle, an unreadable archive, an unknown format, wrong GPU)."""
    with one_line_errors():
        result = bundle.verify(path)
    if result.error is not None:
        if not as_json:
            fail(result.error.splitlines()[0])
        emit_json({"bundle": str(path), "ok": False, "error": result.error, "checks": result.checks})
    elif as_json:
        target = result.target and result.target.name
        emit_json({"bundle": str(path), "ok": result.code == 0, "target": target, "checks": result.checks})
    else:
        _print_verification(path, result)
    raise typer.Exit(result.code)


def tune(bundle_dir: TuneBundle, jobs: Jobs = None, as_json: TuneJson = False) -> None:
    """Measure a bundle's launch configs on this GPU (its architecture must be the bundle's), compile the
    kernels the measured configs need, and rewrite the config table and manifest in place (atomically)."""
    with one_line_errors():
        manifest = bundle.retune(bundle_dir, jobs=jobs, progress=_stage_printer(not as_json))
    result = {
        "bundle": str(bundle_dir),
        "measured_on": manifest["launch_configs"]["measured_on"],
        "launch_configs": manifest["launch_configs"]["sources"],
        "kernels": len(manifest["kernels"]),
    }
    if as_json:
        emit_json(result)
    else:
        typer.echo(
            f"tuned {bundle_dir} on {result['measured_on']}: {sum(result['launch_configs'].values())} configs, "
            f"{result['kernels']} kernels"
        )


def run(
    checkpoint: RunCheckpoint = None,
    bundle_dir: RunBundle = None,
    inputs: RunInput = None,
    prompt: Prompt = None,
    max_new_tokens: MaxNewTokens = 32,
    memory_limit: MemoryLimit = None,
    output: RunOutput = None,
    overwrite: RunOverwrite = False,
    device: RunDevice = "auto",
    dtype: RunDtype = "bfloat16",
    allow_jit: AllowJit = False,
    fuse_siblings: FuseSiblings = True,
    repeat: Repeat = 10,
    as_json: RunJson = False,
) -> None:
    """Run a converted model by hand. Text in, text out with --prompt (LLMs whose checkpoint carries a tokenizer:
    greedy generation). Otherwise tensor in, tensor out: one input (--input, the bundle's sample, or a seeded one),
    with start-up time (load + first forward, which includes any compilation), steady forward time and the output;
    with the bundle's sample input, also the check against its expected output. Exit code: 0 done, 1 the sample
    check failed, 2 the model or input cannot be run (unusable bundle or checkpoint, a GPU of another architecture,
    a launch no shipped kernel serves, out of the memory allowed)."""
    if (checkpoint is None) == (bundle_dir is None):
        fail("give either a CHECKPOINT or --bundle DIR")
    if inputs is not None and not inputs.is_file():
        fail(f"--input {inputs}: no such file")
    if repeat < 0:
        fail(f"--repeat must be 0 or more, got {repeat}")
    if bundle_dir is not None and not fuse_siblings:
        fail("--no-fuse-siblings is for a checkpoint: a bundle always runs every layer on its own")
    dev = resolve_device(device)
    with one_line_errors(user=RunError):  # run_model's other ValueErrors are defects (the model's own sample input)
        outcome = bundle.run_model(
            checkpoint, bundle_dir, device=dev, inputs=inputs, prompt=prompt,
            max_new_tokens=max_new_tokens, memory_limit=memory_limit, output=output, dtype=dtype,
            allow_jit=allow_jit, fuse_siblings=fuse_siblings, repeat=repeat, overwrite=overwrite,
        )  # fmt: skip
    if as_json:
        emit_json(outcome.result)
    elif outcome.generation is not None:
        _print_generation(outcome.generation)
    else:
        _print_run(outcome.result, outcome.ok)
    raise typer.Exit(0 if outcome.ok else 1)


# ------------------------------------------------------------------------------------------------ printing


def _stage_printer(enabled: bool):
    """Progress of a long stage on stderr: a live bar on a terminal, a line per stage (and per 10%) elsewhere."""
    if not enabled:
        return None
    last: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if stage not in last or done == total or done - last[stage] >= step:
            last[stage] = done
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    return progress


def _print_package(summary: dict, output: Path) -> None:
    typer.echo(
        f"wrote {output}: {summary['target']} ({summary['arch']}, {summary['dtype']}), "
        f"{summary['kernels']} kernels compiled in {summary['compile_seconds']} s, "
        f"{summary['files']} files, {summary['bytes'] / 2**20:,.1f} MiB, {summary['seconds']} s in all"
    )
    typer.echo("launch configs: " + ", ".join(f"{n} {src}" for src, n in summary["launch_configs"].items()))
    if summary["archive"] is not None:
        typer.echo(f"archive: {summary['archive']}")


def _print_verification(path: Path, result: bundle.Verification) -> None:
    target = result.target
    what = f" ({target.description}, sm_{target.arch}, {result.manifest['dtype']})" if target is not None else ""
    typer.echo(f"verify {path}{what}")
    for c in result.checks:
        mark = {True: "✓", False: "✗", None: "-"}[c["ok"]]
        typer.echo(f"  {mark} {c['check']}: {c['detail']}")
    typer.echo("passed" if result.code == 0 else "failed")


def _print_run(result: dict, ok: bool) -> None:
    typer.echo(
        f"{result['model']}: {result['kernels']} on {result['device']} ({result['dtype']}); start-up "
        f"{result['startup_seconds']:.2f} s (load {result['load_seconds']:.2f} s, first forward "
        f"{result['first_forward_seconds']:.2f} s), {_forward_time(result['forward_ms'])}; "
        f"output {result['output_shape']}"
    )
    if "sample_check" in result:
        c = result["sample_check"]
        typer.echo(
            f"  {'✓' if ok else '✗'} sample output: relative error {c['relative_error']:.3e} "
            f"(tolerance {c['tolerance']:.0e})"
        )


def _forward_time(ms: float | None) -> str:
    return "steady forward not timed (--repeat 0)" if ms is None else f"forward {ms} ms"


def _print_generation(g: Generation) -> None:
    new = len(g.token_ids)
    typer.echo(g.text)
    typer.echo(f"[{new} tokens in {g.seconds:.2f} s, {new / g.seconds:.1f} tokens/s; load {g.load_s:.2f} s]", err=True)
