"""Every benchmark at a small size (``make bench-quick``, called by ``make test``).

Runs each ``benchmarks/bench_*.py`` in its own subprocess with the arguments that make
it small (a few seconds to a minute each, about 3 minutes in all on 2 cores) and shows
its output. A benchmark *fails* the run only on an error — a traceback, a crash, a
bad argument, or no answer within ``--timeout`` — never on a timing: a missed speed
target (the scripts then exit 1 without a traceback) is printed and passed on, because
timings on a small, shared machine say little.

A new benchmark is run with ``--quick`` unless it is listed in :data:`QUICK_ARGS`.

Usage::

    .venv/bin/python benchmarks/quick.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Arguments that make each benchmark small.
QUICK_ARGS = {
    "bench_scale.py": ["--quick"],
    "bench_segment.py": ["--quick", "--size", "512"],
    "bench_unmix.py": ["--size", "256", "--scipy-pixels", "2000", "--repeat", "1"],
    "bench_quantify.py": ["--size", "512", "--cells", "400", "--repeat", "1"],
    "bench_compile.py": ["--no-command"],
    "bench_accuracy.py": ["--quick", "--more-seeds", "31"],
}


def run_one(script: Path, timeout: float) -> tuple[str, float]:
    """``("ok" | "timing" | "error", seconds)`` of one benchmark run (its output streamed through)."""
    args = QUICK_ARGS.get(script.name, ["--quick"])
    print(f"== {script.name} {' '.join(args)}", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *args], stdout=None, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"   {script.name}: no answer within {timeout:.0f} s", flush=True)
        return "error", time.perf_counter() - t
    seconds = time.perf_counter() - t
    if proc.stderr:
        sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode == 0:
        return "ok", seconds
    if proc.returncode == 1 and "Traceback (most recent call last)" not in proc.stderr:
        return "timing", seconds  # a missed target: reported above, not an error
    return "error", seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds one benchmark may take (default 240)")
    args = ap.parse_args(argv)
    results = {}
    for script in sorted(HERE.glob("bench_*.py")):
        results[script.name] = run_one(script, args.timeout)
    print("== bench-quick: " + ", ".join(f"{n} {r} ({s:.0f} s)" for n, (r, s) in results.items()))
    errors = [n for n, (r, _) in results.items() if r == "error"]
    if errors:
        print(f"bench-quick: errors in {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
