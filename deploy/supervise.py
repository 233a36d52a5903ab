"""Keep a set of long-running processes alive: command 1's supervisor (deploy/up.sh).

    python deploy/supervise.py --logs DIR --state FILE NAME='command line' [NAME='...' ...]

Each program runs in its own process group with its output appended to DIR/NAME.log. When one
exits, whatever is left of its group is ended and it is started again after a back-off (1 s,
doubling to 30 s, back to 1 s once it has run for a minute); the others keep running. SIGTERM
or SIGINT stops every group (SIGTERM, then SIGKILL after 20 s) and exits. If the supervisor
itself is killed, each program is sent SIGTERM by the kernel (``PR_SET_PDEATHSIG``).

The state file (JSON, rewritten on every change) says each program's pid, start time and number
of restarts: what an operator, or a test, reads to see that one process came back alone.
Standard library only: it starts before anything else and must not share their failures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MIN_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 1.0, 30.0, 60.0
STOP_TIMEOUT = 20.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Program:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = MIN_BACKOFF
    next_start: float = 0.0
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _end_groups(programs: list[Program], timeout: float) -> None:
    """SIGTERM each program's whole group, wait, then SIGKILL what is left."""
    pgids = [p.process.pid for p in programs if p.process is not None]
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for program in programs:
            if program.process is not None:
                program.process.poll()  # reap
        if not any(_group_alive(pgid) for pgid in pgids):
            return
        time.sleep(0.1)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    for program in programs:
        if program.process is not None:
            program.process.wait()


class Supervisor:
    def __init__(self, programs: list[Program], state_path: Path | None) -> None:
        self.programs = programs
        self.state_path = state_path
        self.stopping = False

    def log(self, message: str) -> None:
        print(f"[supervise] {time.strftime('%H:%M:%S')} {message}", flush=True)

    def write_state(self) -> None:
        if self.state_path is None:
            return
        state = {p.name: {"pid": p.process.pid if p.alive() else None, "restarts": p.restarts,
                          "running_for": round(time.monotonic() - p.started, 1) if p.alive() else 0,
                          "exits": p.exits[-5:]} for p in self.programs}
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=1))
        os.replace(temporary, self.state_path)

    def run(self) -> int:
        for program in self.programs:
            program.start()
            self.log(f"started {program.name} (pid {program.process.pid})")
        self.write_state()
        while not self.stopping:
            changed = False
            now = time.monotonic()
            for program in self.programs:
                if program.process is not None and program.process.poll() is not None:
                    status = program.process.returncode
                    _end_groups([program], timeout=5)  # helpers it left behind
                    program.exits.append(status)
                    if now - program.started > STABLE_AFTER:
                        program.backoff = MIN_BACKOFF
                    program.next_start = now + program.backoff
                    self.log(f"{program.name} exited with status {status}; starting it again in "
                             f"{program.backoff:.0f}s (log: {program.log_path})")
                    program.backoff = min(program.backoff * 2, MAX_BACKOFF)
                    program.process = None
                    changed = True
                elif program.process is None and now >= program.next_start:
                    program.start()
                    program.restarts += 1
                    self.log(f"restarted {program.name} (pid {program.process.pid}, "
                             f"restart {program.restarts})")
                    changed = True
            if changed:
                self.write_state()
            time.sleep(0.2)
        self.log("stopping every program")
        _end_groups([p for p in self.programs if p.process is not None], STOP_TIMEOUT)
        self.write_state()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--state", type=Path, default=None)
    parser.add_argument("programs", nargs="+", metavar="NAME=COMMAND")
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    programs = []
    for entry in args.programs:
        name, _, command = entry.partition("=")
        if not name or not command:
            parser.error(f"expected NAME=COMMAND, got {entry!r}")
        programs.append(Program(name, shlex.split(command), args.logs / f"{name}.log"))
    supervisor = Supervisor(programs, args.state)

    def stop(signum, frame):
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
