"""The built-in digits dataset is written on first use without TFDS' download banner or progress bars."""

from biflow_jax.data import digits


def test_first_use_is_one_line_and_the_second_is_silent(tmp_path, capfd):
    builder = digits.prepared_builder(str(tmp_path))
    first = capfd.readouterr()
    assert builder.info.splits["train"].num_examples == 1497 and builder.info.splits["test"].num_examples == 300
    lines = tfds_lines(first.out + first.err)
    assert len(lines) == 1 and "building the digits dataset" in lines[0], lines
    digits.prepared_builder(str(tmp_path))
    second = capfd.readouterr()
    assert tfds_lines(second.out + second.err) == []


def tfds_lines(text: str) -> list[str]:
    """Console lines, less TensorFlow's C++ library banners (main.py turns those off; tests do not)."""
    cxx = ("WARNING: All log messages before absl", "port.cc", "cpu_feature_guard", "To enable the following")
    return [line for line in text.splitlines() if line.strip() and not any(mark in line for mark in cxx)]
