"""The Evals API through the official `openai` SDK against a live server: evals, runs, output
items, their refusals (each naming its field, nothing stored) and tenant isolation."""

from __future__ import annotations

import openai
import pytest

from tuneplex.core.storage import artifact_storage, list_prefix
from tuneplex.evals.models import Eval, EvalRun

# The SDK warns that OpenAI shut its own Evals API down (2026-11-30): this one is the way on.
pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")]

ITEM_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"},
                                                "answer": {"type": "string"}},
               "required": ["question", "answer"]}
CRITERIA = [
    {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "operation": "eq"},
    {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.8},
]


def client(live_server, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=tenant.owner_key, max_retries=0)


def jsonl_source(*pairs: tuple[str, str, str]) -> dict:
    return {"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"question": q, "answer": a}, "sample": {"output_text": out}} for q, a, out in pairs]}}


def make_eval(sdk: openai.OpenAI, **extra):
    return sdk.evals.create(name="capitals", data_source_config={
        "type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=CRITERIA, **extra)


def test_the_sdk_creates_reads_updates_and_deletes_evals(live_server, org_a):
    sdk = client(live_server, org_a)
    created = make_eval(sdk, metadata={"team": "search"})
    assert created.id.startswith("eval_") and created.object == "eval"
    assert created.data_source_config.type == "custom"
    assert created.data_source_config.schema_["properties"]["item"] == ITEM_SCHEMA
    assert "sample" in created.data_source_config.schema_["properties"]
    assert [c.name for c in created.testing_criteria] == ["exact", "close"]
    assert created.testing_criteria[1].pass_threshold == 0.8
    second = make_eval(sdk)
    assert [e.id for e in sdk.evals.list()] == [created.id, second.id]  # OpenAI's default: oldest first
    assert [e.id for e in sdk.evals.list(order="desc")] == [second.id, created.id]
    page = sdk.evals.list(limit=1)
    assert [e.id for e in page.data] == [created.id] and page.has_more
    assert sdk.evals.update(created.id, name="capitals v2").name == "capitals v2"
    assert sdk.evals.retrieve(created.id).metadata == {"team": "search"}
    deleted = sdk.evals.delete(created.id)
    assert deleted.deleted and deleted.eval_id == created.id
    with pytest.raises(openai.NotFoundError):
        sdk.evals.retrieve(created.id)


def test_a_run_of_answers_made_elsewhere_is_queued_with_its_items_stored(live_server, org_a):
    sdk = client(live_server, org_a)
    made = make_eval(sdk)
    run = sdk.evals.runs.create(made.id, name="first", data_source=jsonl_source(
        ("Capital of France?", "Paris", "Paris"), ("Capital of Spain?", "Madrid", "Barcelona")))
    assert run.object == "eval.run" and run.status == "queued" and run.eval_id == made.id
    assert run.result_counts.total == 0
    assert run.data_source.source.type == "file_content"
    row = EvalRun.objects.get(pk=run.id)
    assert row.items_total == 2
    with artifact_storage().open(row.items_blob) as blob:
        assert len(blob.read().splitlines()) == 2
    assert [r.id for r in sdk.evals.runs.list(made.id)] == [run.id]
    assert [r.id for r in sdk.evals.runs.list(made.id, status="completed")] == []
    assert sdk.evals.runs.retrieve(run.id, eval_id=made.id).name == "first"
    canceled = sdk.evals.runs.cancel(run.id, eval_id=made.id)
    assert canceled.status == "canceled"
    assert sdk.evals.runs.output_items.list(run.id, eval_id=made.id).data == []
    deleted = sdk.evals.runs.delete(run.id, eval_id=made.id)
    assert deleted.deleted and deleted.run_id == run.id
    assert not artifact_storage().exists(row.items_blob)


@pytest.mark.parametrize("criterion,code,param", [
    ({"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "regex"},
     "invalid_value", "testing_criteria[0].operation"),
    ({"type": "python", "name": "x", "source": "def grade(s, i): return 1"},
     "python_grader_disabled", "testing_criteria[0].type"),
    ({"type": "text_similarity", "name": "x", "input": "a", "reference": "b",
      "evaluation_metric": "cosine", "pass_threshold": 0.5},
     "unsupported_metric", "testing_criteria[0].evaluation_metric"),
])
def test_an_eval_with_a_criterion_it_cannot_grade_is_refused_naming_it(live_server, org_a,
                                                                       criterion, code, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client(live_server, org_a).evals.create(
            data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
            testing_criteria=[criterion])
    assert (raised.value.body["code"], raised.value.body["param"]) == (code, param)
    assert not Eval.objects.exists()


def test_two_criteria_of_one_name_and_a_bad_item_schema_are_refused(live_server, org_a):
    sdk = client(live_server, org_a)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.evals.create(data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                         testing_criteria=[CRITERIA[0], CRITERIA[0]])
    assert raised.value.body["code"] == "duplicate_name"
    assert raised.value.body["param"] == "testing_criteria[1].name"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.evals.create(data_source_config={"type": "custom", "item_schema": {"type": "nonsense"}},
                         testing_criteria=CRITERIA)
    assert raised.value.body["param"] == "data_source_config.item_schema"


def test_a_run_whose_item_does_not_fit_the_schema_stores_nothing(live_server, org_a):
    sdk = client(live_server, org_a)
    made = make_eval(sdk)
    source = jsonl_source(("Capital of France?", "Paris", "Paris"))
    source["source"]["content"].append({"item": {"question": "no answer"}, "sample": {"output_text": ""}})
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.evals.runs.create(made.id, data_source=source)
    assert raised.value.body["code"] == "item_schema_mismatch"
    assert raised.value.body["param"] == "data_source.source.content[1].item"
    assert not EvalRun.objects.exists()
    assert list_prefix(f"orgs/{org_a.organization.id}/evals") == []
    # A jsonl entry without its sample, and a completions run of a model nobody serves.
    del source["source"]["content"][1]
    del source["source"]["content"][0]["sample"]
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.evals.runs.create(made.id, data_source=source)
    assert (raised.value.body["code"], raised.value.body["param"]) == (
        "missing_sample", "data_source.source.content[0].sample")
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.evals.runs.create(made.id, data_source={
            "type": "completions", "model": "no-such-model",
            "source": {"type": "file_content", "content": [{"item": {"question": "q", "answer": "a"}}]},
            "input_messages": {"type": "template", "template": [
                {"role": "user", "content": "{{item.question}}"}]}})
    assert raised.value.body["param"] == "data_source.model"


def test_another_organizations_evals_and_runs_are_404(live_server, org_a, org_b):
    mine, theirs = client(live_server, org_a), client(live_server, org_b)
    made = make_eval(mine)
    run = mine.evals.runs.create(made.id, data_source=jsonl_source(("q", "a", "a")))
    assert theirs.evals.list().data == []
    for call in (lambda: theirs.evals.retrieve(made.id),
                 lambda: theirs.evals.update(made.id, name="taken"),
                 lambda: theirs.evals.delete(made.id),
                 lambda: theirs.evals.runs.list(made.id),
                 lambda: theirs.evals.runs.retrieve(run.id, eval_id=made.id),
                 lambda: theirs.evals.runs.cancel(run.id, eval_id=made.id),
                 lambda: theirs.evals.runs.output_items.list(run.id, eval_id=made.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    # The positive control: the owner reads both.
    assert mine.evals.runs.retrieve(run.id, eval_id=made.id).status == "queued"


def test_the_sdk_validates_a_grader_and_grades_one_sample(live_server, org_a):
    graders = client(live_server, org_a).fine_tuning.alpha.graders
    check = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    assert graders.validate(grader=check).grader.name == "exact"
    with pytest.raises(openai.BadRequestError) as raised:
        graders.validate(grader={**check, "operation": "regex"})
    assert raised.value.body["param"] == "grader.operation"
    assert graders.run(grader=check, model_sample="Paris", item={"answer": "Paris"}).reward == 1.0
    missed = graders.run(grader=check, model_sample="Lyon", item={"answer": "Paris"})
    assert missed.reward == 0.0 and not missed.metadata.errors.invalid_variable_error
    close = graders.run(grader={"type": "text_similarity", "name": "close", "pass_threshold": 0.5,
                                "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                                "evaluation_metric": "fuzzy_match"},
                        model_sample="Pariss", item={"answer": "Paris"})
    assert 0.8 < close.reward < 1.0
    # A template that reads what the item does not have: reward 0, flagged, not a server error.
    unknown = graders.run(grader=check, model_sample="Paris", item={"question": "?"})
    assert unknown.reward == 0.0 and unknown.metadata.errors.invalid_variable_error
