"""``python -m elastiserve.gateway --control-plane URL [--host H] [--port P] [--admin-token-file F]``.

Runs the gateway as its own process (``elastiserve up`` starts it this way). Once listening it
logs ``elastiserve gateway listening on http://HOST:PORT`` (the real port when ``--port 0``);
``GET /healthz`` answers 200 from then on, ``GET /readyz`` once the service list was read.
SIGINT/SIGTERM close it gracefully: no new connections, in-flight requests finish (5 s at most).

The admin token lets the gateway read service tokens (the control plane redacts them for
everyone else); without it, services that have a token answer 503. It is read from
``--admin-token-file`` or ``$ELASTISERVE_TOKEN``, never from the command line (where ``ps``
shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from elastiserve.client.controlplane import DEFAULT_ENDPOINT, ENV_ENDPOINT, ENV_TOKEN
from elastiserve.gateway.app import DEFAULT_PORT, Gateway, GatewayOptions

log = logging.getLogger("elastiserve.gateway")


def parse_args(argv: list[str] | None = None) -> GatewayOptions:
    parser = argparse.ArgumentParser(
        prog="python -m elastiserve.gateway", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--control-plane", default=os.environ.get(ENV_ENDPOINT, DEFAULT_ENDPOINT), help="control plane URL"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT}; 0 picks one)"
    )
    parser.add_argument("--admin-token-file", type=Path, help="file holding the control plane's admin token")
    parser.add_argument("--max-body-bytes", type=int, default=64 << 20, help="larger request bodies get 413")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="seconds; a service's metadata.rpc.keepalive overrides it",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=2.0, help="seconds to open a connection to an instance"
    )
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per request across instances")
    parser.add_argument(
        "--refresh-interval", type=float, default=2.0, help="seconds between reads of the service list when the control plane cannot long-poll it"
    )
    parser.add_argument(
        "--long-poll", type=float, default=30.0, help="seconds each endpoints long-poll waits"
    )
    parser.add_argument(
        "--grpc-port", type=int, default=None, help="also proxy gRPC on this port (see docs/gateway.md)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    token = os.environ.get(ENV_TOKEN)
    if args.admin_token_file is not None:
        try:
            token = args.admin_token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--admin-token-file: {exc.strerror}: {args.admin_token_file}")
    if args.max_attempts < 1:
        parser.error("--max-attempts must be at least 1")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every control-plane call (long-polls included) at INFO: too chatty for a daemon.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return GatewayOptions(
        control_plane=args.control_plane,
        host=args.host,
        port=args.port,
        admin_token=token or None,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        connect_timeout=args.connect_timeout,
        max_attempts=args.max_attempts,
        refresh_interval=args.refresh_interval,
        long_poll=args.long_poll,
        grpc_port=args.grpc_port,
    )


async def serve(options: GatewayOptions) -> int:
    gateway = Gateway(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
    except OSError as exc:
        log.error("error: cannot listen on %s:%s: %s", options.host, options.port, exc.strerror or exc)
        await gateway.close()
        return 1
    if not options.admin_token:
        log.warning("no admin token: services with a token will answer 503 (pass --admin-token-file)")
    grpc = f", gRPC on {options.host}:{gateway.grpc.port}" if gateway.grpc is not None else ""
    log.info("elastiserve gateway listening on http://%s:%d%s", options.host, gateway.port, grpc)
    await stop.wait()
    log.info("shutting down")
    await gateway.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        runner = asyncio.Runner()
    with runner:
        return runner.run(serve(options))


if __name__ == "__main__":
    sys.exit(main())
