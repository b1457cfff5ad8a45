"""eascmd's verbs over the control plane client: create, modify, desc, list, delete, start, stop,
version(s), w, dw, logs, events, schema.

Exit codes scripts can trust: 0 done; 1 the control plane failed, refused (404, 409, 401, 403)
or could not be reached; 2 usage error or a bad spec (found locally or by the server). Errors
are one line on stderr, never a traceback. ``--json`` prints the API's JSON unchanged.

Wire it into the ``elastiserve`` group with :func:`register`. Heavy imports (pydantic, httpx,
rich) happen inside the commands, so registering these costs ``elastiserve serve`` nothing.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from elastiserve.client.controlplane import ControlPlaneClient

F = TypeVar("F", bound=Callable[..., Any])

# Same values as elastiserve.client.controlplane / controlplane.store (a test keeps them equal);
# repeated here so that importing this module stays cheap.
DEFAULT_ENDPOINT = "http://127.0.0.1:8470"
ENV_ENDPOINT = "ELASTISERVE_ENDPOINT"
ENV_TOKEN = "ELASTISERVE_TOKEN"
ENV_HOME = "ELASTISERVE_HOME"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ENDPOINT_FILE = "endpoint"  # written by `elastiserve up` into the state directory


class Context:
    """What every command needs: a client built from --endpoint/--token/--state-dir, and --json."""

    def __init__(self, endpoint: str | None, token: str | None, state_dir: str | None, as_json: bool) -> None:
        from elastiserve.controlplane.store import default_state_dir, read_admin_token

        self.as_json = as_json
        home = default_state_dir(state_dir)
        if not endpoint:
            try:
                endpoint = (home / ENDPOINT_FILE).read_text().strip() or None
            except OSError:
                endpoint = None
        self.endpoint = endpoint or DEFAULT_ENDPOINT
        self.token = token or read_admin_token(home)
        self._client: ControlPlaneClient | None = None

    @property
    def client(self) -> ControlPlaneClient:
        if self._client is None:
            from elastiserve.client.controlplane import ControlPlaneClient

            self._client = ControlPlaneClient(self.endpoint, self.token)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def fail(message: str, code: int = EXIT_FAILED, details: list[str] | None = None) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    for line in details or []:
        if line != message:
            click.echo(f"  {line}", err=True)
    sys.exit(code)


def warn(lines: list[str]) -> None:
    for line in lines:
        click.echo(f"warning: {line}", err=True)


def client_command(func: F) -> F:
    """Add --endpoint/--token/--state-dir/--json and turn errors into one line plus an exit code."""

    @click.option(
        "--endpoint",
        envvar=ENV_ENDPOINT,
        metavar="URL",
        help=f"control plane URL [env {ENV_ENDPOINT}; default: the local one, {DEFAULT_ENDPOINT}]",
    )
    @click.option(
        "--token",
        envvar=ENV_TOKEN,
        metavar="TOKEN",
        help=f"admin token [env {ENV_TOKEN}; default: the local control plane's]",
    )
    @click.option(
        "--state-dir",
        envvar=ENV_HOME,
        metavar="DIR",
        type=click.Path(file_okay=False),
        help=f"where a local control plane keeps its token [env {ENV_HOME}; default ~/.elastiserve]",
    )
    @click.option("--json", "as_json", is_flag=True, help="print JSON (for scripts)")
    @functools.wraps(func)
    def wrapper(
        endpoint: str | None, token: str | None, state_dir: str | None, as_json: bool, **kwargs: Any
    ) -> Any:
        from elastiserve.client.controlplane import ControlPlaneError
        from elastiserve.controlplane.spec import SpecError

        ctx = Context(endpoint, token, state_dir, as_json)
        try:
            return func(ctx, **kwargs)
        except SpecError as exc:
            fail(
                str(exc) if len(exc.errors) == 1 else "invalid service spec",
                EXIT_USAGE,
                exc.errors if len(exc.errors) > 1 else None,
            )
        except ControlPlaneError as exc:
            fail(exc.message, EXIT_USAGE if exc.is_bad_request else EXIT_FAILED, exc.details)
        finally:
            ctx.close()

    return wrapper  # type: ignore[return-value]


def read_spec_file(path: str, name: str | None = None) -> dict[str, Any]:
    """A spec file (or ``-`` for stdin) validated locally, so a typo is reported before any request.

    Relative local paths in it (``model_path``, ``--model-repository=``) are made absolute against
    the file's directory (stdin: the current directory), so they mean what they say wherever the
    control plane runs.
    """
    from elastiserve.controlplane.spec import with_absolute_paths

    base = Path.cwd() if path == "-" else Path(path).resolve().parent
    return with_absolute_paths(_read_spec_file(path, name), base)


def _read_spec_file(path: str, name: str | None = None) -> dict[str, Any]:
    from elastiserve.controlplane.spec import parse_spec, parse_spec_text

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE)
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text", EXIT_USAGE)
    if name is not None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            data.setdefault("name", name)
            if data["name"] != name:
                fail(f"{path}: name '{data['name']}' does not match the service '{name}'", EXIT_USAGE)
            return parse_spec(data).to_dict()
    return parse_spec_text(text, source=path).to_dict()


def wait_ready(ctx: Context, name: str, timeout: float) -> dict[str, Any]:
    """Show progress until every desired instance is ready; exit 1 on failure or timeout."""
    from elastiserve.cli import output

    deadline = time.monotonic() + timeout
    view = ctx.client.get_service(name)
    err = output.console(err=True)
    with err.status("") as status:
        while True:
            counts = view["instances"]
            status.update(f"{name}: {view['status']}, {counts['ready']}/{counts['desired']} instances ready")
            done = counts["ready"] >= counts["desired"] and view["status"] not in ("Creating", "Updating")
            if done and view["status"] in ("Running", "Stopped"):
                return view
            if view["status"] == "Failed":
                fail(f"service '{name}' failed: {view.get('message') or 'see `elastiserve events`'}")
            if time.monotonic() > deadline:
                fail(
                    f"service '{name}' not ready after {timeout:g}s ({view['status']}, "
                    f"{counts['ready']}/{counts['desired']} ready)"
                )
            time.sleep(0.5)
            view = ctx.client.get_service(name)


wait_option = click.option("--wait/--no-wait", default=False, help="wait until all instances are ready")
timeout_option = click.option(
    "--timeout", type=float, default=600.0, show_default=True, help="seconds to --wait"
)


def report_change(ctx: Context, view: dict[str, Any], verb: str) -> None:
    from elastiserve.cli import output

    if ctx.as_json:
        output.print_json(view)
        return
    warn(view.get("warnings", []))
    click.echo(f"service '{view['name']}' {verb} (version {view['version']}, status {view['status']})")


# -- commands ------------------------------------------------------------------------------------


@click.command()
@click.argument("file", metavar="FILE")
@wait_option
@timeout_option
@client_command
def create(ctx: Context, file: str, wait: bool, timeout: float) -> None:
    """Create a service from an EAS-style service.json (FILE "-" reads stdin)."""
    spec = read_spec_file(file)
    view = ctx.client.create_service(spec)
    if not ctx.as_json and "token" in view.get("spec", {}) and "token" not in spec:
        click.echo(f"token: {view['spec']['token']}")
    report_change(ctx, view, "created")
    if wait:
        wait_ready(ctx, view["name"], timeout)


@click.command()
@click.argument("name")
@click.option(
    "-D",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="set one field by dotted path, e.g. -Dmetadata.instance=3 (repeatable)",
)
@click.option("-s", "spec_file", metavar="FILE", help="replace the whole spec with this file")
@wait_option
@timeout_option
@client_command
def modify(
    ctx: Context, name: str, assignments: tuple[str, ...], spec_file: str | None, wait: bool, timeout: float
) -> None:
    """Change a service: -Dkey=value... edits fields; -s FILE replaces the spec. Changing only
    metadata.instance scales; anything else records a new version and rolls it out."""
    if bool(assignments) == bool(spec_file):
        fail("give either -Dkey=value... or -s FILE", EXIT_USAGE)
    if spec_file:
        view = ctx.client.update_service(name, read_spec_file(spec_file, name))
    else:
        from elastiserve.controlplane.spec import absolute_assignments

        view = ctx.client.modify_service(name, absolute_assignments(assignments, Path.cwd()))
    verb = {"unchanged": "unchanged", "scaled": "scaled", "released": "updated"}.get(
        view.get("change", ""), "modified"
    )
    report_change(ctx, view, verb)
    if wait:
        wait_ready(ctx, name, timeout)


@click.command()
@click.argument("name")
@client_command
def desc(ctx: Context, name: str) -> None:
    """Describe a service: status, endpoint, token, instances, resources, versions, message."""
    from elastiserve.cli import output

    view = ctx.client.get_service(name)
    if ctx.as_json:
        output.print_json(view)
        return
    out = output.console()
    out.print(output.service_table(view))


@click.command("list")
@client_command
def list_(ctx: Context) -> None:
    """List services."""
    from elastiserve.cli import output

    services = ctx.client.list_services()
    if ctx.as_json:
        output.print_json(services)
    elif not services:
        click.echo("no services")
    else:
        output.console().print(output.services_table(services))


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")
@client_command
def delete(ctx: Context, name: str, yes: bool) -> None:
    """Delete a service (its instances are drained first)."""
    from elastiserve.cli import output

    if not yes and not click.confirm(f"Delete service '{name}'?", default=False, err=True):
        fail("not deleted", EXIT_FAILED)
    result = ctx.client.delete_service(name)
    if ctx.as_json:
        output.print_json(result)
    else:
        click.echo(f"service '{name}' " + ("deleted" if result["result"] == "deleted" else "deleting"))


@click.command()
@click.argument("name")
@wait_option
@timeout_option
@client_command
def start(ctx: Context, name: str, wait: bool, timeout: float) -> None:
    """Start a stopped service."""
    report_change(ctx, ctx.client.start_service(name), "starting")
    if wait:
        wait_ready(ctx, name, timeout)


@click.command()
@click.argument("name")
@client_command
def stop(ctx: Context, name: str) -> None:
    """Stop a service: drain and stop its instances, keep its spec and versions."""
    report_change(ctx, ctx.client.stop_service(name), "stopping")


@click.command()
@click.argument("name")
@click.argument("number", type=int)
@client_command
def version(ctx: Context, name: str, number: int) -> None:
    """Roll a service to version NUMBER (the instance count stays)."""
    report_change(ctx, ctx.client.rollback(name, number), "rolled back")


@click.command()
@click.argument("name")
@client_command
def versions(ctx: Context, name: str) -> None:
    """List a service's versions (* marks the current one)."""
    from elastiserve.cli import output

    items = ctx.client.list_versions(name)
    if ctx.as_json:
        output.print_json(items)
    else:
        output.console().print(output.versions_table(items))


@click.command()
@click.argument("name")
@client_command
def w(ctx: Context, name: str) -> None:
    """Show a service's instances: address, started, restarts, status, ready, reason."""
    from elastiserve.cli import output

    items = ctx.client.list_instances(name)
    if ctx.as_json:
        output.print_json(items)
    elif not items:
        click.echo(f"service '{name}' has no instances")
    else:
        output.console().print(output.instances_table(items))


@click.command()
@click.argument("name")
@click.argument("instances", nargs=-1, required=True)
@client_command
def dw(ctx: Context, name: str, instances: tuple[str, ...]) -> None:
    """Delete instances; each is drained and replaced by a new one."""
    from elastiserve.cli import output
    from elastiserve.client.controlplane import ControlPlaneError

    results = []
    failed: list[str] = []
    for instance_id in instances:
        try:
            results.append(ctx.client.delete_instance(name, instance_id))
            if not ctx.as_json:
                click.echo(f"instance '{instance_id}' deleting")
        except ControlPlaneError as exc:
            if len(instances) == 1:
                raise
            failed.append(instance_id)
            click.echo(f"error: {exc.message}", err=True)
    if ctx.as_json:
        output.print_json(results)
    if failed:
        sys.exit(EXIT_FAILED)


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="keep printing new output")
@click.option("--instance", metavar="ID", help="only this instance")
@click.option("--tail", type=int, default=200, show_default=True, help="lines to show first")
@client_command
def logs(ctx: Context, name: str, follow: bool, instance: str | None, tail: int) -> None:
    """Print instance logs (all instances, prefixed with their id, unless --instance)."""
    if not follow:
        click.echo(ctx.client.logs(name, instance=instance, tail=tail), nl=False)
        return
    try:
        for chunk in ctx.client.follow_logs(name, instance=instance, tail=tail):
            click.echo(chunk, nl=False)
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@client_command
def events(ctx: Context, name: str, limit: int) -> None:
    """Show a service's recent events."""
    from elastiserve.cli import output

    items = ctx.client.events(name, limit=limit)
    if ctx.as_json:
        output.print_json(items)
    elif not items:
        click.echo(f"service '{name}' has no events")
    else:
        output.console().print(output.events_table(items))


@click.command()
def schema() -> None:
    """Print the JSON Schema of service.json."""
    from elastiserve.cli import output
    from elastiserve.controlplane.spec import spec_json_schema

    output.print_json(spec_json_schema())


COMMANDS: list[click.Command] = [
    create,
    modify,
    desc,
    list_,
    delete,
    start,
    stop,
    version,
    versions,
    w,
    dw,
    logs,
    events,
    schema,
]


def register(group: click.Group) -> None:
    """Add the service commands (and ``ls`` for ``list``) to the ``elastiserve`` group."""
    for command in COMMANDS:
        group.add_command(command)
    alias = copy.copy(list_)
    alias.name, alias.help, alias.short_help = "ls", "Same as list.", "Same as list."
    group.add_command(alias)
