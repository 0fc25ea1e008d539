"""The workflow sandbox, without its per-payload round trips when no codec is configured.

For every payload sequence of every workflow activation and completion the SDK asks the
workflow instance which serialization context applies (six visitor passes: codec, external
storage and storage references, each way), and the sandboxed instance answers each question by
``exec``-ing code inside the sandbox with its import hooks applied. The answers only choose how a
*payload codec* or *external storage* is set up: with neither configured every one of those
passes hands the payloads back unchanged, whatever the context.

Measured in `bench.overhead`'s 200-run arm (py-spy, all threads of the worker process), those
round trips were 10% of the event loop's samples, more than the sandbox's instance creation.

:class:`CodecFreeSandbox` is the SDK's sandbox with one difference: its instances answer those
two questions with the run's own workflow context, outside the sandbox. Activations still run
inside the sandbox, with every restriction. :func:`for_converter` picks it only for a data
converter with no payload codec and no external storage (Spine's default); with payload
encryption (``SPINE_PAYLOAD_KEY``) the SDK's own sandbox answers, context by context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import temporalio.bridge.proto.workflow_activation
import temporalio.bridge.proto.workflow_completion
import temporalio.workflow
from temporalio.converter import (
    DataConverter,
    StorageDriverStoreContext,
    StorageDriverWorkflowInfo,
    WorkflowSerializationContext,
)
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner


def context_free(converter: DataConverter) -> bool:
    """Whether no payload pass of `converter` depends on a serialization context: it has no
    payload codec and no external storage (the only parts those passes use)."""
    return converter.payload_codec is None and converter.external_storage is None


@dataclass(frozen=True)
class CodecFreeSandbox(SandboxedWorkflowRunner):
    """:class:`SandboxedWorkflowRunner` for a worker whose data converter is :func:`context_free`.

    A subclass, so plugins that add passthrough modules to a sandbox (``dataclasses.replace``)
    keep it."""

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _WorkflowScoped(super().create_instance(det))


class _WorkflowScoped(WorkflowInstance):
    """A sandboxed instance whose payloads all take the run's workflow context, given without
    entering the sandbox; everything else is the sandboxed instance's."""

    def __init__(self, inner: WorkflowInstance) -> None:
        self._inner = inner
        info = inner.get_info()
        self._context = WorkflowSerializationContext(
            namespace=info.namespace, workflow_id=info.workflow_id
        )
        self._store = StorageDriverStoreContext(
            target=StorageDriverWorkflowInfo(
                id=info.workflow_id,
                run_id=info.run_id,
                type=info.workflow_type,
                namespace=info.namespace,
            )
        )

    def activate(
        self, act: temporalio.bridge.proto.workflow_activation.WorkflowActivation
    ) -> temporalio.bridge.proto.workflow_completion.WorkflowActivationCompletion:
        return self._inner.activate(act)

    def get_serialization_context(self, command_info: object) -> WorkflowSerializationContext:
        return self._context

    def get_external_store_context(self, command_info: object) -> StorageDriverStoreContext:
        return self._store

    def get_info(self) -> temporalio.workflow.Info:
        return self._inner.get_info()

    def get_thread_id(self) -> int | None:
        return self._inner.get_thread_id()


def for_converter(runner: WorkflowRunner, converter: DataConverter) -> WorkflowRunner:
    """`runner` as the sandbox that suits `converter`: :class:`CodecFreeSandbox` for a
    :func:`context_free` converter, the SDK's own sandbox otherwise. Any other runner (a
    caller's own, for debugging) is returned as it is."""
    if not isinstance(runner, SandboxedWorkflowRunner):
        return runner
    wanted = CodecFreeSandbox if context_free(converter) else SandboxedWorkflowRunner
    if type(runner) is wanted or type(runner) not in (CodecFreeSandbox, SandboxedWorkflowRunner):
        return runner  # already right, or a subclass of someone else's: theirs to configure
    fields = {f.name: getattr(runner, f.name) for f in dataclasses.fields(runner) if f.init}
    return wanted(**fields)
