"""One export on a worker of the ``exports`` queue (CPU, the trainer's environment).

Steps: claim (queued → running, once) → stage (the adapter's files, and its merged model for a
format that needs it, from artifact storage into a work folder) → convert (``python -m
jobs.export`` in the trainer's environment, its progress lines streamed into the row at most
once a second; it checks its artifact before it ends) → store (the artifact written to storage
in chunks while its sha256 is computed) → succeed (bytes, sha256 and the check recorded, counted
in the organization's quota). Every write is conditional on the export still being this
worker's (worker_writes): deleted or failed meanwhile, the worker stops and deletes what it
stored. No lock is held across any of this I/O.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from django.conf import settings

from jobs.export import formats, protocol
from jobs.training.layout import ADAPTER_FILES
from tuneplex.core import metrics
from tuneplex.core.errors import ApiError
from tuneplex.core.redact import client_message
from tuneplex.core.storage import delete_prefix, download_directory, download_file, list_prefix
from tuneplex.core.storage_layout import export_prefix, export_scratch, merged_prefix
from tuneplex.core.storage_stream import blob_writer
from tuneplex.core.trainer_env import trainer_command, trainer_environment
from tuneplex.exports.models import Export
from tuneplex.exports.worker_writes import (
    export_claim,
    export_fail,
    export_progress,
    export_succeed,
)
from tuneplex.files.selectors import storage_quota_check

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 1.0  # the row's progress is written at most this often
# The export's progress from 0 to 1: staging its inputs, the conversion and its check, storing.
STAGE, CONVERT, STORE = (0.0, 0.05), (0.05, 0.9), (0.9, 1.0)
CHUNK = 8 * 2**20


class Abandoned(Exception):
    """The export is no longer this worker's: deleted, or failed by the sweep."""


class ExportFailed(Exception):
    def __init__(self, error: str, check: dict | None = None) -> None:
        super().__init__(error)
        self.error = error  # "code: message"
        self.check = check


def run_export(export_id: str) -> str:
    """Claim the export and run it; what became of it ("not claimed", "succeeded", ...)."""
    export = export_claim(export_id=export_id)
    if export is None:
        log.info("export %s not claimable (taken already, not queued, or its merge not done)",
                 export_id)
        return "not claimed"
    settings.WORK_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"export-{export.id}-", dir=settings.WORK_DIR))
    started = time.monotonic()
    outcome = "failed"
    try:
        outcome = ExportRun(export, work).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        metrics.EXPORT_DURATION.labels(export.format, outcome).observe(time.monotonic() - started)
    log.info("export %s: %s", export.id, outcome)
    return outcome


class Progress:
    """The row's progress, written at most once per PROGRESS_SECONDS (and when forced)."""

    def __init__(self, export_id: str) -> None:
        self.export_id = export_id
        self.written_at = float("-inf")

    def report(self, span: tuple[float, float], fraction: float, message: str, *,
               force: bool = False) -> None:
        """``fraction`` (0 to 1) of the step whose share of the whole is ``span``."""
        now = time.monotonic()
        if not force and now - self.written_at < PROGRESS_SECONDS:
            return
        self.written_at = now
        low, high = span
        overall = low + (high - low) * max(0.0, min(1.0, fraction))
        if not export_progress(export_id=self.export_id, fraction=overall, message=message):
            raise Abandoned(self.export_id)


class ExportRun:
    def __init__(self, export: Export, work: Path) -> None:
        self.export = export
        self.work = work
        self.spec = formats.FORMATS[export.format]
        self.progress = Progress(export.id)
        self.prefix = export_prefix(export.organization_id, export.id)

    def run(self) -> str:
        try:
            adapter_dir, merged_dir = self.stage()
            artifact, check = self.convert(adapter_dir, merged_dir)
            blob, size, sha256 = self.store(artifact)
        except Abandoned:
            delete_prefix(self.prefix)
            return "abandoned"
        except ExportFailed as exc:
            export_fail(export_id=self.export.id, error=exc.error, check=exc.check)
            return "failed"
        except Exception as exc:  # noqa: BLE001 - recorded on the export for the user
            log.exception("export %s failed", self.export.id)
            export_fail(export_id=self.export.id, error="export_error: " + (
                client_message(str(exc)) or type(exc).__name__))
            return "failed"
        if not export_succeed(export_id=self.export.id, blob_name=blob, filename=artifact.name,
                              size=size, sha256=sha256, check=check):
            delete_prefix(self.prefix)  # deleted, failed by the sweep, or no room in the quota
            return "not recorded"
        return "succeeded"

    # --- stage ------------------------------------------------------------------------------

    def stage(self) -> tuple[Path, Path | None]:
        """The adapter's files, and the merged model where the format needs it, on local disk."""
        adapter = self.export.adapter
        self.progress.report(STAGE, 0.0, "Fetching the adapter", force=True)
        adapter_dir = self.work / "adapter"
        adapter_dir.mkdir()
        download_directory(adapter.blob_prefix, ADAPTER_FILES, adapter_dir)
        if not self.export.needs_merge:
            return adapter_dir, None
        prefix = merged_prefix(adapter.blob_prefix)
        names = [name.removeprefix(f"{prefix}/") for name in list_prefix(prefix)]
        if not names:
            raise ExportFailed("merge_missing: the adapter's merged model is not in storage; "
                               "merge the adapter again (POST /v1/adapters/{id}/merge).")
        merged_dir = self.work / "merged"
        for index, name in enumerate(names):
            self.progress.report(STAGE, index / len(names), "Fetching the merged model")
            download_file(f"{prefix}/{name}", merged_dir / name)
        return adapter_dir, merged_dir

    # --- convert ------------------------------------------------------------------------------

    def command(self, adapter_dir: Path, merged_dir: Path | None, out: Path) -> list[str]:
        export = self.export
        name = "-".join(filter(None, (export.adapter_id, export.format, export.quantization)))
        args = ["--format", export.format, "--base", export.adapter.base_model.directory,
                "--adapter", str(adapter_dir), "--out", str(out), "--name", name]
        if export.quantization:
            args += ["--quantization", export.quantization]
        if merged_dir is not None:
            args += ["--merged", str(merged_dir)]
        return trainer_command("jobs.export", *args)

    def convert(self, adapter_dir: Path, merged_dir: Path | None) -> tuple[Path, dict]:
        """Run the exporter to its end: (the artifact, the check it passed)."""
        out = self.work / "out"
        out.mkdir()
        log_path = self.work / "export.log"
        self.progress.report(CONVERT, 0.0, "Converting", force=True)
        with log_path.open("wb") as stderr:
            # Its own process group: the deadline or an abandoned export stops all of it.
            process = subprocess.Popen(self.command(adapter_dir, merged_dir, out),
                                       cwd=settings.REPO_DIR, stdout=subprocess.PIPE,
                                       stderr=stderr, env=trainer_environment(home=self.work),
                                       start_new_session=True)
            timed_out = threading.Event()
            deadline = threading.Timer(settings.EXPORT_DEADLINE_SECONDS,
                                       lambda: (timed_out.set(), _kill(process)))
            deadline.start()
            try:
                end = self.follow(process)
            finally:
                deadline.cancel()
                _kill(process)
        if timed_out.is_set():
            raise ExportFailed(f"export_timeout: the export ran longer than "
                               f"{settings.EXPORT_DEADLINE_SECONDS} s "
                               "(TUNEPLEX_EXPORT_DEADLINE_SECONDS) and was stopped.")
        return self.ending(end, process.returncode, out, log_path)

    def follow(self, process: subprocess.Popen) -> protocol.Exported | protocol.ExportError | None:
        """Its progress lines into the row until it ends; its last line (exported or error)."""
        end = None
        assert process.stdout is not None
        for line in process.stdout:
            match protocol.parse(line):  # None: a line of another shape (a library's), skipped
                case protocol.Progress(fraction=fraction, message=message):
                    self.progress.report(CONVERT, fraction, message)
                case protocol.Exported() | protocol.ExportError() as message:
                    end = message
        process.wait()
        return end

    def ending(self, end, returncode: int, out: Path, log_path: Path) -> tuple[Path, dict]:
        match end:
            case protocol.Exported(file=file, check=check) if returncode == protocol.EXIT_OK:
                if check.get("passed") is not True:
                    raise ExportFailed("check_failed: the exporter's check did not pass.", check)
                return _confined(Path(file), out), check
            case protocol.ExportError(code=code, message=message, check=check):
                raise ExportFailed(f"{code}: {client_message(message)}", check or None)
        raise ExportFailed(f"export_error: {_last_line(log_path) or f'exit status {returncode}'}")

    # --- store --------------------------------------------------------------------------------

    def store(self, artifact: Path) -> tuple[str, int, str]:
        """Write the artifact to storage in chunks; (its blob, size, sha256)."""
        size = artifact.stat().st_size
        try:  # fail fast: the last word is export_succeed's, under the organization's lock
            storage_quota_check(self.export.organization, size,
                                what=f"the export ({size} bytes)", param=None)
        except ApiError as exc:
            raise ExportFailed(f"{exc.code}: {exc.message}") from None
        self.progress.report(STORE, 0.0, "Storing the export", force=True)
        blob = f"{self.prefix}/{artifact.name}"
        writer = blob_writer(blob, scratch=export_scratch(self.export.organization_id,
                                                          self.export.id))
        digest = hashlib.sha256()
        written = 0
        try:
            with artifact.open("rb") as source:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    writer.write(chunk)
                    written += len(chunk)
                    self.progress.report(STORE, written / max(size, 1), "Storing the export")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return blob, written, digest.hexdigest()


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _confined(file: Path, out: Path) -> Path:
    """The artifact the exporter named, which must be a file in its output folder."""
    path = (out / file).resolve()
    if not path.is_relative_to(out.resolve()) or not path.is_file():
        raise ExportFailed("export_error: the exporter named no artifact in its output folder.")
    return path


def _last_line(log_path: Path) -> str:
    """The last line the exporter wrote on stderr (a crash's exception), for the user."""
    with log_path.open("rb") as handle:
        handle.seek(max(0, log_path.stat().st_size - 8192))
        lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    return client_message(lines[-1]) if lines else ""
