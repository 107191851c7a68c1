"""Compile qdplex's segmentation, membrane-ring and quantification kernels (and the unmixing
pivot table's) ahead of time.

``python -m qdplex._precompile`` (e.g. as the last step of an install) compiles them,
with the argument types ``qdplex run`` gives them, into numba's disk cache, so that
the first run only compiles the unmixing kernels (generated per number of
endmembers, hence per panel). A run with everything cached compiles nothing.
"""

from __future__ import annotations

__all__ = ["precompile"]


def precompile() -> float:
    """Compile (or load from the disk cache) the kernels of segmentation, membrane ring and
    quantification, on a small synthetic field; returns the seconds it took.

    Runs :func:`qdplex.segment.segment` (classical, membrane-guided) and
    :func:`qdplex.quantify.quantify` (a chunked float32 image, default statistics) as
    ``qdplex run`` does, so the argument types, hence the compiled specializations,
    are those of a run.
    """
    import time

    import numpy as np

    from ._numba import announce_compilation
    from .model import Channel, MultiplexImage
    from .quantify import quantify
    from .segment import segment
    from .synth import nuclear_field

    t = time.perf_counter()
    announce_compilation()
    image, _ = nuclear_field((96, 96), pixel_size_um=0.5, seed=1)
    image = np.asarray(image, np.float32)
    for membrane in (None, image):  # cells by distance, and along a membrane image
        seg = segment(image, pixel_size_um=0.5, membrane_image=membrane)
    planes = MultiplexImage(np.stack([image, image]), [Channel("a"), Channel("b")], pixel_size_um=0.5)
    quantify(planes, seg)
    from .unmix._kernels import _pivot_table_for  # the one unmixing kernel that does not depend on K

    _pivot_table_for(np.eye(2).tobytes(), 2)
    return time.perf_counter() - t


if __name__ == "__main__":  # python -m qdplex._precompile
    print(f"qdplex: kernels ready in {precompile():.1f} s")
