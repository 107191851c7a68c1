"""The one line a first run prints while numba compiles qdplex's kernels.

qdplex's kernels are numba functions with ``cache=True``: compiled at their first
call and kept on disk (beside the module, or in numba's user-wide cache folder
when the installed package is not writable, or in ``$NUMBA_CACHE_DIR``), so only
the first run of a new install (or of a new qdplex/numba version) compiles them.
:func:`announce_compilation` makes that wait visible: the first time in a process
that numba actually compiles a qdplex kernel (a cache miss, not a cache load), one
line goes to standard error. Importing :mod:`qdplex.quantify` (which ``import
qdplex`` does) turns it on.

:func:`qdplex._precompile.precompile` (``python -m qdplex._precompile``) compiles
some of them ahead of time, e.g. as an install step.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["announce_compilation", "COMPILE_SECONDS"]

#: Rough CPU time to compile every kernel of one ``qdplex run`` (measured by
#: ``benchmarks/bench_compile.py``), quoted in the message.
COMPILE_SECONDS = 10

_lock = threading.Lock()
_state = {"registered": False, "announced": False}


def _is_qdplex(dispatcher) -> bool:
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module == "qdplex" or module.startswith(("qdplex.", "qdplex_"))


def announce_compilation(stream=None) -> None:
    """Print ``compiling qdplex kernels (first run only, ~N s)`` once, at the first compilation.

    Idempotent: registers one listener on numba's ``numba:compile`` event per process.
    ``stream`` defaults to ``sys.stderr`` at the time of the message.
    """
    with _lock:
        if _state["registered"]:
            return
        _state["registered"] = True
    from numba.core import event

    class _FirstCompile(event.Listener):
        def on_start(self, ev):
            if _state["announced"] or not _is_qdplex(ev.data.get("dispatcher")):
                return
            with _lock:
                if _state["announced"]:
                    return
                _state["announced"] = True
            out = stream if stream is not None else sys.stderr
            try:
                print(f"qdplex: compiling qdplex kernels (first run only, ~{COMPILE_SECONDS} s)", file=out, flush=True)
            except (OSError, ValueError):  # a closed or unusable stream: the message is only a courtesy
                pass

        def on_end(self, ev):
            pass

    event.register("numba:compile", _FirstCompile())

