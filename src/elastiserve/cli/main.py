"""The ``elastiserve`` command: one click group; each command is thin over the library."""

from __future__ import annotations

import sys

import click

from elastiserve import __version__
from elastiserve.cli.bench import bench
from elastiserve.cli.services import register as register_services
from elastiserve.cli.up import up


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="elastiserve")
def cli() -> None:
    """elastiserve: a Triton-compatible engine and an elastic serving platform."""


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("flags", nargs=-1, type=click.UNPROCESSED)
def serve(flags: tuple[str, ...]) -> None:
    """Run the inference engine; takes tritonserver's flags (see `elastiserve serve --help`)."""
    from elastiserve.engine.options import HelpRequested, parse_serve_args
    from elastiserve.engine.server import run
    from elastiserve.errors import ConfigError

    try:
        options = parse_serve_args(list(flags))
    except HelpRequested as exc:
        click.echo(str(exc))
        return
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(run(options))


register_services(cli)
cli.add_command(up)
cli.add_command(bench)


def main() -> None:
    cli()
