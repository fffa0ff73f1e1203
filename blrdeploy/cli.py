"""The ``blrdeploy`` command line. Commands stay thin: they parse, call one library function, and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .shapes import check_features

app = typer.Typer(
    name="blrdeploy",
    help="Convert transformer linears to block low-rank form (BLAST, Monarch, low-rank) and run them fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"blrdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def emit_json(data, default=None) -> None:
    """A command's --json result on stdout; ``default`` as json.dump's."""
    json.dump(data, sys.stdout, indent=2, default=default)
    sys.stdout.write("\n")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def check_output_path(path, option: str) -> None:
    """Refuses, before any work, an output path that cannot be written: a directory, or in a missing folder."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        fail(f"{option} {path} is a directory: give a file path")
    if not path.parent.is_dir():
        fail(f"{option} {path}: the folder {path.parent} does not exist")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        fail(f"--device must be auto, cuda, cuda:N or cpu, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device} asked for, but no CUDA GPU is available")
    return device


def _parse_shape(shape: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        fail(f"--shape must look like OUTxIN (e.g. 768x3072), got {shape!r}")
    try:
        check_features(in_features, out_features)
    except ValueError as exc:
        fail(f"--shape {shape}: {exc}")
    return out_features, in_features


@app.command()
def factorize(
    weights: Annotated[
        Path | None,
        typer.Option(help="A .safetensors or torch state-dict file holding the matrix. Default: a built-in demo."),
    ] = None,
    tensor: Annotated[str | None, typer.Option(help="Name of the 2-D tensor inside --weights.")] = None,
    transpose: Annotated[
        bool, typer.Option(help="The stored tensor is (in, out), as in GPT-2's Conv1D: transpose it first.")
    ] = False,
    shape: Annotated[str, typer.Option(help="OUTxIN of the built-in demo matrix (unused with --weights).")] = "768x768",
    params_ratio: Annotated[
        float, typer.Option("--params-ratio", help="Parameter budget rho: structured params / dense out*in, in (0,1).")
    ] = 0.5,
    structure: Annotated[
        list[str] | None,
        typer.Option(help="blast, monarch or lowrank; repeat for several. Default: all three."),
    ] = None,
    steps: Annotated[int, typer.Option(help="BLAST optimization steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed for the demo matrix and BLAST's initialization.")] = 0,
    device: Annotated[str, typer.Option(help="Where to factorize: auto (GPU when present), cpu, cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
) -> None:
    """Factorize one matrix with each structure at the same parameter budget; report error and SQNR.

    With no --weights it uses a seeded 768x768 demo matrix with block-varying structure.
    """
    from . import compare
    from .budget import STRUCTURES

    chosen = tuple(structure or STRUCTURES)
    for s in chosen:
        if s not in STRUCTURES:
            fail(f"unknown structure {s!r}; choose from {', '.join(STRUCTURES)}")
    try:
        if weights is not None:
            matrix = compare.load_matrix(weights, tensor, transpose)
            source = f"{weights}:{tensor}"
        else:
            matrix = compare.demo_matrix(*_parse_shape(shape), seed=seed)
            source = f"demo {shape} (seed {seed})"
        matrix = matrix.to(resolve_device(device))
        with _progress(not as_json) as progress:
            reports = compare.compare_structures(matrix, params_ratio, chosen, steps, seed, progress)
    except ValueError as exc:
        fail(str(exc))
    rows = [r.to_dict() for r in reports]
    if as_json:
        emit_json({"source": source, "shape": list(matrix.shape), "results": rows})
        return
    _print_table(source, tuple(matrix.shape), rows)


class _progress:
    """A BLAST step bar on stderr while a fit runs; a no-op callback when quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return None
        self._bar = _new_bar("BLAST fit")
        self._bar.start()
        self._task = None

        def update(step: int, total: int, err: float) -> None:
            if self._task is None:
                self._task = self._bar.add_task("fit", total=total, err=err)
            self._bar.update(self._task, completed=step, err=err)

        return update

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()


def _new_bar(label: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}  rel. error {task.fields[err]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


class _convert_progress:
    """Layers bar with ETA, plus a step bar for the BLAST fit of the current layer; on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        from .job import Callbacks

        if not self.enabled:
            return Callbacks()
        if not sys.stderr.isatty():
            return self._plain_lines()
        self._bar = _new_bar("converting")
        self._bar.start()
        self._layers = self._fit = None

        def layer(name: str, index: int, count: int) -> None:
            if self._layers is None:
                self._layers = self._bar.add_task(name, total=count, err=0.0)
            self._bar.update(self._layers, completed=index, description=name)
            if self._fit is not None:
                self._bar.remove_task(self._fit)
                self._fit = None

        def fit(step: int, total: int, err: float) -> None:
            if self._fit is None:
                self._fit = self._bar.add_task("BLAST steps", total=total, err=err)
            self._bar.update(self._fit, completed=step, err=err)

        return Callbacks(layer=layer, fit=fit)

    def _plain_lines(self):
        """One line per layer with elapsed time and ETA, for logs and pipes where a live bar cannot draw."""
        import time

        from .job import Callbacks

        self._bar = None
        start = time.perf_counter()

        def layer(name: str, index: int, count: int) -> None:
            elapsed = time.perf_counter() - start
            eta = f"{elapsed / index * (count - index):.0f} s" if index else "?"
            print(f"[{index + 1}/{count}] {name}  elapsed {elapsed:.0f} s, eta {eta}", file=sys.stderr, flush=True)

        return Callbacks(layer=layer)

    def __exit__(self, *exc) -> None:
        if self.enabled and self._bar is not None:
            self._bar.stop()


@app.command()
def convert(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A built-in model (llama-7b, llama-3.2-1b, gpt2-s, vit-b-16, dit-xl-2, gpt2-mini, *-tiny) or a "
            "Hugging Face checkpoint directory. Default: gpt2-mini."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory. Default: ./<model>-<structure>.")
    ] = None,
    structure: Annotated[str, typer.Option(help="blast, monarch or lowrank.")] = "blast",
    params_ratio: Annotated[
        float | None,
        typer.Option(
            "--params-ratio",
            help="Per-layer parameter budget rho in (0,1): (b, r) chosen by DESIGN's rule. "
            "Default 0.5 when neither --preset nor --layers is given.",
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="'paper': the reference paper's per-layer (b, r) for the built-in models.")
    ] = None,
    layers: Annotated[
        Path | None,
        typer.Option(help="JSON/YAML file mapping layer-name patterns to {num_blocks, rank}; wins over the rest."),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Glob of layer names to convert (repeatable). Default: the family's.")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of layer names to keep dense (repeatable).")] = None,
    steps: Annotated[int, typer.Option(help="BLAST optimization steps per layer.")] = 300,
    device: Annotated[str, typer.Option(help="Where to factorize: auto (GPU when present), cpu, cuda.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="Model dtype: auto (what the checkpoint loads as; float32 for built-in models), float32, "
            "bfloat16, float16. The fit itself always runs in float32."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for built-in weights, BLAST init and the comparison inputs.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    skip_incompatible: Annotated[
        bool, typer.Option(help="Keep dense (and report) layers whose dims no setting fits, instead of failing.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Plan only, on the meta device: layers, (b, r) and parameter counts; no weights.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Convert a model's linears to BLAST, Monarch or low-rank layers and write a converted checkpoint.

    With no MODEL it converts the built-in gpt2-mini (GPT-2's architecture, 4 layers of width 384, seeded random
    weights) so the whole flow can be seen on a CPU in about two minutes.
    """
    from .convert import ConvertConfig
    from .job import DEFAULT_MODEL, load_layer_settings, run_convert

    model = model or DEFAULT_MODEL
    try:
        settings = load_layer_settings(layers) if layers is not None else ()
        ratio = params_ratio if params_ratio is not None else (None if preset or settings else 0.5)
        config = ConvertConfig(
            structure=structure, params_ratio=ratio, preset=preset, layers=settings,
            include=tuple(include) if include else None, exclude=tuple(exclude or ()), steps=steps, seed=seed,
            skip_incompatible=skip_incompatible,
        )  # fmt: skip
        if output is None and not dry_run:
            output = Path(f"{Path(model).name}-{structure}")
        dev = resolve_device(device) if not dry_run else "meta"
        with _convert_progress(not dry_run) as callbacks:  # on stderr: --json's stdout stays clean
            summary = run_convert(
                model, output, config, device=dev, dtype=_dtype(dtype), overwrite=overwrite, dry_run=dry_run,
                callbacks=callbacks,
            )  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted: nothing was written", code=130)
    if as_json:
        emit_json(summary, default=str)
        return
    _print_conversion(summary)


def _print_conversion(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{summary['model']}: {'plan' if summary.get('dry_run') else 'converted layers'}")
    cols = ["layer", "structure", "blocks", "rank", "dense params", "params"]
    if not summary.get("dry_run"):
        cols += ["rel. error", "time s"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("layer", "structure") else "right")
    for e in summary["layers"]:
        row = [e["name"], e["structure"], str(e["num_blocks"] or "-"), str(e["rank"])]
        row += [f"{e['dense_params']:,}", f"{e['params']:,}"]
        if not summary.get("dry_run"):
            row += [f"{e['relative_error']:.4f}", f"{e['seconds']:.2f}"]
        table.add_row(*row)
    console.print(table)
    for s in summary["skipped"]:
        console.print(f"[yellow]kept dense[/yellow] {s['name']}: {s['reason']}")
    before, after = summary["params_before"], summary["params_after"]
    console.print(f"parameters: {before:,} -> {after:,} ({before / after:.2f}x smaller)")
    if summary.get("dry_run"):
        return
    mib = 2**20
    console.print(f"weight bytes: {summary['bytes_before'] / mib:,.1f} MiB -> {summary['bytes_after'] / mib:,.1f} MiB")
    console.print(
        f"layer relative error: mean {summary['mean_relative_error']:.4f}, worst {summary['worst_relative_error']:.4f}"
    )
    agree = summary["output_agreement"]
    if agree:
        console.print(
            f"model output vs dense on seeded inputs: relative error {agree['relative_error']:.4f}, "
            f"cosine similarity {agree['cosine_similarity']:.4f}"
        )
    if summary.get("builtin"):
        console.print(
            "[dim]built-in models carry seeded random weights, which have no structure to keep: expect large errors "
            "here; trained checkpoints lose far less[/dim]"
        )
    console.print(f"wrote {summary['output']} in {summary['seconds']:.1f} s on {summary['device']}")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    verify: Annotated[bool, typer.Option(help="Also check model.safetensors against its recorded sha256.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
) -> None:
    """Describe a converted checkpoint: layers, structure, b, r, parameters before/after, size, worst error."""
    from . import checkpoint

    try:
        cfg = checkpoint.read_blr_config(path)
        if verify:
            checkpoint.verify(path)
    except ValueError as exc:
        fail(str(exc))
    layers = cfg["layers"]
    dense = sum(e["in_features"] * e["out_features"] for e in layers)
    factored = sum(e["params"] for e in layers)
    errors = [e["relative_error"] for e in layers if e["relative_error"] is not None]
    report = {
        "path": str(path),
        "source": cfg["source"],
        "format_version": cfg["format_version"],
        "layers": layers,
        "converted_layer_params_before": dense,
        "converted_layer_params_after": factored,
        "model_params_before": cfg.get("summary", {}).get("params_before"),
        "model_params_after": cfg.get("summary", {}).get("params_after"),
        "weights_bytes": cfg["weights"]["bytes"],
        "worst_relative_error": max(errors) if errors else None,
        "output_agreement": cfg.get("summary", {}).get("output_agreement"),
        "verified": verify,
        "tool_versions": cfg.get("tool_versions"),
    }
    if as_json:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path}  ({cfg['source'].get('id')}, {cfg['source'].get('class')})")
    for c in ("layer", "structure", "blocks", "rank", "params before", "params after", "rel. error"):
        table.add_column(c, justify="left" if c in ("layer", "structure") else "right")
    for e in layers:
        err = "-" if e["relative_error"] is None else f"{e['relative_error']:.4f}"
        table.add_row(
            e["name"], e["structure"], str(e["num_blocks"] or "-"), str(e["rank"]),
            f"{e['in_features'] * e['out_features']:,}", f"{e['params']:,}", err,
        )  # fmt: skip
    console = Console()
    console.print(table)
    if report["model_params_before"]:
        console.print(f"model parameters: {report['model_params_before']:,} -> {report['model_params_after']:,}")
    console.print(f"converted layers: {dense:,} -> {factored:,} parameters ({dense / max(1, factored):.2f}x)")
    console.print(
        f"weights file: {report['weights_bytes'] / 2**20:,.1f} MiB; worst layer error: "
        f"{'-' if not errors else f'{max(errors):.4f}'}" + ("; sha256 verified" if verify else "")
    )


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")] = Path("model.onnx"),
    seed: Annotated[int, typer.Option(help="Seed of the sample inputs traced for export.")] = 0,
) -> None:
    """Export a converted checkpoint to ONNX (opset 20): one com.blrdeploy node per BLR layer, each defined as
    a model-local function of standard ops, so onnxruntime runs it on a CPU with no plugin. Batch (and sequence,
    for language models) are dynamic axes; models over 2 GB keep their weights in OUTPUT.data beside it."""
    import time

    from .exporters.onnx import export_checkpoint

    t0 = time.perf_counter()
    try:
        path = export_checkpoint(checkpoint, output, seed=seed)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f} s")


AGAINST = ("onnx", "dense", "reference")


@app.command()
def validate(
    checkpoint: Annotated[Path, typer.Argument(help="A converted checkpoint directory.")],
    against: Annotated[
        str,
        typer.Option(
            help="onnx: the PyTorch model vs onnxruntime (CPU) on its ONNX reference; dense: vs the dense "
            "model it was converted from (approximation quality); reference: GPU path vs the float64 CPU reference."
        ),
    ] = "onnx",
    onnx_file: Annotated[
        Path | None, typer.Option("--onnx", help="The ONNX file (with --against onnx). Default: export to a temp dir.")
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            help="Relative-error tolerance ||out-ref||/||ref||. Default: 1e-4 for onnx (float32), 3e-2 for "
            "reference (bfloat16); for dense, no judgement unless given."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Compare a converted checkpoint's outputs on seeded inputs of several shapes. Exit code: 0 pass, 1 fail,
    2 unusable input (missing/corrupt file, ONNX from another checkpoint, unknown op or missing function body)."""
    from .validators import onnx as v

    if against not in AGAINST:
        fail(f"--against must be one of {', '.join(AGAINST)}, got {against!r}")
    try:
        if against == "onnx":
            report = v.validate_against_onnx(checkpoint, onnx_file, rtol)
        elif against == "dense":
            report = v.validate_against_dense(checkpoint, rtol)
        else:
            report = v.validate_against_reference(checkpoint, rtol=rtol)
    except ValueError as exc:  # Unusable and CheckpointError are ValueErrors
        fail(str(exc).splitlines()[0])
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_report(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_report(report) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"validate {report.checkpoint} against {report.against}")
    for c in report.checks:
        mark = "[green]✓[/green]" if c.ok else "[red]✗[/red]"
        tol = "" if c.tolerance is None else f" (tolerance {c.tolerance:.0e})"
        cos = "" if c.cosine_similarity is None else f", cosine {c.cosine_similarity:.6f}"
        console.print(
            f"  {mark} {c.name} {c.shape}: max abs {c.max_abs:.3e}, relative {c.relative_error:.3e}{tol}{cos}"
        )
    if report.first_diverging_layer:
        console.print(f"  first diverging BLR layer: [bold]{report.first_diverging_layer}[/bold]")
    for note in report.notes:
        console.print(f"  [dim]{note}[/dim]")
    console.print("[green]passed[/green]" if report.ok else "[red]failed[/red]")


def _print_table(source: str, shape: tuple[int, int], rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{source}  {shape[0]}x{shape[1]}")
    for col in ("structure", "blocks", "rank", "params", "ratio", "rel. error", "SQNR dB", "time s"):
        table.add_column(col, justify="left" if col == "structure" else "right")
    for r in rows:
        table.add_row(
            r["structure"],
            "-" if r["num_blocks"] is None else str(r["num_blocks"]),
            str(r["rank"]),
            f"{r['params']:,}",
            f"{r['ratio']:.3f}",
            f"{r['relative_error']:.4f}",
            f"{r['sqnr_db']:.1f}",
            f"{r['seconds']:.2f}",
        )
    Console().print(table)


from . import cli_bench, cli_bundle, cli_roofline  # noqa: E402, F401  (register bench, package, verify-bundle, tune, run, roofline)


def main() -> None:
    app()
