"""Image readers and writers.

``read_image(path)`` dispatches on what ``path`` is:

* an OME-TIFF, ImageJ hyperstack or plain multi-page TIFF (:mod:`.tiff`; TIFFs
  without channel metadata need a sidecar CSV, see :mod:`.channels`),
* a folder of one TIFF per channel (:mod:`.folder`),
* an OME-Zarr (:mod:`.omezarr`).

Writers are atomic (:func:`atomic_path`): OME-TIFF images and uint32 label
masks (:mod:`.writers`), OME-Zarr images and labels (:mod:`.omezarr`).

Before a pixel is read (:mod:`.checks`), devices, FIFOs and symlink loops are
refused, pixels must be integers or floats, and the data a file stores must cover
the shape it declares (TIFF strips and tiles, Zarr chunk files): nothing is
allocated by a number written in a file, and a missing or short chunk is an
:class:`~qdplex.errors.InputError`, never zeros.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..model import MultiplexImage
from .atomic import atomic_path, is_partial
from .channels import read_channels_csv, sidecar_for
from .discover import find_slides, is_channel_folder, is_ome_zarr, is_zarr_like, slide_stem, zarr_metadata_error
from .folder import parse_leica_txt, read_channel_folder
from .omexml import parse_ome
from .checks import check_pixel_dtype, path_kind, require_regular, resolve_input
from .tiff import read_tiff
from .writers import read_labels, write_labels, write_ome_tiff

__all__ = [
    "read_image",
    "read_tiff",
    "read_channel_folder",
    "read_ome_zarr",
    "read_labels",
    "write_ome_tiff",
    "write_labels",
    "write_ome_zarr",
    "write_labels_zarr",
    "atomic_path",
    "is_partial",
    "find_slides",
    "slide_stem",
    "is_ome_zarr",
    "is_channel_folder",
    "read_channels_csv",
    "sidecar_for",
    "parse_leica_txt",
    "parse_ome",
    "path_kind",
    "require_regular",
    "resolve_input",
    "check_pixel_dtype",
]


def __getattr__(name):
    # OME-Zarr support imports zarr/ome_zarr machinery only when used
    if name in ("read_ome_zarr", "write_ome_zarr", "write_labels_zarr"):
        from . import omezarr

        return getattr(omezarr, name)
    raise AttributeError(f"module 'qdplex.io' has no attribute {name!r}")


def read_image(path, *, channels=None, name=None, level: int = 0) -> MultiplexImage:
    """Read a slide lazily as a :class:`~qdplex.model.MultiplexImage` (dask C×Y×X).

    Parameters
    ----------
    path : str or os.PathLike
        An OME-TIFF / TIFF file, an OME-Zarr folder, or a folder of one TIFF
        per channel.
    channels : None, CSV path or sequence of str / Channel, optional
        Channel names (or a sidecar CSV) overriding those in the file. Their
        number must equal the number of planes.
    name : str, optional
        Slide name; defaults to the file stem without ``.ome``/``.tif``/``.zarr``.
    level : int
        Pyramid level to read (0 = full resolution).

    Returns
    -------
    MultiplexImage

    Raises
    ------
    InputError
        Missing, corrupt, truncated or unsupported input, or channel metadata
        that is absent or does not match the planes.

    Examples
    --------
    >>> img = read_image("slide.ome.tif")  # doctest: +SKIP
    >>> img.channel_names, img.pixel_size_um  # doctest: +SKIP
    """
    p = Path(path)
    kind = path_kind(p)
    if kind == "nothing":
        raise InputError("expected an existing slide file or folder, found nothing at this path", path=p)
    if kind not in ("a regular file", "a folder"):
        raise InputError(f"expected a slide file or folder (a regular file or folder), found {kind}", path=p)
    if p.is_dir():
        if is_ome_zarr(p):
            from .omezarr import read_ome_zarr

            return read_ome_zarr(p, channels=channels, name=name, level=level)
        if is_zarr_like(p):
            problem = zarr_metadata_error(p)
            raise InputError(problem or "expected an OME-Zarr (a Zarr group with 'multiscales' metadata), found none",
                             path=p)
        if level != 0:
            raise InputError(f"expected level=0 for a folder of channel TIFFs (no pyramid), found level={level}", path=p)
        return read_channel_folder(p, channels=channels, name=name)
    low = p.name.lower()
    if low.endswith((".tif", ".tiff", ".btf", ".tf8", ".qptiff", ".svs")):
        return read_tiff(p, channels=channels, name=name, level=level)
    # unknown suffix: sniff the magic bytes
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise InputError(f"expected a readable file, found {err}", path=p) from err
    if head[:2] in (b"II", b"MM"):
        return read_tiff(p, channels=channels, name=name, level=level)
    raise InputError(
        f"expected an OME-TIFF/TIFF file, an OME-Zarr folder or a folder of channel TIFFs, "
        f"found a file of unsupported type (suffix {p.suffix!r}, no TIFF signature)",
        path=p,
    )
