"""The eval pages in a real browser (Debian's Chromium through Playwright) against the real ASGI
app under uvicorn and a real Celery worker on the `evals` queue: create an eval in the criteria
editor (a wrong value shown at its field first), start a run of answers made elsewhere, watch
its page follow the run from queued to completed, then filter the items to the failures.

Screenshots: test-artifacts/screenshots/eval-*.png.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import GatewayProcess, WorkerProcess, make_tenant
from tests.e2e.test_dashboard import chromium, shot, sign_in  # noqa: F401 (chromium: a fixture)
from tuneplex.evals.models import Eval, EvalRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ITEM_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"},
                                                "expected": {"type": "string"}},
               "required": ["question", "expected"]}
# (question, expected, the answer made elsewhere): three right, two wrong, one nearly right.
ANSWERS = [("Capital of France?", "Paris", "Paris"), ("Capital of Italy?", "Rome", "Rome"),
           ("Capital of Spain?", "Madrid", "Barcelona"), ("Capital of Japan?", "Tokyo", "Tokyo"),
           ("Capital of Peru?", "Lima", "Quito"), ("Capital of Chile?", "Santiago", "Santiago.")]
FAILING = {2, 4, 5}  # not equal: "Santiago." has a full stop


@pytest.fixture(scope="module")
def web(test_database_url):
    """uvicorn serving the platform, with no inference engine (runs of given answers need none)."""
    process = GatewayProcess(database_url=test_database_url, engine=None)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def start_evals_worker(test_database_url):
    """Starts the `evals` queue's worker when the test says so (a run waits queued until then)."""
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        started.append(WorkerProcess(queues="evals", database_url=test_database_url,
                                     name="evals-dashboard",
                                     extra_env={"TUNEPLEX_EVAL_HEARTBEAT_SECONDS": "1"}))
        return started[-1]

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


def test_an_eval_is_created_run_followed_live_and_its_failures_read_in_the_browser(
        chromium, web, start_evals_worker):  # noqa: F811
    tenant = make_tenant("Graders")
    page = sign_in(chromium, web, tenant.owner.username)
    page.get_by_role("link", name="Evals", exact=True).click()
    page.get_by_role("link", name="New eval").first.click()
    page.wait_for_url(re.compile(r"/evals/new$"))

    # The editor: the first criterion is a string check; a second one becomes text similarity.
    page.locator("#f-name").fill("Capitals")
    page.locator("#f-item_schema").fill(json.dumps(ITEM_SCHEMA))
    page.locator("#f-c0-name").fill("exact")
    # htmx attaches its handlers to swapped-in content before it settles: a change made before
    # that would send nothing. Count the settles and wait for them.
    page.evaluate("() => { window.settled = 0; document.body.addEventListener("
                  "'htmx:afterSettle', () => { window.settled += 1; }); }")
    page.get_by_role("button", name="Add a criterion").click()
    page.wait_for_function("() => window.settled >= 1")
    page.locator("#criterion-1").wait_for()
    page.locator("#f-c1-type").select_option("text_similarity")
    page.locator("#f-c1-evaluation_metric").wait_for()  # the block shows that grader's fields
    page.locator("#f-c1-name").fill("close")
    page.locator("#f-c1-pass_threshold").fill("2")
    page.get_by_role("button", name="Create eval").click()
    error = page.locator("#error-c1-pass_threshold")
    error.filter(has_text="pass_threshold must lie within the score range [0, 1]").wait_for()
    assert page.locator("#f-c1-pass_threshold").get_attribute("aria-invalid") == "true"
    assert not Eval.objects.filter(organization=tenant.organization).exists()
    shot(page, "eval-01-new-eval-error")
    page.locator("#f-c1-pass_threshold").fill("0.8")
    page.get_by_role("button", name="Create eval").click()
    page.wait_for_url(re.compile(r"/evals/eval_\w+/$"))
    made = Eval.objects.get(organization=tenant.organization)
    assert [c["name"] for c in made.testing_criteria] == ["exact", "close"]
    assert made.testing_criteria[1]["pass_threshold"] == 0.8
    shot(page, "eval-02-eval-page")

    # A run of answers made elsewhere, pasted; no worker listens yet, so it waits, polled.
    page.locator('input[name="source"][value="answers"]').check()
    page.locator("#r-items").fill("\n".join(json.dumps({
        "item": {"question": q, "expected": e}, "sample": {"output_text": a}}) for q, e, a in ANSWERS))
    page.locator("#r-name").fill("given answers")
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if request.url.endswith("/progress")
            else None)
    page.get_by_role("button", name="Start the run").click()
    page.wait_for_url(re.compile(r"/runs/evalrun_\w+/$"))
    run = EvalRun.objects.get(eval=made)
    assert page.locator("#progress").get_attribute("data-status") == "queued"
    assert page.locator("#items .eval-item").count() == 0
    # While it is queued the page asks for its progress (every 2 s), and it stays queued.
    page.wait_for_event("request", predicate=lambda request: request.url.endswith("/progress"))
    page.wait_for_event("requestfinished", predicate=lambda request: request.url.endswith("/progress"))
    assert page.locator("#progress").get_attribute("data-status") == "queued"
    shot(page, "eval-03-run-queued")

    start_evals_worker()
    page.locator('#progress[data-status="completed"]').wait_for(timeout=60_000)
    assert EvalRun.objects.get(pk=run.pk).status == "completed"
    assert polls, "the page polled the run while it was queued"
    assert page.locator("#progress").get_attribute("hx-trigger") is None  # polling is over
    assert page.locator("#run-progress-bar").get_attribute("value") == str(len(ANSWERS))
    assert page.locator("#run-counts").inner_text() == "3 passed · 3 failed · 0 errored"
    exact = page.locator('#statistics tr[data-criterion="exact"] .pass-rate').inner_text()
    assert exact.startswith("50.0% (") and "n = 6" in exact, exact
    # The items section reloaded itself when the run ended: every item, side by side.
    page.locator("#items .eval-item").nth(len(ANSWERS) - 1).wait_for()
    assert page.locator("#items .eval-item").count() == len(ANSWERS)
    chile = page.locator("#item-5")
    assert "Santiago." in chile.locator(".item-output").inner_text()
    assert '"expected": "Santiago"' in chile.locator(".item-reference").inner_text()
    assert chile.locator('tr.verdict[data-verdict="fail"]').inner_text().startswith("exact")
    assert chile.locator('tr.verdict[data-verdict="pass"]').inner_text().startswith("close")
    shot(page, "eval-04-run-completed")

    page.get_by_role("link", name="Failures and errors").click()
    page.wait_for_url(re.compile(r"\?status=failing$"))
    page.locator('#items[data-filter="failing"]').wait_for()
    shown = page.locator("#items .eval-item")
    assert shown.count() == len(FAILING)
    assert {int(shown.nth(i).get_attribute("id").removeprefix("item-")) for i in range(shown.count())} \
        == FAILING
    assert {shown.nth(i).get_attribute("data-status") for i in range(shown.count())} == {"fail"}
    shot(page, "eval-05-run-failures")
    page.reload()  # the pushed address shows the same filter
    assert page.locator("#items .eval-item").count() == len(FAILING)

    page.get_by_role("link", name="Evals", exact=True).click()
    row = page.locator(f"#eval-{made.id}")
    assert "completed" in row.inner_text() and "3 passed · 3 failed" in row.inner_text()
    shot(page, "eval-06-evals-list")
    page.context.close()
