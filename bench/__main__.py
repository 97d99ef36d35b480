"""Run every benchmark in turn: `python -m bench [NAME...]` (or `make bench`).

Each prints its own raw baseline, measured in the same run, and the ratio. The output
of each also lands in bench/results/NAME.txt so the README's figures can be traced to
a run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ALL = [
    "bench_eventlog",
    "bench_core",
    "bench_decision",
    "bench_storm",
    "bench_intake",
    "bench_projections",
    "bench_replay",
    "bench_docker",
    "bench_rebuild",
]


def main(names: list[str]) -> int:
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for name in names or ALL:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}"], capture_output=True, text=True, check=False
        )
        output = proc.stdout + (proc.stderr if proc.returncode else "")
        (results / f"{name}.txt").write_text(output)
        print(output.rstrip())
        print(f"   ({time.perf_counter() - started:.0f} s, exit {proc.returncode})", flush=True)
        if proc.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
