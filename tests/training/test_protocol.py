"""The trainer's output protocol (jobs.training.protocol): what the trainer writes is what the
platform's runner reads back, and lines of any other shape are skipped."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import pytest

from jobs.training import protocol
from jobs.training.run import JsonLinesReporter
from jobs.training.trainer import TrainResult
from tests.training.conftest import REPO

A_RESULT = TrainResult(status="succeeded", adapter_dir="/work/job/adapter", sha256="ab" * 32,
                       steps=12, trained_tokens=34_567, config={"lora_rank": 8, "epochs": 2},
                       final_metrics={"step": 12, "train_loss": 0.25, "eval_loss": 0.5},
                       stopped_early=True)
EVERY_KIND = [
    protocol.Event(message="Memory plan: whole micro-batches.", level="warning",
                   data={"checkpointed_layers": 0, "split": False}),
    protocol.Metrics(data={"step": 3, "train_loss": 1.5, "tokens_per_second": 812.4}),
    protocol.Checkpoint(step=4, path="/work/job/checkpoints/step-4",
                        metrics={"step": 4, "train_loss": 1.25}),
    protocol.Result(**dataclasses.asdict(A_RESULT)),
    protocol.Result(status="cancelled"),
    protocol.Result(status="paused", steps=3),
    protocol.Error(code="out_of_memory", message="Out of GPU memory even after the retry."),
]


@pytest.mark.parametrize("message", EVERY_KIND,
                         ids=[f"{i}-{m.TYPE}" for i, m in enumerate(EVERY_KIND)])
def test_every_message_kind_round_trips(message):
    line = message.to_json()
    assert "\n" not in line and protocol.parse(line) == message
    assert protocol.parse(line.encode()) == message  # the runner reads the pipe as bytes


def test_the_cases_cover_every_kind_and_a_result_carries_every_train_result_field():
    assert {type(m) for m in EVERY_KIND} == set(protocol.KINDS.values())
    assert ([f.name for f in dataclasses.fields(protocol.Result)]
            == [f.name for f in dataclasses.fields(TrainResult)])
    result = protocol.parse(protocol.Result(**dataclasses.asdict(A_RESULT)).to_json())
    assert dataclasses.asdict(result) == dataclasses.asdict(A_RESULT)


def test_the_reporter_writes_one_message_a_line():
    stream = io.StringIO()
    reporter = JsonLinesReporter(stream)
    reporter.event("Resumed from checkpoint at step 4.", data={"resumed_from_step": 4})
    reporter.event("no data")
    reporter.metrics({"step": 5, "train_loss": 1.0})
    reporter.checkpoint(6, "/work/job/checkpoints/step-6", {"step": 6})
    reporter.emit(protocol.Result(**dataclasses.asdict(A_RESULT)))
    assert [protocol.parse(line) for line in stream.getvalue().splitlines()] == [
        protocol.Event("Resumed from checkpoint at step 4.", data={"resumed_from_step": 4}),
        protocol.Event("no data", level="info", data={}),
        protocol.Metrics({"step": 5, "train_loss": 1.0}),
        protocol.Checkpoint(6, "/work/job/checkpoints/step-6", {"step": 6}),
        protocol.Result(**dataclasses.asdict(A_RESULT))]


@pytest.mark.parametrize("line", [
    "Loading weights: 100%|██████████| 272/272",  # library chatter that reached stdout
    "", "[1, 2]", '"event"', "null",
    '{"type": "event", "message": "cut sho',  # a line cut short
    b"\xff\xfe{}",  # not UTF-8
    '{"message": "no type"}', '{"type": ["event"]}', '{"type": "telemetry", "data": {}}',
    '{"type": "metrics"}',  # a required field missing
    '{"type": "metrics", "data": [1, 2]}',  # of the wrong type
    '{"type": "checkpoint", "step": "4", "path": "/x"}',
    '{"type": "checkpoint", "step": true, "path": "/x"}',  # a bool is no step
    '{"type": "error", "code": "training_error", "message": null}',
    '{"type": "result", "status": "succeeded", "adapter_dir": "/x", "steps": 1.5}',
    '{"type": "result", "status": "succeeded"}',  # without the adapter it made
    '{"type": "result", "status": "pausing"}',  # no status of the protocol
])
def test_a_line_of_another_shape_is_none(line):
    assert protocol.parse(line) is None


def test_the_reporter_sees_the_runners_pause_file(tmp_path):
    reporter = JsonLinesReporter(io.StringIO())
    assert not reporter.should_pause()  # before the config names the output folder
    reporter.pause_file = tmp_path / protocol.PAUSE_REQUEST
    assert not reporter.should_pause()
    reporter.pause_file.touch()
    assert reporter.should_pause()


def test_fields_a_newer_trainer_adds_are_ignored():
    line = '{"type": "checkpoint", "step": 2, "path": "/x", "metrics": {}, "bytes": 1024}'
    assert protocol.parse(line) == protocol.Checkpoint(step=2, path="/x")


def test_the_protocol_imports_no_torch():
    """The platform imports it; its environment has no torch. Run where torch is installed, so
    an import of it would show."""
    code = ("import sys, jobs.training.protocol, jobs.training.run; "
            "assert 'torch' not in sys.modules, 'torch imported'; import torch")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
