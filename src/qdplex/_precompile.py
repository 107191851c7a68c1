"""Compile qdplex's segmentation, membrane-ring and quantification kernels (and those of the
unmixing pivot table and the on-slide refinement) ahead of time.

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
    from .unmix._kernels import _pivot_table_for  # the unmixing kernels that do not depend on K

    _pivot_table_for(np.eye(2).tobytes(), 2)
    _refinement()
    return time.perf_counter() - t


def _refinement() -> None:
    """The on-slide refinement (:func:`qdplex.unmix.refine.refine_matrix`) of a small
    λ-stack sample: its compiled steps (band integrals, warp, column estimates, single-peaked
    fit) with the argument types :func:`qdplex.unmix.unmix` gives them (~9 s to compile)."""
    import numpy as np

    from .spectra import SpectralLibrary, lambda_grid
    from .unmix.refine import refine_matrix

    chans = lambda_grid(500.0, 720.0, 10.0)
    names = ["DAPI", "QD565", "QD605", "QD655"]
    lib = SpectralLibrary.builtin(names)
    M0 = lib.matrix(chans)
    Y = (M0 @ np.random.default_rng(0).gamma(2.0, 50.0, (len(names), 2000))).astype(np.float32)

    def fit(Y, M):  # clipped least squares: the refinement's own steps are what is compiled here
        A = np.clip(np.linalg.lstsq(M, Y, rcond=None)[0], 0.0, None).astype(np.float32)
        return A, np.sqrt(np.mean((Y - M @ A) ** 2, axis=0)).astype(np.float32)

    refine_matrix(Y, M0, names, unmix_fn=fit, channels=chans, stain=["DAPI"], single_peaked=names,
                  priors=[lib[n] for n in names])


if __name__ == "__main__":  # python -m qdplex._precompile
    print(f"qdplex: kernels ready in {precompile():.1f} s")
