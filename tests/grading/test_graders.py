"""jobs.grading: each grader on items built to pass and to fail, metrics against values computed
independently, templates and their sandbox, judge answers, and spec validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.grading import (
    Grade,
    GraderError,
    JudgeAnswer,
    TemplateMissing,
    grade,
    judge_request,
    metrics,
    render,
    sample_namespace,
    templates,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
ITEM = {"answer": "Paris", "question": "What is the capital of France?",
        "meta": {"tags": ["geo", "europe"], "source": None, "level": 2, "exact": True}}


def graded(spec: dict, output: str, item: dict = ITEM, judge: JudgeAnswer | None = None) -> Grade:
    return grade(validate(spec), item=item, sample=sample_namespace(output), judge=judge)


# --- string_check ---------------------------------------------------------------------------

def string_check(operation: str) -> dict:
    return {"type": "string_check", "name": "capital", "operation": operation,
            "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"}


@pytest.mark.parametrize("operation, passing, failing", [
    ("eq", "Paris", "paris"),
    ("ne", "Lyon", "Paris"),
    ("like", "It is Paris.", "It is paris."),  # the input contains the reference, with case
    ("ilike", "it is PARIS.", "It is Lyon."),
])
def test_string_check_passes_and_fails_each_operation(operation, passing, failing):
    good, bad = graded(string_check(operation), passing), graded(string_check(operation), failing)
    assert (good.score, good.passed, good.error) == (1.0, True, None)
    assert (bad.score, bad.passed, bad.error) == (0.0, False, None)


def test_like_looks_for_the_reference_in_the_input_not_the_other_way():
    # The reference "Paris" is not inside the input "Par": OpenAI's like is input-contains-reference.
    assert not graded(string_check("like"), "Par").passed


# --- text_similarity ------------------------------------------------------------------------

def similarity(metric: str, threshold: float) -> dict:
    return {"type": "text_similarity", "name": metric, "evaluation_metric": metric,
            "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}",
            "pass_threshold": threshold}


HYP, REF = "the cat sat", "the cat sat on the mat"
BLEU_HYP = "the quick brown fox jumps over the lazy dog today"
BLEU_REF = "the quick brown fox jumped over the lazy dog today"


@pytest.mark.parametrize("metric, hypothesis, reference, expected", [
    # Indel ratio: LCS(kitten, sitting) = 4, so 1 - (6 + 7 - 2*4) / 13 = 8/13.
    ("fuzzy_match", "kitten", "sitting", 8 / 13),
    # Modified n-gram precisions 9/10, 7/9, 5/8, 3/7 ("jumps" vs "jumped"), equal lengths.
    ("bleu", BLEU_HYP, BLEU_REF, (9 / 10 * 7 / 9 * 5 / 8 * 3 / 7) ** 0.25),
    # GLEU = min(precision, recall) over 1..4-grams: 6 matches / 6 hypothesis / 18 reference.
    ("gleu", HYP, REF, 6 / 18),
    # ROUGE-n F1: precision 1 (every n-gram of the hypothesis is in the reference), recall
    # 3/6, 2/5, 1/4; the hypothesis has no 4- or 5-gram. ROUGE-L: LCS 3 of 3 and 6 tokens.
    ("rouge_1", HYP, REF, 2 * 1 * (3 / 6) / (1 + 3 / 6)),
    ("rouge_2", HYP, REF, 2 * 1 * (2 / 5) / (1 + 2 / 5)),
    ("rouge_3", HYP, REF, 2 * 1 * (1 / 4) / (1 + 1 / 4)),
    ("rouge_4", HYP, REF, 0.0),
    ("rouge_5", HYP, REF, 0.0),
    ("rouge_l", HYP, REF, 2 * 1 * (3 / 6) / (1 + 3 / 6)),
])
def test_each_metric_scores_what_it_should(metric, hypothesis, reference, expected):
    result = graded(similarity(metric, 0.1), hypothesis, item={"reference": reference})
    assert result.error is None
    assert result.score == pytest.approx(expected, abs=1e-9)


def test_bleu_is_sacrebleus_own_score():
    import sacrebleu

    # Every n-gram order matches, so the sentence score equals the corpus score of one sentence.
    expected = sacrebleu.corpus_bleu([BLEU_HYP], [[BLEU_REF]]).score / 100
    assert metrics.bleu(BLEU_HYP, BLEU_REF) == pytest.approx(expected)


@pytest.mark.parametrize("metric", metrics.SUPPORTED)
def test_each_metric_passes_a_close_answer_and_fails_a_different_one(metric):
    reference = "the committee approved the new budget for the city library on monday"
    close = "the committee approved the new budget for the city library on tuesday"
    different = "rain is expected across the northern valleys by the weekend"
    good = graded(similarity(metric, 0.5), close, item={"reference": reference})
    bad = graded(similarity(metric, 0.5), different, item={"reference": reference})
    assert good.passed and good.score >= 0.5
    assert not bad.passed and bad.score < 0.5
    assert 0.0 <= bad.score < good.score <= 1.0


def test_a_pass_threshold_is_inclusive():
    result = graded(similarity("rouge_1", 2 / 3), HYP, item={"reference": REF})
    assert result.score == pytest.approx(2 / 3) and result.passed


def test_rouge_l_refuses_a_pair_too_large_to_compare_as_an_errored_item():
    words = " ".join(f"w{i}" for i in range(2500))
    started = time.monotonic()
    result = graded(similarity("rouge_l", 0.5), words, item={"reference": words})
    assert result.error["code"] == "input_too_large" and not result.passed
    assert time.monotonic() - started < 2  # refused before the quadratic table


# --- json_check -----------------------------------------------------------------------------

PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}


def json_check(schema: dict | None = None) -> dict:
    spec = {"type": "json_check", "name": "json", "input": "{{ sample.output_text }}"}
    return spec if schema is None else {**spec, "schema": schema}


def test_json_check_passes_json_and_fails_text():
    assert graded(json_check(), '{"a": [1, 2]}').passed
    bad = graded(json_check(), "{'a': 1}")
    assert (bad.score, bad.passed, bad.error) == (0.0, False, None)
    assert bad.sample["reason"].startswith("not JSON")


def test_json_check_with_a_schema_names_the_first_failing_path():
    assert graded(json_check(PERSON), '{"name": "Ada", "age": 36}').passed
    bad = graded(json_check(PERSON), '{"name": "Ada", "age": "old"}')
    assert not bad.passed and bad.error is None
    assert bad.sample["reason"].startswith("$.age: ")
    assert "integer" in bad.sample["reason"]


def test_json_nested_too_deeply_is_a_failed_answer_not_a_crash():
    assert not graded(json_check(), "[" * 100_000 + "]" * 100_000).passed
    assert sample_namespace("[" * 100_000)["output_json"] is None


@pytest.mark.parametrize("schema, param", [
    ({"type": "no-such-type"}, "schema.type"),
    ({"properties": {"a": {"minimum": "zero"}}}, "schema.properties.a.minimum"),
    ({"$ref": "https://example.com/person.json"}, "schema.$ref"),
    ({"patternProperties": {"^x": {}}}, "schema.patternProperties"),
    ({"properties": {"a": {"pattern": "(unclosed"}}}, "schema.properties.a.pattern"),
    ([1, 2], "schema"),
])
def test_a_bad_schema_is_refused_when_the_grader_is_validated(schema, param):
    with pytest.raises(GraderError) as caught:
        validate(json_check(schema))
    assert caught.value.code in ("invalid_schema", "invalid_type")
    assert caught.value.param == param


def test_a_catastrophic_pattern_errors_the_item_within_its_time_limit():
    spec = json_check({"type": "string", "pattern": "^(a|aa)+$"})  # exponential backtracking
    started = time.monotonic()
    result = graded(spec, json.dumps("a" * 60 + "!"))
    assert result.error["code"] == "schema_pattern_timeout"
    assert time.monotonic() - started < 3
    assert graded(spec, json.dumps("aaaa")).passed  # the pattern itself works


# --- templates ------------------------------------------------------------------------------

@pytest.mark.parametrize("template, expected", [
    ("{{item.answer}}", "Paris"),
    ("{{ item.meta.tags[1] }}/{{ item.meta.tags.0 }}", "europe/geo"),
    ("{{ item.meta.tags }}", '["geo", "europe"]'),  # lists and dicts render as JSON
    ("{{ item.meta.level }} {{ item.meta.exact }}", "2 true"),
    ("[{{ item.meta.source }}]", "[]"),  # None renders as nothing
    ("{{ sample.output_json.city }}", "Paris"),
    ("{% if item.meta.missing is defined %}yes{% else %}no{% endif %}", "no"),
    ("{{ item.nothing | default('n/a') }} {{ item.meta.tags | join(', ') | upper }}",
     "n/a GEO, EUROPE"),
])
def test_templates_render_paths_in_item_and_sample(template, expected):
    sample = sample_namespace('{"city": "Paris"}')
    assert render(template, item=ITEM, sample=sample) == expected


def test_a_missing_value_is_an_error_that_names_its_path():
    with pytest.raises(TemplateMissing) as caught:
        render("Q: {{ item.question }} A: {{ item.meta.answer }}", item=ITEM, sample=None,
               param="reference")
    assert caught.value.code == "template_missing_value"
    assert caught.value.param == "reference"
    assert "item.meta.answer" in caught.value.message


def test_a_grader_whose_template_misses_a_value_errors_that_item_only():
    result = graded(string_check("eq"), "Paris", item={"question": "no answer here"})
    assert result.error["code"] == "template_missing_value" and not result.passed
    assert "item.answer" in result.error["message"]
    assert graded(string_check("eq"), "Paris").passed


def test_a_template_reading_the_sample_without_one_is_missing_a_value():
    spec = validate(string_check("eq"))
    result = grade(spec, item=ITEM, sample=None)
    assert result.error["code"] == "template_missing_value"
    assert "sample" in result.error["message"]


@pytest.mark.parametrize("template", [
    "{{ item.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ item['__class__'] }}",
    "{{ item.answer.upper() }}",
    "{{ cycler }}",
    "{% for x in item.meta.tags %}{{ x }}{% endfor %}",
    "{{ item.answer * 1000000 }}",
    "{{ item.answer | attr('__class__') }}",
])
def test_the_sandbox_refuses_anything_but_data_when_validating(template):
    with pytest.raises(GraderError) as caught:
        validate({**string_check("eq"), "reference": template})
    assert caught.value.code == "template_unsupported"
    assert caught.value.param == "reference"


def test_lookups_reach_data_only_never_methods_or_internals():
    # A dict's method is not reachable through attribute syntax: it is a missing key.
    with pytest.raises(TemplateMissing):
        render("{{ item.keys }}", item=ITEM, sample=None)
    assert render("{{ item.keys }}", item={"keys": "data"}, sample=None) == "data"
    with pytest.raises(TemplateMissing):
        render("{{ item.answer.upper }}", item=ITEM, sample=None)


def test_a_template_syntax_error_names_its_field():
    spec = label_model()
    spec["input"][1]["content"] = "{{ item.answer "
    with pytest.raises(GraderError) as caught:
        validate(spec)
    assert (caught.value.code, caught.value.param) == ("template_syntax_error", "input[1].content")


def test_rendered_text_is_capped():
    big = {"text": "x" * (templates.MAX_RENDERED_CHARS // 2 + 1)}
    assert render("{{ item.text }}", item=big, sample=None) == big["text"]
    with pytest.raises(GraderError) as caught:
        render("{{ item.text }}{{ item.text }}", item=big, sample=None)
    assert caught.value.code == "template_output_too_large"


def test_sample_namespace_parses_json_answers_only():
    assert sample_namespace('{"a": 1}')["output_json"] == {"a": 1}
    plain = sample_namespace("Paris", finish_reason="stop")
    assert plain["output_json"] is None and plain["output_text"] == "Paris"
    assert plain["choices"][0]["message"]["content"] == "Paris"
    assert plain["finish_reason"] == "stop"


# --- label_model ----------------------------------------------------------------------------

def label_model() -> dict:
    return {
        "type": "label_model", "name": "judge", "model": "tuneplex-judge",
        "labels": ["correct", "incorrect", "unsure"], "passing_labels": ["correct"],
        "input": [
            {"role": "developer", "content": "Grade the answer to: {{ item.question }}"},
            {"role": "user", "content": [
                {"type": "input_text", "text": "Reference: {{ item.answer }}"},
                {"type": "output_text", "text": "Answer: {{ sample.output_text }}"}]},
        ],
    }


def test_label_model_asks_its_judge_for_one_of_its_labels():
    spec = validate(label_model())
    request = judge_request(spec, item=ITEM, sample=sample_namespace("Lyon"))
    assert request.model == "tuneplex-judge"
    assert request.messages == [
        {"role": "system", "content": "Grade the answer to: What is the capital of France?"},
        {"role": "user", "content": "Reference: Paris\nAnswer: Lyon"},
    ]
    assert request.sampling == {"temperature": 0.0, "max_completion_tokens": 256}
    schema = request.response_format["json_schema"]["schema"]
    assert request.response_format["type"] == "json_schema"
    assert schema["properties"]["label"]["enum"] == ["correct", "incorrect", "unsure"]
    assert schema["required"] == ["label"]


@pytest.mark.parametrize("text, label", [
    ('{"label": "correct"}', "correct"),
    ("```json\n{\"label\": \"correct\"}\n```", "correct"),
    ('  "Correct."  ', "correct"),
    ("INCORRECT", "incorrect"),
    ('{"label": "unsure", "reason": "the reference is amb', "unsure"),  # cut off after the label
])
def test_label_model_reads_json_or_a_bare_label(text, label):
    result = graded(label_model(), "Paris", judge=JudgeAnswer(text=text, usage={"total_tokens": 9}))
    assert result.error is None
    assert result.sample["label"] == label
    assert result.passed is (label == "correct") and result.score == float(label == "correct")
    assert result.sample["output"] == [{"role": "assistant", "content": text}]
    assert result.sample["usage"] == {"total_tokens": 9}
    assert result.sample["input"][1]["content"] == "Reference: Paris\nAnswer: Paris"


@pytest.mark.parametrize("text", [
    "I think the answer is correct", '{"label": "wrong"}', '{"verdict": "correct"}', "", "null"])
def test_an_answer_that_is_no_label_is_an_errored_item(text):
    result = graded(label_model(), "Paris", judge=JudgeAnswer(text=text))
    assert result.error["code"] == "judge_unparseable"
    assert (result.score, result.passed) == (0.0, False)
    assert result.sample["output"][0]["content"] == text


def test_a_failed_or_missing_judge_is_an_errored_item():
    failed = graded(label_model(), "Paris", judge=JudgeAnswer(text=None, error="timed out"))
    assert failed.error == {"code": "judge_failed", "message": "timed out"}
    assert graded(label_model(), "Paris").error["code"] == "judge_missing"


def test_a_judge_prompt_that_misses_a_value_raises_for_the_request_and_errors_the_grade():
    spec, item = validate(label_model()), {"answer": "Paris"}  # no question
    with pytest.raises(TemplateMissing) as caught:
        judge_request(spec, item=item, sample=sample_namespace("Paris"))
    assert caught.value.param == "input[0].content"
    result = grade(spec, item=item, sample=sample_namespace("Paris"), judge=None)
    assert result.error["code"] == "template_missing_value"


def test_graders_that_need_no_model_make_no_request():
    assert judge_request(validate(string_check("eq")), item=ITEM, sample=None) is None


# --- score_model ----------------------------------------------------------------------------

def score_model(**extra) -> dict:
    return {"type": "score_model", "name": "quality", "model": "tuneplex-judge",
            "input": [{"role": "user", "content": "Rate 0-10: {{ sample.output_text }}"}],
            **extra}


def test_score_model_defaults_its_range_and_maps_sampling_params():
    spec = validate(score_model(sampling_params={"max_completions_tokens": 64, "seed": 7,
                                                 "temperature": 0.5}))
    assert spec["range"] == [0.0, 1.0]
    request = judge_request(spec, item=ITEM, sample=sample_namespace("x"))
    assert request.sampling == {"temperature": 0.5, "max_completion_tokens": 64, "seed": 7}
    schema = request.response_format["json_schema"]["schema"]
    assert schema["properties"]["score"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert schema["required"] == ["score"]


@pytest.mark.parametrize("text, score, passed", [
    ('{"score": 8, "reason": "clear"}', 8.0, True),
    ('{"score": 6.5}', 6.5, False),
    (" 7 ", 7.0, True),  # a lone number, at the threshold
    ('{"score": 9.5, "reason": "covers every point but the la', 9.5, True),  # cut off
])
def test_score_model_reads_a_score_and_passes_at_the_threshold(text, score, passed):
    spec = score_model(range=[0, 10], pass_threshold=7)
    result = graded(spec, "an answer", judge=JudgeAnswer(text=text))
    assert result.error is None
    assert (result.score, result.passed) == (score, passed)


def test_score_model_without_a_threshold_passes_from_the_middle_of_its_range():
    spec = score_model(range=[1, 5])
    assert graded(spec, "x", judge=JudgeAnswer(text="3")).passed
    assert not graded(spec, "x", judge=JudgeAnswer(text="2.9")).passed


@pytest.mark.parametrize("text, code", [
    ('{"score": 11}', "judge_out_of_range"),
    ("-1", "judge_out_of_range"),
    ("NaN", "judge_unparseable"),
    ('{"score": true}', "judge_unparseable"),
    ('{"score": "8"}', "judge_unparseable"),
    ("Score: 8", "judge_unparseable"),
])
def test_a_score_that_is_unreadable_or_out_of_range_is_an_errored_item(text, code):
    result = graded(score_model(range=[0, 10]), "x", judge=JudgeAnswer(text=text))
    assert result.error["code"] == code
    assert (result.score, result.passed) == (0.0, False)


# --- validate -------------------------------------------------------------------------------

def without(spec: dict, key: str) -> dict:
    return {k: v for k, v in spec.items() if k != key}


@pytest.mark.parametrize("spec, code, param", [
    ("not a dict", "invalid_type", None),
    ({"name": "x"}, "missing_required_parameter", "type"),
    ({**string_check("eq"), "type": "regex"}, "invalid_value", "type"),
    (without(string_check("eq"), "name"), "missing_required_parameter", "name"),
    ({**string_check("eq"), "name": 3}, "invalid_type", "name"),
    ({**string_check("eq"), "operation": "contains"}, "invalid_value", "operation"),
    (without(string_check("eq"), "reference"), "missing_required_parameter", "reference"),
    ({**string_check("eq"), "input": ["a"]}, "invalid_type", "input"),
    ({**string_check("eq"), "pass_threshold": 1}, "unknown_parameter", "pass_threshold"),
    ({**string_check("eq"), "input": "x" * (64 * 1024 + 1)}, "limit_exceeded", "input"),
    ({**similarity("bleu", 0.5), "evaluation_metric": "cosine"}, "unsupported_metric",
     "evaluation_metric"),
    ({**similarity("bleu", 0.5), "evaluation_metric": "meteor"}, "unsupported_metric",
     "evaluation_metric"),
    ({**similarity("bleu", 0.5), "pass_threshold": "high"}, "invalid_type", "pass_threshold"),
    ({**similarity("bleu", 0.5), "pass_threshold": 1.5}, "invalid_value", "pass_threshold"),
    ({**label_model(), "passing_labels": ["correct", "great"]}, "invalid_value",
     "passing_labels[1]"),
    ({**label_model(), "labels": []}, "invalid_type", "labels"),
    ({**label_model(), "labels": ["a", "a"]}, "invalid_value", "labels[1]"),
    ({**label_model(), "labels": [f"l{i}" for i in range(33)]}, "limit_exceeded", "labels"),
    ({**label_model(), "input": [{"role": "user", "content": "x"}] * 17}, "limit_exceeded",
     "input"),
    ({**label_model(), "input": [{"role": "tool", "content": "x"}]}, "invalid_value",
     "input[0].role"),
    ({**label_model(), "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "x"},
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "unsupported_content", "input[0].content[1].type"),
    ({**label_model(), "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "{% if %}"}]}]},
     "template_syntax_error", "input[0].content[0].text"),
    (without(label_model(), "model"), "missing_required_parameter", "model"),
    ({**label_model(), "sampling_params": {}}, "unknown_parameter", "sampling_params"),
    (score_model(range=[1, 1]), "invalid_value", "range"),
    (score_model(range=[0, "10"]), "invalid_type", "range[1]"),
    (score_model(range=[0, 10], pass_threshold=11), "invalid_value", "pass_threshold"),
    (score_model(sampling_params={"temperature": 3}), "invalid_value",
     "sampling_params.temperature"),
    (score_model(sampling_params={"max_completions_tokens": 0}), "invalid_value",
     "sampling_params.max_completions_tokens"),
    (score_model(sampling_params={"top_k": 5}), "unknown_parameter", "sampling_params.top_k"),
    ({"type": "multi", "name": "m", "graders": {}, "calculate_output": "a"},
     "unsupported_grader", "type"),
    ({"type": "python", "name": "p", "source": "def grade(s, i): return 1"},
     "python_grader_disabled", "type"),
])
def test_validate_refuses_with_a_code_and_the_field(spec, code, param):
    with pytest.raises(GraderError) as caught:
        validate(spec)
    assert (caught.value.code, caught.value.param) == (code, param)
    assert caught.value.message


def test_python_graders_are_unavailable_even_where_allowed():
    spec = {"type": "python", "name": "p", "source": "def grade(s, i): return 1"}
    with pytest.raises(GraderError) as caught:
        validate(spec, allow_python=True)
    assert caught.value.code == "python_grader_unavailable"


def test_validate_returns_the_spec_normalised():
    spec = validate(score_model(pass_threshold=1, sampling_params={"max_completion_tokens": 32}))
    assert spec["pass_threshold"] == 1.0 and isinstance(spec["pass_threshold"], float)
    assert spec["range"] == [0.0, 1.0]
    assert spec["sampling_params"] == {"max_completions_tokens": 32}  # OpenAI's spelling
    assert validate(spec) == spec


def test_a_grade_becomes_openais_result_shape():
    ok = graded(string_check("eq"), "Paris").to_result()
    assert ok == {"name": "capital", "type": "string_check", "score": 1.0, "passed": True,
                  "sample": None}
    errored = graded(string_check("eq"), "Paris", item={}).to_result()
    assert errored["error"]["code"] == "template_missing_value"
    assert errored["passed"] is False


# --- a plain library ------------------------------------------------------------------------

OFFLINE_CHECK = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("graders must not use the network")
socket.socket.connect = refuse
socket.create_connection = refuse
import jobs.grading
from jobs.grading import stats
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("django", "torch", "tuneplex",
                                                            "celery", "transformers"))
assert not heavy, heavy
from jobs.grading import metrics
scores = [metrics.similarity(m, "the cat sat on the mat by the door",
                             "the cat sat on the mat by a door")
          for m in metrics.SUPPORTED]
assert all(0 < s <= 1 for s in scores), scores
print(stats.proportion(8, 10).low, len(scores))
"""


def test_the_library_imports_without_django_or_torch_and_needs_no_downloads(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "NLTK_DATA": str(tmp_path / "nltk_data"), "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", OFFLINE_CHECK], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.4901624715366418", str(len(metrics.SUPPORTED))]
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or cached in HOME
