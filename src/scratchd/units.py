"""Durations and sizes in the forms people type: ``90s``, ``2h``, ``512M``, ``1.5TiB``, ``10%``.

Standard library only: the CLI imports this on every ``scratchd run``.
"""

from __future__ import annotations

import re

# Patterns, not compiled: `re` compiles them on first use (and caches them), so
# importing this, which every `scratchd run` does, compiles nothing.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$"

# Decimal suffixes (K, M, G ...) are powers of 1024 as well: that is what every
# filesystem tool on Linux (df -h, du -h, truncate) means by them. "KB" style
# suffixes mean the same; only the explicit "iB" forms are spelled out.
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_PATTERN = r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$"


class UnitError(ValueError):
    """A duration or size that cannot be read."""


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: ``90s``, ``15m``, ``2h``, ``7d``, ``1w``; a bare number is seconds."""
    if isinstance(value, bool):
        raise UnitError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.match(_DURATION_PATTERN, value)
        if not match:
            raise UnitError(f"not a duration: {value!r} (use e.g. 90s, 15m, 2h, 7d)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise UnitError(f"a duration cannot be negative: {value!r}")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: ``512M``, ``10G``, ``1.5TiB``; a bare number is bytes."""
    if isinstance(value, (bool, float)):
        raise UnitError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.match(_SIZE_PATTERN, value)
        if not match or (match.group(3) and match.group(3).lower() == "ib" and not match.group(2)):
            raise UnitError(f"not a size: {value!r} (use e.g. 512M, 10G, 1.5TiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 0:
        raise UnitError(f"a size cannot be negative: {value!r}")
    return size


def parse_reserve(value: str | int) -> tuple[int, float]:
    """A reserve as ``(bytes, fraction)``; exactly one of the two is non-zero or both are zero.

    ``10%`` -> ``(0, 0.10)``; ``5G`` -> ``(5 GiB, 0.0)``.
    """
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        try:
            percent = float(number)
        except ValueError:
            raise UnitError(f"not a percentage: {value!r}") from None
        if not 0 <= percent <= 100:
            raise UnitError(f"a percentage must be between 0 and 100: {value!r}")
        return 0, percent / 100
    return parse_size(value), 0.0


def format_size(size: int | float | None) -> str:
    """``1536`` -> ``1.5K``: short, binary units, as ``du -h`` prints them."""
    if size is None:
        return "-"
    size = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(size) < 1024 or unit == "T":
            break
        size /= 1024
    if unit == "B":
        return f"{int(size)}B"
    return f"{size:.1f}{unit}" if abs(size) < 10 else f"{size:.0f}{unit}"


def format_duration(seconds: float | None) -> str:
    """``5400`` -> ``1h30m``: the two largest units, as a person reads a countdown."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    remaining = int(abs(seconds))
    parts: list[str] = []
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= length or (unit == "s" and not parts):
            parts.append(f"{remaining // length}{unit}")
            remaining %= length
        if len(parts) == 2:
            break
    return sign + "".join(parts)
