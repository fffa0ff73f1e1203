"""The ``blrdeploy`` command line: every command is registered here, by name, in the order ``--help`` lists them.

Each command lives in a module of this package (one per command group). A command parses its options, calls one
library function and prints; the work itself lives in the library, where tests and Python users call it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from blrdeploy.cli import bench, bundle, convert, factorize, onnx, roofline
from blrdeploy.version import __version__

app = typer.Typer(
    name="blrdeploy",
    help="Convert transformer linears to block low-rank form (BLAST, Monarch, low-rank) and run them fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blrdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


app.command("factorize")(factorize.factorize)
app.command("convert")(convert.convert)
app.command("info")(convert.info)
app.command("export")(onnx.export)
app.command("validate")(onnx.validate)
app.command("bench")(bench.bench)
app.command("package")(bundle.package)
app.command("verify-bundle")(bundle.verify_bundle)
app.command("tune")(bundle.tune)
app.command("run")(bundle.run)
app.command("roofline")(roofline.roofline)


def main() -> None:
    app()
