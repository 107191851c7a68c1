"""Disk cache of the generated kernels (``$QDPLEX_KERNEL_DIR``, else
``~/.cache/qdplex/kernels``, else the temporary folder).

A cache entry is keyed on the kernel sources only: the generated source of the fused
kernel and the code (not the docstrings or comments) of the intrinsic it calls, with
the numba, numpy and Python versions. Editing a docstring anywhere, or any code outside
the kernels, never recompiles users' kernels.
"""

from __future__ import annotations

import os
import sys
import threading

import numba
import numpy as np

from ._codegen import kernel_source

__all__ = ["kernel"]

_KERNELS: dict = {}
_KERNEL_LOCK = threading.Lock()
_JIT_OPTIONS = "nogil=True, fastmath={'contract'}"


def _code_only(source: str) -> str:
    """``source`` reduced to its code: parsed, docstrings (any bare string statement)
    dropped, dumped without comments or layout — an edited docstring or comment gives
    the same text."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and isinstance(s.value.value, str))]
            node.body = kept or [ast.Pass()]
    return ast.dump(tree)


def _intrinsic_code() -> str:
    """The code of the intrinsic the generated kernels call (:func:`_kernels._pivot_for`)."""
    import inspect

    from . import _kernels

    return _code_only(inspect.getsource(_kernels._pivot_for))


def _cache_key(src: str) -> str:
    """Hash of the kernel sources only — the generated source ``src`` and the code of the
    intrinsic it calls — with the numba, numpy and Python versions: a cache entry is only
    ever reused by the exact kernel code and compiler that wrote it, and no docstring,
    comment or code outside the kernels changes it."""
    import hashlib

    tag = f"{numba.__version__}|{np.__version__}|{sys.version_info[:3]}|{_code_only(src)}|{_intrinsic_code()}"
    return hashlib.sha1(tag.encode()).hexdigest()[:16]


def _kernel_module(kind: str, K: int):
    """Import the generated source of kernel ``kind`` for K from a cache folder (so numba
    can cache its machine code on disk); None when no folder is usable."""
    import importlib.util
    import tempfile
    from pathlib import Path

    body, name = kernel_source(kind, K)
    src = body + f"\n\n{name} = numba.njit(cache=True, {_JIT_OPTIONS})({name})\n"
    key = _cache_key(src)
    for base in (os.environ.get("QDPLEX_KERNEL_DIR"), Path.home() / ".cache" / "qdplex" / "kernels",
                 Path(tempfile.gettempdir()) / "qdplex-kernels"):
        if not base:
            continue
        try:
            folder = Path(base)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"qdplex_{kind}_k{K}_{key}.py"
            try:
                ok = path.read_text(encoding="utf-8") == src
            except (OSError, UnicodeError):
                ok = False
            if not ok:  # missing, truncated or stale: (re)write atomically
                tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_text(src, encoding="utf-8")
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # numba's disk cache looks the module up by name
            spec.loader.exec_module(module)
            return getattr(module, name), path
        except Exception:  # noqa: BLE001 - any failure here only costs the disk cache
            continue
    return None, None


def _compile_in_memory(kind: str, K: int):
    body, name = kernel_source(kind, K)
    ns: dict = {}
    exec(body, ns)  # noqa: S102 - fixed template, K an int
    return numba.njit(nogil=True, fastmath={"contract"})(ns[name])


class _Kernel:
    """A generated kernel: the disk-cached compile when it loads, else an in-memory compile.

    numba reads its disk cache lazily, at the first call for each argument type; a stale
    or corrupted cache entry (e.g. from another numba version or an older generated
    source) then raises there (``ModuleNotFoundError``, pickle or LLVM errors). Our kernels
    raise nothing themselves, so any exception from the cached function means a bad cache:
    the call is redone with a fresh in-memory compile, which is kept from then on.
    """

    def __init__(self, kind: str, K: int):
        self.kind, self.K = kind, K
        self.cached, self.path = _kernel_module(kind, K)
        self.fresh = None

    def _fresh(self):
        with _KERNEL_LOCK:
            if self.fresh is None:
                self.fresh = _compile_in_memory(self.kind, self.K)
        return self.fresh

    def __call__(self, *args):
        if self.cached is not None and self.fresh is None:
            try:
                return self.cached(*args)
            except numba.core.errors.TypingError:
                raise  # compiled afresh and the arguments do not type: not a cache problem
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                import warnings

                warnings.warn(f"qdplex: unusable numba disk cache for the {self.kind} kernel (K={self.K}) in "
                              f"{self.path.parent}: {type(exc).__name__}: {exc}; recompiling in memory",
                              RuntimeWarning, stacklevel=2)
                self.cached = None
                for f in (self.path.parent / "__pycache__").glob(f"{self.path.stem}.*"):
                    try:  # the next process writes a fresh cache entry
                        f.unlink()
                    except OSError:
                        pass
        return self._fresh()(*args)


def kernel(kind: str, K: int) -> _Kernel:
    """The compiled kernel ``kind`` for K endmembers (disk-cached machine code when possible)."""
    with _KERNEL_LOCK:
        fn = _KERNELS.get((kind, K))
        if fn is None:
            fn = _KERNELS[(kind, K)] = _Kernel(kind, K)
        return fn
