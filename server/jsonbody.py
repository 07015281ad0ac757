"""JSON request bodies with a nesting limit: ``parse_json_body(data, what)`` for every JSON route.

Python's ``json`` parser recurses once per level and raises ``RecursionError`` (not ``ValueError``)
about 1000 levels down, and a value that parses a few levels short of that still breaks whatever
recurses into it later (``repr`` in an error message, ``json.dumps`` of an echoed KServe ``id``).
The API's own structures are at most 7 levels deep (KServe ``UINT8`` data as nested lists:
``{"inputs": [{"data": [[[[...]]]]}]}``), so anything deeper than ``MAX_JSON_DEPTH`` is refused with
a 400 before any handler sees it.

Cost: a body with at most ``MAX_JSON_DEPTH`` brackets (base64 images, flat ``data`` lists: every
real request) pays two ``bytes.find`` passes, a few ms for 32 MiB. Only a body with more brackets
is scanned (strings removed, then a running sum of +1/-1 per bracket, in numpy): about 0.2-0.8 s
for 32 MiB, less than ``json.loads`` of the same body when it holds numbers.
"""
from __future__ import annotations

import json
import re

import numpy as np

from .errors import APIError

MAX_JSON_DEPTH = 32

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')   # a JSON string literal, escapes included
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))   # int8: +1 / -1
_CHUNK = 1 << 22   # brackets summed at a time: 16 MiB of int32, whatever the body


def _at_most(data: bytes, char: bytes, n: int) -> int:
    """How many times ``char`` occurs in ``data``, counting no further than n + 1 (memchr speed)."""
    found, i = 0, data.find(char)
    while i >= 0 and found <= n:
        found += 1
        i = data.find(char, i + 1)
    return found


def json_depth_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when valid JSON ``data`` nests arrays and objects more than ``limit`` levels deep."""
    if _at_most(data, b"[", limit) + _at_most(data, b"{", limit) <= limit:
        return False   # fewer brackets than levels: every real request ends here
    encoding = json.detect_encoding(data)
    if encoding not in ("utf-8", "utf-8-sig"):   # UTF-16/32 (json.loads takes them): scan their UTF-8
        data = data.decode(encoding).encode()
    # brackets inside strings do not count: remove the strings (split on quotes when nothing is escaped)
    outside = _STRING.sub(b"", data) if b"\\" in data else b"".join(data.split(b'"')[::2])
    steps = np.frombuffer(outside.translate(_STEP, _NOT_BRACKETS), np.int8)   # +1 per opening, -1 per closing
    level = 0
    for start in range(0, len(steps), _CHUNK):
        running = np.cumsum(steps[start:start + _CHUNK], dtype=np.int32)
        if level + int(running.max()) > limit:
            return True
        level += int(running[-1])
    return False


def parse_json_body(data: bytes, what: str, hint: str = ""):
    """``data`` (bytes of any JSON encoding) -> the parsed value; a 400 naming ``what`` when it is
    not JSON or nests deeper than ``MAX_JSON_DEPTH``. ``hint``: what to send instead."""
    too_deep = APIError(400, f"{what} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; this API's "
                             "requests need at most 7: send the documented structure")
    try:
        value = json.loads(data)
    except RecursionError:   # before any handler sees it: a 400, not the 500 it would become
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:   # JSONDecodeError is a ValueError
        raise APIError(400, f"{what} is not valid JSON ({exc}){hint}") from None
    if isinstance(value, (list, dict)) and json_depth_exceeds(data):
        raise too_deep
    return value
