"""offload.text: the one byte and table formatting every report uses."""

from offload.text import GiB, format_bytes, format_table


def test_format_bytes_picks_the_unit_or_takes_one():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * GiB // 2) == "1.50 GiB"
    assert format_bytes(5 * 1024**5) == "5120.00 TiB"  # TiB is the largest unit
    assert format_bytes(GiB, "GiB", width=7) == "   1.00 GiB"
    assert format_bytes(2**20, width=10) == "  1.00 MiB"


def test_format_table_aligns_numbers_right_text_left():
    out = format_table([["a", 1234, 0.5], ["bbb", 5, 12345.0]], ["name", "n", "x"]).split("\n")
    assert out[0] == "name      n       x"
    assert set(out[1]) == {"-", " "}
    assert out[2] == "a     1,234     0.5"
    assert out[3] == "bbb       5  12,345"
    right = format_table([["a", "1 MiB"], ["bb", "10 MiB"]], ["k", "v"], right=[1]).split("\n")
    assert right[2:] == ["a    1 MiB", "bb  10 MiB"]
