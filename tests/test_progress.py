"""Progress: periodic lines when piped, a bar in a terminal, an artifact in a Prefect run."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest
from rich.console import Console

from sidpipe import progress as progress_module
from sidpipe.progress import Progress, duration


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sidpipe.progress"]


def test_piped_output_is_a_line_every_interval_with_count_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setenv("SIDPIPE_PROGRESS", "log")
    monkeypatch.setenv("SIDPIPE_PROGRESS_SECONDS", "0.5")
    caplog.set_level(logging.INFO, logger="sidpipe.progress")
    with Progress("embed shard 0", total=40, unit="items") as bar:
        for _ in range(4):
            time.sleep(0.4)
            bar.advance(10, status="2 failed")
    lines = progress_lines(caplog)
    periodic = lines[:-1]
    assert len(periodic) >= 2, lines  # 1.6 s of work at one line per 0.5 s
    assert all(
        re.fullmatch(r"embed shard 0: \d+/40 items \(\d+%\), [\d.]+ items/s.*", line)
        for line in periodic
    ), periodic
    assert any("ETA" in line and line.endswith("2 failed") for line in periodic), periodic
    assert re.fullmatch(r"embed shard 0: 40 items in [12]s \([\d.]+ items/s\), 2 failed", lines[-1])


def test_a_long_batch_still_gets_lines(monkeypatch, caplog):
    """The line comes from a timer, not from the work: one slow batch is not silence."""
    monkeypatch.setenv("SIDPIPE_PROGRESS", "log")
    monkeypatch.setenv("SIDPIPE_PROGRESS_SECONDS", "0.5")
    caplog.set_level(logging.INFO, logger="sidpipe.progress")
    with Progress("fit rqvae", total=None, unit="steps"):
        time.sleep(1.3)
    lines = progress_lines(caplog)
    assert sum(line.startswith("fit rqvae: 0 steps,") for line in lines) >= 2, lines


def test_no_or_quick_work_shows_nothing_and_a_failure_says_where_it_stopped(monkeypatch, caplog):
    monkeypatch.setenv("SIDPIPE_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="sidpipe.progress")
    with Progress("embed shard 1", total=0):
        pass
    with Progress("assign: encode", total=1000) as bar:
        bar.advance(1000)
    assert progress_lines(caplog) == []
    with pytest.raises(RuntimeError), Progress("embed shard 2", total=10) as bar:
        bar.advance(3)
        raise RuntimeError("boom")
    assert progress_lines(caplog)[-1].startswith("embed shard 2: stopped after 0s (3/10 items")


def test_a_time_limit_caps_the_eta_and_says_so(monkeypatch, caplog):
    """Training with a budget: 200 epochs' steps would take hours, the limit ends it in
    seconds; the ETA is the limit's, not the steps'."""
    monkeypatch.setenv("SIDPIPE_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="sidpipe.progress")
    with Progress("train tiger", total=100_000, unit="steps", time_limit=30) as bar:
        time.sleep(0.2)
        bar.advance(10)
        limited = bar.line()
    with Progress("train tiger", total=20, unit="steps", time_limit=3600) as bar:
        time.sleep(0.2)
        bar.advance(10)
        free = bar.line()
    assert re.search(r"ETA (2\d|30)s \(time limit\)$", limited), limited  # not hours
    assert re.search(r"ETA \ds$", free), free  # the steps end first: no mention of the limit


def test_in_a_terminal_a_bar_is_drawn_and_replaced_by_one_line(monkeypatch, caplog):
    screen = io.StringIO()
    monkeypatch.setenv("SIDPIPE_PROGRESS", "bar")
    monkeypatch.setattr(
        progress_module, "_console", lambda: Console(file=screen, force_terminal=True, width=120)
    )
    caplog.set_level(logging.INFO, logger="sidpipe.progress")
    with Progress("train cpu-small", total=5, unit="steps", time_limit=1) as bar:
        for _ in range(5):
            bar.advance(status="epoch 1/1 ETA 0s, loss 1.0000")
            time.sleep(0.3)  # rich redraws 10 times a second
    assert "train cpu-small" in screen.getvalue()
    assert "5/5" in screen.getvalue()
    assert "ETA 0s (time limit)" in screen.getvalue()
    assert progress_lines(caplog)[-1].startswith("train cpu-small: 5 steps in ")


def test_inside_a_prefect_run_an_artifact_follows_the_work(prefect_api, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    monkeypatch.setenv("SIDPIPE_PROGRESS", "log")

    @flow
    def work() -> None:
        with Progress("assign: encode", total=3) as bar:
            bar.advance(3)

    run_id = work(return_state=True).state_details.flow_run_id
    with get_client(sync_client=True) as client:  # this run's only: the session has many more
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                type=ArtifactFilterType(any_=["progress"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            )
        )
    mine = [a for a in artifacts if (a.description or "").startswith("assign: encode")]
    assert mine and mine[-1].data == 100.0


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_sidpipe_lines_reach_the_api_handler_once_and_nothing_else_is_borrowed():
    """Prefect's API handler is shared with the `sidpipe` logger once; other handlers found on
    `prefect.extra` (a test runner's capture) are not, or each line would be seen twice."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import APILogHandler

    from sidpipe.progress import show_sidpipe_info

    setup_logging()
    extra, sidpipe_logger = logging.getLogger("prefect.extra"), logging.getLogger("sidpipe")
    foreign = logging.NullHandler()
    before = list(sidpipe_logger.handlers)
    extra.addHandler(foreign)
    try:
        show_sidpipe_info()
        show_sidpipe_info()
        assert foreign not in sidpipe_logger.handlers
        assert sum(isinstance(h, APILogHandler) for h in sidpipe_logger.handlers) == 1
    finally:
        extra.removeHandler(foreign)
        sidpipe_logger.handlers = before


def test_prefect_prints_to_the_sessions_stream_not_to_one_tests_capture(capsys):
    """Run in any order, a test that captures output must not leave Prefect's console (which
    flows' log lines and progress bars use) holding its capture file, closed once it ends."""
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    prefects = [
        handler
        for logger in loggers
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, logging.StreamHandler)
        and type(handler).__module__.startswith("prefect.")
    ]
    assert any(isinstance(handler, PrefectConsoleHandler) for handler in prefects)
    streams = [
        h.console.file if isinstance(h, PrefectConsoleHandler) else h.stream for h in prefects
    ]
    assert all(stream is not sys.stderr and not stream.closed for stream in streams)
