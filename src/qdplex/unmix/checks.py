"""Fit warnings: does the library explain the slide?

On the sampled pixels (offset removed, unmixed with the matrix actually used),
:func:`fit_warnings` compares the residual with the slide's own noise floor: the mean
square second difference of neighbouring raw pixel values over 6 (:mod:`qdplex.unmix._sample`),
which holds shot noise and read noise whatever the camera's gain. A good fit leaves a
residual a little below that floor (K of the C degrees of freedom are fitted, and
texture between neighbours lifts the floor: on synthetic slides with the right panel
the ratio is 0.5–0.8; a five-plex slide with a one-marker panel gives 2.6). Warnings, in plain words:

* the residual is more than :data:`RESIDUAL_RATIO` × the noise floor — something in
  the slide is not in the library (a wrong panel, a missing fluor, wrong spectra);
* a channel's residual is more than :data:`CHANNEL_RATIO` × its noise — that part of
  the spectrum is left unexplained (named by its wavelengths);
* the darkest pixels sit well above zero in every channel although the offset given
  was smaller — a camera offset missing from the panel or file.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_quality", "fit_warnings", "RESIDUAL_RATIO", "CHANNEL_RATIO"]

RESIDUAL_RATIO = 2.0
CHANNEL_RATIO = 3.5
MAX_PIXELS = 4096


def _label(ch) -> str:
    e = getattr(ch, "emission_nm", None)
    return f"{ch.name}" if e is None or ch.name.endswith("nm") else f"{ch.name} ({e:g} nm)"


def fit_quality(sample, M: np.ndarray, offset: np.ndarray, unmix_fn) -> dict:
    """Residual against the noise floor on the sample: overall and per channel."""
    Yc = sample.subset(MAX_PIXELS, seed=1) - np.asarray(offset, np.float32)[:, None]
    A = unmix_fn(Yc, M)
    R = Yc - M.astype(np.float32) @ A
    noise = np.maximum(sample.noise_var, 1e-12)
    per = np.sqrt(np.mean(R * R, axis=1) / noise)
    ratio = float(np.sqrt(np.mean(R * R) / np.mean(noise)))
    return {"residual_rms": float(np.sqrt(np.mean(R * R))), "noise_rms": float(np.sqrt(np.mean(noise))),
            "residual_to_noise": round(ratio, 3), "channel_residual_to_noise": [round(float(v), 3) for v in per],
            "pixels": int(Yc.shape[1])}


def fit_warnings(quality: dict, channels, offset_record: dict, dark_estimate: dict | None, names) -> list[str]:
    """Plain-language warnings from :func:`fit_quality` and the offset record."""
    out = []
    ratio = quality["residual_to_noise"]
    if ratio > RESIDUAL_RATIO:
        out.append(f"the unmixing residual is {ratio:.1f}× the slide's noise floor: the library ({', '.join(names)}) "
                   f"does not explain the slide — a wrong panel, a fluor missing from the panel, or wrong spectra")
    per = np.asarray(quality["channel_residual_to_noise"])
    bad = [i for i in np.flatnonzero(per > CHANNEL_RATIO)]
    if bad:
        labels = [_label(channels[i]) for i in bad]
        shown = ", ".join(labels[:6]) + (f" and {len(labels) - 6} more" if len(labels) > 6 else "")
        out.append(f"channel{'s' if len(bad) > 1 else ''} {shown} left unexplained (residual up to "
                   f"{per[bad].max():.1f}× the noise): a fluor missing from the panel or library emits there")
    if dark_estimate is not None and offset_record.get("source") != "estimated":
        given = np.atleast_1d(np.asarray(offset_record["values"], float))
        est = np.asarray(dark_estimate["values"], float)
        noise = quality["noise_rms"]
        if np.all(est - given > np.maximum(3.0 * noise, 0.05 * np.maximum(est, 1e-9))):
            out.append(f"the darkest pixels sit at about {float(np.median(est)):.0f} counts in every channel while the "
                       f"camera offset used is {float(np.median(given)):g}: the camera offset is likely missing — "
                       f"set [unmixing] offset = \"auto\" or the camera's dark level")
    return out
