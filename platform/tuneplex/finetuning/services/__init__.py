"""Writes for fine-tuning jobs, by step: :mod:`.plan` (a request checked and mapped to a
training configuration), :mod:`.lifecycle` (create, cancel, fail, re-queue) and
:mod:`.worker_writes` (a running attempt's writes, fenced by its attempt)."""
