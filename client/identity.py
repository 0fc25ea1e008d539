"""The client side of verified principals: log in, sign, and send the claim with every call.

``spine login`` logs a person in to OpenBao (userpass) and keeps the token in
``~/.config/spine/credentials.json`` (mode 0600); :func:`signer_from_env` finds it again (or
``SPINE_VAULT_TOKEN``). :class:`SigningInterceptor`, a Temporal client interceptor that
:func:`spine.client.runs.connect` adds, signs each start, fork, decision and operator command with
the logged-in principal's key in OpenBao's transit engine and sends the claim in the
``spine_principal`` header. Workers verify it (:mod:`spine.guardrails.identity`).

The Temporal CLI sends the same header with ``--headers``: ``spine sign`` prints it.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.client import (
    Interceptor,
    OutboundInterceptor,
    SignalWorkflowInput,
    StartWorkflowInput,
    StartWorkflowUpdateInput,
    StartWorkflowUpdateWithStartInput,
    WorkflowHandle,
    WorkflowUpdateHandle,
)
from temporalio.converter import PayloadConverter

from spine.contract import (
    LEDGER_UPDATES,
    LEDGER_WORKFLOW_TYPE,
    PRINCIPAL_HEADER,
    SIGNAL_APPROVAL,
    SIGNAL_OPERATOR,
    UPDATE_DECIDE,
    UPDATE_OPERATE,
    WORKFLOW_TYPE,
    AgentRequest,
    ApprovalDecision,
    OperatorCommand,
)
from spine.guardrails.identity import Claim, IdentityError, Purpose, payload_digest, request_digest
from spine.guardrails.principals import VaultSigner, login_userpass, whoami

#: Signals and updates that carry a claim, with the purpose it is signed for and its payload.
SIGNED_CALLS: dict[str, tuple[Purpose, type[BaseModel]]] = {
    SIGNAL_APPROVAL: ("decide", ApprovalDecision),
    UPDATE_DECIDE: ("decide", ApprovalDecision),
    SIGNAL_OPERATOR: ("operate", OperatorCommand),
    UPDATE_OPERATE: ("operate", OperatorCommand),
}


def credentials_path() -> Path:
    """Where ``spine login`` keeps the token: ``$SPINE_CREDENTIALS``, else
    ``~/.config/spine/credentials.json``."""
    if os.environ.get("SPINE_CREDENTIALS"):
        return Path(os.environ["SPINE_CREDENTIALS"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "spine" / "credentials.json"


def login(url: str, name: str, password: str, path: Path | None = None) -> Path:
    """Log `name` in to OpenBao and keep the token for later commands; returns the file.

    Raises:
        IdentityError: the login was refused or OpenBao cannot be reached.
    """
    token = login_userpass(url, name, password)
    path = path or credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created private: nobody else on the machine may read another person's token.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        json.dump({"vault_addr": url, "principal": name, "token": token}, f)
    return path


def signer_from_env(env: Mapping[str, str] | None = None) -> VaultSigner | None:
    """The logged-in principal's signer: ``SPINE_VAULT_TOKEN`` (with ``VAULT_ADDR``), else the
    credentials ``spine login`` kept; None when nobody is logged in."""
    env = os.environ if env is None else env
    token, url = env.get("SPINE_VAULT_TOKEN"), env.get("VAULT_ADDR")
    if token and url:
        name = env.get("SPINE_PRINCIPAL") or whoami(url, token)
        return VaultSigner(url=url, tokens={name: token}, default=name)
    path = credentials_path()
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        name, token, url = saved["principal"], saved["token"], saved["vault_addr"]
    except (OSError, ValueError, KeyError) as err:
        raise IdentityError(f"cannot read the credentials in {path}: {err}") from None
    return VaultSigner(url=url, tokens={name: token}, default=name)


def header(claim: Claim) -> Payload:
    """The ``spine_principal`` header's payload for `claim`."""
    return PayloadConverter.default.to_payloads([claim.model_dump(mode="json")])[0]


def _as_model(value: object, model: type[BaseModel]) -> BaseModel | None:
    """`value` as `model`, or None when it is not one: sent unsigned, the worker refuses it."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


class SigningInterceptor(Interceptor):
    """Signs Spine calls as a principal and sends the claim in the ``spine_principal`` header.

    With one principal (a logged-in person) every call is signed as them; a signer holding
    several principals' tokens (the test kit) signs as the one the call names: the request's
    `user`, the decision's or command's `by`. Either way the worker decides what it grants.
    """

    def __init__(self, signer: VaultSigner) -> None:
        self.signer = signer

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _Signing(next, self.signer)


class _Signing(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, signer: VaultSigner) -> None:
        super().__init__(next)
        self._signer = signer

    def _who(self, named: str) -> str:
        if named in self._signer.tokens:
            return named
        return self._signer.default or named

    async def _claim(
        self, principal: str, purpose: Purpose, workflow_id: str, digest: str
    ) -> Claim:
        return await asyncio.to_thread(
            self._signer.sign, self._who(principal), purpose, workflow_id, digest
        )

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        first = input.args[0] if input.args else None
        if isinstance(first, AgentRequest) or (input.workflow == WORKFLOW_TYPE and first):
            request = _as_model(first, AgentRequest)
            if isinstance(request, AgentRequest):
                purpose: Purpose = "fork" if request.fork_from is not None else "start"
                claim = await self._claim(request.user, purpose, input.id, request_digest(request))
                input.headers = {**input.headers, PRINCIPAL_HEADER: header(claim)}
        return await self.next.start_workflow(input)

    async def signal_workflow(self, input: SignalWorkflowInput) -> None:
        signed = SIGNED_CALLS.get(input.signal)
        if signed is not None and input.args:
            purpose, model = signed
            payload = _as_model(input.args[0], model)
            if payload is not None:
                claim = await self._claim(
                    str(getattr(payload, "by", "")), purpose, input.id, payload_digest(payload)
                )
                input.headers = {**input.headers, PRINCIPAL_HEADER: header(claim)}
        await self.next.signal_workflow(input)

    async def start_workflow_update(self, input: StartWorkflowUpdateInput) -> Any:
        signed = SIGNED_CALLS.get(input.update)
        if signed is not None and input.args:
            purpose, model = signed
            payload = _as_model(input.args[0], model)
            if payload is not None:
                claim = await self._claim(
                    str(getattr(payload, "by", "")), purpose, input.id, payload_digest(payload)
                )
                input.headers = {**input.headers, PRINCIPAL_HEADER: header(claim)}
        elif input.update in LEDGER_UPDATES and input.args and isinstance(input.args[0], BaseModel):
            claim = await self._claim("", "ledger", input.id, payload_digest(input.args[0]))
            input.headers = {**input.headers, PRINCIPAL_HEADER: header(claim)}
        return await self.next.start_workflow_update(input)

    async def start_update_with_start_workflow(
        self, input: StartWorkflowUpdateWithStartInput
    ) -> WorkflowUpdateHandle[Any]:
        update, start = input.update_workflow_input, input.start_workflow_input
        if (
            update.update in LEDGER_UPDATES
            and start.workflow == LEDGER_WORKFLOW_TYPE
            and update.args
            and isinstance(update.args[0], BaseModel)
        ):
            claim = await self._claim("", "ledger", start.id, payload_digest(update.args[0]))
            update.headers = {**update.headers, PRINCIPAL_HEADER: header(claim)}
        return await self.next.start_update_with_start_workflow(input)
