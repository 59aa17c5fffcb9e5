"""Sizes as people write them: 4096, 4K, 64KiB, 10G, 1.5T.

Units are binary (K = KiB = 1024, as LVM and qemu-img read them); a decimal
number is fine when the result is a whole number of bytes.  A device is a
whole number of 4 KiB pages (PAGE).
"""
import re

from .errors import InvalidArgumentError

_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTPE", start=1):
    for _suffix in (_p, _p + "B", _p + "IB"):
        _UNITS[_suffix] = 1 << (10 * _i)
_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*\Z")
FORMS = "4096, 4K, 64KiB, 10G, 1.5T (units B, K, M, G, T, P, E; K = KiB = 1024)"
PAGE = 4096
LIMIT = 1 << 64   # sizes and offsets are 64-bit


def round_up(n, unit=PAGE):
    return -(-n // unit) * unit


def parse_size(text, what="size"):
    """Bytes from a size string; InvalidArgumentError naming the accepted forms."""
    if isinstance(text, int):
        return text
    m = _RE.match(str(text))
    unit = _UNITS.get(m.group(2).upper()) if m else None
    if not m or unit is None:
        raise InvalidArgumentError(f"{what} {text!r} is not a size: use {FORMS}")
    value = float(m.group(1)) * unit if "." in m.group(1) else int(m.group(1)) * unit
    if value != int(value):
        raise InvalidArgumentError(f"{what} {text!r} is not a whole number of bytes")
    if value >= LIMIT:
        raise InvalidArgumentError(f"{what} {text!r} is more than 16E, the most a size can be")
    return int(value)


def format_size(n):
    """1536 -> '1.5K', 10737418240 -> '10G' (binary units, like lvs)."""
    for i, p in reversed(list(enumerate("KMGTPE", start=1))):
        if n >= 1 << (10 * i):
            v = n / (1 << (10 * i))
            return f"{v:.1f}".rstrip("0").rstrip(".") + p
    return f"{n}B"
