"""``spine codec-server``: Temporal's remote codec HTTP API, so the Web UI and CLI show plaintext.

The Web UI (and ``temporal --codec-endpoint``) send the encrypted payloads they display here and
show what comes back; the keys never leave this process. Endpoints::

    POST /encode    {"payloads": [<protobuf-JSON Payload>, ...]} -> same shape, encrypted
    POST /decode    {"payloads": [...]}                          -> same shape, decrypted
    GET  /healthz   {"status": "ok", "current_key_id": "..."}

The browser calls the codec server directly, so it answers CORS for the Web UI's origin; the UI
names the namespace in ``X-Namespace``, which ``--namespace`` can restrict. Anyone who can reach
the server can decrypt with it: keep it on loopback, or behind the same authentication as the UI.

Run the dev server so its Web UI uses it::

    temporal server start-dev --ui-codec-endpoint http://127.0.0.1:8081
    SPINE_CODEC_KEYS=... spine codec-server --port 8081
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import click
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from spine.guardrails.codec import (
    KEY_ENV,
    KEYS_ENV,
    VAULT_PATH_ENV,
    CodecConfigError,
    CodecError,
    EncryptionCodec,
    codec_from_env,
)

log = logging.getLogger("spine.codec_server")

DEFAULT_PORT = 8081
DEFAULT_CORS_ORIGINS = ("http://localhost:8233", "http://127.0.0.1:8233")
#: Headers the Web UI sends: the namespace, and the user's token when "pass access token" is on.
CORS_HEADERS = ("Content-Type", "X-Namespace", "Authorization")

Transform = Callable[[Sequence[Payload]], Awaitable[list[Payload]]]


def create_codec_app(
    codec: EncryptionCodec,
    *,
    cors_origins: Sequence[str] = DEFAULT_CORS_ORIGINS,
    namespaces: Sequence[str] = (),
) -> FastAPI:
    """The codec server as an ASGI app.

    Args:
        codec: Encrypts for ``/encode`` and decrypts for ``/decode``.
        cors_origins: Browser origins allowed to call it (the Web UI's).
        namespaces: If given, requests whose ``X-Namespace`` is not one of these get 403.
    """
    app = FastAPI(title="Spine codec server", docs_url=None, redoc_url=None, openapi_url=None)
    allowed = frozenset(namespaces)

    async def transform(request: Request, fn: Transform, action: str) -> Response:
        namespace = request.headers.get("x-namespace", "")
        if allowed and namespace not in allowed:
            return _error(403, f"namespace {namespace!r} is not served by this codec server")
        try:
            payloads = json_format.Parse(await request.body(), Payloads())
        except json_format.ParseError as err:
            return _error(400, f'body is not {{"payloads": [...]}} protobuf JSON: {err}')
        try:
            result = await fn(payloads.payloads)
        except CodecError as err:
            log.warning("%s failed for namespace %r: %s", action, namespace, err)
            return _error(400, str(err))
        log.debug("%s %d payloads for namespace %r", action, len(result), namespace)
        return Response(
            json_format.MessageToJson(Payloads(payloads=result)), media_type="application/json"
        )

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        return await transform(request, codec.encode, "encode")

    @app.post("/decode")
    async def decode(request: Request) -> Response:
        return await transform(request, codec.decode, "decode")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "current_key_id": codec.current_key_id}

    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cors_origins),
        allow_methods=["POST", "OPTIONS"],
        allow_headers=list(CORS_HEADERS),
        # The UI's "include cross-origin credentials" setting needs this; origins stay explicit.
        allow_credentials=True,
    )
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("codec-server")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to listen on (keep loopback)."
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    default=DEFAULT_CORS_ORIGINS,
    show_default=True,
    help="Web UI origin allowed to call the server (repeatable).",
)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Serve only these namespaces, by the X-Namespace header (repeatable; default all).",
)
@click.option("--log-level", default="info", show_default=True)
def codec_server(
    port: int, host: str, cors_origins: tuple[str, ...], namespaces: tuple[str, ...], log_level: str
) -> None:
    """Serve Temporal's remote codec API so the Web UI and CLI can show encrypted payloads.

    Uses the same keys as workers and clients (SPINE_CODEC_KEYS, SPINE_CODEC_KEY or
    SPINE_CODEC_VAULT_PATH). Start the dev server with
    `temporal server start-dev --ui-codec-endpoint http://127.0.0.1:8081`, or set the endpoint
    in the Web UI under "Codec Server"; for the CLI pass `--codec-endpoint http://127.0.0.1:8081`.
    """
    try:
        codec = codec_from_env(os.environ)
    except CodecConfigError as err:
        raise click.ClickException(str(err)) from err
    if codec is None:
        raise click.ClickException(
            f"no payload encryption key configured; set {KEYS_ENV}, {KEY_ENV} or {VAULT_PATH_ENV}"
        )
    if not _is_loopback(host):
        click.echo(
            f"warning: listening on {host}: anyone who can reach port {port} can decrypt Spine's "
            "payloads; put it behind authentication",
            err=True,
        )
    click.echo(
        f"codec server on http://{host}:{port} (keys {', '.join(codec.key_ids)}; "
        f"encrypting with {codec.current_key_id!r}; CORS for {', '.join(cors_origins)})",
        err=True,
    )
    app = create_codec_app(codec, cors_origins=cors_origins, namespaces=namespaces)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    codec_server()
