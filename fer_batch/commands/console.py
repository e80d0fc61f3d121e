"""Printing text the user (or a file) supplied, safely, in the terminal.

File names, error messages, paths and model-card fields are data, never markup or terminal
commands. Everything the CLI prints that it did not write itself goes through one of:

- :func:`clean`: the text with terminal control characters made visible (``ESC`` becomes the
  four characters ``\\x1b``, so an escape sequence in a file name cannot recolour, retitle or
  clear the terminal, or write a hyperlink); also C1 controls, bidirectional overrides (which
  can make ``gpj.exe`` read as ``exe.jpg``) and the lone surrogates Python uses for file
  names that are not valid UTF-8 (which would otherwise raise ``UnicodeEncodeError``). Tabs and
  newlines stay. For plain output (``typer.echo``, logging).
- :func:`esc`: :func:`clean`, then Rich markup escaped (``[/x]`` or ``[link=...]`` in a name is
  printed as is instead of raising ``MarkupError`` or becoming a link). For text put inside a
  Rich markup string.
- :func:`text`: a ``rich.text.Text`` of the cleaned value (never parsed as markup), for table
  cells and progress descriptions.

:class:`SafeFormatter` applies :func:`clean` to every log line the CLI writes.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from rich.markup import escape as _markup_escape
from rich.text import Text

# C0 controls except tab and newline, DEL, C1 controls, bidi embeddings/overrides/isolates and
# marks, line/paragraph separators, and lone surrogates (undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(m: re.Match) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(value: Any) -> str:
    """``str(value)`` with every terminal control character replaced by its visible escape."""
    return _UNSAFE.sub(_visible, str(value))


def esc(value: Any) -> str:
    """``value`` ready to put inside a Rich markup string: cleaned, markup escaped."""
    return _markup_escape(clean(value))


def text(value: Any, style: str = "") -> Text:
    """``value`` as a Rich ``Text`` (not parsed as markup), cleaned; ``None`` gives ''."""
    return Text("" if value is None else clean(value), style=style)


class SafeFormatter(logging.Formatter):
    """A logging formatter whose lines carry no terminal control characters (log messages
    include file names and decoder errors)."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record))
