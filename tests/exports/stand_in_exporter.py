"""A stand-in for ``python -m jobs.export`` in the platform's unit tests: the same arguments and
the same protocol (jobs.export.protocol), none of the work.

    python -m tests.exports.stand_in_exporter BEHAVIOUR <jobs.export's arguments>

BEHAVIOUR: ``ok`` (a few progress lines, then an artifact: a JSON record of what it was given
and saw in its input folders), ``burst`` (the same after 500 progress lines at once),
``check_failed`` (an export_error line with the check's figures), ``crash`` (a traceback on
stderr and no line at all), ``stray`` (names an artifact outside its output folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.export import protocol

FIGURES = {"passed": False, "kind": "logits", "max_abs_diff": 0.31, "tolerance": 0.05}


def _listing(folder: Path | None) -> dict[str, int] | None:
    if folder is None:
        return None
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def main() -> int:
    behaviour = sys.argv[1]
    parser = argparse.ArgumentParser()
    for name in ("--format", "--quantization", "--base", "--out", "--name"):
        parser.add_argument(name, default="")
    parser.add_argument("--merged", type=Path)
    parser.add_argument("--adapter", type=Path)
    args = parser.parse_args(sys.argv[2:])

    def say(message) -> None:
        print(message.to_json(), flush=True)

    print("a library's own line on stdout", flush=True)  # not the protocol's: skipped
    if behaviour == "crash":
        print("Traceback (most recent call last):\nRuntimeError: the converter broke",
              file=sys.stderr, flush=True)
        return 1
    say(protocol.Progress(fraction=0.5, message="halfway"))
    if behaviour == "burst":
        for step in range(500):
            say(protocol.Progress(fraction=0.5 + step / 1000, message=f"step {step}"))
    if behaviour == "check_failed":
        say(protocol.ExportError(code="check_failed", message="logits differ by 0.31 (> 0.05)",
                                 check=FIGURES))
        return protocol.EXIT_ERROR
    out = Path(args.out)
    artifact = out / f"{args.name}.tar"
    artifact.write_text(json.dumps({
        "argv": sys.argv[2:], "adapter": _listing(args.adapter), "merged": _listing(args.merged)},
        sort_keys=True))
    named = "/etc/hostname" if behaviour == "stray" else str(artifact)
    say(protocol.Exported(file=named, check={"passed": True, "kind": "stand-in", "figure": 1}))
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
