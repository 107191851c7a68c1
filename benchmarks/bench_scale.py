"""Whole-slide scaling: time and peak memory of the tiled flow at two slide sizes (area ×4).

Runs :func:`qdplex.pipeline.process_slide` (read → unmix → segment → quantify → score →
write, tile by tile through :mod:`qdplex.wholeslide`) on a synthetic 28-band λ-stack
slide of side N and of side 2N, each in its own subprocess, and prints wall time and
peak RSS (``ru_maxrss`` of that subprocess) for each, and their ratios. Targets
(issue 6): memory ratio ≤ 1.3, time ratio ≤ 4.6 (the area ratio is 4).

``--baseline`` also runs the in-memory flow (:func:`qdplex.pipeline.run_slide`) at both
sizes, whose memory grows with the slide. ``--full`` runs the 8192×8192, 28-band slide
end to end (targets ≤ 5 min and peak RSS ≤ 4 GB).

Slides are generated out of core: tiles of a few distinct synthetic fields
(:func:`qdplex.synth.make_slide`, each tile a real slide with its own nuclei, cells and
noise) are laid out on the grid in their 8 rotations/reflections and streamed to a
tiled OME-TIFF by :func:`qdplex.io.write_ome_tiff`; no whole-slide array is ever built.
Generated slides are cached in ``--workdir``.

Usage::

    .venv/bin/python benchmarks/bench_scale.py                 # 2048² and 4096²
    .venv/bin/python benchmarks/bench_scale.py --small 1024    # quicker: 1024² and 2048²
    .venv/bin/python benchmarks/bench_scale.py --full          # also 8192² (≤ 5 min, ≤ 4 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PANEL = ROOT / "pipelines" / "breast-5plex.toml"
WAVELENGTHS = (420.0, 690.0, 10.0)  # 28 bands
PIXEL_SIZE_UM = 0.5
GEN_TILE = 1024


# --------------------------------------------------------------------------- slide generation
def _make_tile(args) -> str:
    """One distinct synthetic field (C×T×T uint16), saved as .npy; returns its path."""
    seed, tile, path = args
    if not Path(path).is_file():
        from qdplex.panel import read_panel
        from qdplex.synth import make_slide

        s = make_slide(read_panel(PANEL), shape=(tile, tile), pixel_size_um=PIXEL_SIZE_UM,
                       wavelengths=WAVELENGTHS, seed=seed, name=f"tile{seed}")
        tmp = str(path) + ".part.npy"
        np.save(tmp, np.asarray(s.image.data))
        os.replace(tmp, path)
    return str(path)


def _variant(path: str, k: int) -> np.ndarray:
    a = np.load(path, mmap_mode="r")
    a = np.rot90(a, k % 4, axes=(1, 2))
    if k >= 4:
        a = a[:, :, ::-1]
    return np.ascontiguousarray(a)


def make_large_slide(side: int, workdir: Path, *, distinct: int = 8, tile: int = GEN_TILE) -> Path:
    """A ``side``×``side`` 28-band synthetic λ-stack OME-TIFF, written tile by tile (cached)."""
    import dask
    import dask.array as da

    from qdplex.io import write_ome_tiff
    from qdplex.synth import lambda_channels

    out = workdir / "slides" / f"scale{side}.ome.tif"
    if out.is_file():
        return out
    if side % tile:
        raise SystemExit(f"slide side {side} must be a multiple of the generator tile {tile}")
    tiles_dir = workdir / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(1000 + k, tile, tiles_dir / f"tile{tile}_{1000 + k}.npy") for k in range(distinct)]
    todo = [j for j in jobs if not j[2].is_file()]
    if todo:
        print(f"generating {len(todo)} distinct {tile}² fields ...", flush=True)
        with ProcessPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as ex:
            list(ex.map(_make_tile, todo))
    paths = [str(j[2]) for j in jobs]
    chans = lambda_channels(*WAVELENGTHS)
    g = side // tile
    rows = []
    for i in range(g):
        row = []
        for j in range(g):
            n = i * g + j
            block = dask.delayed(_variant)(paths[n % distinct], (n // distinct + i) % 8)
            row.append(da.from_delayed(block, shape=(len(chans), tile, tile), dtype=np.uint16))
        rows.append(row)
    arr = da.block(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        write_ome_tiff(out, arr, chans, pixel_size_um=PIXEL_SIZE_UM, name=f"scale{side}")
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
    return out


# --------------------------------------------------------------------------- measured runs
def _child(slide: str, out: str, mode: str, tile: int) -> None:
    """Run one slide in this (fresh) process and print its timings as JSON."""
    from qdplex.panel import read_panel

    panel = read_panel(PANEL)
    t = time.perf_counter()
    if mode == "tiled":
        from qdplex.pipeline import process_slide

        row = process_slide(slide, panel, out, report=False, tile=tile)
        timings = row["timings"]
    else:
        from qdplex.io import read_image
        from qdplex.pipeline import run_slide

        img = read_image(slide)
        img = type(img)(data=img.data.persist(), channels=img.channels, pixel_size_um=img.pixel_size_um,
                        name=img.name, source=img.source)
        res = run_slide(img, panel)
        timings = res.timings
    print(json.dumps({"seconds": time.perf_counter() - t, "timings": timings}), flush=True)


def measure(slide: Path, out: Path, mode: str, tile: int) -> dict:
    """Wall time and peak RSS of one run in a subprocess (``ru_maxrss`` via ``os.wait4``)."""
    cmd = [sys.executable, __file__, "--_child", str(slide), str(out), mode, str(tile)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stdout = proc.stdout.read().decode()
    stderr = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run on {slide.name} failed ({proc.returncode}):\n{stderr[-3000:]}")
    child = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "stages": child["timings"]}


def _fmt(r: dict) -> str:
    st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
    return f"{r['wall_s']:7.1f} s (CPU {r['cpu_s']:6.1f} s)  {r['peak_rss_gib']:5.2f} GiB   ({st})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=2048, help="side of the small slide (the large one is 2×)")
    ap.add_argument("--tile", type=int, default=1024, help="whole-slide tile size (default 1024)")
    ap.add_argument("--full", action="store_true", help="also run the 8192×8192 28-band slide end to end")
    ap.add_argument("--only-full", action="store_true", help="run only the 8192×8192 slide")
    ap.add_argument("--baseline", action="store_true", help="also run the in-memory flow at both sizes")
    ap.add_argument("--distinct", type=int, default=8, help="distinct synthetic fields in a generated slide")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qdplex-bench-scale",
                    help="where generated slides (cached) and outputs go")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        slide, out, mode, tile = args._child
        _child(slide, out, mode, int(tile))
        return 0

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"qdplex whole-slide scaling benchmark ({os.cpu_count()} CPUs), 28-band λ-stack, tile {args.tile}")
    ok = True
    # warm-up (not measured): numba kernels compiled and cached, files in the page cache
    warm = make_large_slide(GEN_TILE, work, distinct=args.distinct)
    measure(warm, work / "out" / "warmup", "tiled", args.tile)
    if not args.only_full:
        sizes = (args.small, 2 * args.small)
        slides = [make_large_slide(s, work, distinct=args.distinct) for s in sizes]
        res = {}
        for side, slide in zip(sizes, slides):
            res[side] = measure(slide, work / "out" / f"tiled{side}", "tiled", args.tile)
            print(f"tiled     {side:5d}²: {_fmt(res[side])}", flush=True)
        a, b = res[sizes[0]], res[sizes[1]]
        t_ratio = b["wall_s"] / a["wall_s"]
        m_ratio = b["peak_rss_gib"] / a["peak_rss_gib"]
        ok &= t_ratio <= 4.6 and m_ratio <= 1.3
        print(f"ratios {sizes[1]}² / {sizes[0]}² (area ×4): time {t_ratio:.2f} (target ≤ 4.6), "
              f"peak RSS {m_ratio:.2f} (target ≤ 1.3)  {'PASS' if t_ratio <= 4.6 and m_ratio <= 1.3 else 'FAIL'}; "
              f"CPU time ratio {b['cpu_s'] / a['cpu_s']:.2f}")
        if args.baseline:
            base = {}
            for side, slide in zip(sizes, slides):
                base[side] = measure(slide, work / "out" / f"mem{side}", "memory", args.tile)
                print(f"in-memory {side:5d}²: {_fmt(base[side])}", flush=True)
            print(f"in-memory peak RSS ratio {base[sizes[1]]['peak_rss_gib'] / base[sizes[0]]['peak_rss_gib']:.2f}; "
                  f"tiled / in-memory peak RSS at {sizes[1]}²: "
                  f"{b['peak_rss_gib'] / base[sizes[1]]['peak_rss_gib']:.2f}")
    if args.full or args.only_full:
        slide = make_large_slide(8192, work, distinct=args.distinct)
        r = measure(slide, work / "out" / "tiled8192", "tiled", args.tile)
        good = r["wall_s"] <= 300 and r["peak_rss_gib"] <= 4.0
        ok &= good
        print(f"tiled      8192²: {_fmt(r)}")
        print(f"8192×8192×28 end to end: {r['wall_s'] / 60:.1f} min (target ≤ 5), peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(target ≤ 4)  {'PASS' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
