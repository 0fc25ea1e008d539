"""Spine installs into a user's project like any SDK: one `spine` namespace, nothing shadowed.

The test does what a user would: a fresh virtual environment, a small project with its own
``workflows.py``, ``activities.py`` and ``guardrails.py`` (the Temporal samples' convention, and
the `guardrails-ai` package's import name), ``pip install`` of this checkout (a real wheel build,
not an editable install), a worker built with :class:`spine.SpinePlugin`, and one scripted run to
completion against the test session's Temporal server. Spine's own dependencies come from this
environment (a ``.pth`` file), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a wheel is built from: the project file, the README it names, the packaged folders.
PACKAGED = (
    "pyproject.toml",
    "README.md",
    "spine",
    "workflows",
    "activities",
    "guardrails",
    "observability",
    "client",
    "demo",
)

USER_WORKFLOWS = '''
"""The user's own workflows module (the Temporal samples' layout)."""
OWNER = "user project"
'''

USER_ACTIVITIES = '''
"""The user's own activities module."""
OWNER = "user project"
'''

USER_GUARDRAILS = '''
"""A module named like the guardrails-ai package, to show Spine does not take the name."""
OWNER = "user project"
'''

USER_AGENT = '''
"""The user's agent: one tool, registered the way Spine's docs say."""
from pydantic import BaseModel

from spine import AgentDefinition, Registry, ToolContext, tool


class Shout(BaseModel):
    text: str


class Shouted(BaseModel):
    text: str


@tool(summary_arg="text")
async def shout(args: Shout, ctx: ToolContext) -> Shouted:
    """Say it louder."""
    return Shouted(text=args.text.upper())


def register(registry: Registry) -> None:
    registry.add_tool(shout)
    registry.add_agent(
        AgentDefinition(name="shouter", instructions="Shout what you are told.", tools=("shout",))
    )
'''

USER_MAIN = '''
"""The user's worker and starter: a Temporal worker with SpinePlugin, one scripted run."""
import asyncio
import json
import uuid
from pathlib import Path

import activities
import guardrails
import workflows
from temporalio.worker import Worker

import spine
from spine import AgentRequest, ModelChoice, ScriptToolCall, ScriptTurn, SpineConfig, SpinePlugin


async def main() -> None:
    here = Path(__file__).parent
    config = SpineConfig(
        task_queue=f"user-{uuid.uuid4().hex[:8]}",
        ledger_task_queue=f"user-ledger-{uuid.uuid4().hex[:8]}",
        agent_modules=("my_agent",),
        policy_path=here / "policy.toml",
        state_dir=here / ".spine",
    )
    client = await spine.connect()
    script = [
        ScriptTurn(tool_calls=[ScriptToolCall(name="shout", args={"text": "hello"})]),
        ScriptTurn(text="Shouted."),
    ]
    request = AgentRequest(
        agent="shouter",
        goal="Shout hello.",
        user="ada",
        role="user",
        account="own",
        model=ModelChoice(provider="scripted", script=script),
    )
    worker = Worker(client, task_queue=config.task_queue, plugins=[SpinePlugin(config)])
    async with worker:
        handle = await spine.start_run(client, request, task_queue=config.task_queue)
        result = await spine.wait_result(handle)
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            async for e in handle.fetch_history_events()
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
    print(json.dumps({
        "own_modules": [m.OWNER for m in (workflows, activities, guardrails)],
        "spine_from": str(Path(spine.__file__).parent.parent),
        "status": result.status,
        "output": result.output,
        "steps": result.steps,
        "scheduled": scheduled,
    }))


asyncio.run(main())
'''


def _policy(tmp: Path) -> Path:
    """The default policy with the user's agent and role added."""
    text = (REPO / "guardrails" / "policy.toml").read_text()
    text += '\n[agents.shouter]\nmax_steps = 5\n[agents.shouter.roles]\nuser = ["shout"]\n'
    text += '\n[principals.ada]\nroles = ["user"]\naccounts = ["own"]\n'
    path = tmp / "policy.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_spine_installs_into_a_user_project_and_runs_an_agent(tmp_path: Path, client, vault):
    """A wheel in a fresh venv: the user's own modules win, and a SpinePlugin worker runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    user_site = Path(
        subprocess.run(
            [python, "-c", "import site; print(site.getsitepackages()[0])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Spine's dependencies from this environment; Spine itself only from the wheel below.
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (user_site / "spine_deps.pth").write_text("\n".join(deps) + "\n")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
    )
    [wheel] = wheels.glob("spine_durable-*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(user_site),
            str(wheel),
        ],
        check=True,
    )
    installed = sorted(p.name for p in user_site.iterdir())
    assert "spine" in installed
    for top_level in ("workflows", "activities", "guardrails", "client", "demo", "examples"):
        assert top_level not in installed, f"{top_level} installed at the top level"

    project = tmp_path / "project"
    project.mkdir()
    for name, text in {
        "workflows.py": USER_WORKFLOWS,
        "activities.py": USER_ACTIVITIES,
        "guardrails.py": USER_GUARDRAILS,
        "my_agent.py": USER_AGENT,
        "main.py": USER_MAIN,
    }.items():
        (project / name).write_text(textwrap.dedent(text))
    _policy(project)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SPINE_", "VAULT_"))},
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "PYTHONPATH": "",
        # The worker reads principals' keys from OpenBao; ada signs her start as `spine login`
        # would have her do.
        "VAULT_ADDR": vault.url,
        "VAULT_TOKEN": vault.token,
        "SPINE_VAULT_TOKEN": vault.seed_principals({"ada": ()})["ada"],
        "SPINE_PRINCIPAL": "ada",
        "SPINE_CREDENTIALS": str(tmp_path / "no-credentials.json"),
    }
    done = subprocess.run(
        [python, "main.py"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["own_modules"] == ["user project"] * 3
    assert Path(report["spine_from"]) == user_site, "spine must come from the installed wheel"
    assert (report["status"], report["output"], report["steps"]) == ("completed", "Shouted.", 2)
    assert "tool.shout" in report["scheduled"]
