"""Benchmark: qdplex's full per-cell table against steinbock's ``measure_intensites``.

A 4096×4096 image with 8 float32 channels and about 25,000 cells (nuclei on a
jittered grid, cells grown around them, a 2-pixel membrane ring). In one run it
times, each in its own fresh subprocess (so peak memory is that of one method):

* qdplex: ``quantify(image, Segmentation)`` — mean, std and sum of every channel in
  each of the four compartments (nucleus, cytoplasm, membrane, cell: 12 statistics
  per channel) plus the MCQuant morphology, perimeter and centroids;
* steinbock: ``measure_intensites(img, cells, names, IntensityAggregation.MEAN)`` —
  the mean of each channel over the cell mask alone (1 statistic per channel).

The compartment label images are inputs for both (segmentation output), so the
membrane ring is derived before the clock starts. Numba kernels are compiled (or
loaded from cache) on a small image first. It prints both times, their ratio, and
qdplex's memory relative to the image's size: the peak memory the call adds (peak
RSS minus RSS before the call, and the Python-allocated peak seen by tracemalloc),
and, for transparency, the whole process's peak RSS, which also counts the inputs
(the image and three label images) and the imported libraries. Targets (issue 5):
time ratio ≤ 0.5, and peak memory of the quantification ≤ 2× the image.

Run::

    .venv/bin/python benchmarks/bench_quantify.py            # full size
    .venv/bin/python benchmarks/bench_quantify.py --size 1024 --cells 1600   # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHANNELS = 8


def make_data(size: int, n_cells: int, seed: int = 0):
    """Nuclei on a jittered grid (random ellipses), cells expanded around them, a membrane ring."""
    from skimage.draw import ellipse
    from skimage.segmentation import expand_labels

    from qdplex.segment import membrane_ring

    rng = np.random.default_rng(seed)
    step = size / np.sqrt(n_cells)
    centres = np.arange(step / 2, size, step)
    nuclei = np.zeros((size, size), np.uint32)
    lab = 0
    for cy in centres:
        for cx in centres:
            lab += 1
            r, c = ellipse(cy + rng.uniform(-step / 5, step / 5), cx + rng.uniform(-step / 5, step / 5),
                           rng.uniform(0.18, 0.28) * step, rng.uniform(0.14, 0.24) * step,
                           shape=nuclei.shape, rotation=rng.uniform(0, np.pi))
            nuclei[r, c] = 2 * lab  # non-contiguous IDs (steinbock keeps IDs as uint16: < 65536)
    cells = expand_labels(nuclei, int(step * 0.3)).astype(np.uint32)
    membrane = membrane_ring(cells, 2)
    img = np.empty((CHANNELS, size, size), np.float32)
    for k in range(CHANNELS):
        img[k] = rng.gamma(2.0, 100.0, size=(size, size)).astype(np.float32)
    return img, nuclei, cells, membrane


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(method: str, folder: str) -> None:
    """Run one method in this (fresh) process and print a JSON line of its figures."""
    import tracemalloc

    folder = Path(folder)
    img = np.load(folder / "img.npy")
    cells = np.load(folder / "cells.npy")
    names = [f"ch{k}" for k in range(img.shape[0])]
    if method == "qdplex":
        from qdplex.model import Segmentation
        from qdplex.quantify import quantify

        nuclei = np.load(folder / "nuclei.npy")
        membrane = np.load(folder / "membrane.npy")
        # compile / load the kernels on a small crop first
        small = Segmentation(nuclei[:256, :256], cells[:256, :256])
        small.__dict__["membrane"] = membrane[:256, :256]
        quantify(img[:, :256, :256], small, channel_names=names)
        seg = Segmentation(nuclei, cells)
        seg.__dict__["membrane"] = membrane
        rss0 = _peak_rss_mb()
        tracemalloc.start()
        t = time.perf_counter()
        table = quantify(img, seg, channel_names=names)
        dt = time.perf_counter() - t
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        n_stats = sum(1 for c in table.columns if c.startswith("ch"))
        means = table[[f"{n}_cell_mean" for n in names]].to_numpy()
        np.save(folder / "means_qdplex.npy", means)
        np.save(folder / "ids_qdplex.npy", table.index.to_numpy())
        out = {"seconds": dt, "rows": len(table), "statistics": n_stats, "peak_rss_mb": _peak_rss_mb(),
               "rss_before_mb": rss0, "traced_peak_mb": traced / 2**20}
    else:
        from steinbock.measurement.intensities import IntensityAggregation, measure_intensites

        measure_intensites(img[:, :256, :256], cells[:256, :256], names, IntensityAggregation.MEAN)
        t = time.perf_counter()
        table = measure_intensites(img, cells, names, IntensityAggregation.MEAN)
        dt = time.perf_counter() - t
        out = {"seconds": dt, "rows": len(table), "statistics": table.shape[1], "peak_rss_mb": _peak_rss_mb()}
        np.save(folder / "means_steinbock.npy", table.to_numpy())
        np.save(folder / "ids_steinbock.npy", table.index.to_numpy())
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--cells", type=int, default=25_000)
    p.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    t = time.perf_counter()
    img, nuclei, cells, membrane = make_data(args.size, args.cells)
    n = int(np.unique(cells[cells > 0]).size)
    img_mb = img.nbytes / 2**20
    print(f"data: {img.shape[0]}×{img.shape[1]}×{img.shape[2]} float32 ({img_mb:.0f} MB), {n} cells, "
          f"made in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory(prefix="qdplex-bench-") as folder:
        for name, arr in (("img", img), ("nuclei", nuclei), ("cells", cells), ("membrane", membrane)):
            np.save(Path(folder) / f"{name}.npy", arr)
        del img, nuclei, cells, membrane
        res = {}
        for method in ("steinbock", "qdplex"):
            proc = subprocess.run([sys.executable, __file__, "--child", method, folder],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            res[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        same_ids = np.array_equal(np.load(Path(folder) / "ids_qdplex.npy"), np.load(Path(folder) / "ids_steinbock.npy"))
        diff = np.abs(np.load(Path(folder) / "means_qdplex.npy") - np.load(Path(folder) / "means_steinbock.npy")).max()
    q, s = res["qdplex"], res["steinbock"]
    ratio = q["seconds"] / s["seconds"]
    print(f"steinbock measure_intensites(MEAN), cell mask: {s['seconds']:.2f} s "
          f"({s['statistics']} statistics × {s['rows']} cells)")
    print(f"qdplex quantify full table:                    {q['seconds']:.2f} s "
          f"({q['statistics']} statistics × {q['rows']} cells, + morphology)")
    print(f"time ratio qdplex / steinbock: {ratio:.2f}  (target ≤ 0.5)  "
          f"for {q['statistics'] / s['statistics']:.0f}× the statistics")
    extra = q["peak_rss_mb"] - q["rss_before_mb"]
    print(f"qdplex peak RSS {q['peak_rss_mb']:.0f} MB = {q['peak_rss_mb'] / img_mb:.2f}× the image "
          f"counting the image, 3 label images and the Python libraries ({q['rss_before_mb']:.0f} MB before the call)")
    print(f"qdplex memory added by the call: {extra:.0f} MB RSS = {extra / img_mb:.2f}× the image (target ≤ 2); "
          f"Python-allocated peak {q['traced_peak_mb']:.0f} MB = {q['traced_peak_mb'] / img_mb:.2f}×; "
          f"steinbock peak RSS {s['peak_rss_mb']:.0f} MB")
    print(f"cell means equal steinbock's: same cell IDs {same_ids}, max |difference| {diff:.2e} (target ≤ 1e-5)")
    ok = same_ids and diff <= 1e-5 and ratio <= 0.5 and extra <= 2 * img_mb and q["traced_peak_mb"] <= 2 * img_mb
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
