"""`spine stream-server`: runs' live streams over HTTP, as Server-Sent Events, for apps.

::

    GET /v1/runs/{workflow_id}/events      text/event-stream; one SSE event per stream event:
                                           id: <seq>, event: <kind>, data: <the event as JSON>
    GET /healthz                           {"status": "ok"}

A client that connects late gets everything it missed, then the live tail: it resumes after the
``Last-Event-ID`` header (what browsers' ``EventSource`` sends when it reconnects) or the
``after`` query parameter, and the stream ends after the run's ``end`` event. The events come
from the store the workers write to (:func:`spine.observability.streams.stream_store_from_env`:
PostgreSQL with ``SPINE_DATABASE_URL``, so the server may run on any host; else the SQLite file
in ``SPINE_STATE_DIR``). A sub-agent's stream is its own workflow id's (named in the parent's
``sub_agent`` step events).

With ``SPINE_STREAM_TOKEN`` set every request but ``/healthz`` needs ``Authorization: Bearer
<token>``; the server refuses to listen beyond loopback without one. Put it behind your app's
own authentication: a stream shows what the run's audit log shows, and the model's words.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from spine.observability.streams import StreamStore, follow

TOKEN_ENV = "SPINE_STREAM_TOKEN"
#: Seconds between SSE comments that keep idle connections (and proxies) open.
PING_S = 15


def create_app(store: StreamStore, *, token: str | None = None) -> Starlette:
    """The SSE app over `store`; with `token`, requests need ``Authorization: Bearer <token>``.

    Mount it in your own ASGI app, or run it with ``spine stream-server``.
    """
    expected = f"Bearer {token}".encode() if token else None

    def refused(request: Request) -> Response | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return JSONResponse(
            {"error": "missing or wrong stream token; send 'Authorization: Bearer <token>'"},
            401,
            {"WWW-Authenticate": "Bearer"},
        )

    async def events(request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        run_id = request.path_params["run_id"]
        given = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        try:
            after = int(given)
        except ValueError:
            return JSONResponse(
                {"error": f"Last-Event-ID / after must be an integer, not {given[:40]!r}"}, 400
            )
        if after < 0:
            return JSONResponse({"error": "Last-Event-ID / after must not be negative"}, 400)

        async def stream() -> AsyncIterator[dict[str, str]]:
            async for event in follow(store, run_id, after):
                yield {"id": str(event.seq), "event": event.kind, "data": event.model_dump_json()}

        return EventSourceResponse(stream(), ping=PING_S)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await store.close()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/v1/runs/{run_id:path}/events", events),
        ],
        lifespan=lifespan,
    )
