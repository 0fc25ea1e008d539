"""Tool definitions and versioned tool contracts (`spine tools check` / `spine tools lock`)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field

from spine.activities.contracts import (
    ChangeKind,
    build_lock,
    check_lock,
    compare_schemas,
    dumps_lock,
    load_lock,
)
from spine.activities.tools import (
    AgentDefinition,
    Registry,
    ToolContext,
    ToolDefinition,
    ToolDefinitionError,
    tool,
)
from spine.client.tools_cli import tools

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ a tool in two versions


class CustomerQuery(BaseModel):
    customer_id: str = Field(pattern=r"^c-\d+$", description="Customer id")


class CustomerQueryWithRegion(CustomerQuery):
    region: Literal["eu", "us"] = Field(description="Where the customer's data lives")


class Customer(BaseModel):
    customer_id: str
    name: str


@tool(name="lookup_customer")
async def lookup_customer_v1(args: CustomerQuery, ctx: ToolContext) -> Customer:
    """Look up a customer."""
    return Customer(customer_id=args.customer_id, name="Ada")


@tool(name="lookup_customer")
async def lookup_customer_v1_changed(args: CustomerQueryWithRegion, ctx: ToolContext) -> Customer:
    """Look up a customer in a region (same version: a breaking change)."""
    return Customer(customer_id=args.customer_id, name="Ada")


@tool(name="lookup_customer", version=2)
async def lookup_customer_v2(args: CustomerQueryWithRegion, ctx: ToolContext) -> Customer:
    """Look up a customer in a region."""
    return Customer(customer_id=args.customer_id, name="Ada")


@pytest.fixture
def agent_module() -> Iterator[Callable[..., str]]:
    """Registers throwaway agent modules serving the given tools; returns their names."""
    names: list[str] = []

    def make(*definitions: ToolDefinition) -> str:
        name = f"spine_test_agent_{uuid.uuid4().hex[:8]}"
        module = types.ModuleType(name)

        def register(registry: Registry) -> None:
            for definition in definitions:
                registry.add_tool(definition)
            registry.add_agent(
                AgentDefinition(name="crm-agent", instructions="x", tools=(definitions[0].name,))
            )

        module.register = register  # type: ignore[attr-defined]  # an agent module's hook
        sys.modules[name] = module
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(tools, list(args), prog_name="spine tools")
    return result.exit_code, result.stdout, result.stderr


def write_lock(path: Path, *definitions: ToolDefinition) -> Path:
    path.write_text(dumps_lock(build_lock(definitions)))
    return path


# ----------------------------------------------------------------------------- the CLI


def test_check_passes_on_committed_lock() -> None:
    """`spine tools check` passes for the demo tools against the committed tools.lock.json."""
    code, out, err = run_cli(
        "check", "--agents", "spine.demo.agent", "--lock", str(REPO_ROOT / "tools.lock.json")
    )
    assert code == 0, err
    assert "ok: tool contracts match" in out and "out of date" not in out


def test_lock_is_deterministic(tmp_path: Path) -> None:
    """`spine tools lock` writes the committed lock byte for byte, every time."""
    target = tmp_path / "tools.lock.json"
    assert run_cli("lock", "--agents", "spine.demo.agent", "--lock", str(target))[0] == 0
    first = target.read_bytes()
    assert run_cli("lock", "--agents", "spine.demo.agent", "--lock", str(target))[0] == 0
    assert target.read_bytes() == first == (REPO_ROOT / "tools.lock.json").read_bytes()


def test_breaking_change_fails_naming_tool_and_field(tmp_path: Path, agent_module) -> None:
    """A v1 whose input gained a required field fails the check, naming tool and field."""
    lock = write_lock(tmp_path / "tools.lock.json", lookup_customer_v1)
    code, _, err = run_cli(
        "check", "--agents", agent_module(lookup_customer_v1_changed), "--lock", str(lock)
    )
    assert code == 1
    assert "tool 'lookup_customer' v1: input field 'region': newly required" in err
    assert "bump the version" in err


def test_version_bump_passes(tmp_path: Path, agent_module) -> None:
    """The same change as v2, with v1 still served, passes and reports v2 as new."""
    lock = write_lock(tmp_path / "tools.lock.json", lookup_customer_v1)
    module = agent_module(lookup_customer_v2, lookup_customer_v1)
    code, out, err = run_cli("check", "--agents", module, "--lock", str(lock))
    assert code == 0, err
    assert "new: tool 'lookup_customer' v2" in out


def test_lock_keeps_served_versions_and_drops_unserved(tmp_path: Path, agent_module) -> None:
    """The lock records every served version; one no longer served is reported, then dropped."""
    lock = tmp_path / "tools.lock.json"
    assert (
        run_cli(
            "lock",
            "--agents",
            agent_module(lookup_customer_v1, lookup_customer_v2),
            "--lock",
            str(lock),
        )[0]
        == 0
    )
    assert sorted(load_lock(lock)["lookup_customer"]) == [1, 2]
    only_v2 = agent_module(lookup_customer_v2)
    code, out, _ = run_cli("check", "--agents", only_v2, "--lock", str(lock))
    assert code == 0 and "unserved: tool 'lookup_customer' v1" in out
    assert run_cli("lock", "--agents", only_v2, "--lock", str(lock))[0] == 0
    assert sorted(load_lock(lock)["lookup_customer"]) == [2]


def test_lock_refuses_breaking_change_without_force(tmp_path: Path, agent_module) -> None:
    """`spine tools lock` does not silently re-pin a breaking change; --force does."""
    lock = write_lock(tmp_path / "tools.lock.json", lookup_customer_v1)
    module = agent_module(lookup_customer_v1_changed)
    code, _, err = run_cli("lock", "--agents", module, "--lock", str(lock))
    assert code == 1 and "not written" in err
    assert run_cli("lock", "--agents", module, "--lock", str(lock), "--force")[0] == 0
    assert run_cli("check", "--agents", module, "--lock", str(lock))[0] == 0


def test_check_json_output(tmp_path: Path, agent_module) -> None:
    """`--json` prints the changes machine-readably and still fails on a breaking one."""
    lock = write_lock(tmp_path / "tools.lock.json", lookup_customer_v1)
    code, out, _ = run_cli(
        "check", "--json", "--agents", agent_module(lookup_customer_v1_changed), "--lock", str(lock)
    )
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert {
        "tool": "lookup_customer",
        "version": 1,
        "kind": "breaking",
        "where": "input field 'region'",
        "message": "newly required",
    } in report["changes"]


def test_check_reports_definition_errors_in_one_line(agent_module) -> None:
    """A wrong tool definition makes `spine tools check` fail with one line naming the tool."""
    broken = dataclasses.replace(lookup_customer_v1, compensation="undo_lookup")
    code, _, err = run_cli("check", "--agents", agent_module(broken), "--lock", "missing.json")
    assert code == 1
    assert "tool 'lookup_customer' names compensation 'undo_lookup', which is not registered" in err
    assert len(err.strip().splitlines()) == 1


def test_check_without_lock_file_fails(tmp_path: Path) -> None:
    """Checking against a lock file that does not exist fails and says how to create one."""
    code, _, err = run_cli(
        "check", "--agents", "spine.demo.agent", "--lock", str(tmp_path / "x.json")
    )
    assert code == 1 and "create it with `spine tools lock`" in err


# ----------------------------------------------------------------------- the rules


class Before(BaseModel):
    amount: float = Field(le=100)
    kind: Literal["a", "b", "c"] = "a"
    note: str = Field(default="", max_length=50)
    code: str = ""


def _input_changes(after: type[BaseModel]) -> list[tuple[ChangeKind, str, str]]:
    return compare_schemas(Before.model_json_schema(), after.model_json_schema(), "input")


def test_narrowed_input_types_are_breaking() -> None:
    """number -> integer, a shrunk enum, a tighter maxLength and a new pattern are breaking."""

    class After(BaseModel):
        amount: int = Field(le=100)
        kind: Literal["a", "b"] = "a"
        note: str = Field(default="", max_length=10)
        code: str = Field(default="", pattern="^[A-Z]+$")

    found = {
        (where, message) for kind, where, message in _input_changes(After) if kind == "breaking"
    }
    assert found == {
        ("input field 'amount'", "type number -> integer (no longer accepts number)"),
        ("input field 'kind'", 'no longer accepts values "c"'),
        ("input field 'note'", "maxLength 50 -> 10"),
        ("input field 'code'", 'pattern (none) -> "^[A-Z]+$"'),
    }


def test_additive_input_changes_are_compatible() -> None:
    """A new optional field, a wider type and looser bounds pass."""

    class After(BaseModel):
        amount: float | str = Field(le=1000)
        kind: Literal["a", "b", "c", "d"] = "a"
        note: str = Field(default="", max_length=500)
        code: str = ""
        extra: int | None = None

    changes = _input_changes(After)
    assert all(kind == "compatible" for kind, _, _ in changes), changes
    assert ("compatible", "input field 'extra'", "added") in changes


def test_output_rules_run_the_other_way() -> None:
    """Output: a removed or no-longer-always-returned field breaks; a new field does not."""

    class Old(BaseModel):
        refund_id: str
        amount: float
        currency: str

    class New(BaseModel):
        refund_id: str
        amount: float | None = None
        reversed: bool = False

    changes = compare_schemas(Old.model_json_schema(), New.model_json_schema(), "output")
    assert ("breaking", "output field 'currency'", "removed") in changes
    assert ("breaking", "output field 'amount'", "no longer always returned") in changes
    assert (
        "breaking",
        "output field 'amount'",
        "type number -> null|number (may now return null)",
    ) in changes
    assert ("compatible", "output field 'reversed'", "added") in changes


def test_changed_semantic_flags_are_breaking() -> None:
    """Turning side effects on (or changing compensation or risk) needs a new version."""
    changed = dataclasses.replace(
        lookup_customer_v1, side_effects=True, idempotent_via="header", risk="high"
    )
    lock = load_lock_from(build_lock([lookup_customer_v1]))
    lines = [c.line() for c in check_lock(lock, [changed]) if c.breaking]
    assert (
        "tool 'lookup_customer' v1: side_effects: changed from false to true; "
        "bump the version (@tool(version=2)) or revert"
    ) in lines
    assert any(
        line.startswith('tool \'lookup_customer\' v1: risk: changed from "low" to "high"')
        for line in lines
    )


def load_lock_from(document: dict[str, object]) -> dict[str, dict[int, dict[str, object]]]:
    tools_ = document["tools"]
    assert isinstance(tools_, dict)
    return {name: {int(v): e for v, e in versions.items()} for name, versions in tools_.items()}


# ----------------------------------------------------------------- definition errors


def test_definition_errors_name_the_tool() -> None:
    """Missing types, side effects without idempotent_via and local side effects are refused."""
    with pytest.raises(ToolDefinitionError, match="tool 'untyped' needs a pydantic input model"):

        @tool()
        async def untyped(args, ctx: ToolContext) -> Customer:  # type: ignore[no-untyped-def]  # on purpose
            """No input type."""
            raise NotImplementedError

    with pytest.raises(
        ToolDefinitionError, match="tool 'charge' has side effects but no idempotency key path"
    ):

        @tool(side_effects=True)
        async def charge(args: CustomerQuery, ctx: ToolContext) -> Customer:
            """Charge a customer."""
            raise NotImplementedError

    with pytest.raises(
        ToolDefinitionError, match="tool 'charge' is local=True but has side effects"
    ):

        @tool(side_effects=True, idempotent_via="header", local=True, timeout_s=5)
        async def charge(args: CustomerQuery, ctx: ToolContext) -> Customer:  # noqa: F811  # same name on purpose
            """Charge a customer."""
            raise NotImplementedError

    with pytest.raises(ToolDefinitionError, match="risk must be one of low, medium, high"):
        tool(risk="extreme")(lookup_customer_v1.fn)  # type: ignore[arg-type]  # a wrong literal on purpose


def test_registry_check_collects_every_problem_at_worker_start() -> None:
    """`Registry.check()` names each tool with a dangling reference or a bad definition."""
    registry = Registry()
    registry.add_tool(dataclasses.replace(lookup_customer_v1, fallback="lookup_customer_cached"))
    registry.add_tool(
        dataclasses.replace(
            lookup_customer_v2,
            name="local_writer",
            side_effects=True,
            idempotent_via="key",
            local=True,
        )
    )
    registry.add_agent(
        AgentDefinition(
            name="crm-agent", instructions="x", tools=("lookup_customer", "missing_tool")
        )
    )
    with pytest.raises(ToolDefinitionError) as raised:
        registry.check()
    message = str(raised.value)
    assert (
        "tool 'lookup_customer' names fallback 'lookup_customer_cached', which is not registered"
        in message
    )
    assert "tool 'local_writer' is local=True but has side effects" in message
    assert "agent 'crm-agent' lists tool 'missing_tool', which is not registered" in message


def test_local_read_only_tool_is_described_as_local() -> None:
    """A fast read-only tool may be local; its descriptor carries local, risk and rate group."""

    @tool(local=True, timeout_s=5, rate_limit_group="crm-api", risk="low")
    async def peek_customer(args: CustomerQuery, ctx: ToolContext) -> Customer:
        """Peek at a customer."""
        return Customer(customer_id=args.customer_id, name="Ada")

    descriptor = peek_customer.descriptor()
    assert (descriptor.local, descriptor.risk, descriptor.rate_limit_group) == (
        True,
        "low",
        "crm-api",
    )
    assert descriptor.description == "Peek at a customer."
    assert json.dumps(descriptor.input_schema).count('"description": "Customer id"') == 1
