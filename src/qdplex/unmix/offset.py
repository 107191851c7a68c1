"""The camera's dark level (offset), found from the slide when nobody states it.

Most acquisition software does not record the camera offset, and an offset left in
the data is unmixed as signal (a flat spectrum that every endmember soaks up a part
of). :func:`resolve_offset` applies one rule everywhere (``run_slide``, the whole-slide
path, the Python API):

1. a number or one per channel given by the caller (the panel's ``[unmixing] offset``
   or ``[image] camera_offset``) wins;
2. else the offset the file records (``image.metadata["camera_offset"]``: OME
   ``DetectorSettings/@Offset``, or :mod:`qdplex.synth`);
3. else it is estimated by :func:`estimate_offset`.

Estimate: the darkest 2 % of the sampled pixels (by their channel sum smoothed over
3×3 pixels, so that noise does not pick them) are where tissue signal is least; their
mean spectrum ``d`` is fitted, non-negatively, by the library's spectra, the spectrum of
the dim signal itself (the mean of the next-darkest pixels, up to 20 %, minus ``d``: the
offset cancels in the difference, and a real autofluorescence unlike the library's is
then not taken for dark level) and a constant endmember (a flat spectrum, which no
fluor has): ``d ≈ M a + g b + β``. What the spectra do
not explain, ``d − M a``, is the dark level of each channel. When the channels agree
(their spread is within 5 % of the level, as for one camera behind a λ-stack or a
filter wheel) one value is used for all, which averages the noise and any spectral
mismatch of the dim signal in those pixels; otherwise (e.g. one PMT per channel) each
channel keeps its own. A dark level is never negative.

A fitted constant endmember alone (per pixel) would confound the offset with broad
autofluorescence in every pixel; fitting it once, on pixels that carry least signal,
keeps the estimate to the part of the data that is mostly dark level.
"""

from __future__ import annotations

import numpy as np

__all__ = ["estimate_offset", "resolve_offset"]

#: fraction of the sampled pixels taken as darkest
DARK_FRACTION = 0.02
#: the next-darkest pixels, up to this fraction, give the spectrum of the dim signal
DIM_FRACTION = 0.2
#: relative spread under which the per-channel estimates collapse to one value
UNIFORM_SPREAD = 0.05


def estimate_offset(sample, M: np.ndarray) -> dict:
    """Dark level per channel from a :class:`~qdplex.unmix._sample.PixelSample`.

    Parameters
    ----------
    sample : PixelSample
    M : numpy.ndarray
        C×K mixing matrix of the library the slide is unmixed with.

    Returns
    -------
    dict
        ``values`` (C floats), ``uniform`` (bool), ``constant`` (β of the fit),
        ``per_channel`` (``d − M a``), ``dark_pixels`` (how many), ``dark_signal``
        (the fitted fluor signal of those pixels, summed over channels).
    """
    from scipy.optimize import nnls

    Y, tot = sample.Y, sample.smooth_total
    C = Y.shape[0]
    if Y.shape[1] < 10:
        return {"values": [0.0] * C, "uniform": True, "constant": 0.0, "per_channel": [0.0] * C,
                "dark_pixels": int(Y.shape[1]), "dark_signal": 0.0}
    cut, dim = np.quantile(tot, [DARK_FRACTION, DIM_FRACTION])
    dark = Y[:, tot <= cut]
    d = dark.mean(axis=1)
    # the dim signal's own spectrum (dim pixels minus dark ones: the offset cancels) joins
    # the library's spectra, so that a spectrum unlike the library's (e.g. the slide's real
    # autofluorescence) is not taken for dark level
    g = Y[:, (tot > cut) & (tot <= dim)].mean(axis=1) - d if np.any((tot > cut) & (tot <= dim)) else np.zeros(C)
    E = np.column_stack([M, np.clip(g, 0.0, None)])
    scale = np.abs(E).max(axis=0)
    scale[scale == 0] = 1.0
    A = np.column_stack([E / scale, np.ones(C)])
    coef, _ = nnls(A, d)
    fluor = (E / scale) @ coef[:-1]
    per = d - fluor
    spread = float(np.std(per))
    level = float(np.mean(per))
    uniform = spread <= UNIFORM_SPREAD * max(abs(level), 1e-9)
    vals = np.full(C, max(level, 0.0)) if uniform else np.clip(per, 0.0, None)
    return {"values": [float(v) for v in vals], "uniform": bool(uniform), "constant": float(coef[-1]),
            "per_channel": [round(float(v), 4) for v in per], "dark_pixels": int(dark.shape[1]),
            "dark_signal": float(fluor.sum())}


def resolve_offset(offset, image, sample_fn, M: np.ndarray) -> tuple[np.ndarray, dict]:
    """The offset to unmix ``image`` with, and a record of how it was found.

    Parameters
    ----------
    offset : None, "auto", float or sequence of float
        None and ``"auto"``: the file's recorded offset, else an estimate; a number
        (or one per channel) is used as given.
    image : MultiplexImage
    sample_fn : callable
        Returns the image's :class:`~qdplex.unmix._sample.PixelSample` (called only
        when needed).
    M : numpy.ndarray
        C×K mixing matrix.

    Returns
    -------
    (values, record)
        ``values`` C floats; ``record`` has ``values`` (one float when all channels
        share it, else a list), ``source`` (``"given"``, ``"file"`` or
        ``"estimated"``) and, when estimated, ``estimate`` (see
        :func:`estimate_offset`).
    """
    from ..errors import SpectraError

    C = M.shape[0]
    if isinstance(offset, str) and offset != "auto":
        raise SpectraError(f"expected offset 'auto', a number or one per channel, found {offset!r}")
    source = "given"
    if offset is None or isinstance(offset, str):
        rec = (getattr(image, "metadata", None) or {}).get("camera_offset")
        if rec is not None:
            offset, source = rec, "file"
    estimate = None
    if offset is None or isinstance(offset, str):
        estimate = estimate_offset(sample_fn(), M)
        vals, source = np.asarray(estimate["values"], float), "estimated"
    else:
        vals = np.asarray(offset, dtype=np.float64).ravel()
        if vals.size == 1:
            vals = np.full(C, float(vals[0]))
    rec = {"values": float(vals[0]) if vals.size and np.all(vals == vals[0]) else [float(v) for v in vals],
           "source": source}
    if estimate is not None:
        rec["estimate"] = estimate
    return vals, rec
