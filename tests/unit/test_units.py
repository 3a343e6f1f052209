import pytest

from scratchd.units import UnitError, format_duration, format_size, parse_duration, parse_reserve, parse_size


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("30", 30),
        (45, 45),
        ("1.5h", 5400),
        ("0.2s", 0.2),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "h", "5 years", "-1s", "1x", True, "1e3"])
def test_bad_durations(text):
    with pytest.raises(UnitError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, size",
    [
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("1.5TiB", int(1.5 * (1 << 40))),
        ("4096", 4096),
        (7, 7),
        ("2k", 2048),
        ("1GB", 1 << 30),
        ("3MiB", 3 << 20),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5.5G", "-1", "12 apples", 1.5, True, "1iB"])
def test_bad_sizes(text):
    with pytest.raises(UnitError):
        parse_size(text)


def test_reserves():
    assert parse_reserve("10%") == (0, 0.10)
    assert parse_reserve("5G") == (5 << 30, 0.0)
    assert parse_reserve(0) == (0, 0.0)
    for bad in ("101%", "x%", "-5%"):
        with pytest.raises(UnitError):
            parse_reserve(bad)


def test_formatting():
    assert format_size(0) == "0B"
    assert format_size(1536) == "1.5K"
    assert format_size(200 << 20) == "200M"
    assert format_size(None) == "-"
    assert format_duration(5400) == "1h30m"
    assert format_duration(59) == "59s"
    assert format_duration(0) == "0s"
    assert format_duration(-90) == "-1m30s"
    assert format_duration(90061) == "1d1h"
