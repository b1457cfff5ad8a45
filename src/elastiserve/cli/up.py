"""``elastiserve up``: the control plane, the reconciler and the gateway on this machine.

Kept in its own module so that registering it costs the other commands nothing: the control
plane's imports (FastAPI, uvicorn, psutil) happen only when ``up`` runs.
"""

from __future__ import annotations

import sys

import click

DEFAULT_PORT = 8470  # the same as elastiserve.controlplane.app (repeated: importing it is not cheap)
DEFAULT_GATEWAY_PORT = 8480


@click.command()
@click.option(
    "--state-dir",
    envvar="ELASTISERVE_HOME",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="where the store, tokens, logs and instance files live [env ELASTISERVE_HOME; default ~/.elastiserve]",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="address the API and the gateway listen on"
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True, help="API port"
)
@click.option(
    "--instance-host",
    default="127.0.0.1",
    show_default=True,
    help="address instances listen on and discovery publishes for direct connection "
    "(this machine's LAN address to let clients elsewhere connect directly)",
)
@click.option(
    "--gateway-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_GATEWAY_PORT,
    show_default=True,
    help="gateway port",
)
@click.option(
    "--gateway-grpc-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="gRPC port of the gateway (for services with metadata.enable_grpc) [default: no gRPC]",
)
@click.option("--no-gateway", is_flag=True, help="do not start the gateway")
@click.option(
    "--stop-instances",
    is_flag=True,
    help="on shutdown, drain and stop instances and stop the gateway (default: leave them running; the next `up` adopts them)",
)
@click.option(
    "--cpus",
    type=click.FloatRange(min=0, min_open=True),
    help="CPU cores to schedule on [default: this machine's]",
)
@click.option(
    "--memory",
    type=click.IntRange(min=1),
    metavar="MB",
    help="memory to schedule on, MB [default: this machine's]",
)
@click.option("--gpus", type=click.IntRange(min=0), help="GPUs to schedule on [default: /dev/nvidiaN count]")
@click.option(
    "--drain-delay",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="seconds a removed instance keeps serving after it leaves discovery, before SIGTERM",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def up(
    state_dir: str | None,
    host: str,
    port: int,
    instance_host: str,
    gateway_port: int,
    gateway_grpc_port: int | None,
    no_gateway: bool,
    stop_instances: bool,
    cpus: float | None,
    memory: int | None,
    gpus: int | None,
    drain_delay: float,
    log_level: str,
) -> None:
    """Run the control plane (REST API + reconciler + local runtime) and the gateway until Ctrl-C.

    Instances keep running when it stops and are adopted by the next `up` on the same state dir.
    """
    import logging

    from elastiserve.controlplane.app import PlatformOptions, run_platform
    from elastiserve.controlplane.runtimes.base import Resources
    from elastiserve.controlplane.runtimes.local import machine_capacity
    from elastiserve.controlplane.store import default_state_dir

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname).1s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    capacity = None
    if cpus is not None or memory is not None or gpus is not None:
        machine = machine_capacity()
        capacity = Resources(
            cpu=cpus if cpus is not None else machine.cpu,
            gpu=gpus if gpus is not None else machine.gpu,
            memory=memory if memory is not None else machine.memory,
        )
    options = PlatformOptions(
        state_dir=default_state_dir(state_dir),
        host=host,
        port=port,
        instance_host=instance_host,
        gateway_port=None if no_gateway else gateway_port,
        gateway_grpc_port=None if no_gateway else gateway_grpc_port,
        stop_instances=stop_instances,
        capacity=capacity,
        drain_delay=drain_delay,
    )
    sys.exit(run_platform(options))
