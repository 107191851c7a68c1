"""MkDocs build hooks: pages whose content comes from the code.

* ``cli.md`` is regenerated from ``qdplex.cli.build_parser()`` (scripts/gen_cli_docs.py),
  so the built site never shows a stale command-line reference.
* ``<!-- include: FILE -->`` on a line of its own is replaced by FILE (relative to
  docs/) as a fenced code block; the tutorial page includes docs/tutorial.py this way,
  the same file tests/test_docs.py executes.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
_INCLUDE = re.compile(r"^<!-- include: (?P<file>[\w./-]+) -->$", re.MULTILINE)
_LANG = {".py": "python", ".toml": "toml", ".csv": "text", ".json": "json"}


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _include(match: re.Match) -> str:
    path = (DOCS / match.group("file")).resolve()
    text = path.read_text(encoding="utf-8").rstrip()
    return f"```{_LANG.get(path.suffix, 'text')}\n{text}\n```"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "cli.md":
        return _gen_cli().cli_markdown()
    return _INCLUDE.sub(_include, markdown)
