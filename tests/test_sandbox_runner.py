"""The workflow sandbox without per-payload round trips (`spine.runner`): chosen only for a
converter with no codec and no external storage, sandbox restrictions intact."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterator
from uuid import uuid4

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from temporalio.worker.workflow_sandbox import _runner as sdk_runner

from spine.client.identity import SigningInterceptor
from spine.client.runs import start_run, wait_result
from spine.client.testing import VaultDev
from spine.guardrails.codec import EncryptionCodec, encrypted_data_converter
from spine.plugin import PASSTHROUGH_MODULES, SpineConfig, build_worker, sandbox
from spine.runner import CodecFreeSandbox, context_free, for_converter
from tests.helpers import call, eventually, scripted_request, turn
from tests.rogue_workflow import ClockReadingWorkflow

ENCRYPTED = encrypted_data_converter(EncryptionCodec({"k1": os.urandom(32)}))


@pytest.fixture
def sandbox_questions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts the context questions the SDK's sandboxed instances answer inside the sandbox."""
    asked: Counter[str] = Counter()
    for name in ("get_serialization_context", "get_external_store_context"):
        original = getattr(sdk_runner._Instance, name)

        def counted(self, command_info, _original=original, _name=name):
            asked[_name] += 1
            return _original(self, command_info)

        monkeypatch.setattr(sdk_runner._Instance, name, counted)
    yield asked


def test_a_plain_converter_gets_the_codec_free_sandbox_with_its_restrictions():
    """Spine's default converter (no codec, no external storage) gets CodecFreeSandbox, keeping
    every passthrough and restriction of the sandbox it was given."""
    assert context_free(pydantic_data_converter)
    given = sandbox()
    chosen = for_converter(given, pydantic_data_converter)
    assert type(chosen) is CodecFreeSandbox
    assert chosen.restrictions == given.restrictions
    assert set(PASSTHROUGH_MODULES) <= chosen.restrictions.passthrough_modules
    # A plugin adding its passthrough modules later (as the OpenTelemetry plugin does) keeps it.
    widened = dataclasses.replace(
        chosen, restrictions=chosen.restrictions.with_passthrough_modules("opentelemetry")
    )
    assert type(widened) is CodecFreeSandbox
    assert for_converter(chosen, pydantic_data_converter) is chosen


def test_a_codec_or_external_storage_keeps_the_sdk_sandbox():
    """With payload encryption every payload keeps its own serialization context, so the SDK's
    sandbox answers; a codec-free sandbox given such a converter is turned back into it."""
    assert not context_free(ENCRYPTED)
    restrictions = SandboxRestrictions.default.with_passthrough_modules("spine")
    for given in (SandboxedWorkflowRunner(restrictions), CodecFreeSandbox(restrictions)):
        chosen = for_converter(given, ENCRYPTED)
        assert type(chosen) is SandboxedWorkflowRunner
        assert chosen.restrictions == restrictions
    stored = dataclasses.replace(pydantic_data_converter, external_storage=object())  # type: ignore[arg-type]
    assert not context_free(stored)
    assert type(for_converter(sandbox(), stored)) is SandboxedWorkflowRunner


def test_a_callers_own_runner_is_left_alone():
    """A caller's unsandboxed runner (for debugging) or own sandbox subclass is theirs."""

    @dataclasses.dataclass(frozen=True)
    class TheirSandbox(SandboxedWorkflowRunner):
        pass

    unsandboxed = UnsandboxedWorkflowRunner()
    theirs = TheirSandbox()
    assert for_converter(unsandboxed, pydantic_data_converter) is unsandboxed
    assert for_converter(theirs, pydantic_data_converter) is theirs


async def test_a_plain_run_asks_the_sandbox_no_context_question(
    client: Client, worker_config: SpineConfig, sandbox_questions: Counter[str]
):
    """A run on Spine's plain worker completes without one context round trip into the
    sandbox; the worker's runner (and the ledger worker's) is the codec-free sandbox."""
    script = [turn(call("lookup_order", order_id="o-1401")), turn(text="done")]
    worker = build_worker(client, config=worker_config)
    assert type(worker.config(active_config=True)["workflow_runner"]) is CodecFreeSandbox
    async with worker:
        handle = await start_run(
            client, scripted_request(script), task_queue=worker_config.task_queue
        )
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert sandbox_questions == Counter()


async def test_an_encrypted_run_still_takes_its_contexts_from_the_sandbox(
    client: Client,
    worker_config: SpineConfig,
    vault: VaultDev,
    new_account,
    sandbox_questions: Counter[str],
):
    """With payload encryption the SDK's sandbox answers every context question, as before
    (the run and its ciphertext history are tested in test_codec.py). A fresh account, so a
    fresh budget ledger on this test's own ledger queue."""
    encrypted = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=ENCRYPTED,
        interceptors=[SigningInterceptor(vault.signer(vault.tokens))],
    )
    config = dataclasses.replace(
        worker_config, ledger_task_queue=f"{worker_config.task_queue}-ledger"
    )
    worker = build_worker(encrypted, config=config)
    assert type(worker.config(active_config=True)["workflow_runner"]) is SandboxedWorkflowRunner
    async with worker:
        request = scripted_request([turn(text="done")])
        request.account = new_account("enc")
        handle = await start_run(encrypted, request, task_queue=config.task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert sandbox_questions["get_serialization_context"] > 0


async def test_workflow_code_still_runs_inside_the_sandbox(client: Client):
    """The codec-free sandbox keeps every restriction: workflow code reading the wall clock
    fails its workflow task with the sandbox's error, and the run does not complete."""
    queue = f"clock-{uuid4()}"
    runner = for_converter(sandbox(), client.data_converter)
    assert type(runner) is CodecFreeSandbox
    async with Worker(
        client, task_queue=queue, workflows=[ClockReadingWorkflow], workflow_runner=runner
    ):
        handle = await client.start_workflow(
            ClockReadingWorkflow.run, id=f"clock-{uuid4()}", task_queue=queue
        )

        async def failed_task() -> bool:
            async for event in handle.fetch_history_events():
                if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                    message = event.workflow_task_failed_event_attributes.failure.message
                    assert "datetime.datetime.now" in message, message
                    return True
            return False

        await eventually(failed_task, what="the clock-reading task to fail")
        await handle.terminate("test over")
