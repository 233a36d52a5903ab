"""TensorBoard event files for a job's training curves, written without TensorFlow or tensorboard.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, the bytes, masked
CRC-32C of the bytes), each an ``Event`` protocol buffer: the first names the file version, the
others carry a step, a wall time and a ``Summary`` of scalar values. Only that much of the format
is written here (a few varints and fixed-width fields), so the trainer and the worker need no
extra package; TensorBoard reads the files as its own.

    with EventWriter(folder, suffix="a1") as events:
        events.scalars(step, {"train/loss": 1.9, "train/learning_rate": 1e-4})
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

# The metrics the trainer reports (its "metrics" lines) and their TensorBoard tags.
TAGS = {
    "train_loss": "train/loss",
    "eval_loss": "eval/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
    "token_accuracy": "train/token_accuracy",
}


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(number: int) -> bytes:
    out = bytearray()
    number &= (1 << 64) - 1  # int64 on the wire: two's complement
    while True:
        low = number & 0x7F
        number >>= 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def event(*, wall_time: float, step: int = 0, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
    """One ``Event`` message (tensorflow/core/util/event.proto)."""
    message = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        message += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
            for tag, value in scalars.items())
        message += _bytes_field(5, summary)
    return message


def record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked(length) + data + _masked(data)


class EventWriter:
    """Appends scalar events to one new event file in ``folder``."""

    def __init__(self, folder: Path, *, suffix: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = folder / (f"{name}.{suffix}" if suffix else name)
        self._file = self.path.open("ab")
        self._file.write(record(event(wall_time=time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._file.write(record(event(wall_time=time.time(), step=step, scalars=values)))
            self._file.flush()

    def metrics(self, metrics: dict) -> None:
        """A trainer "metrics" line's data: the known values under their TensorBoard tags."""
        values = {tag: float(metrics[key]) for key, tag in TAGS.items()
                  if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)}
        self.scalars(int(metrics.get("step", 0)), values)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
