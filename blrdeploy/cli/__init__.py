"""The ``blrdeploy`` command line: every command is registered here, by name, in the order ``--help`` lists them.

Each command lives in a module of this package (one per command group). A command parses its options, calls one
library function and prints; the work itself lives in the library, where tests and Python users call it.
"""

from __future__ import annotations

from typing import Annotated

import torch
import typer
from typer.core import TyperCommand, TyperGroup

from blrdeploy.cli import bench, bundle, convert, eval, factorize, heal, onnx, roofline
from blrdeploy.cli.common import cpu_threads
from blrdeploy.version import __version__


def _flags_without_metavar(params: list) -> list:
    """Newer typer prints a flag's type as if it took a value (``--json <bool>``); a flag takes none."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _flags_without_metavar(super().get_params(ctx))


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _flags_without_metavar(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
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
    threads: Annotated[
        int | None,
        typer.Option(
            envvar="BLRDEPLOY_THREADS",
            help="CPU threads for torch. Default: OMP_NUM_THREADS if set, else the cores not already busy (by the "
            "load average), so a shared machine is not slowed many times over.",
        ),
    ] = None,
) -> None:
    torch.set_num_threads(cpu_threads(threads))


app.command("factorize", cls=_Command)(factorize.factorize)
app.command("convert", cls=_Command)(convert.convert)
app.command("info", cls=_Command)(convert.info)
app.command("export", cls=_Command)(onnx.export)
app.command("validate", cls=_Command)(onnx.validate)
app.command("eval", cls=_Command)(eval.eval_command)
app.command("heal", cls=_Command)(heal.heal)
app.command("bench", cls=_Command)(bench.bench)
app.command("package", cls=_Command)(bundle.package)
app.command("verify-bundle", cls=_Command)(bundle.verify_bundle)
app.command("tune", cls=_Command)(bundle.tune)
app.command("run", cls=_Command)(bundle.run)
app.command("roofline", cls=_Command)(roofline.roofline)


def main() -> None:
    app()
