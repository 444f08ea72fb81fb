"""numpy-style index expressions from the command line ('[0, :5]', '[..., -1]'), parsed without eval."""

from __future__ import annotations

import re

from paramctl.errors import UsageError

_PART = re.compile(r"^(?:(?P<int>-?\d+)|(?P<slice>(-?\d+)?:(-?\d+)?(:(-?\d+)?)?)|(?P<ellipsis>\.\.\.))$")


def parse_index(text: str) -> tuple:
    """'[0, :5]' -> (0, slice(None, 5)); integers, slices and '...' only."""
    inner = re.sub(r"\s+", "", text)
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    if not inner:
        return ()
    key: list = []
    for part in inner.split(","):
        m = _PART.match(part)
        if not m:
            raise UsageError(f"invalid index {text!r}: use integers, slices and '...', as in '[0, :5]'")
        if m["int"] is not None:
            key.append(int(m["int"]))
        elif m["ellipsis"]:
            key.append(Ellipsis)
        else:
            key.append(slice(*(int(b) if b else None for b in part.split(":"))))
    return tuple(key)
