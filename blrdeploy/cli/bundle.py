"""CLI commands for device bundles and running models: ``package``, ``verify-bundle``, ``tune``, ``run``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from blrdeploy.cli.common import check_output_path, emit_json, fail


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


def package(
    checkpoint: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    target: Annotated[
        str,
        typer.Option(
            help="Device profile: jetson (Orin Nano 8 GB, sm_87), a40 (sm_86), h100, h200 (sm_90), a NAME.json in "
            "$BLRDEPLOY_DEVICES, or the path of a profile JSON file."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle directory to write.")],
    archive: Annotated[bool, typer.Option(help="Also write OUTPUT.tar.gz beside the directory.")] = False,
    dtype: Annotated[
        str | None, typer.Option(help="float16, bfloat16 or float32. Default: the target's (jetson float16).")
    ] = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            help="Most tokens (batch x sequence) one forward will see: kernels are compiled for every token bucket "
            "up to it (1, 16, 64, 256, 1024, 4096, 16384)."
        ),
    ] = 16384,
    tune: Annotated[
        bool | None,
        typer.Option(
            help="Measure launch configs on this GPU. Default: when this GPU has the target's architecture; "
            "otherwise configs come from the architecture's shipped table and the heuristic defaults."
        ),
    ] = None,
    onnx: Annotated[bool, typer.Option(help="Include the float32 ONNX reference (large models: slow).")] = True,
    jobs: Annotated[int | None, typer.Option(help="Parallel compile processes. Default: one per CPU.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at OUTPUT.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON on stdout.")] = False,
) -> None:
    """Build a per-device bundle: weights in the target's dtype, every kernel the model needs compiled ahead of
    time for the target's architecture (no GPU needed), the launch configs per layer and token bucket, the ONNX
    reference and a sample input/expected output, and a manifest with the sha256 of every file."""
    from blrdeploy.exporters import bundle

    t0 = time.perf_counter()
    try:
        manifest = bundle.package(
            checkpoint, target, output, dtype=dtype, max_tokens=max_tokens, tune=tune, with_onnx=onnx,
            archive=archive, overwrite=overwrite, jobs=jobs, progress=_stage_printer(not as_json),
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
    summary = {
        "bundle": str(output),
        "archive": str(bundle.archive_path(output)) if archive else None,
        "target": manifest["target"]["name"],
        "arch": f"sm_{manifest['target']['arch']}",
        "dtype": manifest["dtype"],
        "kernels": len(manifest["kernels"]),
        "compile_seconds": manifest["compile_seconds"],
        "launch_configs": manifest["launch_configs"]["sources"],
        "buckets": manifest["buckets"],
        "files": len(manifest["files"]),
        "bytes": sum((output / f).stat().st_size for f in manifest["files"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if as_json:
        emit_json(summary)
        return
    typer.echo(
        f"wrote {output}: {summary['target']} ({summary['arch']}, {summary['dtype']}), "
        f"{summary['kernels']} kernels compiled in {summary['compile_seconds']} s, "
        f"{summary['files']} files, {summary['bytes'] / 2**20:,.1f} MiB, {summary['seconds']} s in all"
    )
    typer.echo("launch configs: " + ", ".join(f"{n} {src}" for src, n in summary["launch_configs"].items()))
    if archive:
        typer.echo(f"archive: {summary['archive']}")


def verify_bundle(
    path: Annotated[Path, typer.Argument(help="A bundle directory or its .tar.gz archive.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON on stdout.")] = False,
) -> None:
    """Check a bundle: every file against its sha256, the manifest against its own; on a GPU also its
    architecture and the sample input -> expected output through the shipped kernels.
    Exit code: 0 pass; 1 a check failed (a file inside missing, truncated or changed; the manifest changed; the
    sample's output differs); 2 unusable (no such bundle, an unreadable archive, an unknown format, wrong GPU)."""
    import torch

    from blrdeploy.exporters import bundle

    checks: list[dict] = []
    code, target, manifest = 0, None, None

    def failed(check: str, detail: str) -> None:
        nonlocal code
        checks.append({"check": check, "ok": False, "detail": detail})
        code = 1

    try:
        try:
            root, manifest = bundle.open_bundle(path)
            target = bundle.target_of(manifest)
            n = bundle.verify_files(root, manifest)
            checks.append({"check": "checksums", "ok": True, "detail": f"{n} files match the manifest"})
        except bundle.ChecksumError as exc:
            failed("checksums", str(exc))
        if code == 0 and torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            bundle.check_gpu(target, bundle._gpu_arch(), name)
            checks.append({"check": "architecture", "ok": True, "detail": f"sm_{target.arch} = {name}"})
            try:
                model, b = bundle.load_bundle(root, "cuda")
                try:
                    check, _ = bundle.sample_check(model, b)
                finally:
                    b.close()
            except (bundle.ChecksumError, RuntimeError) as exc:  # a kernel missing, or refused by the driver
                failed("sample", f"{type(exc).__name__}: {exc}")
            else:
                checks.append(
                    {
                        "check": "sample",
                        "ok": check.ok,
                        "detail": f"relative error {check.relative_error:.3e} (tolerance {check.tolerance:.0e}), "
                        f"{b.kernels.jit_launches} JIT launches",
                    }
                )
                code = 0 if check.ok else 1
        elif code == 0:
            checks.append({"check": "architecture and sample", "ok": None, "detail": "skipped: no CUDA GPU here"})
    except ValueError as exc:  # BundleError: unusable
        if as_json:
            emit_json({"bundle": str(path), "ok": False, "error": str(exc), "checks": checks})
            raise typer.Exit(2) from None
        fail(str(exc).splitlines()[0])
    if as_json:
        emit_json({"bundle": str(path), "ok": code == 0, "target": target and target.name, "checks": checks})
    else:
        what = f" ({target.description}, sm_{target.arch}, {manifest['dtype']})" if target is not None else ""
        typer.echo(f"verify {path}{what}")
        for c in checks:
            mark = {True: "✓", False: "✗", None: "-"}[c["ok"]]
            typer.echo(f"  {mark} {c['check']}: {c['detail']}")
        typer.echo("passed" if code == 0 else "failed")
    raise typer.Exit(code)


def tune(
    bundle_dir: Annotated[Path, typer.Option("--bundle", help="The bundle directory to tune in place.")],
    jobs: Annotated[int | None, typer.Option(help="Parallel compile processes. Default: one per CPU.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Measure a bundle's launch configs on this GPU (its architecture must be the bundle's), compile the
    kernels the measured configs need, and rewrite the config table and manifest in place (atomically)."""
    from blrdeploy.exporters import bundle

    try:
        manifest = bundle.retune(bundle_dir, jobs=jobs, progress=_stage_printer(not as_json))
    except (ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0])
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
    checkpoint: Annotated[
        Path | None, typer.Argument(help="A converted checkpoint directory (JIT kernels). Or use --bundle.")
    ] = None,
    bundle_dir: Annotated[
        Path | None, typer.Option("--bundle", help="A bundle directory or archive: shipped kernels, no compiling.")
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--input",
            help="A .safetensors file of the model's inputs by name (input_ids, pixel_values, ...). Default: the "
            "bundle's sample input, or the family's seeded sample (batch 1) for a checkpoint.",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="LLMs whose checkpoint carries a tokenizer: generate greedily from this text, print text."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="With --prompt: tokens to generate.")] = 32,
    memory_limit: Annotated[
        str | None, typer.Option(help="Cap this process's GPU memory, e.g. 8GB or 7.5GiB (as on an 8 GB Jetson).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the output tensor to this .safetensors file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu (cpu: the PyTorch reference path).")] = "auto",
    dtype: Annotated[str, typer.Option(help="Checkpoint only: float32, bfloat16 or float16.")] = "bfloat16",
    allow_jit: Annotated[
        bool, typer.Option(help="Bundle only: compile (with a warning) a launch no shipped kernel serves.")
    ] = False,
    fuse_siblings: Annotated[
        bool,
        typer.Option(
            help="Checkpoint on a GPU: stack sibling layers and fuse the family's blocks (faster). A bundle runs every "
            "layer on its own, as --no-fuse-siblings does."
        ),
    ] = True,
    repeat: Annotated[int, typer.Option(help="Timed forwards after the first.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print timings and the result as JSON on stdout.")] = False,
) -> None:
    """Run a converted model by hand. Text in, text out with --prompt (LLMs whose checkpoint carries a tokenizer:
    greedy generation). Otherwise tensor in, tensor out: one input (--input, the bundle's sample, or a seeded one),
    with start-up time (load + first forward, which includes any compilation), steady forward time and the output;
    with the bundle's sample input, also the check against its expected output. Exit code: 0 done, 1 the sample
    check failed, 2 the model or input cannot be run (unusable bundle or checkpoint, a GPU of another architecture,
    a launch no shipped kernel serves, out of the memory allowed)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from blrdeploy.cli.common import resolve_device
    from blrdeploy.exporters import bundle

    if (checkpoint is None) == (bundle_dir is None):
        fail("give either a CHECKPOINT or --bundle DIR")
    check_output_path(output, "--output")
    if inputs is not None and not inputs.is_file():
        fail(f"--input {inputs}: no such file")
    if repeat < 0:
        fail(f"--repeat must be 0 or more, got {repeat}")
    if bundle_dir is not None and not fuse_siblings:
        fail("--no-fuse-siblings is for a checkpoint: a bundle always runs every layer on its own")
    dev = resolve_device(device)
    if memory_limit is not None:
        from blrdeploy.measure.bench import limit_gpu_memory, parse_size

        if not dev.startswith("cuda"):
            fail("--memory-limit caps GPU memory: it needs a CUDA GPU")
        try:
            limit_gpu_memory(parse_size(memory_limit), torch.device(dev))
        except ValueError as exc:
            fail(str(exc))
    if prompt is not None:
        from blrdeploy.conversion.checkpoint import has_tokenizer

        if inputs is not None or output is not None:
            fail("--prompt runs text in, text out: it does not take --input or --output")
        if max_new_tokens < 1:
            fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if checkpoint is not None and not has_tokenizer(checkpoint):
            fail(f"{checkpoint} carries no tokenizer (tokenizer.json / tokenizer_config.json): use --input for tensors")
    t0 = time.perf_counter()
    b = None
    try:
        if bundle_dir is not None:
            model, b = bundle.load_bundle(bundle_dir, dev, allow_jit=allow_jit)
        else:
            from blrdeploy.conversion.checkpoint import load
            from blrdeploy.models.outputs import sample_inputs

            torch_dtype = bundle.DTYPES.get(dtype)
            if torch_dtype is None:
                fail(f"--dtype must be one of {', '.join(bundle.DTYPES)}, got {dtype!r}")
            model = load(checkpoint, device=dev, dtype=torch_dtype, fuse_siblings=None if fuse_siblings else False)
        if prompt is not None:
            return _generate_text(model, b.root / bundle.CHECKPOINT if b else checkpoint, prompt, max_new_tokens,
                                  time.perf_counter() - t0, as_json)  # fmt: skip
        if inputs is not None:
            feed = load_file(str(inputs))
        elif b is not None:
            feed = load_file(str(b.root / b.manifest["sample"]["input"]))
        else:
            from blrdeploy.conversion.checkpoint import read_blr_config

            feed = sample_inputs(model, read_blr_config(checkpoint), batch=1, seed=0)
    except (ValueError, OSError, SafetensorError) as exc:
        fail(str(exc).splitlines()[0])
    except torch.OutOfMemoryError:
        fail(f"out of memory loading the model{' under --memory-limit ' + memory_limit if memory_limit else ''}")
    load_s = time.perf_counter() - t0
    from blrdeploy.models.outputs import model_output

    def forward():
        return model_output(model, feed)  # synchronizes: copies the output to the CPU

    times = []
    try:
        t1 = time.perf_counter()
        out = forward()
        first_s = time.perf_counter() - t1
        for _ in range(max(0, repeat)):
            t = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        fail("out of memory running the model (it loaded; a smaller input may fit)")
    except RuntimeError as exc:  # MissingKernel, CudaError: the bundle cannot serve this input on this machine
        if b is None and inputs is None:
            raise
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    except (ValueError, IndexError, TypeError, AttributeError) as exc:
        if inputs is None:  # the checkpoint's own sample input: a defect, not the user's input
            raise
        names = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in feed.items())
        fail(f"the model cannot run --input {inputs} ({names}): {type(exc).__name__}: {str(exc).splitlines()[0]}")
    steady_ms = 1e3 * sorted(times)[len(times) // 2] if times else None
    result = {
        "model": str(bundle_dir or checkpoint),
        "kernels": "PyTorch reference" if dev == "cpu" else ("shipped cubins" if b is not None else "Triton JIT"),
        "device": dev,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_seconds": round(load_s, 3),
        "first_forward_seconds": round(first_s, 3),
        "startup_seconds": round(load_s + first_s, 3),
        "forward_ms": None if steady_ms is None else round(steady_ms, 3),
        "inputs": {k: list(v.shape) for k, v in feed.items()},
        "output_shape": list(out.shape),
        "jit_launches": b.kernels.jit_launches if b is not None and b.kernels is not None else None,
    }
    ok = True
    if b is not None and inputs is None:
        check, _ = bundle.sample_check(model, b)
        result["sample_check"] = check.to_dict()
        ok = check.ok
    if output is not None:
        save_file({"output": out.contiguous()}, str(output))
        result["output_file"] = str(output)
    if as_json:
        emit_json(result)
    else:
        typer.echo(
            f"{result['model']}: {result['kernels']} on {dev} ({result['dtype']}); start-up "
            f"{result['startup_seconds']:.2f} s (load {result['load_seconds']:.2f} s, first forward "
            f"{result['first_forward_seconds']:.2f} s), forward {result['forward_ms']} ms; "
            f"output {result['output_shape']}"
        )
        if "sample_check" in result:
            c = result["sample_check"]
            typer.echo(
                f"  {'✓' if ok else '✗'} sample output: relative error {c['relative_error']:.3e} "
                f"(tolerance {c['tolerance']:.0e})"
            )
    raise typer.Exit(0 if ok else 1)


def _generate_text(model, checkpoint: Path, prompt: str, max_new_tokens: int, load_s: float, as_json: bool) -> None:
    """Greedy generation with transformers' generate on the loaded model and the checkpoint's tokenizer."""
    import torch

    from blrdeploy.conversion.checkpoint import has_tokenizer

    if not has_tokenizer(checkpoint):
        fail(f"{checkpoint} carries no tokenizer (tokenizer.json / tokenizer_config.json): use --input for tensors")
    if not hasattr(model, "generate"):
        fail(f"{type(model).__name__} does not generate text; run it on tensors with --input")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the tokenizer in {checkpoint}: {str(exc).splitlines()[0]}")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        fail("--prompt encodes to no tokens")
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and ids.shape[1] + max_new_tokens > positions:
        fail(
            f"the prompt's {ids.shape[1]} tokens and --max-new-tokens {max_new_tokens} exceed the model's "
            f"{positions} positions: shorten the prompt or ask for at most {max(0, positions - ids.shape[1])} tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(n: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  min_new_tokens=0, pad_token_id=pad)  # fmt: skip

    try:
        t = time.perf_counter()
        generate(1)  # compiles the kernels the prompt needs: start-up, not generation speed
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(max_new_tokens)
        seconds = time.perf_counter() - t
    except torch.OutOfMemoryError:
        fail("out of memory while generating (the model loaded; a shorter prompt or fewer tokens may fit)")
    except RuntimeError as exc:  # MissingKernel, CudaError from a bundle's launches
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    new = out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    result = {
        "model": str(checkpoint), "prompt": prompt, "text": text, "prompt_tokens": ids.shape[1],
        "new_tokens": len(new), "token_ids": new, "load_seconds": round(load_s, 3),
        "warmup_seconds": round(warm_s, 3), "generate_seconds": round(seconds, 3),
        "tokens_per_s": round(len(new) / seconds, 2),
    }  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        typer.echo(text)
        typer.echo(
            f"[{len(new)} tokens in {seconds:.2f} s, {len(new) / seconds:.1f} tokens/s; load {load_s:.2f} s]",
            err=True,
        )
