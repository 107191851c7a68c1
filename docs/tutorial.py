"""qdplex Python API tutorial: one multiplexed QD slide, step by step.

Run it with ``python docs/tutorial.py`` (tests/test_docs.py runs it too). It makes a
synthetic breast five-plex slide with known ground truth, then walks through every
stage of the pipeline with the public API and checks the results against the truth.
Outputs go to a temporary folder, or to ``$QDPLEX_TUTORIAL_OUT`` when set.
"""

import os
import tempfile
from pathlib import Path

import numpy as np

import qdplex  # the public API: qdplex.unmix, qdplex.segment, qdplex.quantify, ... are functions
from qdplex.metrics import iou_pairs
from qdplex.synth import make_slide, write_slide

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("QDPLEX_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="qdplex-tutorial-"))

# --- 1. A panel: which marker rides on which quantum dot, scored where ----------
panel = qdplex.read_panel(HERE.parent / "pipelines" / "breast-5plex.toml")
for m in panel.markers:
    print(f"{m.name:5s} on {m.fluor} scored in the {m.compartment}")

# --- 2. A slide: a synthetic 31-channel λ-stack (420–720 nm) with ground truth ----
# make_slide draws a tissue layout, expresses each marker in its compartment, mixes
# the QD, DAPI and autofluorescence spectra into the channels and adds camera noise.
slide = make_slide(panel, shape=(256, 256), pixel_size_um=0.5, seed=1, name="tutorial")
paths = write_slide(slide, OUT / "synthetic")
image = qdplex.read_image(paths["slide"])  # lazy dask C×Y×X + channel bands + pixel size
print(image.shape, image.pixel_size_um, "µm/px,", image.channels[0])
# The camera's dark level travels with the file (OME DetectorSettings/@Offset) and is
# read back; a panel's [unmixing] offset would override it.
offset = image.metadata["camera_offset"]
assert offset == slide.image.metadata["camera_offset"]
print("camera offset", offset)

# --- 3. Reference spectra, and whether they can be told apart on these channels --
library = qdplex.library_for_panel(panel, image.channels)  # built-ins (+ panel CSVs, + unstained control)
check = qdplex.check_panel(library, image.channels)
print(f"condition number {check.condition_number:.2f}; warnings: {check.warnings or 'none'}")
print((100 * check.crosstalk).round(1))  # % of each fluor's signal in the others' peak channels

# --- 4. Unmixing: one abundance plane per fluor, a residual, a saturation mask ---
unmixed = qdplex.unmix(image, library, method="nnls", offset=offset)
print(unmixed.abundances.channel_names)  # fluor names: DAPI, QD655, ..., AF
truth_ab = slide.abundances  # the noise-free planes the slide was made from
for fluor in ("QD655", "QD605"):
    est = unmixed.abundances.plane(fluor).compute()
    true = truth_ab.plane(fluor).compute()
    r = np.corrcoef(est.ravel(), true.ravel())[0, 1]
    print(f"{fluor}: pixel correlation with the true abundance {r:.3f}")
    assert r > 0.9

# --- 5. Segmentation: nuclei on the DAPI plane, cells grown from them ------------
dapi = unmixed.abundances.plane("DAPI").compute()
seg = qdplex.segment(dapi, pixel_size_um=image.pixel_size_um, expand_um=5.0, membrane_width_um=1.0)
f1 = qdplex.match_labels(slide.nuclei, seg.nuclei, iou=0.5)["f1"]
print(f"{seg.n_cells} cells; nucleus F1 at IoU 0.5 against the truth: {f1:.3f}")
assert f1 > 0.8

# --- 6. Quantification: one row per cell, MCQuant column order -------------------
stats = qdplex.quantify(unmixed, seg, panel)  # every plane × compartment × statistic, morphology, QC
table = qdplex.cell_table(stats, panel)  # MCQuant order: CellID, one column per marker, ..., X_centroid, ...
print(table.columns[:8].tolist())
t_ids, p_ids, iou = iou_pairs(slide.cells, seg.cells)[:3]
keep = iou >= 0.5  # cells matched one-to-one with true cells
est = table.set_index("CellID").loc[p_ids[keep], "HER2"].to_numpy()
true = slide.truth.set_index("CellID").loc[t_ids[keep], "HER2"].to_numpy()
print(f"HER2 per-cell correlation with the truth over {keep.sum()} matched cells: {np.corrcoef(est, true)[0, 1]:.3f}")

# --- 7. All of the above in one call, plus scoring ----------------------------------
# The panel sets no [unmixing] offset, so run_slide takes the file's. It also measures
# HER2 membrane completeness on the membrane ring's pixels for the HER2 score.
result = qdplex.run_slide(image, panel)
print("thresholds:", {k: round(float(v), 3) for k, v in result.thresholds.items()})
print("HER2 score:", result.summary["her2"]["score"], "-", result.summary["her2"]["completeness_basis"])
print("timings (s):", {k: round(v, 2) for k, v in result.timings.items()})

# --- 8. Files: what `qdplex run` writes for one slide, with its QC report --------
row = qdplex.process_slide(paths["slide"], panel, OUT / "out")
print(row["status"], sorted(row["outputs"]))
print("open", OUT / "out" / "tutorial" / "qc" / "report.html")
