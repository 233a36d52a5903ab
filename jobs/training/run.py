"""Command-line entry point the platform's worker runs in the trainer environment.

    python -m jobs.training.run CONFIG.json

Reads a :class:`TrainingConfig` as JSON and writes the messages of :mod:`jobs.training.protocol`
on stdout, one JSON object a line (events, metrics, checkpoints, then a result or an error); the
exit codes are defined there too.

SIGTERM (the platform cancelling the job) stops training at the next micro-batch; the process then
prints a result with status "cancelled" and exits 3. The pause file (``protocol.PAUSE_REQUEST`` in
the output folder) stops it at the end of its step with a checkpoint, a result with status
"paused" and exit 4. Exit 0: succeeded; 1: error; 2: bad config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from jobs.training import protocol
from jobs.training.protocol import EXIT_CANCELLED, EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_PAUSED


class JsonLinesReporter:
    """The trainer's reporter (:class:`jobs.training.trainer.Reporter`) writing protocol lines."""

    def __init__(self, stream=sys.stdout) -> None:
        self.stream = stream
        self.stop_requested = False
        self.pause_file: Path | None = None  # the runner's pause request, once the config is read

    def emit(self, message: protocol.Message) -> None:
        self.stream.write(message.to_json() + "\n")
        self.stream.flush()

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.emit(protocol.Event(message=message, level=level, data=data or {}))

    def metrics(self, data: dict[str, Any]) -> None:
        self.emit(protocol.Metrics(data=data))

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        self.emit(protocol.Checkpoint(step=step, path=path, metrics=metrics))

    def should_stop(self) -> bool:
        return self.stop_requested

    def should_pause(self) -> bool:
        return self.pause_file is not None and self.pause_file.exists()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Fewer, growable segments: the activation plan runs close to its budget, where a fragmented
    # cache would otherwise free and re-allocate (a synchronising cudaFree) on the way to a peak.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from jobs.training import distributed

    # Under torchrun only rank 0 speaks the protocol; the other ranks' reports are dropped (each
    # rank still sees its own stop request; errors go to stderr with their traceback).
    world = distributed.current()
    if world.distributed:
        distributed.die_with_launcher()
    reporter = JsonLinesReporter(sys.stdout if world.main else open(os.devnull, "w"))
    # Keep library chatter (progress bars, warnings) off stdout, which carries the protocol.
    sys.stdout = sys.stderr

    def request_stop(signum, frame):  # noqa: ARG001
        reporter.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    from jobs.training.config import ConfigError, TrainingConfig

    try:
        config = TrainingConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    except (ConfigError, ValueError, TypeError, IndexError, OSError) as exc:
        reporter.emit(protocol.Error(code="invalid_config", message=str(exc)))
        return EXIT_CONFIG
    reporter.pause_file = Path(config.output_dir) / protocol.PAUSE_REQUEST
    import torch

    from jobs.training.trainer import Cancelled, OutOfHostMemory, Paused, train

    advice = " Lower batch_size or max_seq_len, or enable gradient_checkpointing."
    try:
        result = train(config, reporter)
    except Cancelled:
        reporter.emit(protocol.Result(status="cancelled"))
        return EXIT_CANCELLED
    except Paused as paused:
        reporter.emit(protocol.Result(status="paused", steps=paused.step))
        return EXIT_PAUSED
    except torch.OutOfMemoryError as exc:
        reporter.emit(protocol.Error(code="out_of_memory", message=(
            f"Out of GPU memory even after the automatic retry: {exc}".splitlines()[0] + advice)))
        return EXIT_ERROR
    except OutOfHostMemory as exc:
        reporter.emit(protocol.Error(code="out_of_memory",
                                     message=f"Out of memory on the CPU: {exc}.{advice}"))
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - reported to the platform, with the traceback on stderr
        traceback.print_exc()
        reporter.emit(protocol.Error(code="training_error",
                                     message=f"{exc.__class__.__name__}: {exc}"[:2000]))
        return EXIT_ERROR
    reporter.emit(protocol.Result(**dataclasses.asdict(result)))
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
