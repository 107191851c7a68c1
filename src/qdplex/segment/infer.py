"""The shipped nucleus model at run time: onnxruntime, offline, no deep-learning framework.

:func:`model_nuclei` segments a 2-D nuclear image with an ONNX model made by
:mod:`.train` (the shipped :data:`DEFAULT_MODEL` unless another file is given):

1. **Scale.** The image is resampled (bilinear) so that its typical nucleus is
   :data:`~qdplex.segment.model.NOMINAL_DIAMETER` pixels across. The nucleus
   diameter comes from the caller, or is measured by the model itself
   (:func:`estimate_diameter_model`): the model looks at a crop at a ladder
   of scales and keeps the one at which what it finds is its nominal size.
2. **Intensity.** ``(image - p1) / (p99.8 - p1)`` with percentiles of the
   whole image (or of the slide, for a tile); a flat image has no nuclei.
3. **Probabilities.** The network runs on overlapping 768² tiles (at the
   model's scale, 32 px of context on each side) batched through onnxruntime;
   each tile contributes its centre.
4. **Instances.** Seeds are the connected interior regions (probability of
   "interior" > 0.5); a seeded watershed of the interior probability grows them
   over the foreground (interior + boundary > 0.5); unseeded foreground blobs of
   nucleus size become nuclei of their own; specks are dropped and holes filled.
5. The labels are mapped back to the original pixel grid (nearest neighbour), and
   objects no brighter than the background's noise allows are dropped
   (:func:`drop_faint`: noise that the normalisation stretched on an almost empty field).
"""

from __future__ import annotations

import json
import math
import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import SegmentationError
from . import _kernels
from .model import NOMINAL_DIAMETER, median_diameter, normalise, normalise_levels

__all__ = ["DEFAULT_MODEL", "NucleusModel", "load_model", "model_nuclei", "estimate_diameter_model", "drop_faint",
           "available"]

#: The model shipped with qdplex.
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "nuclei.onnx"
#: Side of the tiles the network sees, and the context each keeps around its core (model-scale px).
NET_TILE, NET_MARGIN = 768, 32
#: Largest rescale factor allowed either way (beyond it the nucleus size is implausible for the image).
MAX_ZOOM = 16.0


def available() -> bool:
    """Whether onnxruntime is importable (the model needs it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


class NucleusModel:
    """An ONNX nucleus model: ``probabilities`` of background / interior / boundary per pixel.

    Pickles as its path (an onnxruntime session cannot be pickled): a dask worker that
    receives a tile task loads the model once itself, from the same file.
    """

    def __reduce__(self):
        return (load_model, (str(self.path),))

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SegmentationError(f"expected a nucleus model (.onnx) at {self.path}, found no such file")
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise SegmentationError(
                f"expected onnxruntime to run the nucleus model {self.path.name}, found it not installed "
                "(pip install onnxruntime, or use method='classical')"
            ) from exc
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, min(int(os.cpu_count() or 1), 8))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own (non-public) exception types
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise SegmentationError(f"expected a readable ONNX nucleus model in {self.path}, found a file onnxruntime cannot load ({first})") from None
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        shape_in = ins[0].shape if ins else None
        shape_out = outs[0].shape if outs else None
        ok = (
            len(ins) == 1
            and len(outs) >= 1
            and len(shape_in) == 4
            and shape_in[1] == 1
            and ins[0].type == "tensor(float)"
            and len(shape_out) == 4
            and shape_out[1] == 3
        )
        if not ok:
            found = ", ".join(f"{i.name}{list(i.shape)} {i.type}" for i in ins) or "no inputs"
            found_out = ", ".join(f"{o.name}{list(o.shape)}" for o in outs) or "no outputs"
            raise SegmentationError(
                f"expected a nucleus model in {self.path} with one float input N×1×H×W and output N×3×H×W, "
                f"found inputs {found} and outputs {found_out}"
            )
        self.input_name = ins[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.nominal = float(json.loads(meta.get("nominal_diameter_px", json.dumps(NOMINAL_DIAMETER))))
        self.card = json.loads(meta["card"]) if "card" in meta else {}
        self._lock = threading.Lock()

    def probabilities(self, x: np.ndarray, *, batch: int = 2) -> np.ndarray:
        """3×H×W class probabilities of a normalised float32 image at the model's scale."""
        H, W = x.shape
        core = NET_TILE - 2 * NET_MARGIN
        if H <= NET_TILE and W <= NET_TILE:
            boxes = [(0, 0, H, W)]
        else:
            boxes = [(y, x0, min(y + core, H), min(x0 + core, W)) for y in range(0, H, core) for x0 in range(0, W, core)]
        out = np.empty((3, H, W), np.float32)
        pending = []

        def flush():
            side_h = max(b[1].shape[0] for b in pending)
            side_w = max(b[1].shape[1] for b in pending)
            arr = np.stack([np.pad(t, ((0, side_h - t.shape[0]), (0, side_w - t.shape[1])), mode="reflect" if min(t.shape) > 1 else "edge") for _, t in pending])
            with self._lock:
                prob = self.session.run(None, {self.input_name: arr[:, None]})[0]
            for (box, _), p, in zip(pending, prob):
                (y0, x0, y1, x1), (py, px) = box
                out[:, y0:y1, x0:x1] = p[:, py : py + y1 - y0, px : px + x1 - x0]
            pending.clear()

        for y0, x0, y1, x1 in boxes:
            ry0, rx0 = max(y0 - NET_MARGIN, 0), max(x0 - NET_MARGIN, 0)
            ry1, rx1 = min(y1 + NET_MARGIN, H), min(x1 + NET_MARGIN, W)
            t = x[ry0:ry1, rx0:rx1]
            # pad to a multiple of 8 (three poolings) with mirrored pixels
            ph, pw = -t.shape[0] % 8, -t.shape[1] % 8
            ph = max(ph, 16 - t.shape[0]) if t.shape[0] < 16 else ph
            pw = max(pw, 16 - t.shape[1]) if t.shape[1] < 16 else pw
            if ph or pw:
                mode = "reflect" if min(t.shape) > max(ph, pw) else "symmetric"
                t = np.pad(t, ((0, ph), (0, pw)), mode=mode)
            pending.append((((y0, x0, y1, x1), (y0 - ry0, x0 - rx0)), t))
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        return out


@lru_cache(maxsize=4)
def _cached(path: str, mtime: float, size: int) -> NucleusModel:
    return NucleusModel(path)


def load_model(path=None) -> NucleusModel:
    """The nucleus model at ``path`` (default: the shipped one), loaded once per file version."""
    p = Path(path) if path is not None else DEFAULT_MODEL
    if not p.is_file():
        raise SegmentationError(f"expected a nucleus model (.onnx) at {p}, found no such file")
    st = p.stat()
    return _cached(str(p.resolve()), st.st_mtime, st.st_size)


# --------------------------------------------------------------------------- resampling
# The model's grid is anchored at the image (or slide) origin: model pixel J sits at
# input coordinate (J + 0.5) / scale - 0.5, so a tile and the whole image see the same samples.
def _grid(start: int, stop: int, scale: float) -> tuple[int, int]:
    """Model-grid indices [J0, J1) covering input pixels [start, stop)."""
    return int(math.floor(start * scale)), max(int(math.ceil(stop * scale)), int(math.floor(start * scale)) + 1)


def _resize(img: np.ndarray, scale: float, origin=(0, 0)) -> np.ndarray:
    """Bilinear samples of ``img`` (whose first pixel is at ``origin``) on the model's grid."""
    H, W = img.shape
    (jy0, jy1), (jx0, jx1) = _grid(origin[0], origin[0] + H, scale), _grid(origin[1], origin[1] + W, scale)
    if scale == 1.0:
        return img
    z = 1.0 / scale
    off = ((jy0 + 0.5) * z - 0.5 - origin[0], (jx0 + 0.5) * z - 0.5 - origin[1])
    return ndi.affine_transform(img, np.array([z, z]), offset=off, output_shape=(jy1 - jy0, jx1 - jx0), order=1, mode="nearest")


def _labels_to(labels: np.ndarray, shape, scale: float, origin=(0, 0)) -> np.ndarray:
    """Nearest-neighbour resampling of model-grid labels back to the input pixels."""
    if scale == 1.0:
        return labels
    H, W = shape
    h, w = labels.shape
    jy0, jx0 = _grid(origin[0], origin[0] + H, scale)[0], _grid(origin[1], origin[1] + W, scale)[0]
    iy = np.clip(np.floor((np.arange(H) + origin[0] + 0.5) * scale).astype(np.int64) - jy0, 0, h - 1)
    ix = np.clip(np.floor((np.arange(W) + origin[1] + 0.5) * scale).astype(np.int64) - jx0, 0, w - 1)
    return labels[iy[:, None], ix[None, :]]


def scaled_shape(shape, scale: float, *, what: str = "nuclear image") -> tuple[int, int]:
    """The image shape at the model's scale; SegmentationError when it cannot hold a nucleus or is huge."""
    if not (math.isfinite(scale) and 1.0 / MAX_ZOOM <= scale <= MAX_ZOOM):
        raise SegmentationError(
            f"expected a nucleus diameter within {MAX_ZOOM:g}× of the model's {NOMINAL_DIAMETER:g} px "
            f"(rescale factor {1 / MAX_ZOOM:g}–{MAX_ZOOM:g}), found a rescale factor of {scale:.3g} for the {what} of shape {tuple(shape)}"
        )
    h, w = (max(int(round(s * scale)), 1) for s in shape)
    if min(h, w) < NOMINAL_DIAMETER:
        raise SegmentationError(
            f"expected a {what} at least one nucleus ({NOMINAL_DIAMETER:g} px at the model's scale) on each side, "
            f"found shape {tuple(shape)} ({h}×{w} at the model's scale)"
        )
    return h, w


# --------------------------------------------------------------------------- instances
def instances(prob: np.ndarray, *, min_area: float | None = None) -> np.ndarray:
    """Nucleus labels (int32) from 3×H×W class probabilities at the model's scale (module docstring, step 4)."""
    p_int = prob[1]
    fg = (prob[1] + prob[2]) > 0.5
    if not fg.any():
        return np.zeros(p_int.shape, np.int32)
    r = NOMINAL_DIAMETER / 2.0
    min_area = max(0.1 * math.pi * r * r, 8.0) if min_area is None else float(min_area)
    seeds, ns = ndi.label((p_int > 0.5) & fg)
    if ns:
        area = np.bincount(seeds.ravel(), minlength=ns + 1)
        small = area < 3
        small[0] = False
        if small.any():
            seeds[small[seeds]] = 0
    # a foreground component without a seed becomes one nucleus
    comp, nc = ndi.label(fg)
    has = np.zeros(nc + 1, bool)
    has[comp[seeds > 0]] = True
    has[0] = True
    if not has.all():
        start = int(seeds.max())
        extra = np.zeros(nc + 1, np.int32)
        miss = np.flatnonzero(~has)
        extra[miss] = start + np.arange(1, miss.size + 1)
        add = extra[comp]
        seeds = np.where(add > 0, add, seeds)
    labels = _kernels.flood(1.0 - p_int, seeds.astype(np.int64), fg)
    from .nuclei import _clean, _fill_holes

    labels = _fill_holes(labels)
    return _clean(labels, min_area=min_area).astype(np.int32)


# --------------------------------------------------------------------------- public
def _segment_scaled(model: NucleusModel, img: np.ndarray, scale: float, levels, origin=(0, 0)):
    """(labels at the model's scale, labels on the image grid) for rescale factor ``scale``."""
    scaled_shape(img.shape, scale)
    x = normalise(_resize(img, scale, origin), levels)
    small = instances(model.probabilities(x))
    return small, _labels_to(small, img.shape, scale, origin)


#: Smallest nucleus diameter (pixels) the model measures.
MIN_DIAMETER = 4.0


def _probe(m: NucleusModel, img: np.ndarray, d: float, levels, crop: int):
    """For a guess ``d``: (scale, median diameter at the model's scale of the nuclei off the
    crop's edge or None, the model's confidence: mean top-class probability where it sees any nucleus)."""
    scale = float(np.clip(m.nominal / d, 1.0 / MAX_ZOOM, MAX_ZOOM))
    side = int(min(crop / scale, 4096))
    H, W = img.shape
    y0, x0 = max((H - side) // 2, 0), max((W - side) // 2, 0)
    sub = img[y0 : y0 + side, x0 : x0 + side]
    if min(sub.shape) * scale < NOMINAL_DIAMETER:
        return scale, None, 0.0
    scaled_shape(sub.shape, scale)
    prob = m.probabilities(normalise(_resize(sub, scale), levels))
    small = instances(prob)
    seen = prob[0] < 0.9
    conf = float(prob.max(axis=0)[seen].mean()) if seen.any() else 0.0
    edge = np.unique(np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]]))
    inner = np.where(np.isin(small, edge), 0, small)
    return scale, median_diameter(inner) or median_diameter(small), conf


#: Nucleus diameters (pixels) at which :func:`estimate_diameter_model` looks (steps of ~1.45×).
CANDIDATES = (4.5, 6.5, 9.5, 13.5, 19.5, 28.0, 40.0, 58.0, 84.0)


#: Weight of the scale mismatch |log(D(c)/c)| against the confidence in choosing a candidate.
MISMATCH_WEIGHT = 0.1
#: With a known pixel size, nuclei are taken to be this many µm across at least and at most.
PLAUSIBLE_UM = (3.5, 20.0)


def estimate_diameter_model(image, *, model=None, levels=None, crop: int = 384, pixel_size_um: float | None = None) -> float | None:
    """Typical nucleus diameter (pixels) of ``image`` measured by the model.

    For each candidate diameter ``c`` in :data:`CANDIDATES` (those for which
    the image holds at least one nucleus at the model's scale), the model runs
    on a central crop (``crop`` pixels at the model's scale) resampled as if
    the nuclei were ``c`` wide. It records the model's confidence (the mean
    top-class probability wherever it sees any nucleus) and the implied
    diameter ``D(c)``: the median equivalent diameter of what it finds (nuclei
    off the crop's edge) divided by the rescale factor. The model is most
    confident near the right scale — nuclei seen much too small are split
    into uncertain pieces, seen much too large they blur into uncertain
    blobs — and there ``D(c) ≈ c``; the candidate with the highest confidence
    minus :data:`MISMATCH_WEIGHT` × ``|log(D(c)/c)|`` wins, and one more pass
    at ``D(c)`` refines it. With ``pixel_size_um`` the candidates and the answer are kept
    to nuclei of :data:`PLAUSIBLE_UM` µm. None when no nucleus is found at any scale.
    """
    from ._checks import check_image, check_positive

    m = model if isinstance(model, NucleusModel) else load_model(model)
    img = check_image(image, "nuclear image")
    levels = normalise_levels(img) if levels is None else levels
    if not levels[1] > levels[0]:
        return None
    lo, hi = MIN_DIAMETER, float(max(img.shape))
    if pixel_size_um is not None:
        px = check_positive(pixel_size_um, "pixel_size_um")
        lo, hi = max(lo, PLAUSIBLE_UM[0] / px), min(hi, max(PLAUSIBLE_UM[1] / px, lo))
    cands = [c for c in CANDIDATES if lo / 1.2 <= c <= hi * 1.2] or [float(np.sqrt(lo * hi))]
    seen = []
    for c in cands:
        scale, md, conf = _probe(m, img, c, levels, crop)
        if md is not None:
            seen.append((conf, abs(math.log(md / scale / c)), md / scale))
    if not seen:
        return None
    _, err, d = max(seen, key=lambda s: s[0] - MISMATCH_WEIGHT * s[1])
    scale, md, _ = _probe(m, img, d, levels, crop)
    if md is not None and abs(math.log(md / scale / d)) < err:
        d = md / scale
    return float(np.clip(d, lo, hi))


def model_nuclei(image, diameter_px: float | None = None, *, model=None, levels=None, origin=(0, 0),
                 pixel_size_um: float | None = None) -> np.ndarray:
    """Nucleus labels (uint32, 0 background) of a 2-D image by the ONNX nucleus model.

    Parameters
    ----------
    image : numpy.ndarray
        Checked float32 2-D nuclear image.
    diameter_px : float, optional
        Typical nucleus diameter in pixels; measured by the model when not given.
    model : str or path or NucleusModel, optional
        The ONNX file (default: the shipped model).
    levels : (float, float), optional
        Intensities mapped to 0 and 1 (a slide's, for a tile); the image's own percentiles by default.
    origin : (int, int)
        Position of the image's first pixel in the slide (a tile's offset), so
        that tiles are resampled on the slide's grid.
    pixel_size_um : float, optional
        Bounds the measured diameter to plausible nuclei (:data:`PLAUSIBLE_UM`).
    """
    m = model if isinstance(model, NucleusModel) else load_model(model)
    levels = normalise_levels(image) if levels is None else levels
    if not levels[1] > levels[0]:
        return np.zeros(image.shape, np.uint32)
    d = diameter_px
    if d is None:
        d = estimate_diameter_model(image, model=m, levels=levels, pixel_size_um=pixel_size_um)
        if d is None:
            return np.zeros(image.shape, np.uint32)
    _, labels = _segment_scaled(m, image, m.nominal / float(d), levels, origin)
    return drop_faint(labels, image, window=int(round(FAINT_WINDOW * float(d)))).astype(np.uint32)


#: A nucleus's mean must stand this many pixel-noise σ above the background (:func:`drop_faint`).
FAINT_SNR = 4.0
#: The background around a nucleus is measured within this many nucleus diameters.
FAINT_WINDOW = 4.0
#: Fewest background pixels to measure background and noise from (else nothing is dropped).
MIN_BACKGROUND_PX = 200


def faint_objects(labels: np.ndarray, image: np.ndarray, *, snr: float = FAINT_SNR, window: int | None = None) -> np.ndarray:
    """Per label ID (index 0 is the background, never faint), whether the object's mean
    intensity is less than ``snr`` × the pixel noise above the background.

    On an almost empty field the intensity normalisation stretches noise until the model
    sees nuclei in it; such objects are no brighter than the background they sit on. The
    background pixels are those at least 3 px from every object; an object's background
    is their mean within about ``window`` × ``window`` pixels around each of its pixels
    (blocks of a quarter window, averaged over 4 × 4 blocks; so that
    uneven illumination does not hide dim nuclei on its dark side; where no background
    pixel is that close, and with ``window=None``, the median of all of them); the noise σ
    comes from second differences of horizontally neighbouring background pixels on up
    to ~512 evenly spaced rows (``var(a − 2b + c) = 6σ²``: a smooth background gradient or
    vignetting cancels). Chosen on the validation split of ``nuclei_train``: at 4σ no true nucleus of it was
    dropped. With fewer than :data:`MIN_BACKGROUND_PX` background pixels (tissue edge
    to edge) nothing is faint.
    """
    n = int(labels.max())
    none = np.zeros(n + 1, bool)
    if n == 0:
        return none
    img = np.asarray(image, np.float32)
    bg_mask = ~ndi.binary_dilation(labels > 0, iterations=3)
    rows = slice(None, None, max(1, img.shape[0] // 512))  # a few hundred rows hold plenty of noise samples
    sub, sub_mask = img[rows], bg_mask[rows]
    trip = sub_mask[:, 2:] & sub_mask[:, 1:-1] & sub_mask[:, :-2]
    if int(bg_mask.sum()) < MIN_BACKGROUND_PX or int(trip.sum()) < min(MIN_BACKGROUND_PX, int(bg_mask.sum()) // 4):
        return none
    d2 = (sub[:, 2:] - 2.0 * sub[:, 1:-1] + sub[:, :-2])[trip]
    sigma = float(np.sqrt(np.mean(d2.astype(np.float64) ** 2) / 6.0))
    values = img[bg_mask]
    bg = float(np.median(values[:: max(1, values.size // 1_000_000)]))
    where_obj = np.flatnonzero(labels.ravel())  # only object pixels enter the per-object sums
    lab = labels.ravel()[where_obj].astype(np.int64)
    area = np.bincount(lab, minlength=n + 1)
    total = np.bincount(lab, weights=img.ravel()[where_obj], minlength=n + 1)
    if window is not None and window >= 3:
        # background sums on blocks of a quarter window, box-averaged over 4 × 4 blocks (≈ the
        # window): the local background is smooth at that scale, and the full-resolution box
        # filters cost ten times more
        blk = max(1, int(window) // 4)
        H, W = img.shape
        ry, rx = np.arange(0, H, blk), np.arange(0, W, blk)
        v = np.where(bg_mask, img, np.float32(0.0))
        tot = np.add.reduceat(np.add.reduceat(v, ry, axis=0, dtype=np.float64), rx, axis=1)
        cnt = np.add.reduceat(np.add.reduceat(bg_mask, ry, axis=0, dtype=np.int64), rx, axis=1).astype(np.float64)
        tot, cnt = (ndi.uniform_filter(a, 4, mode="constant") for a in (tot, cnt))
        local = np.where(cnt > 1e-9, tot / np.maximum(cnt, 1e-9), bg).astype(np.float32)
        local = np.repeat(np.repeat(local, blk, axis=0)[:H], blk, axis=1)[:, :W]
        bg = np.bincount(lab, weights=local.ravel()[where_obj], minlength=n + 1) / np.maximum(area, 1)
    faint = total / np.maximum(area, 1) - bg < snr * sigma
    faint[0] = False
    faint[area == 0] = False
    return faint


def drop_faint(labels: np.ndarray, image: np.ndarray, *, snr: float = FAINT_SNR, window: int | None = None) -> np.ndarray:
    """``labels`` without its :func:`faint_objects` (IDs renumbered 1…n)."""
    faint = faint_objects(labels, image, snr=snr, window=window)
    if not faint.any():
        return labels
    keep = np.zeros(faint.size, labels.dtype)
    kept = np.flatnonzero(~faint[1:]) + 1
    keep[kept] = np.arange(1, kept.size + 1, dtype=labels.dtype)
    return keep[labels]
