"""Progress of long work, shown three ways from one call site.

    with Progress("embed shard 0", total=len(items), unit="items") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

- In a terminal: a rich progress bar (count, rate, ETA), drawn on Prefect's own console so log
  lines print above it instead of through it; the finished bar is replaced by one log line.
- Piped (CI, a worker's log, `| tee`): a plain log line every `SIDPIPE_PROGRESS_SECONDS`
  (default 5) seconds, even while one batch runs long, each with count, rate and ETA.
- Either way, work that took a second or more ends with one line: count, time, rate.
- Inside a Prefect flow or task run: a progress artifact the UI shows, updated every few seconds.

`SIDPIPE_PROGRESS=bar|log|off` overrides the terminal check. Nothing here changes a result:
progress is observed, never waited on.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time

log = logging.getLogger("sidpipe.progress")

ARTIFACT_SECONDS = 3.0  # at most one Prefect API call per tracker per this many seconds


def show_sidpipe_info() -> None:
    """Make sidpipe's INFO lines (stage counts, progress) visible unless the user chose a level.
    Flows and the CLI call it; under Prefect its handlers take them, else (a command that runs
    no flow) a plain stderr handler in Prefect's format does."""
    logger = logging.getLogger("sidpipe")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    # Under Prefect, send them where a run's own lines go (the console and the API, so the UI
    # shows them), as PREFECT_LOGGING_EXTRA_LOGGERS=sidpipe would: a worker started without
    # that variable still shows ingest counts, skipped stages and quality warnings.
    # Only Prefect's API handler is taken: others found there (a test runner's capture handlers)
    # would see each line twice, since the console's lines already come through propagation.
    if "prefect.logging.handlers" in sys.modules:  # else Prefect has set up no handlers
        from prefect.logging.handlers import APILogHandler

        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            for handler in logging.getLogger("prefect.extra").handlers:
                if isinstance(handler, APILogHandler):
                    logger.addHandler(handler)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"
            )
        )
        logger.addHandler(handler)


def interval_seconds() -> float:
    try:
        return max(0.5, float(os.environ.get("SIDPIPE_PROGRESS_SECONDS", "5")))
    except ValueError:
        return 5.0


def duration(seconds: float) -> str:
    """`42s`, `6m05s`, `1h02m`: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _console():
    """The console Prefect's log handler prints to (so bars and log lines share one screen)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("sidpipe", "prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                return handler.console
    from rich.console import Console

    return Console(stderr=True)


def _mode() -> str:
    chosen = os.environ.get("SIDPIPE_PROGRESS", "").lower()
    if chosen in ("bar", "log", "off"):
        return chosen
    try:
        terminal = _console().is_terminal
    except Exception:  # noqa: BLE001 - no Prefect logging configured: look at stderr itself
        terminal = sys.stderr.isatty()
    return "bar" if terminal else "log"


def _add_progress_styles(console) -> None:
    """Prefect's console has its own theme, without rich's progress styles: add those."""
    from rich.default_styles import DEFAULT_STYLES
    from rich.errors import MissingStyle
    from rich.theme import Theme

    try:
        console.get_style("bar.back")
    except MissingStyle:
        names = ("bar.", "progress.")
        styles = {k: v for k, v in DEFAULT_STYLES.items() if k.startswith(names)}
        console.push_theme(Theme(styles, inherit=False))


class _Bars:
    """One rich Progress shared by every tracker of the process (shards run in threads)."""

    lock = threading.Lock()
    progress = None
    users = 0

    @classmethod
    def add(cls, description: str, total: int | None) -> int:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with cls.lock:
            if cls.progress is None:
                console = _console()
                _add_progress_styles(console)
                cls.progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[eta]}"),
                    TextColumn("{task.fields[status]}"),
                    console=console,
                    transient=True,
                )
                cls.progress.start()
            cls.users += 1
            return cls.progress.add_task(description, total=total, unit="", status="", eta="")

    @classmethod
    def remove(cls, task_id: int) -> None:
        with cls.lock:
            cls.progress.remove_task(task_id)
            cls.users -= 1
            if cls.users == 0:
                cls.progress.stop()
                cls.progress = None


def _artifact(description: str):
    """A Prefect progress artifact when called inside a flow or task run, else None."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    try:
        from sidpipe import artifacts

        return artifacts.progress(description)
    except Exception as exc:  # noqa: BLE001 - the UI's view must never fail the work
        log.debug("no progress artifact for %s: %s", description, exc)
        return None


class Progress:
    """A tracker of `total` units of work (None: unknown). Thread-safe; use as a context.
    `time_limit` (seconds): the work stops then whatever is left (a training budget), so the
    ETA is never later than that."""

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "items",
        artifact: bool = True,
        time_limit: float | None = None,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.time_limit = time_limit
        self.done, self.status = 0, ""
        self.mode = "off" if total == 0 else _mode()  # no work, nothing to show
        self.started = self._last_artifact = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        self._artifact = _artifact(f"{what}: share of {unit} done") if artifact else None
        self._stop, self._closed = threading.Event(), False
        if self.mode == "bar":
            self._bar = _Bars.add(what, total)
            _Bars.progress.update(self._bar, unit=unit)
        elif self.mode == "log":
            # A line every interval even while one batch runs long: never silent. The thread
            # runs in this context, so inside a Prefect run its lines reach the run's logs too.
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._lines,),
                name=f"progress-{what}",
                daemon=True,
            ).start()

    def _lines(self) -> None:
        while not self._stop.wait(interval_seconds()):
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.update(self.done + n, status)

    def update(self, done: int, status: str | None = None, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if status is not None:
                self.status = status
            if total is not None:
                self.total = total
            now = time.monotonic()
            if self._bar is not None:
                _Bars.progress.update(
                    self._bar,
                    completed=done,
                    total=self.total,
                    status=self.status,
                    eta=self._eta_text(),
                )
            if self._artifact is not None and now - self._last_artifact >= ARTIFACT_SECONDS:
                self._last_artifact = now
                self._push_artifact()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def eta(self) -> float | None:
        if not self.total or not self.done:
            return None
        return min(max(self.total - self.done, 0) / self.rate(), self._time_left())

    def _time_left(self) -> float:
        if self.time_limit is None:
            return float("inf")
        return max(self.time_limit - (time.monotonic() - self.started), 0.0)

    def _eta_text(self) -> str:
        """`ETA 5m02s`, `ETA 18m40s (time limit)` when the limit ends the work first, or ``."""
        if (eta := self.eta()) is None:
            return ""
        return f"ETA {duration(eta)}" + (" (time limit)" if eta >= self._time_left() else "")

    def _count(self) -> str:
        if self.total:
            share = 100.0 * self.done / self.total
            return f"{self.done:,}/{self.total:,} {self.unit} ({share:.0f}%)"
        return f"{self.done:,} {self.unit}"

    def line(self) -> str:
        """`embed shard 0: 4,096/50,000 items (8%), 152 items/s, ETA 5m02s, loss 0.31`"""
        parts = [self._count(), f"{self.rate():,.1f} {self.unit}/s"]
        if eta := self._eta_text():
            parts.append(eta)
        if self.status:
            parts.append(self.status)
        return f"{self.what}: " + ", ".join(parts)

    def _push_artifact(self, finished: bool = False) -> None:
        try:
            from prefect.artifacts import update_progress_artifact

            share = 100.0 * self.done / self.total if self.total else 0.0
            share = 100.0 if finished else share
            update_progress_artifact(self._artifact, min(share, 100.0))
        except Exception as exc:  # noqa: BLE001 - the UI's view must never fail the work
            log.debug("progress artifact of %s not updated: %s", self.what, exc)
            self._artifact = None

    def close(self, failed: bool = False) -> None:
        """The last word: one line with the whole count and time (the bar goes away)."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                _Bars.remove(self._bar)
                self._bar = None
            if self.mode == "off":
                return
            if self._artifact is not None and not failed:
                self._push_artifact(finished=True)
                self._artifact = None
            took = time.monotonic() - self.started
            if took < 1.0 and not failed:
                return  # quick work needs no word
            if failed:
                log.info("%s: stopped after %s (%s)", self.what, duration(took), self._count())
            else:
                status = f", {self.status}" if self.status else ""
                log.info(
                    "%s: %s in %s (%s %s/s)%s",
                    self.what,
                    f"{self.done:,} {self.unit}",
                    duration(took),
                    f"{self.rate():,.1f}",
                    self.unit,
                    status,
                )
