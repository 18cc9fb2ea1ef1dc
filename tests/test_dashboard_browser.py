"""The dashboard in a real browser (Debian's Chromium driven by Playwright), against a real
API server and worker process over the test database."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobq.queue import Limits, Queue
from tests.helpers import ROOT, wait_for, worker_process
from tests.servers import free_port, start_api, stop, wait_ready

CHROMIUM = os.environ.get("JOBQ_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"

try:
    from playwright.async_api import Browser, Page, Route, async_playwright, expect
except ImportError:  # pragma: no cover - a dev install has it
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium) or set "
        "JOBQ_CHROMIUM to run the browser tests",
        allow_module_level=True,
    )

# Fast retries and presence updates, so a flaky job's retries take a fraction of a second.
FAST = {
    "JOBQ_RETRY_BASE_SECONDS": "0.05",
    "JOBQ_RETRY_CAP_SECONDS": "0.2",
    "JOBQ_HEARTBEAT_SECONDS": "0.5",
    "JOBQ_POLL_INTERVAL_SECONDS": "0.2",
    "JOBQ_CANCEL_GRACE_SECONDS": "1",
}
TIMEOUT_MS = 15_000
EXAMPLES = "jobq.examples:registry"


@pytest.fixture(scope="module")
async def base_url(dsn: str) -> AsyncIterator[str]:
    """An API server and a worker running the example handlers on the `default` queue."""
    api, base = start_api(dsn, "--app", EXAMPLES)
    worker = worker_process(dsn, EXAMPLES, env=FAST)
    try:
        await wait_ready(base, api)
        yield base
    finally:
        stop(worker)
        stop(api)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    p = await context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield p
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        await p.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        await context.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture
async def api(base_url: str, queue: Queue) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the running API, over an empty jobs table."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
        yield c


async def enqueue(api: httpx.AsyncClient, **job: Any) -> dict[str, Any]:
    response = await api.post("/jobs", json=job)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def job_status(api: httpx.AsyncClient, job_id: str) -> str:
    status: str = (await api.get(f"/jobs/{job_id}")).json()["status"]
    return status


async def test_overview_counts_change_after_jobs_are_enqueued(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    # No worker takes the `parked` queue: the jobs stay queued and are counted there.
    await page.goto(f"{base_url}/ui")
    await expect(page.locator("#live")).to_have_class("live ok")
    for _ in range(3):
        await enqueue(api, kind="echo", queue="parked")
    queued = page.locator('td[data-queue="parked"][data-status="queued"]')
    await expect(queued).to_have_text("3")

    for _ in range(2):
        await enqueue(api, kind="echo", queue="parked")

    await expect(queued).to_have_text("5")
    await expect(page.locator('[data-unhandled="parked/echo"]')).to_contain_text("5 waiting")


async def test_overview_counts_finished_jobs(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    await page.goto(f"{base_url}/ui")
    job = await enqueue(api, kind="echo", payload={"hello": "world"})

    await expect(page.locator('td[data-queue="default"][data-status="succeeded"]')).to_have_text(
        "1"
    )
    assert await job_status(api, job["id"]) == "succeeded"


async def test_job_detail_shows_the_errors_of_a_flaky_job_that_retried(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    job = await enqueue(api, kind="flaky", payload={"fail_times": 2}, max_attempts=3)

    await page.goto(f"{base_url}/ui/jobs/{job['id']}")

    await expect(page.locator("#status")).to_have_attribute("data-status", "succeeded")
    errors = page.locator("#errors > li")
    await expect(errors).to_have_count(2)
    await expect(errors.nth(0)).to_contain_text("attempt 1 of 2 planned failures")
    await expect(errors.nth(1)).to_contain_text("attempt 2 of 2 planned failures")
    await expect(page.locator("#attempts")).to_have_text("3 / 3")
    await expect(page.locator("#result")).to_contain_text('"succeeded_on_attempt": 3')


async def test_cancel_button_cancels_a_running_sleep_job(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    job = await enqueue(api, kind="sleep", payload={"seconds": 60})
    await wait_for(lambda: _is(api, job["id"], "running"))
    await page.goto(f"{base_url}/ui/jobs/{job['id']}")
    await expect(page.locator("#status")).to_have_attribute("data-status", "running")

    await page.locator("#cancel").click()

    await expect(page.locator("#status")).to_have_attribute("data-status", "cancelled")
    await expect(page.locator("#cancel")).to_be_disabled()
    await expect(page.locator("#retry")).to_be_enabled()
    assert await job_status(api, job["id"]) == "cancelled"


async def test_retry_button_requeues_a_failed_job_and_it_runs_again(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    job = await enqueue(api, kind="fail", payload={"message": "disk full"}, max_attempts=1)
    await wait_for(lambda: _is(api, job["id"], "failed_permanent"))
    await page.goto(f"{base_url}/ui/jobs/{job['id']}")
    await expect(page.locator("#errors > li")).to_have_count(1)

    await page.locator("#retry").click()

    # It ran again: a second error, recorded by a second run, and it failed again.
    await expect(page.locator("#errors > li")).to_have_count(2)
    await expect(page.locator("#status")).to_have_attribute("data-status", "failed_permanent")
    await expect(page.locator("#action-result")).to_have_text("Queued again.")
    body = (await api.get(f"/jobs/{job['id']}")).json()
    assert (body["attempts"], len(body["errors"])) == (1, 2)


async def test_jobs_table_filters_by_status_and_links_to_the_job(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    failed = await enqueue(api, kind="fail", max_attempts=1)
    await enqueue(api, kind="echo")
    await wait_for(lambda: _is(api, failed["id"], "failed_permanent"))

    await page.goto(f"{base_url}/ui/jobs")
    await page.locator("#f-status").select_option("failed_permanent")
    await page.locator("#filters button[type=submit]").click()

    rows = page.locator("#jobs-body tr[data-job-id]")
    await expect(rows).to_have_count(1)
    await rows.first.locator("a").click()
    await expect(page).to_have_url(f"{base_url}/ui/jobs/{failed['id']}")
    await expect(page.locator("#kind")).to_have_text("fail")


async def test_overview_fits_a_phone_screen(
    browser: Browser, api: httpx.AsyncClient, base_url: str
) -> None:
    await enqueue(api, kind="echo", queue="parked")
    context = await browser.new_context(viewport={"width": 390, "height": 844})
    try:
        p = await context.new_page()
        await p.goto(f"{base_url}/ui")
        await expect(p.locator('td[data-queue="parked"][data-status="queued"]')).to_have_text("1")
        page_width = await p.evaluate("document.documentElement.scrollWidth")
        ARTIFACTS.mkdir(exist_ok=True)
        await p.screenshot(path=str(ARTIFACTS / "overview-phone.png"), full_page=True)
    finally:
        await context.close()
    assert page_width <= 390  # wide tables scroll inside their card, not the page


async def test_dashboard_asks_for_a_token_when_auth_is_on(
    browser: Browser, dsn: str, queue: Queue
) -> None:
    api, base = start_api(dsn, "--app", EXAMPLES, env={"JOBQ_API_TOKENS": "t0ken"})
    context = await browser.new_context()
    try:
        await wait_ready(base, api)
        p = await context.new_page()
        p.set_default_timeout(TIMEOUT_MS)
        await p.goto(f"{base}/ui")
        await expect(p.locator("#login")).to_be_visible()

        await p.locator("#token").fill("t0ken")
        await p.locator("#login button[type=submit]").click()

        await expect(p.locator("#login")).to_be_hidden()
        await expect(p.locator("#live")).to_have_class("live ok")
        assert await p.evaluate("sessionStorage.getItem('jobq-token')") == "t0ken"
    finally:
        await context.close()
        stop(api)


async def test_overview_lists_periodic_schedules_with_their_next_run(
    page: Page, api: httpx.AsyncClient, base_url: str, queue: Queue
) -> None:
    # What a worker running the scheduler declares (jobq.queue.schedules), written directly:
    # the example worker declares no schedule.
    await queue.pool.execute("TRUNCATE jobq_schedules")
    await queue.pool.execute(
        "INSERT INTO jobq_schedules (name, kind, queue, spec, last_tick, next_run_at)"
        " VALUES ('nightly', 'echo', 'default', 'cron 30 2 * * * (Europe/Paris)', now(),"
        " now() + interval '1 hour')"
    )
    await page.goto(f"{base_url}/ui")
    item = page.locator('#schedules li[data-schedule="nightly"]')
    await expect(item).to_contain_text("cron 30 2 * * * (Europe/Paris)")
    await expect(item).to_contain_text("next ")
    await expect(item).to_contain_text("not run yet")
    await queue.pool.execute("TRUNCATE jobq_schedules")


async def test_overview_lists_a_paused_kind_and_its_resume_button_resumes_it(
    page: Page, api: httpx.AsyncClient, base_url: str, queue: Queue
) -> None:
    await queue.pause("kind", "report.build")
    try:
        await page.goto(f"{base_url}/ui")
        item = page.locator('#flow li[data-paused-kind="report.build"]')
        await expect(item).to_contain_text("report.build is paused")
        await item.locator("button[data-resume-kind]").click()
        await expect(item).to_have_count(0)
        assert not [s for s in await queue.flow_states() if s.name == "report.build" and s.paused]
    finally:
        await queue.resume("kind", "report.build")


async def test_overview_shows_who_paused_a_queue(
    page: Page, api: httpx.AsyncClient, base_url: str, queue: Queue
) -> None:
    await queue.pause("queue", "reports", by="ops on call")
    try:
        await page.goto(f"{base_url}/ui")
        row = page.locator('#counts-body tr[data-queue-row="reports"]')
        await expect(row.locator("span[data-paused-by]")).to_have_text(" by ops on call")
    finally:
        await queue.resume("queue", "reports")


async def test_overview_lists_a_limit_with_what_runs_under_it(
    page: Page, api: httpx.AsyncClient, base_url: str, queue: Queue
) -> None:
    await queue.declare_limits("w", {"echo": Limits(max_concurrency=3, max_per_key=2)}, {})
    try:
        await page.goto(f"{base_url}/ui")
        item = page.locator('#flow li[data-limit="kind/echo"]')
        await expect(item).to_contain_text("0 running of 3 · at most 2 per key")
    finally:
        await queue.pool.execute("DELETE FROM jobq_flow_controls WHERE name = 'echo'")


# -- loading and failure states ------------------------------------------------------------

ALL_CLEAR = [
    "No jobs yet.",
    "No failures.",
    "Every waiting job has a worker.",
    "No worker is running.",
    "No kind is paused and no limit is declared.",
]


async def test_overview_shows_loading_placeholders_before_its_first_answer(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    released = asyncio.Event()

    async def hold(route: Route) -> None:  # the real /stats, answered late
        await released.wait()
        await route.continue_()

    await page.route("**/stats", hold)
    await page.goto(f"{base_url}/ui")

    for list_id in ("failing", "unhandled", "workers"):
        await expect(page.locator(f"#{list_id} li")).to_have_text("Loading…")
    await expect(page.locator("#counts-body td")).to_have_text("Loading…")
    body = await page.locator("main").inner_text()
    assert not [text for text in ALL_CLEAR if text in body], body

    released.set()
    await expect(page.locator("#live")).to_have_class("live ok")
    await expect(page.locator('#workers li[data-state="loading"]')).to_have_count(0)


@pytest.fixture
async def api_without_database(dsn: str) -> AsyncIterator[str]:
    """A real API server whose database is unreachable: /stats answers 503."""
    proc, base = start_api(f"postgresql://jobq@127.0.0.1:{free_port()}/jobq")
    try:

        async def serving() -> bool:
            assert proc.poll() is None, "the API server exited"
            try:
                async with httpx.AsyncClient() as c:
                    return (await c.get(f"{base}/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(serving, timeout=30, interval=0.1)
        yield base
    finally:
        stop(proc)


async def test_overview_shows_an_error_and_no_all_clear_when_stats_fails(
    page: Page, api_without_database: str
) -> None:
    await page.goto(f"{api_without_database}/ui")

    await expect(page.locator("#banner")).to_be_visible()
    await expect(page.locator("#banner")).to_contain_text("database is unavailable")
    await expect(page.locator("#live")).to_have_class("live bad")
    for list_id in ("failing", "unhandled", "workers"):
        await expect(page.locator(f'#{list_id} li[data-state="error"]')).to_be_visible()
    body = await page.locator("main").inner_text()
    assert not [text for text in ALL_CLEAR if text in body], body
    assert "Loading…" not in body


# -- the jobs table and the job page -------------------------------------------------------

LONG_ERROR = "disk full: " + "x" * 600 + "\nsecond line\nthird line"


async def test_jobs_table_keeps_its_layout_with_a_long_multi_line_last_error(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    failed = await enqueue(api, kind="fail", payload={"message": LONG_ERROR}, max_attempts=1)
    await enqueue(api, kind="echo", queue="parked")
    await wait_for(lambda: _is(api, failed["id"], "failed_permanent"))

    await page.goto(f"{base_url}/ui/jobs")

    row = page.locator(f'#jobs-body tr[data-job-id="{failed["id"]}"]')
    await expect(row.locator("td[data-last-error]")).to_contain_text("disk full: xxx")
    cells = await row.locator("td").evaluate_all(
        "tds => tds.map(td => { const r = td.getBoundingClientRect();"
        " return [getComputedStyle(td).display, Math.round(r.top), Math.round(r.height)]; })"
    )
    assert {display for display, _, _ in cells} == {"table-cell"}
    assert len({(top, height) for _, top, height in cells}) == 1, cells  # one aligned row
    header = await page.locator("#jobs thead th").count()
    assert len(cells) == header
    text = await row.locator("td[data-last-error]").inner_text()
    assert "second line" not in text  # the first line only; the job page has the rest


async def test_jobs_table_shows_no_last_error_for_a_job_that_succeeded_after_retries(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    job = await enqueue(api, kind="flaky", payload={"fail_times": 1}, max_attempts=3)
    await wait_for(lambda: _is(api, job["id"], "succeeded"))
    assert (await api.get(f"/jobs/{job['id']}")).json()["last_error"]  # history keeps it

    await page.goto(f"{base_url}/ui/jobs")

    cell = page.locator(f'#jobs-body tr[data-job-id="{job["id"]}"] td[data-last-error]')
    await expect(cell).to_have_text("")


async def test_jobs_table_times_show_the_date(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    await enqueue(api, kind="echo", queue="parked")

    await page.goto(f"{base_url}/ui/jobs")

    created = page.locator("#jobs-body tr[data-job-id] td").nth(5)
    await expect(created).to_have_text(re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"))


async def test_job_page_of_a_job_without_errors_says_so_without_a_numbered_item(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    job = await enqueue(api, kind="echo", queue="parked")

    await page.goto(f"{base_url}/ui/jobs/{job['id']}")

    await expect(page.locator("#status")).to_have_attribute("data-status", "queued")
    await expect(page.locator("#no-errors")).to_have_text("No errors.")
    await expect(page.locator("#no-errors")).to_be_visible()
    await expect(page.locator("#errors > li")).to_have_count(0)
    await expect(page.locator("#errors")).to_be_hidden()


async def test_job_page_for_a_malformed_id_is_a_404_page(
    page: Page, api: httpx.AsyncClient, base_url: str
) -> None:
    response = await page.goto(f"{base_url}/ui/jobs/not-a-uuid")

    assert response is not None and response.status == 404
    assert "text/html" in response.headers["content-type"]
    await expect(page.locator("#not-found")).to_contain_text("'not-a-uuid' is not a job id.")


async def _is(api: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return await job_status(api, job_id) == status
