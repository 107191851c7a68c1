"""Readers and writers: round trips keep every metadata field; real files load with the right names."""

from __future__ import annotations

import shutil

import dask.array as da
import numpy as np
import pytest
import tifffile

from qdplex.errors import InputError, OutputError
from qdplex.io import (
    atomic_path,
    find_slides,
    read_image,
    read_labels,
    write_labels,
    write_labels_zarr,
    write_ome_tiff,
    write_ome_zarr,
)
from qdplex.model import Channel

CHANNELS = [
    Channel("DAPI", 461.0, 40.0, "DAPI"),
    Channel("HER2", 655.0, 20.0, "QD655"),
    Channel("ER", 605.0, None, "QD605"),
    Channel("plain"),
]


def _same_channels(found, expected):
    assert [c.name for c in found] == [c.name for c in expected]
    for f, e in zip(found, expected):
        assert f.fluor == e.fluor
        assert f.emission_nm == pytest.approx(e.emission_nm) if e.emission_nm else f.emission_nm is None
        assert f.bandwidth_nm == pytest.approx(e.bandwidth_nm) if e.bandwidth_nm else f.bandwidth_nm is None


# --- OME-TIFF ---------------------------------------------------------------------------------


def test_ome_tiff_round_trip_keeps_metadata(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((4, 120, 90), dtype=np.float32)
    path = write_ome_tiff(tmp_path / "slide.ome.tif", data, CHANNELS, pixel_size_um=0.325)
    img = read_image(path)
    _same_channels(img.channels, CHANNELS)
    assert img.pixel_size_um == pytest.approx(0.325)
    assert img.name == "slide"
    assert img.source == str(path)
    assert isinstance(img.data, da.Array)
    np.testing.assert_array_equal(img.data.compute(), data)
    with tifffile.TiffFile(path) as tif:  # napari / QuPath see channels, not time
        assert tif.is_ome
        assert tif.series[0].axes == "CYX"
        assert tif.series[0].dtype == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["slide.ome.tif"]  # no temporary left


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float64])
def test_ome_tiff_dtypes(tmp_path, dtype):
    data = (np.arange(2 * 30 * 40) % 200).reshape(2, 30, 40).astype(dtype)
    img = read_image(write_ome_tiff(tmp_path / "a.ome.tif", data, ["a", "b"]))
    out = img.data.compute()
    assert out.dtype == (np.float32 if dtype == np.float64 else dtype)
    np.testing.assert_array_equal(out, data.astype(out.dtype))
    assert img.pixel_size_um is None


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiled_pyramidal_dask_written_by_tiles(tmp_path, monkeypatch, compression):
    import qdplex.io.writers as writers

    monkeypatch.setattr(writers, "IN_MEMORY_BYTES", 0)  # stream, as for a whole slide
    rng = np.random.default_rng(1)
    full = rng.integers(0, 4000, (3, 1100, 1300), dtype=np.uint16)
    # several channels per chunk: the writer must spool, not recompute per channel
    data = da.from_array(full, chunks=(3, 256, 256))
    path = write_ome_tiff(tmp_path / "big.ome.tif", data, ["a", "b", "c"], pixel_size_um=0.5,
                          tile=256, pyramid=2, compression=compression)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.axes == "CYX"
        assert [lv.shape for lv in series.levels] == [(3, 1100, 1300), (3, 550, 650), (3, 275, 325)]
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        lvl1 = series.levels[1].asarray()
    expected = full[:, :1100, :1300].reshape(3, 550, 2, 650, 2).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_array_equal(lvl1, np.round(expected).astype(np.uint16))
    img = read_image(path)
    np.testing.assert_array_equal(img.data.compute(), full)
    low = read_image(path, level=2)
    assert low.shape == (3, 275, 325)
    assert low.pixel_size_um == pytest.approx(0.5 * 1300 / 325)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.ome.tif"]  # spool removed


@pytest.mark.parametrize("channel_chunk", [1, 3])
def test_dask_source_is_computed_once(tmp_path, monkeypatch, channel_chunk):
    import qdplex.io.writers as writers

    monkeypatch.setattr(writers, "IN_MEMORY_BYTES", 0)  # force the streaming path
    calls = []

    def expensive(block):
        if block.size:  # not dask meta inference
            calls.append(block.shape)
        return block * 2

    full = np.arange(3 * 600 * 500, dtype=np.float32).reshape(3, 600, 500)
    src = da.from_array(full, chunks=(channel_chunk, 300, 250)).map_blocks(expensive, dtype=np.float32)
    path = write_ome_tiff(tmp_path / "once.ome.tif", src, ["a", "b", "c"], tile=128, pyramid=1)
    np.testing.assert_array_equal(read_image(path).data.compute(), full * 2)
    n_chunks = (3 // channel_chunk) * 4
    assert len(calls) == n_chunks  # each block computed once, pyramid built from the written level
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once.ome.tif"]


def test_automatic_tiling_and_pyramid_for_large_images(tmp_path):
    data = da.zeros((1, 4200, 4400), dtype=np.uint8, chunks=(1, 2048, 2048))
    path = write_ome_tiff(tmp_path / "large.ome.tif", data, ["x"])
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].is_tiled
        assert len(tif.series[0].levels) == 4  # 4400 → 2200 → 1100 → 550


def test_external_pyramidal_ome_tiff_and_units(tmp_path):
    """A pyramidal OME-TIFF as tifffile / bioformats2raw write it, pixel size in nm."""
    data = np.arange(2 * 512 * 256, dtype=np.uint16).reshape(2, 512, 256)
    path = tmp_path / "ext.ome.tif"
    meta = {"axes": "CYX", "Channel": {"Name": ["A", "B"]}, "PhysicalSizeX": 650.0, "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 650.0, "PhysicalSizeYUnit": "nm"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(data, subifds=1, metadata=meta, tile=(128, 128))
        tw.write(data[:, ::2, ::2], subfiletype=1, tile=(128, 128))
    img = read_image(path)
    assert img.channel_names == ["A", "B"]
    assert img.pixel_size_um == pytest.approx(0.65)
    assert img.shape == (2, 512, 256)
    np.testing.assert_array_equal(img.data[:, 100:300, 50:60].compute(), data[:, 100:300, 50:60])


def test_yxs_samples_layout(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "rgb.ome.tif"
    tifffile.imwrite(path, data, photometric="rgb", metadata={"axes": "YXS", "Channel": {"Name": "HE"}})
    img = read_image(path)
    assert img.channel_names == ["HE:R", "HE:G", "HE:B"]
    np.testing.assert_array_equal(img.data.compute(), np.moveaxis(data, -1, 0))


def test_lazy_graph_is_picklable_for_distributed_workers(tmp_path):
    import pickle

    data = np.arange(2 * 64 * 64, dtype=np.uint16).reshape(2, 64, 64)
    img = read_image(write_ome_tiff(tmp_path / "p.ome.tif", data, ["a", "b"]))
    img.data.sum().compute()  # opens the file in this process
    clone = pickle.loads(pickle.dumps(img.data))
    np.testing.assert_array_equal(clone.compute(), data)


def test_channels_argument_overrides_names(tmp_path):
    path = write_ome_tiff(tmp_path / "s.ome.tif", np.zeros((4, 8, 8), np.float32), CHANNELS)
    img = read_image(path, channels=["a", "b", "c", "d"], name="renamed")
    assert img.channel_names == ["a", "b", "c", "d"]
    assert img.channels[1].emission_nm == 655.0  # wavelengths kept from the file
    assert img.name == "renamed"
    with pytest.raises(InputError, match="expected 2 channels.*found 4 plane"):
        read_image(path, channels=["a", "b"])


# --- labels -----------------------------------------------------------------------------------


def test_labels_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 70000, (200, 300)).astype(np.uint32)
    path = write_labels(tmp_path / "cells.ome.tif", labels, pixel_size_um=0.5, name="cells")
    back = read_labels(path)
    assert back.dtype == np.uint32 and back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)
    img = read_image(path)
    assert img.channel_names == ["cells"] and img.pixel_size_um == pytest.approx(0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].dtype == np.uint32
        assert tif.series[0].axes in ("YX", "CYX")


def test_labels_pyramid_is_nearest(tmp_path):
    labels = np.repeat(np.repeat(np.arange(64, dtype=np.uint32).reshape(8, 8), 64, 0), 64, 1)  # 512²
    path = write_labels(tmp_path / "l.ome.tif", da.from_array(labels, chunks=128), tile=128, pyramid=2)
    low = read_labels(path, level=2)
    assert set(np.unique(low)) == set(range(64))  # no averaged, invented labels
    np.testing.assert_array_equal(low, labels[::4, ::4])


def test_write_labels_rejects_bad_input(tmp_path):
    with pytest.raises(OutputError, match="integer labels"):
        write_labels(tmp_path / "x.ome.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(OutputError, match="non-negative"):
        write_labels(tmp_path / "x.ome.tif", -np.ones((4, 4), np.int32))
    assert list(tmp_path.iterdir()) == []


# --- plain TIFF and sidecars ------------------------------------------------------------------


def test_plain_tiff_needs_a_sidecar(tmp_path):
    data = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, photometric="minisblack", metadata=None)
    with pytest.raises(InputError, match="plain.channels.csv.*found no channel metadata and 3 plane"):
        read_image(path)
    (tmp_path / "plain.channels.csv").write_text("channel,name,emission_nm,bandwidth_nm\n2,CD3,605,20\n1,DAPI,,\n3,CD8,655,\n")
    img = read_image(path)
    assert img.channel_names == ["DAPI", "CD3", "CD8"]
    assert img.channels[1].band == (595.0, 615.0)
    np.testing.assert_array_equal(img.data.compute(), data)
    (tmp_path / "plain.channels.csv").write_text("channel,name\n1,DAPI\n2,CD3\n")
    with pytest.raises(InputError, match="expected 2 channels.*found 3 plane"):
        read_image(path)


def test_single_strip_uncompressed_pages_are_read_in_small_chunks(tmp_path):
    """tifffile / ImageJ write uncompressed pages as one strip: memory-mapped, not read page-wise."""
    data = np.random.default_rng(5).integers(0, 255, (2, 3000, 2500), dtype=np.uint8)
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].rowsperstrip == 3000  # one strip per page
    img = read_image(path, channels=["a", "b"])
    assert max(img.data.chunks[1]) <= 1024 and max(img.data.chunks[2]) <= 1024
    np.testing.assert_array_equal(img.data[:, 1500:2100, 2000:].compute(), data[:, 1500:2100, 2000:])


def test_folder_channels_csv_for_many_tiffs(tmp_path):
    for stem in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{stem}.tiff", np.zeros((2, 10, 10), np.uint8))
    (tmp_path / "channels.csv").write_text("channel_number,marker_name\n1,X\n2,Y\n")
    assert read_image(tmp_path / "b.tiff").channel_names == ["X", "Y"]
    # two 2-channel slides sharing a 2-row channels.csv: two slides, not one channel folder
    assert [p.name for p in find_slides(tmp_path)] == ["a.tiff", "b.tiff"]


def test_qptiff_channel_names_and_filters(tmp_path):
    """Akoya / PerkinElmer QPTIFF: one page per filter channel, names in per-page XML."""
    path = tmp_path / "scan.qptiff"
    names = [("DAPI", 435, 485), ("Qdot 655", 640, 670)]
    with tifffile.TiffWriter(path) as tw:
        for i, (name, lo, hi) in enumerate(names):
            desc = (f'<?xml version="1.0" encoding="utf-8"?>\r\n<PerkinElmer-QPI-ImageDescription>'
                    f"<DescriptionVersion>2</DescriptionVersion><ImageType>FullResolution</ImageType>"
                    f"<Name>{name}</Name><Biomarker>m{i}</Biomarker><EmissionFilter><Name>f</Name><Bands>"
                    f"<FilterBand><Cuton>{lo}</Cuton><Cutoff>{hi}</Cutoff></FilterBand></Bands></EmissionFilter>"
                    f"</PerkinElmer-QPI-ImageDescription>")
            tw.write(np.full((32, 48), i, np.uint16), description=desc, software="PerkinElmer-QPI",
                     resolution=(20000.0, 20000.0), resolutionunit="CENTIMETER", metadata=None)
    img = read_image(path)
    assert img.metadata["format"] == "qptiff"
    assert img.channel_names == ["DAPI", "Qdot 655"]
    assert img.channels[1].band == (640.0, 670.0)
    assert img.pixel_size_um == pytest.approx(0.5)
    np.testing.assert_array_equal(img.data[:, 0, 0].compute(), [0, 1])


def test_bad_sidecar_messages(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 5, 5), np.uint8))
    (tmp_path / "s.channels.csv").write_text("channel,name\n1,A\n3,B\n")
    with pytest.raises(InputError, match=r"s.channels.csv.*channel numbers 1..2.*found \[1, 3\]"):
        read_image(tmp_path / "s.tif")
    (tmp_path / "s.channels.csv").write_text("channel,label_x\n1,A\n")
    with pytest.raises(InputError, match="'name'"):
        read_image(tmp_path / "s.tif")
    (tmp_path / "s.channels.csv").write_text("channel,name,emission_nm\n1,A,abc\n2,B,500\n")
    with pytest.raises(InputError, match="line 2.*emission_nm.*'abc'"):
        read_image(tmp_path / "s.tif")


def test_imagej_hyperstack_with_labels_and_micron_unit(tmp_path):
    data = np.zeros((3, 16, 16), np.uint16)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"axes": "CYX", "Labels": ["DAPI", "QD605", "QD655"], "unit": "micron"})
    img = read_image(path)
    assert img.channel_names == ["DAPI", "QD605", "QD655"]
    assert img.pixel_size_um == pytest.approx(0.25)


def test_corrupt_truncated_and_unsupported_files(tmp_path):
    good = write_ome_tiff(tmp_path / "good.ome.tif", np.ones((2, 256, 256), np.float32), ["a", "b"])
    trunc = tmp_path / "trunc.ome.tif"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(InputError, match="trunc.ome.tif.*(truncated|readable)"):
        read_image(trunc)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(InputError, match="junk.tif: expected a readable TIFF"):
        read_image(junk)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(InputError, match="notes.txt.*unsupported"):
        read_image(other)
    with pytest.raises(InputError, match="missing.ome.tif.*found nothing"):
        read_image(tmp_path / "missing.ome.tif")
    zstack = tmp_path / "z.ome.tif"
    tifffile.imwrite(zstack, np.zeros((2, 3, 8, 8), np.uint8), metadata={"axes": "ZCYX"})
    with pytest.raises(InputError, match="single-plane.*ZCYX"):
        read_image(zstack)


# --- OME-Zarr ---------------------------------------------------------------------------------


def test_ome_zarr_round_trip_and_levels(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.random((4, 1100, 700), dtype=np.float32)
    path = write_ome_zarr(tmp_path / "s.ome.zarr", da.from_array(data, chunks=(4, 512, 512)), CHANNELS,
                          pixel_size_um=0.4)
    img = read_image(path)
    _same_channels(img.channels, CHANNELS)
    assert img.pixel_size_um == pytest.approx(0.4)
    assert img.name == "s"
    np.testing.assert_array_equal(img.data.compute(), data)
    assert img.metadata["levels"] == 3  # 1100 → 550 → 275
    low = read_image(path, level=1)
    assert low.shape == (4, 550, 350)
    assert low.pixel_size_um == pytest.approx(0.8)
    np.testing.assert_allclose(low.data[:, 3, 5].compute(), data[:, 6:8, 10:12].mean(axis=(1, 2)), rtol=1e-6)
    # rewriting replaces the folder atomically
    write_ome_zarr(path, data[:2], ["x", "y"])
    assert read_image(path).channel_names == ["x", "y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.zarr"]


def test_ome_zarr_corrupt_chunk(tmp_path):
    path = write_ome_zarr(tmp_path / "c.ome.zarr", np.ones((1, 64, 64), np.float32), ["a"])
    chunk = next(p for p in (path / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(b"garbage")
    with pytest.raises(InputError, match="c.ome.zarr.*corrupt"):
        read_image(path).data.compute()
    (path / ".zattrs").write_text("{}")
    with pytest.raises(InputError, match="c.ome.zarr"):
        read_image(path)


def test_ome_zarr_labels(tmp_path):
    labels = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200) % 977
    path = write_labels_zarr(tmp_path / "cells.ome.zarr", labels, pixel_size_um=0.5, levels=1)
    np.testing.assert_array_equal(read_labels(path), labels)
    np.testing.assert_array_equal(read_labels(path, level=1), labels[::2, ::2])  # nearest, not averaged
    path = write_ome_zarr(tmp_path / "n.ome.zarr", labels[None], ["nuclei"], labels=True, levels=1)
    np.testing.assert_array_equal(read_labels(path, level=1), labels[::2, ::2])


def test_ome_zarr_read_by_ome_zarr_py(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = write_ome_zarr(tmp_path / "s.ome.zarr", np.zeros((2, 64, 64), np.uint16), ["A", "B"])
    node = next(iter(Reader(parse_url(str(path)))()))
    assert node.metadata["channel_names"] == ["A", "B"]
    assert node.data[0].shape == (2, 64, 64)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_written_by_ome_zarr_py(tmp_path, version):
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    data = np.arange(2 * 1 * 300 * 200, dtype=np.uint16).reshape(1, 2, 300, 200)  # t c y x
    group = zarr.open_group(str(tmp_path / "ext.zarr"), mode="w", zarr_format=fmt.zarr_format)
    scales = [[{"type": "scale", "scale": [1.0, 1.0, 0.25 * 2**k, 0.25 * 2**k]}] for k in range(3)]
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    write_image(data, group, scale_factors=(2, 4), axes=axes, fmt=fmt, coordinate_transformations=scales)
    attrs = group.attrs.asdict()
    # ome-zarr-py ≥ 0.18 ignores the given transformations and units (and names levels s0, s1, …):
    # state the physical scale in the metadata ourselves, as a microscope exporter would
    ms = (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]
    ms["axes"] = axes
    for k, ds in enumerate(ms["datasets"]):
        ds["coordinateTransformations"] = scales[k]
    group.attrs.update({"ome": attrs["ome"]} if "ome" in attrs else {"multiscales": attrs["multiscales"]})
    attrs = group.attrs.asdict()
    key = {"ome": {**attrs.get("ome", {})}} if "ome" in attrs else {}
    omero = {"channels": [{"label": "DAPI"}, {"label": "QD655"}]}
    if key:
        key["ome"]["omero"] = omero
        group.attrs.update(key)
    else:
        group.attrs.update({"omero": omero})
    img = read_image(tmp_path / "ext.zarr")
    assert img.channel_names == ["DAPI", "QD655"]
    assert img.pixel_size_um == pytest.approx(0.25)
    np.testing.assert_array_equal(img.data.compute(), data[0])
    assert img.metadata["ngff_version"] == version
    assert read_image(tmp_path / "ext.zarr", level=2).shape[1:] == (75, 50)
    assert find_slides(tmp_path) == [(tmp_path / "ext.zarr").resolve()]


def test_bioformats2raw_layout(tmp_path):
    import zarr

    root = zarr.open_group(str(tmp_path / "conv.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr(tmp_path / "img.ome.zarr", np.ones((2, 40, 30), np.uint8), ["a", "b"])
    shutil.copytree(tmp_path / "img.ome.zarr", tmp_path / "conv.zarr" / "0")
    img = read_image(tmp_path / "conv.zarr")
    assert img.channel_names == ["a", "b"] and img.shape == (2, 40, 30) and img.name == "conv"


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".")
        tmp.write_text("new")
    assert target.read_text() == "new"


# --- discovery --------------------------------------------------------------------------------


def test_find_slides(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    write_ome_tiff(tmp_path / "a" / "s1.ome.tif", np.zeros((1, 4, 4), np.uint8), ["x"])
    tifffile.imwrite(tmp_path / "a" / "deep" / "s2.tiff", np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "a" / "deep" / "s2.channels.csv").write_text("channel,name\n1,A\n2,B\n")
    (tmp_path / "a" / ".s3.ome.tif.123-abc.part").write_bytes(b"partial")
    write_ome_zarr(tmp_path / "a" / "z.ome.zarr", np.zeros((1, 8, 8), np.uint8), ["x"])
    chan = tmp_path / "chan"
    chan.mkdir()
    for stem in ("c1", "c2", "c3"):
        tifffile.imwrite(chan / f"{stem}.tif", np.zeros((4, 4), np.uint8))
    (chan / "channels.csv").write_text("channel,name\nc2,B\nc1,A\nc3,C\n")
    (tmp_path / "skip_me.tif").write_bytes(b"")
    found = find_slides([tmp_path, tmp_path / "a" / "s1.ome.tif"], exclude=("skip_*",))
    assert [p.relative_to(tmp_path.resolve()).as_posix() for p in found] == [
        "a/deep/s2.tiff", "a/s1.ome.tif", "a/z.ome.zarr", "chan",
    ]
    img = read_image(chan)
    assert img.channel_names == ["B", "A", "C"] and img.name == "chan"
    assert find_slides(tmp_path / "a", include=("*.zarr",)) == [(tmp_path / "a" / "z.ome.zarr").resolve()]
    with pytest.raises(InputError, match="nowhere.*found nothing"):
        find_slides([tmp_path / "nowhere"])


# --- real public data -------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["E34", "G01", "J02"])
def test_real_cytomapper_imc_with_markers_csv(shared_data, stem):
    folder = shared_data / "multiplex" / "cytomapper_imc_pancreas"
    img = read_image(folder / f"{stem}_imc.tiff", channels=folder / "markers.csv")
    assert img.channel_names == ["H3", "CD99", "PIN", "CD8a", "CDH"]
    assert img.shape == (5, 100, 100) and img.data.dtype == np.float32
    np.testing.assert_array_equal(img.data.compute(), tifffile.imread(folder / f"{stem}_imc.tiff"))
    mask = read_labels(folder / f"{stem}_mask.tiff")
    assert mask.dtype == np.uint32 and mask.shape == (100, 100)
    assert len(np.unique(mask[mask > 0])) in (113, 122, 127)


def test_real_mcmicro_markers_csv_is_a_folder_sidecar(shared_data):
    folder = shared_data / "multiplex" / "spatialproteomics_codex"
    assert read_image(folder / "image.tiff").channel_names == ["DAPI", "PAX5", "CD3", "CD4", "CD8"]


def test_real_codex_as_sidecar_in_tmp_copy(shared_data, tmp_path):
    src = shared_data / "multiplex" / "spatialproteomics_codex"
    shutil.copy(src / "image.tiff", tmp_path / "image.tiff")
    shutil.copy(src / "markers.csv", tmp_path / "image.channels.csv")
    img = read_image(tmp_path / "image.tiff")
    assert img.channel_names == ["DAPI", "PAX5", "CD3", "CD4", "CD8"]
    assert img.shape == (5, 101, 101) and img.data.dtype == np.uint8
    assert read_labels(src / "segmentation.tiff").max() > 0


def test_real_imagej_hyperstack(shared_data):
    path = shared_data / "multiplex" / "instanseg_fluo" / "Fluorescence_example.tif"
    with pytest.raises(InputError, match="Fluorescence_example.channels.csv.*2 plane"):
        read_image(path)
    img = read_image(path, channels=["nuclei", "membrane"])
    assert img.shape == (2, 450, 450)
    np.testing.assert_array_equal(img.data.compute(), tifffile.imread(path))


def test_real_leica_spectral_folder(shared_data):
    folder = shared_data / "spectral_stack" / "neherlab_leica_3dye"
    img = read_image(folder)
    assert img.shape == (12, 512, 512) and img.name == "neherlab_leica_3dye"
    # three sequential scans (488, 514, 561 nm) × four 20 nm detector bands from 03.txt
    assert [c.name for c in img.channels[:4]] == ["ex488_em500-520", "ex488_em520-540", "ex488_em540-560",
                                                  "ex488_em560-580"]
    assert img.channels[4].name.startswith("ex514_") and img.channels[8].name.startswith("ex561_")
    assert all(c.bandwidth_nm == 20.0 for c in img.channels)
    assert img.channels[11].band == (620.0, 640.0)
    np.testing.assert_array_equal(img.data[5].compute(), tifffile.imread(folder / "03_Series004_z000_ch05.tif"))
    assert find_slides(folder) == [folder.resolve()]


def test_camera_offset_round_trips_as_ome_detector_offset(tmp_path):
    """The camera dark level survives a write/read (OME DetectorSettings/@Offset), with bands kept."""
    import tifffile

    from qdplex.io import read_image, write_ome_tiff
    from qdplex.model import Channel, MultiplexImage

    chans = [Channel(f"{w}nm", float(w), 10.0) for w in (500, 510, 520)]
    img = MultiplexImage(np.full((3, 16, 16), 105, np.uint16), chans, 0.5, "dark", metadata={"camera_offset": 100.0})
    path = write_ome_tiff(tmp_path / "dark.ome.tif", img)
    back = read_image(path)
    assert back.metadata["camera_offset"] == 100.0
    assert back.channels == chans
    with tifffile.TiffFile(path) as tif:
        assert 'Offset="100.0"' in tif.ome_metadata
    # without an offset nothing is claimed
    path2 = write_ome_tiff(tmp_path / "plain.ome.tif", np.zeros((3, 8, 8), np.uint16), chans)
    assert "camera_offset" not in read_image(path2).metadata


def test_label_writers_refuse_negative_labels(tmp_path):
    """Both label writers share one check: negative IDs would wrap to huge uint32 labels."""
    from qdplex.io import write_labels, write_labels_zarr

    bad = np.array([[0, 1], [-3, 2]], dtype=np.int32)
    for writer, name in ((write_labels, "l.ome.tif"), (write_labels_zarr, "l.ome.zarr")):
        with pytest.raises(OutputError, match="non-negative labels, found minimum -3"):
            writer(tmp_path / name, bad)
        assert not (tmp_path / name).exists()
