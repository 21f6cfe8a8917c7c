"""Externally supplied strings (file names, adapt targets, messages that quote them) made safe for one
log line or a terminal: ``printable``. Used wherever such a string is logged or printed.

A file name is bytes on Linux: Python decodes a name that is not UTF-8 with ``surrogateescape``, so
``b"\\xff.pt"`` becomes ``"\\udcff.pt"``, which no UTF-8 log file, terminal or SQLite text column can
take. ``printable`` writes such a byte as ``\\xff``, and a newline, a carriage return, an ANSI escape
or any other non-printable character as its Python escape, so a name can neither forge a log line nor
drive the terminal; printable text (any script) passes unchanged.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``str(text)`` with every non-printable character escaped (``\\n``, ``\\x1b``, ``\\u202e``) and
    every undecodable byte of a file name (a lone surrogate from ``surrogateescape``) as ``\\xNN``."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif 0xDC80 <= ord(ch) <= 0xDCFF:            # an undecodable byte of a file name
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def storable(text: str) -> str:
    """``text`` as valid Unicode for a text column or a UTF-8 file: undecodable file-name bytes as
    ``\\xNN``, everything else (newlines included) kept; ``text`` itself when it is valid already."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:      # a lone surrogate that no file name decodes to
        return printable(text)
