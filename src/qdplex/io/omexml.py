"""OME-XML: parse channel metadata and pixel size; build the OME-XML qdplex writes.

Emission bands are stored the OME way: ``Channel/@EmissionWavelength`` holds the
band centre and an emission ``Filter`` in the ``Instrument`` (referenced from the
channel's ``LightPath/EmissionFilterRef``) holds the band edges as
``TransmittanceRange/@CutIn`` and ``@CutOut``. ``Channel/@Fluor`` holds the fluor.
Bio-Formats, QuPath and OMERO read these elements.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import tifffile

from ..errors import InputError
from ..model import Channel

__all__ = ["parse_ome", "build_ome", "to_um", "LENGTH_UNITS_UM"]

#: OME UnitsLength → µm factor (the common ones).
LENGTH_UNITS_UM = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,  # Greek mu
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "dm": 1e5,
    "m": 1e6,
    "in": 25400.0,
    "ft": 304800.0,
}
_WAVELENGTH_NM = {"nm": 1.0, "Å": 0.1, "pm": 1e-3, "µm": 1e3, "um": 1e3, "μm": 1e3}


def to_um(value, unit, *, path=None, what="PhysicalSizeX") -> float | None:
    """Convert an OME length to µm (``unit`` defaults to µm as in the OME schema)."""
    if value is None:
        return None
    unit = unit or "µm"
    if unit not in LENGTH_UNITS_UM:
        raise InputError(f"{what}: expected a length unit in {sorted(LENGTH_UNITS_UM)}, found {unit!r}", path=path)
    out = float(value) * LENGTH_UNITS_UM[unit]
    return out if out > 0 else None


def _nm(value, unit, *, path, what) -> float | None:
    if value is None or value == "":
        return None
    unit = unit or "nm"
    if unit not in _WAVELENGTH_NM:
        raise InputError(f"{what}: expected a wavelength unit in {sorted(_WAVELENGTH_NM)}, found {unit!r}", path=path)
    return float(value) * _WAVELENGTH_NM[unit]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el, name):
    return [c for c in el if _local(c.tag) == name]


def _child(el, name):
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def parse_ome(xml: str, *, image_index: int = 0, path=None) -> dict:
    """Channels and pixel size of one Image of an OME-XML document.

    Returns
    -------
    dict
        ``channels`` (list of :class:`Channel`, one per OME channel *sample*:
        a channel with ``SamplesPerPixel=3`` gives three entries named
        ``<name>:R``, ``:G``, ``:B``), ``channel_count`` (OME channels),
        ``samples`` (per channel), ``pixel_size_um`` (X, or None),
        ``pixel_size_y_um``, ``name`` (Image name or None), ``size`` (dict of
        SizeX..SizeT).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InputError(f"expected valid OME-XML in the TIFF description, found a parse error: {err}", path=path) from err
    images = [el for el in root.iter() if _local(el.tag) == "Image"]
    if not images:
        raise InputError("expected an OME <Image> element, found none", path=path)
    if image_index >= len(images):
        image_index = 0
    image = images[image_index]
    pixels = _child(image, "Pixels")
    if pixels is None:
        raise InputError("expected an OME <Pixels> element in the first Image, found none", path=path)

    filters = {}
    for flt in root.iter():
        if _local(flt.tag) == "Filter" and flt.get("ID"):
            rng = _child(flt, "TransmittanceRange")
            if rng is not None:
                cut_in = _nm(rng.get("CutIn"), rng.get("CutInUnit"), path=path, what="TransmittanceRange CutIn")
                cut_out = _nm(rng.get("CutOut"), rng.get("CutOutUnit"), path=path, what="TransmittanceRange CutOut")
                filters[flt.get("ID")] = (cut_in, cut_out)
    filter_sets = {}
    for fs in root.iter():
        if _local(fs.tag) == "FilterSet" and fs.get("ID"):
            refs = [r.get("ID") for r in _children(fs, "EmissionFilterRef")]
            filter_sets[fs.get("ID")] = refs

    channels: list[Channel] = []
    counts = []
    for i, ch in enumerate(_children(pixels, "Channel")):
        name = ch.get("Name") or ch.get("Fluor") or f"Channel:{i}"
        samples = int(ch.get("SamplesPerPixel") or 1)
        em = _nm(ch.get("EmissionWavelength"), ch.get("EmissionWavelengthUnit"), path=path, what=f"Channel {name!r} EmissionWavelength")
        refs = []
        light = _child(ch, "LightPath")
        if light is not None:
            refs += [r.get("ID") for r in _children(light, "EmissionFilterRef")]
        fsref = _child(ch, "FilterSetRef")
        if fsref is not None:
            refs += filter_sets.get(fsref.get("ID"), [])
        band = None
        for ref in refs:
            lo, hi = filters.get(ref, (None, None))
            if lo is not None and hi is not None and hi > lo:
                band = (lo, hi)
                break
        bw = None
        if band is not None:
            bw = band[1] - band[0]
            if em is None:
                em = (band[0] + band[1]) / 2.0
        fluor = ch.get("Fluor") or None
        if samples == 1:
            channels.append(Channel(name, em, bw, fluor))
        else:
            suffixes = "RGB" if samples == 3 else [str(k) for k in range(samples)]
            channels.extend(Channel(f"{name}:{s}", em, bw, fluor) for s in suffixes)
        counts.append(samples)

    offsets = {float(ds.get("Offset")) for ch in _children(pixels, "Channel")
               for ds in _children(ch, "DetectorSettings") if ds.get("Offset") is not None}
    size = {k: int(pixels.get(f"Size{k}", 1)) for k in "XYZCT"}
    px = to_um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"), path=path)
    py = to_um(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"), path=path, what="PhysicalSizeY")
    return {
        "channels": channels,
        "channel_count": len(counts),
        "samples": counts,
        "pixel_size_um": px if px is not None else py,
        "pixel_size_y_um": py,
        "name": image.get("Name"),
        "size": size,
        "camera_offset": offsets.pop() if len(offsets) == 1 else None,
    }


def build_ome(
    shape: tuple[int, int, int],
    dtype,
    channels: list[Channel],
    *,
    pixel_size_um: float | None = None,
    name: str | None = None,
    camera_offset: float | None = None,
) -> str:
    """OME-XML for a C×Y×X image with named channels, emission bands, fluors and pixel size.

    A ``camera_offset`` (the detector's dark level in counts) is stored as the standard
    ``Channel/DetectorSettings/@Offset`` of one ``Instrument/Detector``.
    """
    c, y, x = (int(s) for s in shape)
    chan_meta = []
    for ch in channels:
        meta = {"Name": ch.name}
        if ch.emission_nm is not None:
            meta["EmissionWavelength"] = float(ch.emission_nm)
            meta["EmissionWavelengthUnit"] = "nm"
        if ch.fluor:
            meta["Fluor"] = ch.fluor
        chan_meta.append(meta)
    meta = {"Channel": chan_meta}
    if name:
        meta["Name"] = name
    if pixel_size_um:
        meta.update(
            PhysicalSizeX=float(pixel_size_um),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(pixel_size_um),
            PhysicalSizeYUnit="µm",
        )
    ox = tifffile.OmeXml()
    ox.addimage(np.dtype(dtype), (c, y, x), (c, 1, 1, y, x, 1), axes="CYX", **meta)
    xml = ox.tostring(declaration=True)
    banded = [(i, ch) for i, ch in enumerate(channels) if ch.emission_nm is not None and ch.bandwidth_nm]
    if not banded and camera_offset is None:
        return xml
    # add an emission Filter per banded channel (OME has no band width attribute on Channel)
    ns = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
    ET.register_namespace("", ns)
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    root = ET.fromstring(xml.split("?>", 1)[1] if xml.startswith("<?xml") else xml)
    q = lambda t: f"{{{ns}}}{t}"  # noqa: E731
    instrument = ET.Element(q("Instrument"), {"ID": "Instrument:0"})
    if camera_offset is not None:  # schema order: Detector before Filter
        ET.SubElement(instrument, q("Detector"), {"ID": "Detector:0", "Offset": repr(float(camera_offset))})
    for i, ch in banded:
        flt = ET.SubElement(instrument, q("Filter"), {"ID": f"Filter:0:{i}", "Type": "BandPass"})
        lo, hi = ch.band
        ET.SubElement(
            flt,
            q("TransmittanceRange"),
            {"CutIn": repr(float(lo)), "CutInUnit": "nm", "CutOut": repr(float(hi)), "CutOutUnit": "nm"},
        )
    image = root.find(q("Image"))
    root.insert(list(root).index(image), instrument)
    pixels = image.find(q("Pixels"))
    image.insert(list(image).index(pixels), ET.Element(q("InstrumentRef"), {"ID": "Instrument:0"}))
    chans = pixels.findall(q("Channel"))
    if camera_offset is not None:  # schema order in Channel: DetectorSettings before LightPath
        for ch in chans:
            ch.insert(0, ET.Element(q("DetectorSettings"), {"ID": "Detector:0", "Offset": repr(float(camera_offset))}))
    for i, _ in banded:
        light = chans[i].find(q("LightPath"))
        if light is None:
            light = ET.SubElement(chans[i], q("LightPath"))
        ET.SubElement(light, q("EmissionFilterRef"), {"ID": f"Filter:0:{i}"})
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode")
