"""The eval pages, server side: the list, the new-eval form (each error at the field it names,
nothing stored), an eval's page and its start-a-run form, a run's live progress, statistics and
items; what a viewer may do, and that another organization's evals and runs do not exist. The
browser test is tests/e2e/test_eval_dashboard.py."""

from __future__ import annotations

import json
import re
from html import unescape

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import get_resolver

from jobs import grading
from tests.conftest import add_member
from tests.frontend.conftest import browser, csrf, form
from tuneplex.core.scopes import Role
from tuneplex.evals import services
from tuneplex.evals.models import Eval, EvalRun
from tuneplex.evals.worker_writes import eval_run_claim, eval_run_complete, eval_run_record_items
from tuneplex.files.models import File

pytestmark = pytest.mark.django_db

ITEM_SCHEMA = {"type": "object", "properties": {"input": {"type": "string"},
                                                "expected": {"type": "string"}},
               "required": ["input", "expected"]}
CRITERIA = [
    {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
     "reference": "{{ item.expected }}", "operation": "eq"},
    {"type": "text_similarity", "name": "close", "input": "{{ sample.output_text }}",
     "reference": "{{ item.expected }}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.75},
]


def an_eval(tenant, name: str = "arithmetic") -> Eval:
    return services.eval_create(organization=tenant.organization, actor=tenant.principal(),
                                name=name, testing_criteria=CRITERIA,
                                data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA})


def a_run(tenant, made: Eval, answers: list[tuple[str, str]]) -> EvalRun:
    """A run of answers made elsewhere: (expected, answer) per item; queued (the test is the
    worker)."""
    content = [{"item": {"input": f"question {i}", "expected": expected},
                "sample": {"output_text": answer}} for i, (expected, answer) in enumerate(answers)]
    return services.eval_run_create(organization=tenant.organization, actor=tenant.principal(),
                                    eval=made, data_source={"type": "jsonl", "source": {
                                        "type": "file_content", "content": content}})


def graded(index: int, expected: str, answer: str | None) -> dict:
    """One output item as the worker stores it, graded by the real graders (answer None: the
    model's request failed, an errored item)."""
    item = {"input": f"question {index}", "expected": expected}
    if answer is None:
        error = {"code": "sample_failed", "message": "The model answered 500."}
        return {"datasource_item_id": index, "datasource_item": item, "status": "error",
                "sample": {"model": "", "input": [], "output": [], "usage": None, "error": error},
                "results": [{"name": c["name"], "type": c["type"], "score": 0.0, "passed": False,
                             "sample": None, "error": error} for c in CRITERIA]}
    results = [grading.grade(grading.validate(c), item=item, sample=grading.sample_namespace(answer),
                             judge=None).to_result() for c in CRITERIA]
    return {"datasource_item_id": index, "datasource_item": item, "results": results,
            "status": "pass" if all(r["passed"] for r in results) else "fail",
            "sample": {"model": "", "input": [{"role": "user", "content": item["input"]}],
                       "output": [{"role": "assistant", "content": answer}], "usage": None,
                       "error": None}}


def work(run: EvalRun, outputs: list[dict], *, complete: bool = True) -> EvalRun:
    """Play the eval worker: claim the run, store the graded items, end it."""
    claimed = eval_run_claim(run_id=run.id)
    assert claimed is not None
    assert eval_run_record_items(run=claimed, attempt=claimed.attempts, outputs=outputs)
    if complete:
        assert eval_run_complete(run=claimed, attempt=claimed.attempts, note="done")
    return EvalRun.objects.get(pk=run.pk)


ANSWERS = [("4", "4"), ("9", "nine"), ("12", "12"), ("7", "17"), ("3", None)]  # pass, fail, pass, fail, error


@pytest.fixture
def finished_run(org_a):
    made = an_eval(org_a)
    run = a_run(org_a, made, [(e, a or "") for e, a in ANSWERS])
    return work(run, [graded(i, e, a) for i, (e, a) in enumerate(ANSWERS)])


# --- tenancy and roles -----------------------------------------------------------------------------

def _eval_routes() -> list[tuple[str, str]]:
    routes = []
    for pattern in get_resolver().url_patterns:
        if getattr(pattern, "namespace", None) == "frontend":
            routes += [(sub.name, str(sub.pattern)) for sub in pattern.url_patterns
                       if "<oid:eval_id>" in str(sub.pattern)]
    return routes


def test_every_eval_route_is_a_404_for_another_organizations_eval_or_run(org_a, org_b):
    theirs = an_eval(org_b, name="their secret eval")
    their_run = a_run(org_b, theirs, [("1", "1")])
    mine = an_eval(org_a)
    routes = _eval_routes()
    assert len(routes) == 7, routes
    client = browser(org_a.owner)
    for name, pattern in routes:
        for eval_id in (theirs.id, mine.id):  # theirs; and their run under my eval
            if eval_id == mine.id and "<oid:run_id>" not in pattern:
                continue
            url = "/" + pattern.replace("<oid:eval_id>", eval_id).replace("<oid:run_id>", their_run.id)
            for method in ("get", "post"):
                response = getattr(client, method)(url, **csrf(client))
                assert response.status_code in (404, 405), (name, method, url, response.status_code)
                assert "their secret eval" not in response.content.decode()
    assert EvalRun.objects.get(pk=their_run.pk).status == "queued"  # the cancel did nothing
    assert EvalRun.objects.filter(eval=theirs).count() == 1
    assert "their secret eval" not in client.get("/evals/").content.decode()


def test_the_pages_render_for_every_role(org_a, finished_run):
    made = finished_run.eval
    pages = ["/evals/", f"/evals/{made.id}/", f"/evals/{made.id}/runs",
             f"/evals/{made.id}/runs/{finished_run.id}/",
             f"/evals/{made.id}/runs/{finished_run.id}/items?status=failing"]
    for role in Role.values:
        client = browser(org_a.owner if role == Role.OWNER else add_member(org_a, role))
        for page in pages:
            response = client.get(page)
            assert response.status_code in (200, 286), (role, page, response.status_code)
        listing = client.get("/evals/").content.decode()
        row = re.search(rf'<tr id="eval-{made.id}">.*?</tr>', listing, re.DOTALL)[0]
        assert "arithmetic" in row and "exact, close" in row  # its criteria
        assert "status-completed" in row and "2 passed · 2 failed · 1 errored" in row
        assert (client.get("/evals/new").status_code == 403) == (role == Role.VIEWER)


def test_a_viewer_sees_no_write_controls_and_is_refused_when_forging(org_a):
    made = an_eval(org_a)
    run = a_run(org_a, made, [("1", "1")])
    viewer = browser(add_member(org_a, Role.VIEWER))
    member = browser(add_member(org_a, Role.MEMBER))
    pages = ["/evals/", f"/evals/{made.id}/", f"/evals/{made.id}/runs/{run.id}/"]
    for page in pages:
        html = viewer.get(page).content.decode()
        assert "hx-post" not in html, page
        assert not re.search(r'<form method="post" action="/(?!logout|organizations)', html), page
        assert "New eval" not in html and "Start the run" not in html and "Cancel run" not in html
    # The same pages show a member the controls: the checks above would see them.
    assert "New eval" in member.get("/evals/").content.decode()
    assert 'id="run-form"' in member.get(f"/evals/{made.id}/").content.decode()
    assert 'id="cancel-run"' in member.get(f"/evals/{made.id}/runs/{run.id}/").content.decode()
    forged = [("/evals/new", {"name": "x", "criteria_json": '[{"type": "json_check", "name": "j", '
                                                            '"input": "{{ sample.output_text }}"}]'}),
              (f"/evals/{made.id}/runs/new", {"source": "answers", "items_from": "paste",
                                              "items": '{"item": {"input": "a", "expected": "b"}, '
                                                       '"sample": {"output_text": "b"}}'}),
              (f"/evals/{made.id}/runs/{run.id}/cancel", {})]
    for url, data in forged:
        assert viewer.post(url, form(viewer, data)).status_code == 403, url
    assert Eval.objects.filter(organization=org_a.organization).count() == 1
    assert EvalRun.objects.filter(eval=made).count() == 1
    assert EvalRun.objects.get(pk=run.pk).status == "queued"


# --- the new-eval form -----------------------------------------------------------------------------

def _error(html: str, field: str) -> str:
    found = re.search(rf'<p class="field-error" id="error-{re.escape(field)}">(.*?)</p>', html, re.DOTALL)
    assert found is not None, f"no error element for {field}"
    return unescape(found[1]).strip()


def _editor(**fields) -> dict:
    """A new-eval form with one string_check criterion, changed by ``fields``."""
    return {"name": "capitals", "item_schema": "", "criteria_count": "1", "c0-type": "string_check",
            "c0-name": "exact", "c0-input": "{{ sample.output_text }}",
            "c0-reference": "{{ item.expected }}", "c0-operation": "eq", **fields}


@pytest.mark.parametrize(("fields", "where", "says"), [
    ({"c0-operation": "contains"}, "c0-operation", "operation must be one of eq, ne, like, ilike"),
    ({"c0-input": "{{ sample.output_text"}, "c0-input", "template"),
    ({"c0-type": "text_similarity", "c0-evaluation_metric": "fuzzy_match", "c0-pass_threshold": "1.5"},
     "c0-pass_threshold", "pass_threshold must lie within the score range [0, 1]"),
    ({"c0-type": "text_similarity", "c0-evaluation_metric": "fuzzy_match", "c0-pass_threshold": "high"},
     "c0-pass_threshold", "Enter a number."),
    ({"c0-type": "label_model", "c0-model": "SmolLM2-135M-Instruct", "c0-prompt": "{{ sample.output_text }}",
      "c0-labels": "good, bad", "c0-passing_labels": "great"},
     "c0-passing_labels", "passing_labels[0]: 'great' is not one of the labels"),
    ({"c0-type": "json_check", "c0-schema": '{"type": "objekt"}'}, "c0-schema", "schema"),
    ({"c0-type": "json_check", "c0-schema": "{nope"}, "c0-schema", "Not valid JSON"),
    ({"criteria_count": "2", "c1-type": "string_check", "c1-name": "exact", "c1-input": "x",
      "c1-reference": "y", "c1-operation": "eq"}, "c1-name", "Two testing criteria are named 'exact'"),
    ({"item_schema": '{"type": 12}'}, "item_schema", "item_schema is not a valid JSON schema"),
    ({"item_schema": "{"}, "item_schema", "Not valid JSON"),
    ({"criteria_json": '[{"type": "string_check", "name": "a", "input": "x", "reference": "y", '
                       '"operation": "is"}]'},
     "criteria_json", "testing_criteria[0].operation: operation must be one of"),
    ({"criteria_json": "[1, 2"}, "criteria_json", "Not valid JSON"),
])
def test_the_new_eval_form_shows_each_error_at_its_field_and_stores_nothing(org_a, fields, where,
                                                                            says):
    client = browser(org_a.owner)
    response = client.post("/evals/new", form(client, _editor(**fields)))
    assert response.status_code == 400
    html = response.content.decode()
    assert says in _error(html, where), _error(html, where)
    others = re.findall(r'<p class="field-error" id="error-([^"]+)">\s*([^<\s][^<]*)</p>', html)
    assert [field for field, _ in others] == [where]  # nowhere else
    assert 'value="capitals"' in html  # what was typed is kept
    assert not Eval.objects.exists()


def test_creating_an_eval_from_the_editor(org_a):
    client = browser(org_a.owner)
    page = client.get("/evals/new").content.decode()
    assert 'name="c0-type"' in page and "{{ sample.output_text }}" in page
    created = client.post("/evals/new", form(client, _editor(**{
        "criteria_count": "2", "c1-type": "score_model", "c1-name": "judge",
        "c1-model": "SmolLM2-135M-Instruct", "c1-system": "", "c1-prompt": "Rate {{ sample.output_text }}",
        "c1-range_low": "0", "c1-range_high": "10", "c1-pass_threshold": "7"})))
    made = Eval.objects.get(organization=org_a.organization)
    assert created.status_code == 302 and created["Location"] == f"/evals/{made.id}/"
    assert made.name == "capitals"
    assert made.data_source_config["item_schema"] == {"type": "object"}  # blank: any object
    assert made.testing_criteria[0] == {"type": "string_check", "name": "exact",
                                        "input": "{{ sample.output_text }}",
                                        "reference": "{{ item.expected }}", "operation": "eq"}
    judge = made.testing_criteria[1]
    assert (judge["type"], judge["range"], judge["pass_threshold"]) == ("score_model", [0.0, 10.0], 7.0)
    assert judge["input"] == [{"role": "user", "content": "Rate {{ sample.output_text }}"}]
    html = client.get(f"/evals/{made.id}/").content.decode()
    assert "judge" in html and "scores it from 0 to 10; passes at 7" in html


def test_the_criteria_editor_adds_retypes_and_removes_criteria(org_a):
    client = browser(org_a.owner)
    htmx = {"HTTP_HX_REQUEST": "true"}
    added = client.post("/evals/new", form(client, _editor(editor="add")), **htmx).content.decode()
    assert added.lstrip().startswith('<fieldset id="criteria"')  # the editor alone
    assert 'id="criterion-1"' in added and 'name="criteria_count" value="2"' in added
    assert 'value="{{ sample.output_text }}"' not in added  # templates are in textareas
    retyped = client.post("/evals/new", form(client, _editor(**{
        "editor": "refresh", "c0-type": "label_model", "c0-name": "kept"})), **htmx).content.decode()
    assert 'name="c0-labels" value="correct, incorrect"' in retyped  # the new type's defaults
    assert 'name="c0-name" value="kept"' in retyped and 'name="c0-operation"' not in retyped
    two = _editor(**{"criteria_count": "2", "c1-type": "json_check", "c1-name": "second",
                     "c1-input": "{{ sample.output_text }}"})
    removed = client.post("/evals/new", form(client, two | {"editor": "remove-0"}), **htmx)
    html = removed.content.decode()
    assert 'name="c0-name" value="second"' in html and 'id="criterion-1"' not in html
    assert not Eval.objects.exists()


# --- starting a run --------------------------------------------------------------------------------

def _start(client, made, **fields):
    data = {"source": "answers", "items_from": "paste", "model": "", "prompt": "{{ item.input }}",
            "temperature": "0", "max_tokens": "64", **fields}
    return client.post(f"/evals/{made.id}/runs/new", form(client, data))


LINE = '{"item": {"input": "2 + 2?", "expected": "4"}, "sample": {"output_text": "4"}}'


@pytest.mark.parametrize(("fields", "where", "says"), [
    ({"items": LINE + "\n\nnot json"}, "items", "Line 3: not valid JSON"),
    ({"items": LINE + '\n{"item": {"input": "x"}, "sample": {"output_text": "y"}}'}, "items",
     "Line 2: The item does not match the eval's item_schema at '.': 'expected' is a required property"),
    ({"items": '{"item": {"input": "x", "expected": "y"}}'}, "items", "Line 1: A jsonl data source"),
    ({"items": ""}, "items", "Paste at least one line"),
    ({"source": "model", "model": "no-such-model", "items": LINE}, "model", "no-such-model"),
    ({"source": "model", "model": "m", "temperature": "hot", "items": LINE}, "temperature",
     "Enter a number."),
    ({"items_from": "file", "file_id": ""}, "file", "Choose a file of items"),
])
def test_the_run_form_shows_each_error_at_its_field_and_starts_nothing(org_a, fields, where, says):
    made = an_eval(org_a)
    client = browser(org_a.owner)
    response = _start(client, made, **fields)
    assert 400 <= response.status_code < 500
    html = response.content.decode()
    assert says in _error(html, where), _error(html, where)
    assert not EvalRun.objects.exists()


def test_starting_runs_from_pasted_items_and_from_an_uploaded_file(org_a):
    made = an_eval(org_a)
    client = browser(org_a.owner)
    page = client.get(f"/evals/{made.id}/").content.decode()
    assert 'id="run-form"' in page and "{{ item.input }}" in page
    started = _start(client, made, items=f"{LINE}\n{LINE}\n", name="pasted")
    run = EvalRun.objects.get(eval=made, name="pasted")
    assert started.status_code == 302 and started["Location"] == f"/evals/{made.id}/runs/{run.id}/"
    assert run.items_total == 2 and run.data_source["type"] == "jsonl" and run.status == "queued"

    bad = SimpleUploadedFile("bad.jsonl", b'{"item": {"input": "x", "expected": "y"}}\n{"nope": 1}\n')
    refused = client.post(f"/evals/{made.id}/runs/new", form(client, {
        "source": "answers", "items_from": "file", "upload": bad}))
    assert refused.status_code == 400
    assert "line 2: Each line needs an 'item' object." in _error(refused.content.decode(), "file")
    good = SimpleUploadedFile("items.jsonl", ((LINE + "\n") * 3).encode())
    from_file = client.post(f"/evals/{made.id}/runs/new", form(client, {
        "source": "answers", "items_from": "file", "upload": good, "name": "uploaded"}))
    assert from_file.status_code == 302
    run = EvalRun.objects.get(eval=made, name="uploaded")
    file = File.objects.get(organization=org_a.organization, filename="items.jsonl")
    assert file.purpose == "evals" and run.data_source["source"] == {"type": "file_id", "id": file.id}
    assert run.items_total == 3
    # The uploaded file is offered for the next run.
    assert f'<option value="{file.id}"' in client.get(f"/evals/{made.id}/").content.decode()


# --- a run's page ----------------------------------------------------------------------------------

def test_the_run_page_polls_while_the_run_is_active_and_stops_when_it_ends(org_a):
    made = an_eval(org_a)
    run = a_run(org_a, made, [(e, a or "") for e, a in ANSWERS])
    client = browser(org_a.owner)
    progress = f"/evals/{made.id}/runs/{run.id}/progress"
    html = client.get(f"/evals/{made.id}/runs/{run.id}/").content.decode()
    assert f'hx-get="{progress}" hx-trigger="every 2s"' in html and "Waiting for an eval worker" in html
    assert 'hx-trigger="every 2s"' in client.get(f"/evals/{made.id}/").content.decode()  # runs table

    outputs = [graded(i, e, a) for i, (e, a) in enumerate(ANSWERS)]
    work(run, outputs[:3], complete=False)
    partway = client.get(progress)
    assert partway.status_code == 200 and "HX-Trigger" not in partway
    html = partway.content.decode()
    assert 'value="3" max="5"' in html and "3 of 5 items graded (60%)" in html
    assert "when the run ends" in html and 'hx-trigger="every 2s"' in html

    claimed = EvalRun.objects.get(pk=run.pk)
    assert eval_run_record_items(run=claimed, attempt=claimed.attempts, outputs=outputs[3:])
    assert eval_run_complete(run=claimed, attempt=claimed.attempts, note="Attempt 1 graded 5 items.")
    ended = client.get(progress)
    assert ended.status_code == 286 and json.loads(ended["HX-Trigger"]) == {"eval-run-ended": {}}
    html = ended.content.decode()
    assert "hx-trigger" not in html and "Cancel run" not in html and 'data-status="completed"' in html
    exact = re.search(r'<tr data-criterion="exact">.*?</tr>', html, re.DOTALL)[0]
    # 2 of 4 graded items pass (the errored one is not counted): Wilson's interval on 2/4.
    assert "50.0%" in exact and "(15.0% – 85.0%, n = 4)" in exact, exact
    assert "Attempt 1 graded 5 items." in html
    runs_table = client.get(f"/evals/{made.id}/runs")
    assert runs_table.status_code == 286 and "hx-trigger" not in runs_table.content.decode()


def _shown_items(html: str) -> list[tuple[int, str]]:
    return [(int(i), s) for i, s in re.findall(r'<article class="eval-item" id="item-(\d+)" '
                                               r'data-status="(\w+)">', html)]


def test_the_items_show_side_by_side_and_filter_to_failures(org_a, finished_run):
    made = finished_run.eval
    client = browser(org_a.owner)
    base = f"/evals/{made.id}/runs/{finished_run.id}"
    page = client.get(f"{base}/").content.decode()
    assert _shown_items(page) == [(0, "pass"), (1, "fail"), (2, "pass"), (3, "fail"), (4, "error")]
    one = re.search(r'<article class="eval-item" id="item-1".*?</article>', page, re.DOTALL)[0]
    assert "question 1" in one and ">nine</div>" in one and "&quot;expected&quot;: &quot;9&quot;" in one
    verdicts = re.findall(r'<tr class="verdict" data-verdict="(\w+)"><td>(\w+)</td>', one)
    assert verdicts == [("fail", "exact"), ("fail", "close")]
    errored = re.search(r'<article class="eval-item" id="item-4".*?</article>', page, re.DOTALL)[0]
    assert "The model answered 500." in errored and "sample_failed" in errored

    failing = client.get(f"{base}/items?status=failing").content.decode()
    assert _shown_items(failing) == [(1, "fail"), (3, "fail"), (4, "error")]
    assert failing.lstrip().startswith('<section id="items"')
    assert _shown_items(client.get(f"{base}/items?status=fail").content.decode()) == [(1, "fail"), (3, "fail")]
    assert _shown_items(client.get(f"{base}/?status=error").content.decode()) == [(4, "error")]
    assert _shown_items(client.get(f"{base}/items?status=bogus").content.decode())[0] == (0, "pass")


def test_the_items_are_paged(org_a):
    made = an_eval(org_a)
    answers = [(str(i), str(i) if i % 3 else "wrong") for i in range(45)]
    run = work(a_run(org_a, made, answers), [graded(i, e, a) for i, (e, a) in enumerate(answers)])
    client = browser(org_a.owner)
    base = f"/evals/{made.id}/runs/{run.id}"
    first = client.get(f"{base}/").content.decode()
    assert [i for i, _ in _shown_items(first)] == list(range(20)) and "Page 1 of 3 (45 items)" in first
    third = client.get(f"{base}/items?status=all&page=3").content.decode()
    assert [i for i, _ in _shown_items(third)] == list(range(40, 45))
    failing = client.get(f"{base}/items?status=failing&page=1").content.decode()
    assert [i for i, _ in _shown_items(failing)] == list(range(0, 45, 3))  # 15: one page
    assert "Page 1 of" not in failing


def test_cancelling_a_run_from_its_page(org_a):
    made = an_eval(org_a)
    run = a_run(org_a, made, [("1", "1")])
    client = browser(add_member(org_a, Role.MEMBER))
    cancelled = client.post(f"/evals/{made.id}/runs/{run.id}/cancel", **csrf(client))
    assert cancelled.status_code == 200
    assert json.loads(cancelled["HX-Trigger"]) == {"eval-run-ended": {}}  # the items reload
    assert 'data-status="canceled"' in cancelled.content.decode()
    assert "Cancel run" not in cancelled.content.decode()
    assert EvalRun.objects.get(pk=run.pk).status == "canceled"
    again = client.post(f"/evals/{made.id}/runs/{run.id}/cancel", **csrf(client))
    assert "The run had already ended: canceled." in again.content.decode()


def test_a_pairwise_runs_page_shows_the_comparison_both_answers_and_the_ties(org_a):
    from tuneplex.evals.executor import _pairwise_result

    made = an_eval(org_a)
    run = EvalRun.objects.create(
        organization=org_a.organization, eval=made, model="model-a", items_blob="x", items_total=3,
        data_source={"type": "pairwise", "models": ["model-a", "model-b"],
                     "judge": {"model": "judge-m"}, "source": {"type": "file_content", "content": []}})
    readings = [("first", "second"), ("second", "first"), ("first", "first")]  # a wins, b wins, tie

    def output(index: int, labels: tuple[str, str]) -> dict:
        verdicts = [{"label": label, "text": label, "usage": None, "error": None} for label in labels]
        result = _pairwise_result("judge-m", verdicts)
        return {"datasource_item_id": index, "datasource_item": {"input": f"q{index}"},
                "results": [result], "status": {"a": "pass", "b": "fail", "tie": "tie"}[result["winner"]],
                "sample": {"model": "model-a", "input": [{"role": "user", "content": f"q{index}"}],
                           "output": [{"role": "assistant", "content": f"answer A{index}"}],
                           "usage": None, "error": None,
                           "compare": {"model": "model-b", "output": [
                               {"role": "assistant", "content": f"answer B{index}"}],
                               "usage": None, "error": None}}}

    work(run, [output(i, labels) for i, labels in enumerate(readings)])
    client = browser(org_a.owner)
    base = f"/evals/{made.id}/runs/{run.id}"
    page = client.get(f"{base}/").content.decode()
    comparison = re.search(r'<table class="table" id="pairwise">.*?</table>', page, re.DOTALL)[0]
    assert "model-a" in comparison and "model-b" in comparison
    # One win, one loss, one tie: a win rate of 1 of 2, with its (wide) interval.
    assert re.search(r"<td>1</td><td>1</td><td>1</td><td>0</td>", comparison)
    assert 'class="win-rate">50.0%' in comparison
    assert 'id="statistics"' not in page  # the eval's own criteria are not applied
    item = re.search(r'<article class="eval-item" id="item-0".*?</article>', page, re.DOTALL)[0]
    assert "answer A0" in item and "answer B0" in item and "the first model wins" in item
    assert _shown_items(client.get(f"{base}/items?status=tie").content.decode()) == [(2, "tie")]


def test_the_evals_list_shows_each_evals_latest_run(org_a, django_assert_max_num_queries):
    first, second, never = an_eval(org_a, "first"), an_eval(org_a, "second"), an_eval(org_a, "never")
    done = work(a_run(org_a, first, [("4", "4")]), [graded(0, "4", "4")])
    newest = a_run(org_a, first, [("4", "5")])  # queued after the completed one
    only = work(a_run(org_a, second, [("4", "5")]), [graded(0, "4", "5")])
    client = browser(org_a.owner)
    with django_assert_max_num_queries(6):  # one query for the latest runs (one per eval: 8)
        page = client.get("/evals/").content.decode()
    linked = dict(re.findall(r'href="/evals/(eval_\w+)/runs/(evalrun_\w+)/"', page))
    assert linked == {first.id: newest.id, second.id: only.id} and done.id not in page
    assert never.id in page and "no run yet" in page
