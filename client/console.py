"""`spine console`: the web console for the people around the agent (approvers and operators).

Server-rendered pages (Starlette and Jinja2 templates, autoescaped; no JavaScript at all):

- **Inbox** (``/inbox``): every open approval of every run, with what it needs to be judged, and
  approve / reject with a reason;
- **Parked runs** (``/parked``): the dead-letter queue, and retry / skip / compensate / abort;
- **A run** (``/runs/<workflow id>``): its timeline, tool calls, approvals and who decided them,
  spend against budget, the audit chain's verdict, links to the Temporal Web UI and the trace;
- **Budgets** (``/budgets``): each account's spend today and this month against its limits.

**Who acts.** People sign in with their OpenBao login (userpass, as ``spine login``). The console
keeps the OpenBao token on the server, in a session the browser knows only by an opaque random id
(an HttpOnly, SameSite=Strict cookie), and signs each decision and operator command with that
token, as that person, exactly as the CLI does (:class:`spine.client.identity.SigningInterceptor`):
the console holds no key of its own and grants nothing. ``by`` is always the signed-in person;
a form field naming someone else is ignored, and the role a person picks is checked by the
worker, whose refusal (wrong role, self-approval, already decided, not parked) is shown to them.

**What comes in is hostile.** Every POST carries the session's CSRF token (and a foreign
``Origin`` is refused); bodies are small, url-encoded, and bounded; ids, roles and reasons are
validated before anything is sent; every page is rendered with autoescaping under a strict
Content-Security-Policy (no scripts, no frames, forms post only here).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from spine.client import console_data as data
from spine.client.console_cli import DEFAULT_HOST, DEFAULT_PORT
from spine.client.identity import SigningInterceptor
from spine.client.runs import SpineClientError, decide, get_run, operate
from spine.contract import (
    MAX_REASON_CHARS,
    NAME_PATTERN,
    ApprovalDecision,
    OperatorCommand,
)
from spine.guardrails.identity import NAME, IdentityError
from spine.guardrails.policy import Policy
from spine.guardrails.principals import VaultSigner, login_userpass

log = logging.getLogger(__name__)

COOKIE = "spine_console"
TEMPLATES = Path(__file__).with_name("console_templates")
#: The largest form body accepted (a reason is at most 2,000 characters).
MAX_BODY = 16 * 1024
MAX_FIELDS = 16
#: Signed-in sessions end after this long, or after this long unused.
SESSION_TTL_S = 8 * 3600
SESSION_IDLE_S = 3600
#: Sessions kept at once (signed-out visitors' first, oldest first, are dropped beyond it).
MAX_SESSIONS = 2000
#: Every page: no scripts, no frames, styles and forms from here only.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class ConsoleSettings:
    """What the console reads from and where people sign in."""

    client: Client
    """A Temporal client that signs nothing (reads); decisions go through per-person copies."""
    vault_url: str
    """OpenBao, where people log in (userpass) and sign (transit)."""
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    """Where the audit store, traces and shared database are (as for the CLI)."""
    policy: Policy | None = None
    """The policy the workers run (budget limits, who holds which role: hints only)."""
    secure_cookies: bool = False
    """Mark the session cookie Secure (when served over HTTPS, behind a proxy)."""


@dataclass
class Session:
    sid: str
    csrf: str
    created: float
    seen: float
    principal: str | None = None
    token: str | None = field(default=None, repr=False)
    flashes: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    """Sessions by opaque id, in memory: the OpenBao tokens never leave the server."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._max = max_sessions

    def new(self) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._by_id[session.sid] = session
        while len(self._by_id) > self._max:
            anonymous = next((s for s in self._by_id.values() if s.principal is None), None)
            self._by_id.pop(anonymous.sid if anonymous else next(iter(self._by_id)))
        return session

    def get(self, sid: str | None) -> Session | None:
        session = self._by_id.get(sid or "")
        if session is None:
            return None
        now = time.monotonic()
        if now - session.created > SESSION_TTL_S or now - session.seen > SESSION_IDLE_S:
            self._by_id.pop(session.sid, None)
            return None
        session.seen = now
        self._by_id.move_to_end(session.sid)
        return session

    def drop(self, session: Session) -> None:
        self._by_id.pop(session.sid, None)


# ---------------------------------------------------------------------------------- helpers


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value is escaped; nothing is marked safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shown"] = data.shown
    env.filters["compact"] = data.compact
    env.filters["when"] = data.when
    env.filters["usd"] = lambda v: "—" if v is None else f"${v:,.4f}"
    env.globals["run_url"] = run_url
    env.globals["trace_url"] = trace_url
    return env


def run_url(workflow_id: str) -> str:
    """The console page of a run (the id is quoted whole, slashes too)."""
    return "/runs/" + urllib.parse.quote(workflow_id, safe="")


def trace_url(workflow_id: str) -> str:
    """The console page of a run's trace."""
    return "/trace/" + urllib.parse.quote(workflow_id, safe="")


def _safe_next(value: str | None) -> str:
    """A local path to go back to after signing in; anything else goes to the inbox."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        if len(value) <= 600 and all(c.isprintable() for c in value):
            return value
    return "/inbox"


class BadForm(Exception):  # noqa: N818  # control flow: answered with 400/413
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _form(request: Request) -> dict[str, str]:
    """A small url-encoded form: the first value of each field; bounded in size and fields."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise BadForm(415, "forms must be sent url-encoded")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadForm(413, f"the form is larger than {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadForm(413, f"the form is larger than {MAX_BODY} bytes")
    try:
        fields = urllib.parse.parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as err:
        raise BadForm(400, f"the form could not be read: {err}") from None
    return {k: v[0] for k, v in fields.items()}


def _flash(session: Session, message: tuple[str, str]) -> None:
    """A message for the person's next page (the last few only)."""
    session.flashes = [*session.flashes[-4:], message]


def _summarise(err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}"


# ------------------------------------------------------------------------------------- app


class Console:
    """The console's routes over one :class:`ConsoleSettings`."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.sessions = Sessions()
        self.templates = _environment()
        self.css = (TEMPLATES / "console.css").read_text()

    # ------------------------------------------------------------------ sessions and pages

    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.sid,
            httponly=True,
            samesite="strict",
            secure=self.settings.secure_cookies,
            path="/",
        )

    def roles_of(self, principal: str) -> list[str] | None:
        """The roles the policy grants `principal` directly; None when the console cannot
        know (no policy, or the person's roles come from OpenBao groups)."""
        policy = self.settings.policy
        if policy is None or principal not in policy.principals or policy.groups:
            return None  # with group grants, what OpenBao says the person belongs to counts
        return list(policy.principals[principal].roles)

    def page(
        self, template: str, session: Session | None, status: int = 200, **values: Any
    ) -> HTMLResponse:
        flashes = list(session.flashes) if session else []
        if session:
            session.flashes.clear()
        who = session.principal if session else None
        html = self.templates.get_template(template).render(
            me=who,
            my_roles=self.roles_of(who) if who else None,
            csrf=session.csrf if session else "",
            flashes=flashes,
            nav=Path(template).stem,
            **values,
        )
        response = HTMLResponse(html, status_code=status)
        if session:
            self._set_cookie(response, session)
        return response

    def _signed_in(self, request: Request) -> Session | Response:
        session = self._session(request)
        if session is None or session.principal is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(
                "/login?next=" + urllib.parse.quote(target, safe=""), status_code=303
            )
        return session

    @staticmethod
    def _filter(request: Request) -> data.Filter | str:
        """The list's filter from the query string, or why it is not one."""
        try:
            return data.Filter.of(
                request.query_params.get("account"), request.query_params.get("agent")
            )
        except ValueError as err:
            return f"filter refused: {err}"

    def _refused(self, session: Session | None, status: int, message: str) -> HTMLResponse:
        return self.page("refused.html", session, status=status, message=message)

    async def _checked_post(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The signed-in session and the form of a POST that passed the CSRF check."""
        session = self._session(request)
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            return self._refused(session, 403, "this form was sent from another site; refused")
        try:
            form = await _form(request)
        except BadForm as err:
            return self._refused(session, err.status, err.message)
        if session is None or not hmac.compare_digest(
            form.get("csrf", "").encode(), session.csrf.encode()
        ):
            return self._refused(
                session,
                403,
                "the form's security token is missing or does not match your session "
                "(it expired, or the form did not come from this console); nothing was sent",
            )
        if session.principal is None or session.token is None:
            return RedirectResponse("/login", status_code=303)
        return session, form

    def signed_client(self, session: Session) -> Client:
        """The Temporal client that signs as the signed-in person, with their own token."""
        assert session.principal is not None and session.token is not None
        base = self.settings.client
        signer = VaultSigner(
            self.settings.vault_url, {session.principal: session.token}, default=session.principal
        )
        return Client(
            base.service_client,
            namespace=base.namespace,
            data_converter=base.data_converter,
            interceptors=[SigningInterceptor(signer)],
        )

    # ----------------------------------------------------------------------------- routes

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/inbox", status_code=303)

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def stylesheet(self, request: Request) -> Response:
        return Response(self.css, media_type="text/css")

    async def login_form(self, request: Request) -> Response:
        session = self._session(request) or self.sessions.new()
        return self.page(
            "login.html",
            session,
            next=_safe_next(request.query_params.get("next")),
            name="",
            error=None,
        )

    async def login(self, request: Request) -> Response:
        session = self._session(request)
        try:
            form = await _form(request)
        except BadForm as err:
            return self._refused(session, err.status, err.message)
        if session is None or not hmac.compare_digest(
            form.get("csrf", "").encode(), session.csrf.encode()
        ):
            session = self.sessions.new()
            return self.page(
                "login.html",
                session,
                status=403,
                next="/inbox",
                name="",
                error="the sign-in form expired; please sign in again",
            )
        name = form.get("name", "").strip()
        target = _safe_next(form.get("next"))
        if not NAME.match(name):
            return self.page(
                "login.html",
                session,
                status=400,
                next=target,
                name="",
                error=f"a name is lower case letters, digits, '.', '_' or '-' ({NAME_PATTERN})",
            )
        try:
            token = await asyncio.to_thread(
                login_userpass, self.settings.vault_url, name, form.get("password", "")
            )
        except IdentityError as err:
            return self.page(
                "login.html", session, status=401, next=target, name=name, error=str(err)
            )
        self.sessions.drop(session)  # a new id once signed in (no fixation)
        fresh = self.sessions.new()
        fresh.principal, fresh.token = name, token
        log.info("console: %s signed in", name)
        response = RedirectResponse(target, status_code=303)
        self._set_cookie(response, fresh)
        return response

    async def logout(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        await asyncio.to_thread(self._revoke, session.token)
        self.sessions.drop(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    def _revoke(self, token: str | None) -> None:
        import hvac

        try:
            hvac.Client(
                url=self.settings.vault_url, token=token, timeout=5
            ).auth.token.revoke_self()
        except Exception as err:  # noqa: BLE001  # the session is gone either way
            log.warning("console: could not revoke an OpenBao token at sign-out: %s", err)

    async def inbox(self, request: Request) -> Response:
        return await self._listing(
            request,
            "inbox.html",
            data.inbox,
            self_approval=bool(
                self.settings.policy and self.settings.policy.identity.allow_self_approval
            ),
        )

    async def parked(self, request: Request) -> Response:
        return await self._listing(request, "parked.html", data.parked)

    async def _listing(
        self,
        request: Request,
        template: str,
        fetch: Callable[[Client, data.Filter], Awaitable[tuple[list[Any], bool]]],
        **extra: object,
    ) -> Response:
        """A page listing runs (the inbox, parked runs), filtered by the query's account/agent."""
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        items: list[Any] = []
        more, problem = False, None
        only = self._filter(request)
        if isinstance(only, str):
            problem = only
        else:
            try:
                items, more = await fetch(self.settings.client, only)
            except SpineClientError as err:
                problem = str(err)
        return self.page(
            template,
            session,
            items=items,
            more=more,
            problem=problem,
            only=only if isinstance(only, data.Filter) else data.Filter(),
            **extra,
        )

    async def run(self, request: Request) -> Response:
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        workflow_id = request.path_params["workflow_id"]
        if not data.valid_workflow_id(workflow_id):
            return self._refused(session, 400, "that is not a workflow id")
        try:
            run = await data.run_page(
                self.settings.client, workflow_id, self.settings.env, self.settings.policy
            )
        except SpineClientError as err:
            return self._refused(session, 404, str(err))
        operator_roles = run.story.spec.operator_roles if run.story.spec else []
        working = run.running and run.status not in ("awaiting_approval", "parked")
        return self.page(
            "run.html",
            session,
            run=run,
            refresh=3 if working else 0,
            operator_roles=operator_roles,
            self_approval=bool(
                self.settings.policy and self.settings.policy.identity.allow_self_approval
            ),
        )

    async def trace(self, request: Request) -> Response:
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        workflow_id = request.path_params["workflow_id"]
        if not data.valid_workflow_id(workflow_id):
            return self._refused(session, 400, "that is not a workflow id")
        lines, problem = await data.trace_lines(self.settings.env, workflow_id)
        return self.page(
            "trace.html", session, workflow_id=workflow_id, lines=lines, problem=problem
        )

    async def budgets(self, request: Request) -> Response:
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        rows, problem = [], None
        only = self._filter(request)
        if isinstance(only, str):
            problem = only
        else:
            try:
                rows = await data.budgets(self.settings.client, self.settings.policy, only)
            except SpineClientError as err:
                problem = str(err)
        return self.page(
            "budgets.html",
            session,
            rows=rows,
            problem=problem,
            only=only if isinstance(only, data.Filter) else data.Filter(),
        )

    async def decide(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        workflow_id = form.get("workflow_id", "")
        if not data.valid_workflow_id(workflow_id):
            return self._refused(session, 400, "that is not a workflow id")
        back = RedirectResponse(run_url(workflow_id), status_code=303)
        if len(form.get("reason", "")) > MAX_REASON_CHARS:
            _flash(session, ("error", f"a reason is at most {MAX_REASON_CHARS} characters"))
            return back
        try:
            decision = ApprovalDecision(
                approval_id=form.get("approval_id", ""),
                decision=form.get("decision", ""),  # type: ignore[arg-type]  # validated here
                by=session.principal or "",  # always the signed-in person, whatever was sent
                role=form.get("role", ""),
                reason=form.get("reason", ""),
            )
        except ValidationError as err:
            _flash(session, ("error", f"not sent: {_summarise(err)}"))
            return back
        handle = get_run(self.signed_client(session), workflow_id)
        try:
            ack = await decide(handle, decision)
        except (SpineClientError, IdentityError) as err:
            _flash(session, ("error", str(err)))
            return back
        past = "approved" if ack.decision == "approve" else "rejected"
        _flash(
            session,
            (
                "ok",
                f"{past} {ack.approval_id} as {decision.by} ({decision.role}); "
                f"the run is now {ack.status}",
            ),
        )
        return back

    async def operate(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        workflow_id = form.get("workflow_id", "")
        if not data.valid_workflow_id(workflow_id):
            return self._refused(session, 400, "that is not a workflow id")
        back = RedirectResponse(run_url(workflow_id), status_code=303)
        if len(form.get("reason", "")) > MAX_REASON_CHARS:
            _flash(session, ("error", f"a reason is at most {MAX_REASON_CHARS} characters"))
            return back
        try:
            command = OperatorCommand(
                action=form.get("action", ""),  # type: ignore[arg-type]  # validated here
                by=session.principal or "",
                role=form.get("role", ""),
                reason=form.get("reason", ""),
            )
        except ValidationError as err:
            _flash(session, ("error", f"not sent: {_summarise(err)}"))
            return back
        handle = get_run(self.signed_client(session), workflow_id)
        try:
            state = await operate(handle, command)
        except (SpineClientError, IdentityError) as err:
            _flash(session, ("error", str(err)))
            return back
        goes_on = command.action in ("retry", "skip")
        _flash(
            session,
            (
                "ok",
                f"{command.action} accepted from {command.by} ({command.role}); "
                + ("the run goes on" if goes_on else "the run ends, undoing its side effects")
                + f" (it was {state.status})",
            ),
        )
        return back


class _Headers:
    """Security headers on every response (pure ASGI middleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: ConsoleSettings) -> Any:
    """The console as an ASGI app."""
    console = Console(settings)
    app = Starlette(
        routes=[
            Route("/", console.home),
            Route("/healthz", console.healthz),
            Route("/console.css", console.stylesheet),
            Route("/login", console.login_form, methods=["GET"]),
            Route("/login", console.login, methods=["POST"]),
            Route("/logout", console.logout, methods=["POST"]),
            Route("/inbox", console.inbox),
            Route("/parked", console.parked),
            Route("/budgets", console.budgets),
            Route("/runs/{workflow_id:path}", console.run),
            Route("/trace/{workflow_id:path}", console.trace),
            Route("/decide", console.decide, methods=["POST"]),
            Route("/operate", console.operate, methods=["POST"]),
        ]
    )
    app.state.console = console
    return _Headers(app)


@asynccontextmanager
async def serving(
    settings: ConsoleSettings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> AsyncIterator[str]:
    """Serve the console in this event loop until the block ends; yields its URL (port 0: a
    free one).

    Raises:
        OSError: the address cannot be bound (in use, not this host's).
    """
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # here, so a port in use is an OSError, not uvicorn's exit
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", lifespan="off", proxy_headers=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it stopped
                raise RuntimeError(f"the console did not start on {host}:{bound}")
            await asyncio.sleep(0.05)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        yield f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
