"""The console (`spine console`), driven in a real browser (Debian's headless Chromium).

Each test starts the console on a free port over the session's Temporal dev server and OpenBao,
with a worker of its own, and acts as a person would: signs in with an OpenBao login, reads the
inbox or the parked runs, approves, rejects or operates, and watches the run's page. Lists are
filtered to the test's own fresh account (other tests leave runs behind on the shared server).

Hostile cases: a viewer sees no working approve button and a forged POST naming another
approver is refused by the worker and the refusal shown; POSTs without the session's CSRF token,
from another origin, or without a session are refused before anything is sent; tool arguments,
goals and reasons carrying markup are rendered as text; no page carries the test's secrets (the
demo API key in OpenBao, the people's OpenBao tokens).

Screenshots of each page go to ``tests/artifacts/console-*.png`` (git-ignored) and, when missing
or with ``SPINE_UPDATE_SCREENSHOTS=1``, to ``docs/screenshots/`` for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from spine.client.console import ConsoleSettings, run_url, serving
from spine.client.runs import get_state, start_run, wait_result
from spine.client.testing import free_port
from spine.contract import AgentRequest
from spine.guardrails.policy import load_policy
from spine.guardrails.secrets import VaultSecrets
from tests.helpers import call, require_module, scripted_request, turn, unavailable, wait_for_status

playwright_api = require_module(
    "playwright.async_api", "playwright is not installed: pip install -e '.[dev]'"
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
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
#: Generous: the machine is small and shared.
TIMEOUT_S = 90
XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def _chromium() -> str:
    for candidate in (os.environ.get("SPINE_CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    unavailable("chromium not found: apt-get install -y chromium (or set SPINE_CHROMIUM)")


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture
async def console(temporal_env, vault, worker_config, test_policy) -> AsyncIterator[str]:
    """The console on a free port, reading what this test's worker writes."""
    settings = ConsoleSettings(
        client=temporal_env.client,  # reads only; decisions are signed per person
        vault_url=vault.url,
        env={"SPINE_STATE_DIR": str(worker_config.state_dir), "SPINE_UI_URL": "http://ui.test"},
        policy=load_policy(test_policy),
    )
    async with serving(settings, port=free_port()) as url:
        yield url


@pytest.fixture
async def browser(chromium, tmp_path):
    async with playwright_api.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1100, "height": 1400},
        )
        context.set_default_timeout(TIMEOUT_S * 1000)
        dialogs: list[str] = []
        context.on("page", lambda p: p.on("dialog", lambda d: dialogs.append(d.message)))
        try:
            yield context, dialogs
        finally:
            await context.close()


async def _page(context):
    page = context.pages[0] if context.pages else await context.new_page()
    return page


async def sign_in(page, console: str, name: str, next_path: str = "/inbox") -> None:
    await page.goto(f"{console}/login?next={urllib.parse.quote(next_path, safe='')}")
    await page.get_by_label("Name").fill(name)
    await page.get_by_label("Password").fill(f"pw-{name}")
    await page.get_by_role("button", name="Sign in").click()
    await playwright_api.expect(page.get_by_text(f"Signed in as {name}")).to_be_visible()


async def reload_until(page, url: str, check, what: str, timeout: float = TIMEOUT_S) -> str:
    """Load `url` until ``check(html)`` holds (visibility and workers lag); returns the HTML."""
    deadline = time.monotonic() + timeout
    html = ""
    while time.monotonic() < deadline:
        await page.goto(url)
        html = await page.content()
        if check(html):
            return html
        await page.wait_for_timeout(500)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last page:\n{html}")


def shoot(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"console-{name}.png"


def keep_screenshot(name: str) -> None:
    """Copy the artifact to docs/screenshots when missing or asked for (not on every run)."""
    target = SCREENSHOTS / f"{name}.png"
    if not target.exists() or os.environ.get("SPINE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shoot(name), target)


def assert_no_secrets(html: str, vault, service) -> None:
    """Nothing on a page is a secret the test knows: the API key, anyone's OpenBao token."""
    for label, value in [
        ("demo API key", service.api_key),
        ("OpenBao root token", vault.token),
        *((f"{name}'s OpenBao token", token) for name, token in vault.tokens.items()),
    ]:
        assert value not in html, f"the {label} is on the page"


def _request(account: str, script, *, goal: str = "refund the order", user: str = "alice"):
    request: AgentRequest = scripted_request(script, goal=goal, user=user)
    request.account = account
    return request


# ---------------------------------------------------------------------------- the inbox


async def test_approve_from_the_inbox_and_watch_the_run_complete(
    client, make_worker, task_queue, new_account, console, browser, vault, service
):
    """bob signs in, reads the approval (who asked, the call, why, the rule, the deadline, what
    the run did already), approves it with a reason, and watches the run complete."""
    context, dialogs = browser
    account = new_account("console")
    script = [
        turn(call("lookup_order", order_id="o-1461")),
        turn(call("issue_refund", order_id="o-1461", amount=150.0, reason=XSS), confidence=0.93),
        turn(text="Refunded 150."),
    ]
    async with make_worker():
        handle = await start_run(client, _request(account, script), task_queue=task_queue)
        await wait_for_status(handle, "awaiting_approval", timeout=TIMEOUT_S)
        page = await _page(context)
        inbox = f"/inbox?account={account}"
        await sign_in(page, console, "bob", inbox)
        html = await reload_until(
            page, console + inbox, lambda h: "issue_refund(" in h, "the approval in the inbox"
        )
        card = page.locator("article", has_text=handle.id)
        text = await card.inner_text()
        for expected in (
            "refund-agent",
            "alice (support)",
            account,
            '"amount": 150.0',
            "amount 150.00 is above 100.00",
            "issue_refund: amount above 100.00 -> supervisor",
            "0.93",
            "escalates to director",
            'lookup_order(order_id="o-1461")',
            XSS,  # the argument, shown as text
        ):
            assert expected in text, f"{expected!r} not in the inbox card:\n{text}"
        assert "<script>alert" not in html and "&lt;script&gt;" in html
        await page.screenshot(path=str(shoot("inbox")), full_page=True)
        assert_no_secrets(html, vault, service)
        # On a phone: nothing wider than the screen. By keyboard: the skip link comes first.
        await page.set_viewport_size({"width": 390, "height": 844})
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 391, f"the inbox is {width}px wide on a 390px phone"
        await page.screenshot(path=str(shoot("inbox-phone")), full_page=True)
        await page.set_viewport_size({"width": 1100, "height": 1400})
        await page.keyboard.press("Tab")
        focused = await page.evaluate("document.activeElement.textContent")
        assert focused == "Skip to content"

        await card.get_by_label("Reason (for the audit log)").fill("customer verified by phone")
        await card.get_by_role("button", name="Approve").click()
        await playwright_api.expect(page.get_by_role("status").first).to_contain_text(
            "approved ap-"
        )
        assert urllib.parse.unquote(page.url).endswith(f"/runs/{handle.id}")
        result = await wait_result(handle)
        assert result.status == "completed", result.reason
        run_html = await reload_until(
            page,
            console + run_url(handle.id),
            lambda h: 'id="run-status">completed<' in h and "verified:" in h,
            "the run's page to show it completed, with its audit chain verified",
        )
    decisions = await page.locator(
        "section", has_text="Approvals and operator actions"
    ).inner_text()
    assert re.search(r"approve ap-\S+\s+accepted", decisions), decisions
    assert "bob (supervisor)" in decisions and "customer verified by phone" in decisions
    timeline = await page.locator("section", has_text="Timeline").first.inner_text()
    assert "issue_refund" in timeline and '"refund_id"' in timeline
    assert "matches the head the run anchored" in run_html
    await page.screenshot(path=str(shoot("run")), full_page=True)
    assert_no_secrets(run_html, vault, service)
    refunds = service.get("/v1/refunds?order_id=o-1461")
    assert [r["amount"] for r in refunds] == [150.0]
    assert dialogs == [], "a script ran on a console page"

    # Links: the Temporal Web UI page of the run, and its trace.
    web_ui = await page.get_by_role("link", name="Temporal Web UI").get_attribute("href")
    assert web_ui.startswith("http://ui.test/namespaces/default/workflows/")
    await page.get_by_role("link", name="Trace").click()
    await playwright_api.expect(page.get_by_role("heading", level=1)).to_contain_text("Trace of")
    trace_html = await page.content()
    assert "invoke_agent" in trace_html or "no spans" in trace_html or "no trace file" in trace_html
    keep_screenshot("inbox")
    keep_screenshot("inbox-phone")
    keep_screenshot("run")


async def test_reject_from_the_inbox_shows_the_compensation(
    client, make_worker, task_queue, new_account, console, browser, vault, service
):
    """A rejection ends the run; the refund made before it is undone, and the run's page shows
    the undo in its timeline and the side effect as compensated."""
    context, _ = browser
    account = new_account("console")
    script = [
        turn(call("issue_refund", order_id="o-1462", amount=40.0)),
        turn(call("issue_refund", order_id="o-1462", amount=150.0)),
        turn(text="Refunded."),
    ]
    async with make_worker():
        handle = await start_run(client, _request(account, script), task_queue=task_queue)
        await wait_for_status(handle, "awaiting_approval", timeout=TIMEOUT_S)
        page = await _page(context)
        inbox = f"/inbox?account={account}"
        await sign_in(page, console, "bob", inbox)
        await reload_until(
            page, console + inbox, lambda h: handle.id in h, "the approval in the inbox"
        )
        card = page.locator("article", has_text=handle.id)
        assert "step 1: issue_refund" in await card.inner_text()  # what the run did already
        await card.get_by_label("Reason (for the audit log)").fill("second refund not justified")
        await card.get_by_role("button", name="Reject").click()
        await playwright_api.expect(page.get_by_role("status").first).to_contain_text(
            "rejected ap-"
        )
        result = await wait_result(handle)
        assert result.status == "rejected", result.reason
        html = await reload_until(
            page,
            console + run_url(handle.id),
            lambda h: 'id="run-status">rejected<' in h,
            "the run's page to show the rejection",
        )
    effects = await page.locator("section", has_text="Side effects").inner_text()
    assert "issue_refund" in effects and "compensated" in effects
    timeline = await page.locator("section", has_text="Timeline").first.inner_text()
    assert "undo: reverse_refund" in timeline
    assert "second refund not justified" in html
    assert_no_secrets(html, vault, service)
    [refund] = service.get("/v1/refunds?order_id=o-1462")
    assert refund["reversed"] is True


# ---------------------------------------------------------------------------- parked runs


async def test_operate_a_parked_run_from_the_console(
    client, make_worker, task_queue, new_account, console, browser, vault, service
):
    """A run parks on a secret that vanished; ops sees why and its side effect, a viewer gets
    no working buttons, and ops' retry (once the secret is back) lets the run complete."""
    context, _ = browser
    account = new_account("console")
    script = [
        turn(call("issue_refund", order_id="o-1463", amount=40.0)),
        turn(call("issue_refund", order_id="o-1463", amount=150.0)),
        turn(text="Refunded."),
    ]
    # No secret cache: the refund after the approval reads the (deleted) secret again.
    uncached = VaultSecrets(vault.url, token=vault.token, cache_ttl_s=0)
    async with make_worker(secrets=uncached):
        handle = await start_run(client, _request(account, script), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval", timeout=TIMEOUT_S)
        vault.client().secrets.kv.v2.delete_metadata_and_all_versions(
            path=f"spine/{account}", mount_point="secret"
        )
        from tests.helpers import approve_first_pending

        await approve_first_pending(handle, state)
        await wait_for_status(handle, "parked", timeout=TIMEOUT_S)

        page = await _page(context)
        listed = f"/parked?account={account}"
        await sign_in(page, console, "ops", listed)
        html = await reload_until(
            page, console + listed, lambda h: handle.id in h, "the parked run in the list"
        )
        card = page.locator("article", has_text=handle.id)
        text = await card.inner_text()
        assert "SecretMissing" in text, text
        assert 'issue_refund(order_id="o-1463", amount=40.0)' in text  # its side effect
        await page.screenshot(path=str(shoot("parked")), full_page=True)
        assert_no_secrets(html, vault, service)

        # A model turn cannot be skipped, a tool call can; here the refused choice is shown.
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        await card.get_by_label("Reason (for the audit log)").fill("secret restored")
        await card.get_by_role("button", name="Retry").click()
        await playwright_api.expect(page.get_by_role("status").first).to_contain_text(
            "retry accepted from ops (operator)"
        )
        result = await wait_result(handle)
        assert result.status == "completed", result.reason
        html = await reload_until(
            page,
            console + run_url(handle.id),
            lambda h: 'id="run-status">completed<' in h,
            "the run's page to show it completed",
        )
    assert "operator ops (operator) chose retry: secret restored" in html
    assert [r["amount"] for r in service.get("/v1/refunds?order_id=o-1463")] == [40.0, 150.0]
    keep_screenshot("parked")


# ---------------------------------------------------------------------------- hostile cases


async def _csrf(page) -> str:
    return await page.locator("form[action='/logout'] input[name=csrf]").get_attribute("value")


async def test_a_viewer_cannot_approve_even_with_a_forged_form(
    client, make_worker, task_queue, new_account, console, browser, vault, service
):
    """vera (viewer) sees the approval but no approve button; a POST she forges, naming bob and
    the supervisor role, is signed as her and refused by the run, and she is shown why."""
    context, _ = browser
    account = new_account("console")
    script = [turn(call("issue_refund", order_id="o-1464", amount=150.0)), turn(text="done")]
    async with make_worker():
        handle = await start_run(client, _request(account, script), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval", timeout=TIMEOUT_S)
        approval = state.pending_approvals[0].approval_id
        page = await _page(context)
        inbox = f"/inbox?account={account}"
        await sign_in(page, console, "vera", inbox)
        await reload_until(page, console + inbox, lambda h: handle.id in h, "the approval")
        card = page.locator("article", has_text=handle.id)
        assert await card.get_by_role("button", name="Approve").count() == 0
        assert "hold none of the roles that may decide this" in await card.inner_text()

        forged = {
            "csrf": await _csrf(page),
            "workflow_id": handle.id,
            "approval_id": approval,
            "decision": "approve",
            "role": "supervisor",
            "by": "bob",  # ignored: decisions are by the signed-in person
            "reason": "forged",
        }
        # The POST is answered with a redirect to the run's page, which shows the refusal.
        response = await page.request.post(f"{console}/decide", form=forged)
        refusal = await response.text()
        assert "principal &#39;vera&#39; does not hold role &#39;supervisor&#39;" in refusal, (
            refusal
        )
        forged["role"] = "viewer"
        response = await page.request.post(f"{console}/decide", form=forged)
        refusal = await response.text()
        assert "role &#39;viewer&#39; may not decide approval" in refusal, refusal
        after = await get_state(handle)
        assert after.status == "awaiting_approval"
        assert [p.approval_id for p in after.pending_approvals] == [approval]

        # bob decides it for real; a second decision on it is refused as already decided.
        page2 = await context.new_page()
        await page2.context.clear_cookies()
        await sign_in(page2, console, "bob", inbox)
        card = page2.locator("article", has_text=handle.id)
        await card.get_by_role("button", name="Reject").click()
        await playwright_api.expect(page2.get_by_role("status").first).to_contain_text(
            "rejected ap-"
        )
        forged.update(csrf=await _csrf(page2), role="supervisor", decision="approve")
        response = await page2.request.post(f"{console}/decide", form=forged)
        text = await response.text()
        assert "already decided" in text or "already finished" in text, text
        result = await wait_result(handle)
    assert result.status == "rejected"
    assert service.get("/v1/refunds?order_id=o-1464") == []


async def test_self_approval_is_refused_and_shown(
    client, make_worker, task_queue, new_account, temporal_env, browser, vault, service, tmp_path
):
    """carol holds support and supervisor: she starts a run, sees no buttons on its approval,
    and a decision she forges anyway is refused by the run as self-approval, and shown."""
    from tests.helpers import custom_policy

    context, _ = browser
    account = new_account("console")

    def both(data: dict) -> None:
        data["principals"]["carol"] = {"roles": ["support", "supervisor"], "accounts": ["*"]}

    policy_path = custom_policy(tmp_path, both)
    settings = ConsoleSettings(
        client=temporal_env.client, vault_url=vault.url, env={}, policy=load_policy(policy_path)
    )
    script = [turn(call("issue_refund", order_id="o-1467", amount=150.0)), turn(text="done")]
    async with make_worker(policy_path=policy_path), serving(settings, port=free_port()) as url:
        request = _request(account, script, user="carol")
        handle = await start_run(client, request, task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval", timeout=TIMEOUT_S)
        page = await _page(context)
        inbox = f"/inbox?account={account}"
        await sign_in(page, url, "carol", inbox)
        await reload_until(page, url + inbox, lambda h: handle.id in h, "the approval")
        card = page.locator("article", has_text=handle.id)
        assert await card.get_by_role("button", name="Approve").count() == 0
        assert "You requested this run" in await card.inner_text()
        response = await page.request.post(
            f"{url}/decide",
            form={
                "csrf": await _csrf(page),
                "workflow_id": handle.id,
                "approval_id": state.pending_approvals[0].approval_id,
                "decision": "approve",
                "role": "supervisor",
            },
        )
        refusal = await response.text()
        assert "requested this run and cannot approve its own request" in refusal, refusal
        assert (await get_state(handle)).status == "awaiting_approval"
        await handle.terminate("test over")
    assert service.get("/v1/refunds?order_id=o-1467") == []


async def test_posts_without_the_session_token_are_refused(
    client, make_worker, task_queue, new_account, console, vault
):
    """Without the session's CSRF token, from another origin, or without a session, a POST is
    refused before anything reaches the run; pages need a session; the cookie is HttpOnly and
    SameSite=Strict and holds no token; every page carries a script-free CSP."""
    account = new_account("console")
    script = [turn(call("issue_refund", order_id="o-1465", amount=150.0)), turn(text="done")]
    async with make_worker():
        handle = await start_run(client, _request(account, script), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval", timeout=TIMEOUT_S)
        approval = state.pending_approvals[0].approval_id
        async with httpx.AsyncClient(base_url=console, timeout=30) as http:
            assert (await http.get("/inbox")).status_code == 303  # to the sign-in page
            login = await http.get("/login")
            assert "script-src" not in login.headers["content-security-policy"]
            assert "default-src 'none'" in login.headers["content-security-policy"]
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
            # A sign-in without the form's token is refused too (login CSRF).
            bad = await http.post("/login", data={"name": "bob", "password": "pw-bob"})
            assert bad.status_code == 403
            csrf = re.search(r'name="csrf" value="([^"]+)"', bad.text).group(1)
            wrong = await http.post(
                "/login", data={"csrf": csrf, "name": "bob", "password": "not-bobs"}
            )
            assert wrong.status_code == 401 and "OpenBao refused the login" in wrong.text
            # Where to go after signing in is a local path only (no open redirect).
            signed = await http.post(
                "/login",
                data={"csrf": csrf, "name": "bob", "password": "pw-bob", "next": "//evil.test/x"},
            )
            assert signed.status_code == 303 and signed.headers["location"] == "/inbox"
            cookie = signed.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
            assert vault.tokens["bob"] not in cookie
            page = await http.get(f"/inbox?account={account}")
            assert page.status_code == 200
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            decision = {
                "workflow_id": handle.id,
                "approval_id": approval,
                "decision": "approve",
                "role": "supervisor",
            }
            for form, headers, status in [
                (decision, {}, 403),  # no token
                ({**decision, "csrf": "x" * len(token)}, {}, 403),  # a wrong token
                ({**decision, "csrf": token}, {"origin": "http://evil.test"}, 403),
            ]:
                refused = await http.post("/decide", data=form, headers=headers)
                assert refused.status_code == status, refused.text
                assert "nothing was sent" in refused.text or "another site" in refused.text
            async with httpx.AsyncClient(base_url=console, timeout=30) as stranger:
                refused = await stranger.post("/decide", data={**decision, "csrf": token})
                assert refused.status_code == 403
            huge = await http.post(
                "/decide", data={**decision, "csrf": token, "reason": "x" * 20000}
            )
            assert huge.status_code == 413
            bad_id = await http.get("/runs/" + urllib.parse.quote("bad\x01id", safe=""))
            assert bad_id.status_code == 400
            assert (await get_state(handle)).status == "awaiting_approval"
            # With the token, the same decision goes through.
            accepted = await http.post("/decide", data={**decision, "csrf": token})
            assert accepted.status_code == 303
        result = await wait_result(handle)
    assert result.status == "completed", result.reason


async def test_a_hostile_workflow_id_and_goal_render_as_text(
    client, make_worker, task_queue, new_account, console, vault, service
):
    """A run whose id and goal carry quotes, slashes and markup: its page is found, shows them
    as text, and does not put the id into a visibility query."""
    account = new_account("console")
    script = [turn(call("lookup_order", order_id="o-1468")), turn(text="<i>done</i>")]
    hostile_id = "it's/<b>bold</b>\\" + account
    async with make_worker():
        request = _request(account, script, goal=XSS)
        handle = await start_run(client, request, workflow_id=hostile_id, task_queue=task_queue)
        result = await wait_result(handle)
        assert result.status == "completed", result.reason
    async with httpx.AsyncClient(base_url=console, timeout=60) as http:
        login = await http.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
        await http.post("/login", data={"csrf": csrf, "name": "bob", "password": "pw-bob"})
        page = await http.get(run_url(hostile_id))
    assert page.status_code == 200, page.text
    html = page.text
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<script>alert" not in html and "<i>done</i>" not in html
    assert "not cross-checked with Temporal: the workflow id has quotes" in html
    assert_no_secrets(html, vault, service)


async def test_budgets_page_shows_today_against_the_limit(
    client, make_worker, task_queue, new_account, temporal_env, browser, vault, service, tmp_path
):
    """An account's spend today (committed, reserved) against the policy's daily limit."""
    from tests.helpers import custom_policy

    context, _ = browser
    account = new_account("console")

    def limited(data: dict) -> None:
        data["accounts"][account] = {"daily_usd": 2.0, "monthly_usd": 20.0}

    policy_path = custom_policy(tmp_path, limited)
    script = [turn(call("lookup_order", order_id="o-1466")), turn(text="ok")]
    settings = ConsoleSettings(
        client=temporal_env.client, vault_url=vault.url, env={}, policy=load_policy(policy_path)
    )
    async with make_worker(policy_path=policy_path), serving(settings, port=free_port()) as url:
        handle = await start_run(client, _request(account, script), task_queue=task_queue)
        result = await wait_result(handle)
        assert result.status == "completed", result.reason
        page = await _page(context)
        listed = f"/budgets?account={account}"
        await sign_in(page, url, "bob", listed)
        html = await reload_until(
            page,
            url + listed,
            lambda h: account in h and "no ledger yet" not in h,
            "the account's ledger on the budgets page",
        )
        row = page.locator("tr", has_text=account)
        cells = await row.locator("td").all_inner_texts()
        committed = float(cells[0].lstrip("$").replace(",", ""))
        assert committed > 0, cells
        assert cells[2] == "$2.0000", cells
        assert await row.locator("meter").count() == 1
        await page.screenshot(path=str(shoot("budgets")), full_page=True)
        assert_no_secrets(html, vault, service)
        await page.goto(f"{url}/budgets?account=Not+An+Account")
        await playwright_api.expect(page.get_by_role("alert")).to_contain_text("filter refused")
    keep_screenshot("budgets")


# ---------------------------------------------------------------------------- the command


async def test_the_spine_console_command_serves_and_says_what_is_missing(
    temporal_env, vault, tmp_path
):
    """`spine console` listens where SPINE_CONSOLE_PORT says; a port in use and a missing
    OpenBao address are one `spine: error:` line each."""
    import asyncio
    import subprocess

    from tests.helpers import SPINE, eventually

    port = free_port()
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "VAULT_ADDR": vault.url,
        "SPINE_CONSOLE_PORT": str(port),
        "SPINE_STATE_DIR": str(tmp_path),
    }
    server = await asyncio.create_subprocess_exec(
        SPINE, "console", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def healthy() -> bool:
                assert server.returncode is None, f"spine console exited {server.returncode}"
                return (await http.get("/healthz")).text == "ok"

            await eventually(healthy, timeout=TIMEOUT_S, what="spine console to answer")
            login = await http.get("/login")
            assert login.status_code == 200 and 'name="password"' in login.text

        def spine(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [SPINE, "console", *args],
                env={**env, **more},
                capture_output=True,
                text=True,
                timeout=120,
            )

        busy = await asyncio.to_thread(spine)
        assert busy.returncode == 1
        assert busy.stderr.strip().startswith(f"spine: error: cannot listen on 127.0.0.1:{port}")
        assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
        missing = await asyncio.to_thread(spine, "--port", str(free_port()), VAULT_ADDR="")
        assert missing.returncode == 2
        assert "--vault-addr (or VAULT_ADDR) is required" in missing.stderr
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), timeout=30)
