"""The dashboard in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser), against the real ASGI app under uvicorn, real Celery workers training on the CPU and a
real vLLM CPU server. A team lead's first day: sign in, upload a dataset (a broken one first),
train, deploy, chat, rate, and manage keys; then a viewer who can only look.

A screenshot of each page is saved under test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import add_member, make_tenant
from tests.fixtures.adapter_rows import adapter_row
from tests.fixtures.datasets import lines_to_bytes, pirate_lines
from tuneplex.core.scopes import Role
from tuneplex.feedback.models import Comparison, Feedback
from tuneplex.finetuning.models import FineTuningJob
from tuneplex.tenancy.services import organization_update

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
PASSWORD = "pw-123456789"  # tests.conftest.make_user's
TRAIN_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium from Debian's package, with the flags this closed network needs."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: deploy/setup.sh --with-tests installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # Playwright's sync API keeps an event loop in this thread while the browser is open; the
    # tests' own ORM calls (and the database teardown) are still plain synchronous calls.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright, _restored("DJANGO_ALLOW_ASYNC_UNSAFE", previous):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def _restored(name: str, value: str | None):
    try:
        yield
    finally:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(browser, gateway, username: str):
    context = browser.new_context(base_url=gateway.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm and confirm() prompts
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{gateway.url}/")
    return page


def upload(page, name: str, content: bytes) -> None:
    page.goto("/datasets/")
    page.set_input_files("#upload-file", files=[{"name": name, "mimeType": "application/jsonl",
                                                 "buffer": content}])
    page.get_by_role("button", name="Upload and validate").click()
    page.wait_for_url(re.compile(r"/datasets/file-\w+/$"))


def test_a_team_lead_trains_deploys_chats_and_manages_keys_in_the_browser(
        chromium, celery_worker, gpu_workers, gateway, default_model):
    tenant = make_tenant("Acme")
    organization_update(organization=tenant.organization, actor=tenant.principal(),
                        auto_deploy=False)  # the lead deploys it by hand below
    gpu_workers()
    page = sign_in(chromium, gateway, tenant.owner.username)
    shot(page, "01-overview-empty")
    assert page.get_by_role("heading", name="Acme").is_visible()

    # A broken file: kept with its report, each problem on its line.
    broken = lines_to_bytes(pirate_lines(3) + ["{not json", '{"messages": "nope"}'])
    upload(page, "broken.jsonl", broken)
    assert page.get_by_text("not usable").is_visible()
    errors = page.locator("#errors tbody tr")
    assert errors.count() >= 2
    assert errors.nth(0).locator("td").nth(0).inner_text() == "4"
    assert "invalid_json" in errors.nth(0).inner_text()
    assert page.get_by_role("link", name="Fine-tune on this dataset").count() == 0
    shot(page, "02-dataset-report-errors")

    # A good one: the worker computes its statistics while the page polls; histogram drawn.
    upload(page, "pirate.jsonl", lines_to_bytes(pirate_lines(32)))
    page.locator('#statistics[data-status="ready"]').wait_for(timeout=120_000)
    page.wait_for_function("Chart.getChart(document.getElementById('length-histogram'))"
                           "?.data.datasets[0].data.reduce((a, b) => a + b, 0) === 32")
    assert page.locator("#preview article").count() == 5
    assert "Arr!" in page.locator("#preview").inner_text()
    shot(page, "03-dataset-statistics")

    # New job: a bad value is flagged inline, the estimate shows before anything is submitted.
    page.get_by_role("link", name="Fine-tune on this dataset").click()
    page.locator("#estimate-memory").wait_for()
    page.locator("#advanced summary").click()
    page.get_by_label("LoRA rank").fill("0")
    page.locator("#error-lora_rank").filter(has_text="must be between 1 and 256").wait_for()
    assert page.locator("#estimate-memory").count() == 0
    assert page.get_by_label("LoRA rank").get_attribute("aria-invalid") == "true"
    shot(page, "04-new-job-inline-error")
    for label, value in [("LoRA rank", "8"), ("Epochs", "2"), ("Batch size", "8"),
                         ("Learning rate", "0.001"), ("Checkpoint every", "2")]:
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_label("Name suffix (optional)").fill("pirate")
    page.locator("#estimate-steps").filter(has_text="8 steps").wait_for()
    assert page.get_by_label("LoRA rank").get_attribute("aria-invalid") is None
    shot(page, "05-new-job-estimate")
    page.get_by_role("button", name="Start fine-tuning").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-\w+/$"))
    job_id = page.url.rstrip("/").rsplit("/", 1)[1]

    # The job page follows it live: progress, chart, events; polling stops when it is done.
    page.locator("#job-progress-bar").wait_for(timeout=120_000)
    shot(page, "06-job-running")
    page.locator('#progress[data-status="succeeded"]').wait_for(timeout=TRAIN_TIMEOUT_MS)
    job = FineTuningJob.objects.get(id=job_id)
    assert job.status == "succeeded", job.error
    points = page.evaluate("Chart.getChart(document.getElementById('loss-chart')).data.datasets[0].data")
    assert len(points) == 8 and points[-1]["y"] < points[0]["y"], points
    assert "Job succeeded" in page.locator("#events").inner_text()
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "/progress" in request.url else None)
    page.wait_for_timeout(5000)
    assert polls == []
    shot(page, "07-job-succeeded")

    # Deploy it by hand, then chat with it beside the base model, and rate the answer.
    page.goto("/adapters/")
    row = page.locator(f"#adapter-{job.adapter.id}")
    row.get_by_role("button", name="Deploy").click()
    row.get_by_text("deployed", exact=True).wait_for()
    shot(page, "08-adapters-deployed")
    row.get_by_role("link", name="Chat").click()
    page.wait_for_url(re.compile(r"/playground/"))
    assert page.locator("#model-left").input_value() == job.fine_tuned_model
    page.get_by_label("Message").fill("Tell me something about tea.")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Send").click()
    # Each pane shows its rating bar once its stream has ended; wait for both before reading.
    for side in ("left", "right"):
        page.locator(f"#transcript-{side} .rate").wait_for(timeout=120_000)
    left = page.locator("#transcript-left .msg.assistant").inner_text()
    right = page.locator("#transcript-right .msg.assistant").inner_text()
    assert left.strip() and right.strip() and left != right
    page.locator("#transcript-left").get_by_role("button", name="Good answer (save as feedback)").click()
    page.get_by_text("Saved as a good example.").wait_for()
    shot(page, "09-playground")
    feedback = Feedback.objects.get(organization=tenant.organization)
    assert feedback.model == job.fine_tuned_model and feedback.rating == 1
    assert feedback.messages[-1] == {"role": "assistant", "content": left}
    # Side by side, the left answer marked better: a preference pair for a DPO dataset.
    page.get_by_role("button", name="Left is better (save the comparison)").click()
    page.get_by_text(f"Saved: {job.fine_tuned_model}'s answer is preferred.").wait_for()
    comparison = Comparison.objects.get(organization=tenant.organization)
    assert (comparison.preferred, comparison.non_preferred) == (left, right)
    assert comparison.messages == [{"role": "user", "content": "Tell me something about tea."}]
    page.goto("/feedback/")
    assert "Tell me something about tea." in page.locator("#feedback").inner_text()
    assert page.locator("#preference-count").inner_text() == "1"
    shot(page, "10-feedback")

    # An API key: shown once, works, revoked, stops working.
    page.goto("/api-keys/")
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-key").input_value()
    assert key.startswith("tpx_")
    shot(page, "11-api-key-created")
    assert httpx.get(f"{gateway.url}/v1/organization", headers={"Authorization": f"Bearer {key}"}
                     ).status_code == 200
    page.goto("/api-keys/")
    assert key not in page.content()
    laptop = page.locator("#keys tr", has_text="laptop")
    laptop.get_by_role("button", name="Revoke").click()
    laptop.get_by_text("revoked").wait_for()
    assert httpx.get(f"{gateway.url}/v1/organization", headers={"Authorization": f"Bearer {key}"}
                     ).status_code == 401
    shot(page, "12-api-key-revoked")

    for path, name in [("/", "13-overview"), ("/jobs/", "14-jobs"), ("/datasets/", "15-datasets"),
                       ("/team/", "16-team"), ("/audit/", "17-audit")]:
        page.goto(path)
        shot(page, name)
    audit = page.locator("#audit").inner_text()
    assert "api_key.revoke" in audit and "finetuning_job.create" in audit
    page.context.close()


def test_a_viewer_sees_no_write_buttons_and_a_forged_request_is_refused(
        chromium, gateway, default_model):
    tenant = make_tenant("Viewers")
    adapter = adapter_row(tenant.organization, default_model)
    viewer = add_member(tenant, Role.VIEWER)
    page = sign_in(chromium, gateway, viewer.username)
    for path in ["/datasets/", "/jobs/", "/adapters/", "/api-keys/", "/team/", "/feedback/"]:
        page.goto(path)
        assert page.locator("[hx-post]").count() == 0, path
        assert page.locator("#upload, #create-key, #export-feedback").count() == 0, path
    assert adapter.name in page.goto("/adapters/").text()
    shot(page, "18-viewer-adapters")
    assert page.goto("/jobs/new").status == 403
    assert page.goto("/audit/").status == 403
    shot(page, "19-viewer-forbidden")
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    forged = page.request.post(f"/adapters/{adapter.id}/deploy", headers={"X-CSRFToken": token})
    assert forged.status == 403
    forged_key = page.request.post("/api-keys/", headers={"X-CSRFToken": token},
                                   form={"name": "sneaky", "scopes": "read"})
    assert forged_key.status == 403
    adapter.refresh_from_db()
    assert adapter.deployed is False
    page.context.close()
