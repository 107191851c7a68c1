"""Optional deep-learning nucleus backends: Cellpose and StarDist.

They are used only when the package *and* its weights are already on this
machine; qdplex never downloads anything at run time. When either is missing
a :class:`~qdplex.errors.SegmentationError` says what was expected and where.

- Cellpose: weights are looked up in ``$CELLPOSE_LOCAL_MODELS_PATH`` or
  ``~/.cellpose/models`` (``nucleitorch_0`` for ``model="nuclei"``, ``cpsam``
  for Cellpose 4), or ``model`` is a path to a weights file.
- StarDist: ``model`` is a local model folder, or a pretrained name
  (default ``2D_versatile_fluo``) already unpacked under
  ``~/.keras/models/StarDist2D/<name>``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import SegmentationError

__all__ = ["segment", "available"]


def available(method: str) -> bool:
    """Whether the package of ``method`` ("cellpose" or "stardist") is importable."""
    return importlib.util.find_spec(method) is not None


def _missing_package(method: str) -> SegmentationError:
    return SegmentationError(
        f"expected the optional {method!r} package for method={method!r}, found it not installed "
        f"(install {method} and its model weights locally, or use method='classical')"
    )


def _cellpose_weights(model: str | None) -> Path:
    if model and Path(model).is_file():
        return Path(model)
    home = Path(os.environ.get("CELLPOSE_LOCAL_MODELS_PATH", Path.home() / ".cellpose" / "models"))
    found = sorted(p.name for p in home.iterdir()) if home.is_dir() else []
    names = [model] if model else ["nucleitorch", "cpsam"]
    for name in names:
        hits = [f for f in found if f.startswith(name) and not f.endswith((".npy", ".tmp"))]
        if hits:
            return home / hits[0]
    raise SegmentationError(
        f"expected Cellpose weights {names} under {home}, found {found or 'none'} "
        "(qdplex never downloads weights: fetch them once with cellpose, or use method='classical')"
    )


def _cellpose(img: np.ndarray, d: float | None, model: str | None) -> np.ndarray:  # pragma: no cover
    if not available("cellpose"):
        raise _missing_package("cellpose")
    weights = _cellpose_weights(model)
    from cellpose import models

    net = models.CellposeModel(gpu=False, pretrained_model=str(weights))
    lo, hi = np.percentile(img, [1, 99.8])
    norm = np.clip((img - lo) / max(hi - lo, 1e-12), 0, None)
    try:
        out = net.eval(norm, diameter=d, channels=[0, 0])
    except TypeError:  # Cellpose ≥ 4 has no channels argument
        out = net.eval(norm, diameter=d)
    return np.asarray(out[0])


def _stardist_dir(model: str | None) -> Path:
    if model and Path(model).is_dir():
        return Path(model)
    name = model or "2D_versatile_fluo"
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / "StarDist2D" / name
    if not (cache.is_dir() and any(cache.rglob("*.h5"))):
        raise SegmentationError(
            f"expected StarDist weights for {name!r} in {cache}, found none "
            "(qdplex never downloads weights: fetch them once with stardist, or use method='classical')"
        )
    return cache


def _stardist(img: np.ndarray, d: float | None, model: str | None) -> np.ndarray:  # pragma: no cover
    if not available("stardist"):
        raise _missing_package("stardist")
    folder = _stardist_dir(model)
    from stardist.models import StarDist2D

    net = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
    lo, hi = np.percentile(img, [1, 99.8])
    norm = (img - lo) / max(hi - lo, 1e-12)
    # the versatile fluorescence model was trained on nuclei about 17 px across
    scale = None if not d else float(np.clip(17.0 / d, 0.25, 4.0))
    labels, _ = net.predict_instances(norm, scale=scale)
    return np.asarray(labels)


def segment(img: np.ndarray, d: float | None, *, method: str, model: str | None = None) -> np.ndarray:
    """Nucleus labels (uint32, 1..n) of a checked 2-D image by a deep backend."""
    from .nuclei import _clean

    run = {"cellpose": _cellpose, "stardist": _stardist}[method]
    labels = run(img, d, model)
    return _clean(labels, min_area=1)
