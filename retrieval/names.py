"""File names exactly as the file system gives them: kept in the index, shown to people, written to JSON.

A POSIX file name is bytes. Python gives one that is not UTF-8 (common in archives from older cameras and other
systems) as a str with each undecodable byte as a lone surrogate (PEP 383): ``b"caf\\xe9.jpg"`` is
``"caf\\udce9.jpg"``, which opens the same file but cannot be encoded as UTF-8, so SQLite, PostgreSQL and a UTF-8
terminal refuse it. Three views of one name:

- **In the index** (:func:`to_db`, :func:`from_db`): a name without surrogates is stored as it is, so every index
  written before reads unchanged; one with surrogates is stored as :data:`ESCAPED` followed by the name with each
  backslash doubled and each surrogate written ``\\udcXX``. Every name stored is an absolute path, which never
  starts with :data:`ESCAPED`, and a name that would is escaped too: no escaped form equals a stored plain name.
- **For people** (:func:`shown`): undecodable bytes as ``\\xNN``, and control characters, line separators and
  bidirectional overrides escaped too (a hostile name can neither break a table's lines nor steer a terminal).
- **In JSON** (:func:`json_name`): the str itself, which ``json.dumps`` writes with ``\\udcXX`` escapes and
  Python's ``json.loads`` reads back into a str that opens the same file; since other JSON readers turn a lone
  surrogate into U+FFFD, a name that is not UTF-8 also gets its exact bytes, base64-encoded, in ``<key>_bytes``.
"""
from __future__ import annotations

import base64
import os
import re
import unicodedata

#: The prefix of a name stored escaped (see the module docstring); never the start of an absolute path.
ESCAPED = "escaped:"

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNESCAPE = re.compile(r"\\(\\|u[dD][89a-fA-F][0-9a-fA-F]{2})")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def has_surrogates(name: str) -> bool:
    """True for a name that is not valid Unicode text (undecodable bytes of a file name, or lone UTF-16 halves)."""
    return _SURROGATE.search(name) is not None


def to_db(name: str) -> str:
    """``name`` as stored in the index: itself, or escaped when it holds surrogates (see the module docstring)."""
    if not name.startswith(ESCAPED) and not has_surrogates(name):
        return name
    return ESCAPED + _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", name.replace("\\", "\\\\"))


def from_db(stored: str) -> str:
    """The name :func:`to_db` stored."""
    if not stored.startswith(ESCAPED):
        return stored
    return _UNESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)),
                         stored[len(ESCAPED):])


def shown(name: str | os.PathLike) -> str:
    """``name`` for a person to read, on one line: undecodable bytes as ``\\xNN``, control characters, line
    separators and bidirectional overrides escaped; everything else (accents, emoji, any script) as it is."""
    s = os.fsdecode(name)
    if s.isprintable():
        return s
    out = []
    for c in s:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c in _BIDI or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)


def name_bytes(name: str | os.PathLike) -> bytes:
    """The file name as the file system has it (the bytes ``open`` passes on)."""
    return os.fsencode(name)


def json_name(key: str, name: str | os.PathLike) -> dict:
    """``{key: name}``, plus ``{key + "_bytes": base64 of its bytes}`` when the name is not UTF-8 (see the module
    docstring): every UTF-8 name gives the one field it always gave."""
    s = os.fsdecode(name)
    if not has_surrogates(s):
        return {key: s}
    return {key: s, f"{key}_bytes": base64.b64encode(name_bytes(s)).decode("ascii")}
