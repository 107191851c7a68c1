"""Benchmark: first-run kernel compilation of a new install (issue 14: ≤ 5 s on the sample slide).

Runs ``qdplex run sample_data/slides --panel sample_data/panel.toml --out TMP`` in fresh
processes with empty kernel caches (``NUMBA_CACHE_DIR`` and ``QDPLEX_KERNEL_DIR`` set
to new temporary folders, as on a new install), then again with the caches just
written. Two measurements:

* compilation: the slide runs in-process (``--scheduler synchronous``) with a
  listener on numba's ``numba:compile`` events, summing the time of the outermost
  compilations (nested ones are inside them), per kernel module, as wall time and
  as the compiling thread's CPU time (the steadier figure on a busy machine); the
  second run shows what the disk cache leaves (0 when every kernel is cached);
* wall time of the command as a user types it (default local cluster), cold and warm;
* with ``--precompile``: ``python -m qdplex._precompile`` on fresh caches (as an
  install step would), then the compilation left to the first run.

The difference cold − warm of the wall time is printed too, as a check of the
first figure (it also counts loading the cache). Target: compilation ≤ 5 s (CPU).

Run::

    .venv/bin/python benchmarks/bench_compile.py [--precompile] [--no-command]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
from collections import defaultdict
from numba.core import event

import threading

state = threading.local()
per_module = defaultdict(float)
wall = [0.0]
n = [0]


class Outermost(event.Listener):
    def on_start(self, ev):
        if getattr(state, "depth", 0) == 0:
            state.t, state.c = time.perf_counter(), time.thread_time()
            state.m = ev.data["dispatcher"].py_func.__module__
        state.depth = getattr(state, "depth", 0) + 1

    def on_end(self, ev):
        state.depth -= 1
        if state.depth == 0:
            per_module[state.m] += time.thread_time() - state.c
            wall[0] += time.perf_counter() - state.t
            n[0] += 1


event.register("numba:compile", Outermost())
from qdplex.cli import main

t = time.perf_counter()
rc = main(["run", "sample_data/slides", "--panel", "sample_data/panel.toml", "--out", sys.argv[1],
           "--scheduler", "synchronous"])
print(json.dumps({"rc": rc, "wall": time.perf_counter() - t, "compile": wall[0],
                  "compile_cpu": sum(per_module.values()), "compiles": n[0], "per_module": dict(per_module)}))
"""


def _env(caches: dict) -> dict:
    env = dict(os.environ, **caches)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _in_process(caches: dict, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out)], cwd=ROOT, env=_env(caches),
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(lines[-1])
    res["compile_lines"] = [ln for ln in proc.stderr.splitlines() if "compiling qdplex kernels" in ln]
    return res


def _command(caches: dict, out: Path) -> tuple[float, list[str]]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qdplex.cli", "run", "sample_data/slides", "--panel",
                           "sample_data/panel.toml", "--out", str(out)], cwd=ROOT, env=_env(caches),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "compiling qdplex kernels" in ln]
    return time.perf_counter() - t, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-command", action="store_true", help="skip the wall-time runs of the plain command")
    p.add_argument("--precompile", action="store_true",
                   help="also: fresh caches, `python -m qdplex._precompile` (as an install step), then the first run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qdplex-bench-compile-") as tmp:
        tmp = Path(tmp)
        caches = {"NUMBA_CACHE_DIR": str(tmp / "numba"), "QDPLEX_KERNEL_DIR": str(tmp / "kernels")}
        cold = _in_process(caches, tmp / "out-cold")
        warm = _in_process(caches, tmp / "out-warm")
        print(f"in-process run (--scheduler synchronous), fresh caches: compilation {cold['compile']:.1f} s "
              f"(CPU {cold['compile_cpu']:.1f} s; {cold['compiles']} kernels) of {cold['wall']:.1f} s; "
              f"cached: compilation {warm['compile']:.1f} s of {warm['wall']:.1f} s")
        for mod, s in sorted(cold["per_module"].items(), key=lambda kv: -kv[1]):
            print(f"    {s:5.2f} s CPU  {mod}")
        print(f"first-run message: {cold['compile_lines'] or 'none'}; second run: {warm['compile_lines'] or 'none'}")
        if args.precompile:
            caches3 = {"NUMBA_CACHE_DIR": str(tmp / "numba3"), "QDPLEX_KERNEL_DIR": str(tmp / "kernels3")}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "qdplex._precompile"], cwd=ROOT, env=_env(caches3),
                           capture_output=True, check=True)
            tp = time.perf_counter() - t
            after = _in_process(caches3, tmp / "out-pre")
            print(f"python -m qdplex._precompile on fresh caches: {tp:.1f} s; then the first run: compilation "
                  f"{after['compile']:.1f} s (CPU {after['compile_cpu']:.1f} s; {after['compiles']} kernels: "
                  f"{', '.join(sorted(after['per_module']))}) of {after['wall']:.1f} s")
        if not args.no_command:
            caches2 = {"NUMBA_CACHE_DIR": str(tmp / "numba2"), "QDPLEX_KERNEL_DIR": str(tmp / "kernels2")}
            tc, lc = _command(caches2, tmp / "cmd-cold")
            tw, lw = _command(caches2, tmp / "cmd-warm")
            print(f"qdplex run sample_data/slides --panel sample_data/panel.toml --out TMP: fresh caches {tc:.1f} s, "
                  f"cached {tw:.1f} s, difference {tc - tw:.1f} s; message {lc or 'none'}, then {lw or 'none'}")
    first = after["compile_cpu"] if args.precompile else cold["compile_cpu"]
    ok = first <= 5.0 and warm["compiles"] == 0
    print(f"{'PASS' if ok else 'FAIL'}: first run compiles {first:.1f} s CPU "
          f"{'after the precompile step' if args.precompile else 'on a new install'} "
          f"(target ≤ 5 s), {warm['compiles']} kernels once cached (target 0)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
