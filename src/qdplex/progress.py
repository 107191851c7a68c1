"""Progress of a batch: bars with ETA on a terminal, plain log lines otherwise, a log file.

:class:`BatchProgress` receives three kinds of events — a slide starts, a slide
reaches a pipeline stage (``"unmix"``, ``"segment"``, ``"quantify"``, ``"score"``
with the fraction of the slide done), a slide finishes — and shows them

* on a terminal: one overall bar (slides done, ETA) and one bar per running slide
  (tqdm);
* elsewhere (a pipe, a CI log, a cluster job's stdout): one plain line per event;
* always, when ``log_file`` is given: one timestamped line per event in that file
  (``OUT/qdplex.log``), whatever ``quiet`` says.

``quiet=True`` silences the terminal/stream output (errors still reach the log file
and the manifest). The class is independent of dask: :mod:`qdplex.batch` feeds it
from the client side as futures complete and as workers report stages.

The stream shows a one-line :meth:`BatchProgress.header` (how many slides, where to),
the progress, and errors; the batch's closing summary goes to the log file only — the
caller shows it once, e.g. with :func:`batch_summary` and :func:`format_summary`
(what ``qdplex run`` prints).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

__all__ = ["BatchProgress", "LOGGER_NAME", "batch_summary", "format_summary", "show_path"]

#: Name of the logger the batch writes to (``logging.getLogger(LOGGER_NAME)``).
LOGGER_NAME = "qdplex.batch"

_FMT = "%(asctime)s %(levelname)s %(message)s"


class BatchProgress:
    """Report a batch's progress to a terminal, a stream and a log file.

    Parameters
    ----------
    total : int
        Number of slides in the batch.
    log_file : str or Path, optional
        File that receives every event as a timestamped line (appended).
    quiet : bool
        No terminal/stream output (the log file is still written).
    stream : file-like, optional
        Where to show progress (default ``sys.stderr``).
    tty : bool, optional
        Force bars (True) or plain lines (False); default: ``stream.isatty()``.

    Examples
    --------
    >>> p = BatchProgress(2, quiet=True)
    >>> p.start("a"); p.stage("a", "unmix", 0.25); p.finish("a", "ok", 1.0)
    >>> p.close()
    """

    def __init__(self, total: int, *, log_file=None, quiet: bool = False, stream: TextIO | None = None,
                 tty: bool | None = None):
        self.total = int(total)
        self.quiet = bool(quiet)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else bool(tty)
        self.done = 0
        self.failed = 0
        self._lock = threading.RLock()
        self._bars: dict[str, object] = {}
        self._overall = None
        self._t0 = time.monotonic()
        self.log = logging.getLogger(LOGGER_NAME)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in self.log.handlers):
            self.log.addHandler(logging.NullHandler())  # never logging's last-resort stderr output
        self._handlers: list[logging.Handler] = []
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter(_FMT))
            self._add_handler(fh)
        if not self.quiet and not self.tty:
            sh = logging.StreamHandler(self.stream)
            sh.setFormatter(logging.Formatter("qdplex: %(message)s"))
            sh.addFilter(lambda record: getattr(record, "qdplex_stream", True))
            self._add_handler(sh)
        if not self.quiet and self.tty:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            # a terminal that reports no size (e.g. a bare pty) gets a fixed width, not an empty bar
            self._bar_opts = {"dynamic_ncols": True} if _terminal_width(self.stream) >= 40 else {"ncols": 100, "nrows": 24}
            self._overall = tqdm(total=self.total, desc="slides", unit="slide", position=0,
                                 file=self.stream, leave=True, **self._bar_opts)

    # ------------------------------------------------------------------ events
    def header(self, out, options: dict | None = None) -> None:
        """The batch's first line: how many slides, where to, on what (``options`` in full to the log)."""
        import json

        opts = dict(options or {})
        self.log.info("batch of %d slides into %s (%s)", self.total, out, json.dumps(opts, default=str),
                      extra={"qdplex_stream": False})
        where = opts.get("scheduler") or "local"
        if where == "local":
            n = opts.get("workers")
            where = f"a local dask cluster ({n} worker{'s' if int(n) != 1 else ''})" if n else "a local dask cluster"
        elif where in ("synchronous", "sync"):
            where = "this process, one slide at a time"
        else:
            where = f"the dask scheduler at {where}"
        self._show(f"{self.total} slide{'s' if self.total != 1 else ''} → {show_path(out)}/ "
                   f"{'in' if where.startswith('this process') else 'on'} {where}")

    def info(self, message: str, *, stream: bool = True) -> None:
        """A free-form line: log file; the stream too unless quiet or ``stream=False`` (above the bars on a TTY)."""
        with self._lock:
            if stream:
                self.log.info(message)
                if self._overall is not None:
                    self._tqdm.write(f"qdplex: {message}", file=self.stream)
            else:
                self.log.info(message, extra={"qdplex_stream": False})

    def _show(self, message: str) -> None:
        """A line on the stream (unless quiet), not in the log file."""
        with self._lock:
            if self.quiet:
                return
            if self._overall is not None:
                self._tqdm.write(f"qdplex: {message}", file=self.stream)
            else:
                print(f"qdplex: {message}", file=self.stream, flush=True)

    def start(self, slide: str) -> None:
        """Slide ``slide`` started on a worker."""
        with self._lock:
            self.log.info("start %s", slide)
            if self._overall is not None and slide not in self._bars:
                self._bars[slide] = self._tqdm(
                    total=100, desc=_short(slide), unit="%", position=len(self._bars) + 1, file=self.stream,
                    leave=False, **self._bar_opts,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
                )

    def stage(self, slide: str, stage: str, fraction: float) -> None:
        """Slide ``slide`` finished pipeline stage ``stage``; ``fraction`` of it is done (0–1)."""
        with self._lock:
            self.log.info("%s: %s done (%.0f%%)", slide, stage, 100.0 * float(fraction))
            bar = self._bars.get(slide)
            if bar is None and self._overall is not None:
                self.start(slide)
                bar = self._bars.get(slide)
            if bar is not None:
                target = max(0, min(100, int(round(100 * float(fraction)))))
                bar.set_description_str(f"{_short(slide)} {stage}", refresh=False)
                bar.update(max(0, target - bar.n))

    def finish(self, slide: str, status: str, seconds: float | None = None, error: str | None = None,
               *, skipped: bool = False, key: str | None = None) -> None:
        """Slide ``slide`` ended with ``status`` (``"ok"``/``"failed"``); ``skipped`` = resumed.

        ``key`` is the name its :meth:`start`/:meth:`stage` events used, when not ``slide``.
        """
        with self._lock:
            self.done += 1
            if status != "ok":
                self.failed += 1
            what = "skipped (outputs complete)" if skipped else status
            took = "" if seconds is None or skipped else f" in {seconds:.1f} s"
            msg = f"[{self.done}/{self.total}] {slide} {what}{took}"
            if error:
                msg += f": {error}"
                self.log.error(msg)
            else:
                left = self.total - self.done
                self.log.info(msg + (f"; {self._eta_text()}" if left > 0 else ""))
            bar = self._bars.pop(key or slide, None)
            if bar is not None:
                bar.close()
            if self._overall is not None:
                if error:
                    self._tqdm.write(f"qdplex: {msg}", file=self.stream)
                self._overall.set_postfix_str(f"{self.failed} failed", refresh=False)
                self._overall.update(1)

    def stage_callback(self, slide: str) -> Callable[[str, float], None]:
        """A ``progress(stage, fraction)`` callable for :func:`qdplex.slide.run_slide`."""
        return lambda stage, fraction: self.stage(slide, stage, fraction)

    def close(self, summary: str | None = None) -> None:
        """Close the bars and detach the log handlers (``summary`` goes to the log file first, not the stream)."""
        with self._lock:
            if summary:
                self.log.info(summary, extra={"qdplex_stream": False})
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
            if self._overall is not None:
                self._overall.close()
                self._overall = None
            for h in self._handlers:
                self.log.removeHandler(h)
                h.close()
            self._handlers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ helpers
    def _add_handler(self, h: logging.Handler) -> None:
        self.log.addHandler(h)
        self._handlers.append(h)

    def _eta_text(self) -> str:
        left = self.total - self.done
        if self.done == 0 or left <= 0:
            return "batch done" if left <= 0 else "ETA unknown"
        per = (time.monotonic() - self._t0) / self.done
        return f"ETA {_hms(per * left)}"


def _terminal_width(stream) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


# --------------------------------------------------------------------------- the closing summary
def show_path(path) -> str:
    """``path`` relative to the working folder when it lies below it, else absolute (one rule for every line)."""
    import os

    p = Path(path).expanduser().resolve()
    try:
        return str(p.relative_to(Path(os.getcwd()).resolve()))
    except ValueError:
        return str(p)


def batch_summary(manifest, out, seconds: float | None = None) -> dict:
    """What a finished batch did, for people (:func:`format_summary`) and scripts (JSON).

    Parameters
    ----------
    manifest : pandas.DataFrame
        The manifest :func:`qdplex.batch.run_batch` returned (``slide``, ``status``,
        ``action``, ``error``).
    out : str or Path
        The batch's output folder.
    seconds : float, optional
        Wall time of the batch.

    Returns
    -------
    dict
        ``slides``, ``ok`` (computed now), ``skipped`` (outputs already complete),
        ``failed``, ``seconds``, ``out``, ``manifest``, ``cohort_report``, ``log``,
        ``first_slide`` and its ``cells_csv`` and ``report_html`` (absolute paths, None
        when not written) and ``failures`` (``slide``, ``error``).
    """
    out = Path(out).expanduser().resolve()
    status = manifest["status"].astype(str)
    action = manifest["action"].astype(str) if "action" in manifest.columns else status.where(status != "ok", "computed")
    ok = status == "ok"

    def existing(p: Path):
        return str(p) if p.exists() else None

    first = next((str(s) for s, good in zip(manifest["slide"], ok) if good), None)
    failures = [{"slide": str(r["slide"]), "error": str(r.get("error") or "")}
                for _, r in manifest[~ok].iterrows()]
    return {
        "slides": int(len(manifest)),
        "ok": int((ok & (action != "skipped")).sum()),
        "skipped": int((ok & (action == "skipped")).sum()),
        "failed": int((~ok).sum()),
        "seconds": None if seconds is None else round(float(seconds), 2),
        "out": str(out),
        "manifest": existing(out / "manifest.csv"),
        "cohort_report": existing(out / "report.html"),
        "log": existing(out / "qdplex.log"),
        "first_slide": first,
        "cells_csv": existing(out / first / "cells.csv") if first else None,
        "report_html": existing(out / first / "qc" / "report.html") if first else None,
        "failures": failures,
    }


def format_summary(summary: dict) -> str:
    """The closing lines ``qdplex run`` prints: counts, then where to look."""
    took = "" if summary.get("seconds") is None else f" in {summary['seconds']:.1f} s"
    lines = [f"qdplex: {summary['ok']} slide{'s' if summary['ok'] != 1 else ''} done, {summary['skipped']} skipped "
             f"(already complete), {summary['failed']} failed{took}"]
    rows = [("manifest", summary.get("manifest"), ""),
            ("cells", summary.get("cells_csv"), f"  ({summary['first_slide']})" if summary.get("first_slide") else ""),
            ("QC report", summary.get("report_html"), "  ← open in a browser"),
            ("cohort report", summary.get("cohort_report"), ""),
            ("log", summary.get("log"), "")]
    for label, path, note in rows:
        if path:
            lines.append(f"  {label + ':':<15}{show_path(path)}{note}")
    return "\n".join(lines)
