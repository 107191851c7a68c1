"""Deprecated module: the slide path moved to :mod:`qdplex.slide` and :mod:`qdplex.batch`.

Kept as thin aliases for callers of the old names (the napari widget and some tests):

* ``qdplex.pipeline.run_slide`` → :func:`qdplex.slide.run_slide`
* ``qdplex.pipeline.SlideResult`` → :class:`qdplex.slide.SlideResult`
* ``qdplex.pipeline.process_slide`` → :func:`qdplex.batch.process_slide`

New code imports from ``qdplex`` (``qdplex.run_slide``, ``qdplex.process_slide``,
``qdplex.run_batch``).
"""

from __future__ import annotations

from .batch import process_slide
from .slide import SlideResult, run_slide

__all__ = ["run_slide", "process_slide", "SlideResult"]
