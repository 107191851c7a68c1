"""The plugin's dock widgets (each a QWidget taking the viewer, as npe2 expects)."""

from ._colorby import ColorByWidget
from ._run import RunWidget
from ._spectrum import SpectrumWidget
from ._table import CellTableWidget
from ._threshold import ThresholdWidget

__all__ = ["RunWidget", "CellTableWidget", "ColorByWidget", "ThresholdWidget", "SpectrumWidget"]
