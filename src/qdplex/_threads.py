"""One thread for BLAS and OpenMP where small numerical work sits between parallel kernels.

On a few cores, numpy's and scipy's threaded BLAS (and scikit-learn's OpenMP) spin-wait
against qdplex's own kernel threads and against each other when the matrices are tiny:
the mixture threshold fits (2.6 s per marker with the default threads on 2 CPUs, 0.2 s
with one) and the on-slide unmixing estimates (refinement 35 → 19 ms at 768²).
:func:`one_thread` limits them for the duration of a ``with`` block (threadpoolctl).
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["one_thread"]


@lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_thread(user_api: str | None = None):
    """A context in which the native thread pools (``"blas"``, ``"openmp"`` or, by default,
    all of them) run on one thread."""
    return _controller().limit(limits=1, user_api=user_api)
