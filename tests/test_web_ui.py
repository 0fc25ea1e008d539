"""The Temporal Web UI tells a demo run's story, checked in a real browser (headless Chromium).

The test starts its own dev server with the UI on a free port, runs the demo conversation (with
its approval), opens the run's page at the link `spine` prints, and reads the page the way a
person would: the event history in compact, oldest-first order shows each model turn
(``llm: scripted step N``) and each tool call (``issue_refund(o-1481)``), and the User Metadata
tab shows the run's summary. The screenshot goes to ``tests/artifacts/web-ui-run.png``
(git-ignored) and, when missing or with ``SPINE_UPDATE_SCREENSHOTS=1``, to ``docs/web-ui.png``
for the README (not on every run: that would dirty the checkout).

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``SPINE_CHROMIUM`` names another
binary) and the ``playwright`` package (dev extra); never ``playwright install``. Skipped, saying
why, when Chromium is not installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from spine.client.demo import build_demo_request
from spine.client.runs import decide, start_run, wait_result, web_ui_url
from spine.client.testing import DemoService, VaultDev, free_port, temporal_dev_server
from spine.contract import ApprovalDecision
from spine.guardrails.secrets import VaultSecrets
from tests.helpers import require_module, signed_client, unavailable, wait_for_status

playwright_api = require_module(
    "playwright.async_api", "playwright is not installed: pip install -e '.[dev]'"
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "tests" / "artifacts" / "web-ui-run.png"
README_SHOT = ROOT / "docs" / "web-ui.png"
ORDER = "o-1481"
#: A fresh, quiet, offline browser: no sandbox (containers), no GPU, no background traffic.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Generous: the UI renders client-side, and CI machines are small and busy.
UI_TIMEOUT_MS = 60_000


def _chromium() -> str:
    for candidate in (os.environ.get("SPINE_CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    unavailable("chromium not found: apt-get install -y chromium (or set SPINE_CHROMIUM)")


@pytest.fixture(scope="module")
async def ui_env() -> AsyncIterator[tuple[WorkflowEnvironment, int, str]]:
    """Chromium's path and a dev server of this module's own, with its Web UI on a free port."""
    chromium = _chromium()
    port = free_port()
    async with temporal_dev_server(ui_port=port) as env:
        yield env, port, chromium


async def test_demo_run_reads_like_a_story_in_the_web_ui(
    ui_env, stack: tuple[VaultDev, DemoService], monkeypatch
):
    """The run's page lists model turns and tool calls by summary, and the run's summary."""
    env, ui_port, chromium = ui_env
    vault, service = stack
    from spine.plugin import SpineConfig, build_worker  # lazily: it imports every activity

    with tempfile.TemporaryDirectory(prefix="spine-ui-") as tmp:
        config = SpineConfig(
            task_queue="web-ui",
            state_dir=Path(tmp) / "state",
            settings={"SPINE_DEMO_URL": service.url},
            secrets=VaultSecrets(vault.url, token=vault.token),
            providers={},
        )
        request = build_demo_request(ORDER)
        client = signed_client(env.client, vault)
        async with build_worker(client, config=config):
            handle = await start_run(client, request, task_queue=config.task_queue)
            state = await wait_for_status(handle, "awaiting_approval")
            approval = state.pending_approvals[0].approval_id
            await decide(
                handle,
                ApprovalDecision(
                    approval_id=approval, decision="approve", by="bob", role="supervisor"
                ),
            )
            result = await wait_result(handle)
        assert result.status == "completed", result.reason

        monkeypatch.setenv("SPINE_UI_URL", f"http://127.0.0.1:{ui_port}")
        url = web_ui_url(handle.id, handle.result_run_id)  # the link `spine run` prints
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch_persistent_context(
                str(Path(tmp) / "chromium-profile"),
                executable_path=chromium,
                args=CHROMIUM_FLAGS,
                headless=True,
                viewport={"width": 1500, "height": 1700},
            )
            try:
                page = browser.pages[0] if browser.pages else await browser.new_page()
                page.set_default_timeout(UI_TIMEOUT_MS)
                await page.goto(f"{url}?sort=ascending")
                await page.get_by_role("button", name="Compact").click()
                expect = playwright_api.expect
                story = [
                    f"resolve agent {request.agent}",
                    "llm: scripted step 1",
                    f"lookup_order({ORDER})",
                    "llm: scripted step 2",
                    f"issue_refund({ORDER})",
                    "llm: scripted step 3",
                    f"send_email({ORDER})",
                    "llm: scripted step 4",
                    f"update_ticket({ORDER})",
                    "llm: scripted step 5",
                ]
                for line in story:
                    line_shown = page.get_by_text(line, exact=True).first
                    await expect(line_shown).to_be_visible(timeout=UI_TIMEOUT_MS)
                shown = await page.locator("main").inner_text()
                where = [shown.find(line) for line in story]
                assert where == sorted(where), f"out of order on the page: {story}, at {where}"
                ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(ARTIFACT))
                await page.get_by_role("tab", name="User Metadata").click()
                # The UI renders summaries (markdown) in a sandboxed iframe; the first is Summary.
                summary = page.frame_locator("iframe").first.get_by_text(
                    f"{request.agent}: {request.goal}"
                )
                await expect(summary).to_be_visible(timeout=UI_TIMEOUT_MS)
            finally:
                await browser.close()
    if not README_SHOT.exists() or os.environ.get("SPINE_UPDATE_SCREENSHOTS") == "1":
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACT, README_SHOT)


async def test_a_sub_agent_shows_as_a_child_of_its_run_in_the_web_ui(
    ui_env, stack: tuple[VaultDev, DemoService], monkeypatch
):
    """The parent's page names its child run; the child's page names its parent."""
    from spine.client.testing import child_runs, script, start_scripted_run
    from spine.plugin import SpineConfig, build_worker

    env, ui_port, chromium = ui_env
    vault, service = stack
    # Runs are started by a verified principal: this client signs as the request's user.
    from temporalio.client import Client

    from spine.client.identity import SigningInterceptor

    client = Client(
        env.client.service_client,
        namespace=env.client.namespace,
        data_converter=env.client.data_converter,
        interceptors=[SigningInterceptor(vault.signer(vault.tokens))],
    )
    order = "o-1482"
    child_script = (
        script()
        .tool("file_inspection", order_id=order, finding="dented", claim_amount=10.0)
        .text("Dented; claimed 10.00.")
    )
    with tempfile.TemporaryDirectory(prefix="spine-ui-") as tmp:
        config = SpineConfig(
            task_queue="web-ui-sub-agent",
            state_dir=Path(tmp) / "state",
            settings={"SPINE_DEMO_URL": service.url},
            secrets=VaultSecrets(vault.url, token=vault.token),
            providers={},
        )
        async with build_worker(client, config=config):
            handle = await start_scripted_run(
                client,
                config.task_queue,
                "refund-agent",
                "inspect",
                script().tool("inspect_damage", task=f"Inspect {order}.").text("done"),
                role="support",
                sub_agents={"inspection-agent": child_script},
            )
            assert (await wait_result(handle)).status == "completed"
        [child] = await child_runs(handle)
        monkeypatch.setenv("SPINE_UI_URL", f"http://127.0.0.1:{ui_port}")
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch_persistent_context(
                str(Path(tmp) / "chromium-profile"),
                executable_path=chromium,
                args=CHROMIUM_FLAGS,
                headless=True,
                viewport={"width": 1500, "height": 1700},
            )
            try:
                page = browser.pages[0] if browser.pages else await browser.new_page()
                page.set_default_timeout(UI_TIMEOUT_MS)
                expect = playwright_api.expect
                await page.goto(web_ui_url(handle.id, handle.result_run_id))
                await expect(page.get_by_text(child.id).first).to_be_visible(timeout=UI_TIMEOUT_MS)
                await page.goto(web_ui_url(child.id))
                parent_link = page.get_by_role("link", name=handle.id).first
                await expect(parent_link).to_be_visible(timeout=UI_TIMEOUT_MS)
            finally:
                await browser.close()
