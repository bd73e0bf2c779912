"""The project's bad-input rule, as tests check it: one ``flare-rt: error:`` line and no traceback."""
from __future__ import annotations


def error_line(err: str) -> str:
    """The single ``flare-rt: error:`` line of the stderr text ``err``, which holds no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flare-rt: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def one_error_line(capture) -> str:
    """The single ``flare-rt: error:`` line on stderr (``capture``: pytest's capsys or capfd)."""
    return error_line(capture.readouterr().err)
