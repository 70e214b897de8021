"""The rank-0 progress bar: drawn on a terminal at most once a second, never into a log file or pipe."""

from __future__ import annotations

import io
import logging

import pytest

from retinaflow.engine.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> str:
    monkeypatch.setattr("sys.stderr", stream)
    progress = Progress(1000, 0)
    for it in range(1, 501):
        progress.update(it, {"loss": 0.5, "lr": 1e-3, "img_s": 10.0} if it % 100 == 0 else None)
    progress.close()
    return stream.getvalue()


def test_a_terminal_gets_a_bar_redrawn_at_most_once_a_second(monkeypatch) -> None:
    drawn = _run(monkeypatch, _Terminal())
    assert 1 <= drawn.count("\r") <= 3  # 500 updates in well under a second: first draw and the close
    assert "500/1000" in drawn


def test_a_log_file_gets_the_window_lines_only(monkeypatch, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="retinaflow.train"):
        assert _run(monkeypatch, io.StringIO()) == ""  # a pod's log: no bar redrawn per iteration
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "iter 100 loss=0.5 lr=0.001 img/s=10.0" and len(lines) == 5
