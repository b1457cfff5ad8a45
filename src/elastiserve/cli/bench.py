"""``elastiserve bench``: load any KServe-v2 / Triton server (or a service through the gateway).

Closed loop (``--concurrency 1,4,16``) or open loop (``--request-rate 500,1000``, Poisson
arrivals, latency from the scheduled send time), HTTP or gRPC. Prints a table, and ``--json`` /
``--csv`` for scripts (``-`` = stdout). Exit codes: 0 done, 1 the server could not be reached or
every request failed, 2 bad usage (one line on stderr, never a traceback).

Everything heavy (numpy, the drivers, grpc) is imported inside the command, so registering it
costs the other commands nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _OneLineUsageError(click.UsageError):
    """click's usage errors print usage + hint + message; scripts want one line."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _BenchCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if isinstance(exc, _OneLineUsageError):
                raise
            raise _OneLineUsageError(exc.format_message(), ctx) from None


def _usage(message: str) -> NoReturn:
    raise _OneLineUsageError(message)


def _numbers(text: str, option: str, kind: type) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _usage(f"{option} {text!r}: expected a comma-separated list of numbers")
    if not values or any(v <= 0 for v in values):
        _usage(f"{option} {text!r}: values must be > 0")
    return values


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \r\n") or "\n" in value or "\r" in value:
        _usage(f"--header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


@click.command("bench", cls=_BenchCommand)
@click.option("-m", "--model", required=True, help="model name")
@click.option("-x", "--model-version", default="", help="model version [default: the server's choice]")
@click.option(
    "-u",
    "--url",
    default=None,
    help="server: host:port, http://host:port/PREFIX (e.g. a gateway's /api/predict/SERVICE) "
    "[default 127.0.0.1:8000 (http), 127.0.0.1:8001 (grpc)]",
)
@click.option(
    "--service",
    metavar="NAME",
    help="an elastiserve service: its gateway URL and token come from the control plane "
    "(--endpoint / ELASTISERVE_ENDPOINT, admin token from ELASTISERVE_TOKEN or the state dir)",
)
@click.option(
    "--direct",
    is_flag=True,
    help="with --service: load one ready instance directly (direct connect) instead of the gateway",
)
@click.option("--endpoint", metavar="URL", help="control plane for --service [env ELASTISERVE_ENDPOINT]")
@click.option("-i", "--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option(
    "--concurrency", "concurrency_text", metavar="N[,N...]", help="closed loop: clients [default 1]"
)
@click.option(
    "--request-rate", "rate_text", metavar="R[,R...]", help="open loop: requests/s, Poisson arrivals"
)
@click.option(
    "--duration", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="measured s"
)
@click.option("--warmup", type=click.FloatRange(min=0), default=2.0, show_default=True, help="warm-up s")
@click.option(
    "--input-data",
    default="random",
    show_default=True,
    metavar="zero|random|FILE",
    help='FILE: perf_analyzer JSON {"data": [{"INPUT0": [...]}, ...]}',
)
@click.option(
    "--shape", "shapes", multiple=True, metavar="NAME:DIMS[:TYPE]", help="input shape w/o batch dim"
)
@click.option("--output", "outputs", multiple=True, metavar="NAME", help="outputs to request [default: all]")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--input-format",
    type=click.Choice(["binary", "json"]),
    default="binary",
    show_default=True,
    help="HTTP tensors: binary extension (tritonclient's default) or JSON (e.g. for MLServer)",
)
@click.option("--token", default=None, help="service token, sent as 'Authorization: TOKEN' (gateway)")
@click.option(
    "-H", "--header", "headers", multiple=True, metavar="'Name: value'", help="extra header/metadata"
)
@click.option(
    "--timeout", type=click.FloatRange(min=0.01), default=30.0, show_default=True, help="per request s"
)
@click.option(
    "--connections",
    type=click.IntRange(min=1),
    default=None,
    help="gRPC: connections the calls share [default: one per client; 16 open loop]; "
    "HTTP open loop: most connections [default 512]",
)
@click.option("--workers", type=click.IntRange(min=1, max=64), default=1, show_default=True, help="processes")
@click.option(
    "--grpc-impl",
    type=click.Choice(["raw", "aio"]),
    default="raw",
    show_default=True,
    help="gRPC client: our lean HTTP/2 client or grpc.aio",
)
@click.option("--seed", type=int, default=0, show_default=True, help="random data and Poisson schedule")
@click.option("--json", "json_path", metavar="PATH", help="write the JSON report ('-' = stdout)")
@click.option("--csv", "csv_path", metavar="PATH", help="write one CSV row per level ('-' = stdout)")
@click.option(
    "--progress/--no-progress", default=None, help="progress line [default: when stderr is a terminal]"
)
def bench(
    model: str,
    model_version: str,
    url: str | None,
    service: str | None,
    direct: bool,
    endpoint: str | None,
    protocol: str,
    concurrency_text: str | None,
    rate_text: str | None,
    duration: float,
    warmup: float,
    input_data: str,
    shapes: tuple[str, ...],
    outputs: tuple[str, ...],
    batch_size: int,
    input_format: str,
    token: str | None,
    headers: tuple[str, ...],
    timeout: float,
    connections: int | None,
    workers: int,
    grpc_impl: str,
    seed: int,
    json_path: str | None,
    csv_path: str | None,
    progress: bool | None,
) -> None:
    """Load generator for KServe-v2 / Triton servers and elastiserve services (HTTP or gRPC)."""
    from elastiserve.loadgen.api import run_benchmark
    from elastiserve.loadgen.grpc_driver import parse_grpc_url
    from elastiserve.loadgen.http_driver import parse_http_url
    from elastiserve.loadgen.runner import LevelSpec
    from elastiserve.loadgen.targets import TargetOptions, fetch_metadata
    from elastiserve.loadgen.workload import WorkloadError, build_workload, parse_shape_option

    if concurrency_text and rate_text:
        _usage("--concurrency and --request-rate exclude each other (closed loop or open loop)")
    if protocol == "grpc" and input_format == "json":
        _usage("--input-format json is for HTTP; gRPC always sends raw tensors")
    if json_path == "-" and csv_path == "-":
        _usage("--json - and --csv - cannot both go to stdout")
    header_list = [_header(h) for h in headers]
    if service:
        url, token = _service_target(service, direct, endpoint, protocol, url, token)
    elif direct:
        _usage("--direct needs --service")
    if token:
        header_list.append(("Authorization", token))
    options = TargetOptions(
        url=url or ("127.0.0.1:8000" if protocol == "http" else "127.0.0.1:8001"),
        protocol=protocol,
        headers=header_list,
        input_format=input_format,
        grpc_impl=grpc_impl,
        timeout=timeout,
    )
    if rate_text:
        levels = [
            LevelSpec(
                rate=r, duration=duration, warmup=warmup, connections=connections, timeout=timeout, seed=seed
            )
            for r in _numbers(rate_text, "--request-rate", float)
        ]
    else:
        levels = [
            LevelSpec(
                concurrency=c,
                duration=duration,
                warmup=warmup,
                connections=connections,
                timeout=timeout,
                seed=seed,
            )
            for c in _numbers(concurrency_text or "1", "--concurrency", int)
        ]
    try:
        shape_specs = [parse_shape_option(s) for s in shapes]
        if input_data not in ("zero", "random") and not Path(input_data).is_file():
            raise WorkloadError(f"--input-data {input_data!r}: not zero, random or an existing file")
        (parse_http_url if protocol == "http" else parse_grpc_url)(options.url)
    except (WorkloadError, ValueError) as exc:
        _usage(str(exc))
    try:
        metadata = fetch_metadata(options, model, model_version)
    except ConnectionError as exc:
        if not shape_specs:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        click.echo(f"warning: {exc} (running anyway: errors will be counted)", err=True)
        metadata = None
    try:
        workload = build_workload(
            model,
            metadata=metadata,
            shapes=shape_specs,
            outputs=outputs,
            input_data=input_data,
            batch_size=batch_size,
            version=model_version,
            seed=seed,
        )
    except WorkloadError as exc:
        _usage(str(exc))

    show_progress = sys.stderr.isatty() if progress is None else progress
    stdout_taken = "-" in (json_path, csv_path)
    report = run_benchmark(
        options,
        workload,
        levels,
        workers=workers,
        progress=_progress_printer(warmup) if show_progress and workers == 1 else None,
        on_result=_result_printer(show_progress),
    )
    from rich.console import Console

    stream = sys.stderr if stdout_taken else sys.stdout
    console = Console(file=stream, highlight=False, width=None if stream.isatty() else 160)
    console.print(report.table())
    for result in report.results:
        if result.errors:
            kinds = ", ".join(f"{kind}: {count:,}" for kind, count in result.errors.items())
            click.echo(f"errors [{_load(result)}] {kinds}", err=True)
        for warning in result.warnings:
            click.echo(f"warning: [{_load(result)}] {warning}", err=True)
    if json_path:
        _write(json_path, report.to_json())
    if csv_path:
        _write(csv_path, report.to_csv())
    if all(r.requests == 0 for r in report.results):
        sys.exit(EXIT_FAILED)


def _service_target(
    service: str, direct: bool, endpoint: str | None, protocol: str, url: str | None, token: str | None
) -> tuple[str, str | None]:
    """The URL (and service token) of ``service``: its gateway endpoint, or one ready instance."""
    from elastiserve.client.controlplane import ControlPlaneClient, ControlPlaneError
    from elastiserve.controlplane.spec import REDACTED

    if url:
        _usage("--service and --url exclude each other")
    try:
        with ControlPlaneClient(endpoint) as client:
            view = client.get_service(service)
            if direct:
                ready = client.endpoints(service).endpoints
                if not ready:
                    click.echo(f"error: service '{service}' has no ready instance", err=True)
                    sys.exit(EXIT_FAILED)
                chosen = ready[0]
                port = chosen.get("port") if protocol == "http" else chosen.get("grpc_port")
                if not port:
                    _usage(f"service '{service}' publishes no gRPC port for direct connect")
                return f"{chosen['ip']}:{port}", token
    except ControlPlaneError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if protocol == "grpc":
        _usage("--service over gRPC needs --direct (or --url with the gateway's gRPC port)")
    if not view.get("endpoint"):
        _usage(f"the control plane publishes no gateway endpoint for '{service}'; use --direct")
    shown = (view.get("spec") or {}).get("token")
    if token is None and shown and shown != REDACTED:
        token = shown
    elif token is None and shown == REDACTED:
        _usage("the control plane showed the service token redacted (no admin token): pass --token")
    return str(view["endpoint"]), token


def _load(result: Any) -> str:
    return f"{result.concurrency} clients" if result.mode == "closed" else f"{result.rate:g}/s"


def _progress_printer(warmup: float) -> Any:
    last = {"done": 0, "t": 0.0}

    def show(label: str, elapsed: float, total: float, done: int, errors: int) -> None:
        rate = (done - last["done"]) / max(1e-9, elapsed - last["t"])
        last["done"], last["t"] = done, elapsed
        phase = "warm-up" if elapsed < warmup else "       "
        sys.stderr.write(
            f"\r[{label}] {elapsed:5.1f}/{total:.0f}s  {rate:9,.0f} req/s  errors {errors}  {phase}   "
        )
        sys.stderr.flush()

    return show


def _result_printer(show_progress: bool) -> Any:
    def show(result: Any) -> None:
        if show_progress:
            sys.stderr.write("\r\033[K")
        click.echo(
            f"[{_load(result)}] {result.throughput_rps:,.0f} req/s, p50 {result.latency_ms['p50']:.3f} ms, "
            f"p99 {result.latency_ms['p99']:.3f} ms, errors {result.error_count}",
            err=True,
        )

    return show


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
