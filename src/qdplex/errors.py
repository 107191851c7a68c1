"""The qdplex exception family.

Every error qdplex raises on bad input is a :class:`QdplexError`. Messages name
the file (when there is one), what was expected and what was found, so the CLI
can print ``str(err)`` as one line and a batch can record it in the manifest.
"""

from __future__ import annotations

__all__ = [
    "QdplexError",
    "InputError",
    "PanelError",
    "SpectraError",
    "SegmentationError",
    "OutputError",
]


class QdplexError(Exception):
    """Base class of every error qdplex raises on purpose."""

    def __init__(self, message: str, *, path=None):
        self.path = None if path is None else str(path)
        if self.path and self.path not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)


class InputError(QdplexError, ValueError):
    """An input image (or its metadata) is unreadable or not what was expected."""


class PanelError(QdplexError, ValueError):
    """A panel file is invalid: names the file, the key, the expected and found value."""


class SpectraError(QdplexError, ValueError):
    """A spectral library is unusable for the requested channels (coverage, singularity)."""


class SegmentationError(QdplexError, ValueError):
    """A segmentation input is unusable (empty, wrong dimensions, non-finite)."""


class OutputError(QdplexError, OSError):
    """An output cannot be written where asked (e.g. inside an input folder)."""
