"""`spine stream-server`: serve runs' live streams as Server-Sent Events (see
:mod:`spine.client.stream_server`)."""

from __future__ import annotations

import ipaddress
import os

import click

from spine.client.stream_server import TOKEN_ENV, create_app
from spine.observability.streams import stream_store_from_env


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("stream-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8500, show_default=True, type=click.IntRange(1, 65535))
def stream_server(host: str, port: int) -> None:
    """Serve runs' live streams (tokens and steps) as Server-Sent Events.

    GET /v1/runs/RUN/events streams RUN's events, from the first (or after the Last-Event-ID
    header, or ?after=SEQ) to the run's end. Reads the store the workers write to
    (SPINE_DATABASE_URL, else SQLite in SPINE_STATE_DIR). With SPINE_STREAM_TOKEN set, requests
    need 'Authorization: Bearer <token>'; without it only loopback addresses are allowed.
    """
    import uvicorn  # lazily: only this verb serves HTTP

    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not _loopback(host):
        raise click.UsageError(
            f"refusing to serve run streams on {host!r} without a token; set {TOKEN_ENV} "
            "(clients send 'Authorization: Bearer <token>') or listen on 127.0.0.1"
        )
    try:
        store = stream_store_from_env(os.environ)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(f"streams from {store}; SSE at http://{host}:{port}/v1/runs/RUN/events")
    uvicorn.run(create_app(store, token=token), host=host, port=port, log_level="warning")
