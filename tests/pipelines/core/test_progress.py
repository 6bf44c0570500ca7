"""Progress bars: in a log (not a terminal) whole lines, at most one every STILLROOM_PROGRESS_INTERVAL seconds."""

from __future__ import annotations

import io

from stillroom.pipelines.core import ProgressBar


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bar_in_a_log_prints_a_line_at_most_every_interval(monkeypatch):
    monkeypatch.setenv("STILLROOM_PROGRESS_INTERVAL", "10")
    log, clock = io.StringIO(), _Clock()
    bar = ProgressBar(total=470, desc="teacher epoch 0 of 1", file=log, unit="batch")
    bar._time = clock  # tqdm reads the time through this attribute
    bar.start_t = bar.last_print_t = clock.now
    for _ in range(470):  # one update every 0.25 s: 117.5 s in all
        clock.now += 0.25
        bar.update(1)
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    # the first line, then one line each 10 s of the 117.5 s (11), then the closing one
    assert 12 <= len(lines) <= 14, lines
    assert lines[0].startswith("teacher epoch 0 of 1:   0%") and "470/470" in lines[-1]


def test_a_bar_in_a_terminal_redraws_in_place(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = ProgressBar(total=3, desc="x", file=term, mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert term.getvalue().count("\r") >= 3 and term.getvalue().count("\n") == 1
