"""How a flow fails on an expected error: with its message as the run's state, no traceback.

`@fail_cleanly` (under `@flow`) turns a `SidpipeError` into a Failed state whose message is the
error's text (and hint): that is what the Prefect UI shows, and calling the flow still raises
the error itself. A filter on Prefect's run loggers drops the traceback of such an error from
the logs (its message stays) and the engine's "exited with unexpected exception" line after
it, so each expected failure is one line. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging

from prefect.states import Failed

from sidpipe.errors import SidpipeError

# What Prefect's engine logs when a deployment's run ends Failed (its subprocess re-raises the
# state's error): for an expected error the state message has already said it all.
_ENGINE_EXIT = "Engine execution exited with unexpected exception"


class _NoTracebackForExpectedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, SidpipeError):
            if record.msg == _ENGINE_EXIT:
                return False
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_errors() -> None:
    """Install the filter on Prefect's flow and task run loggers (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForExpectedErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForExpectedErrors())


def fail_cleanly(fn):
    """Decorate a flow function (below `@flow`): expected errors end it as a clean Failed state."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SidpipeError as exc:
            return Failed(message=exc.one_line, data=exc)

    # Prefect builds its parameter model from the signature and resolves annotations in the
    # wrapper's module: hand it the flow's signature with the annotations already resolved.
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


quiet_expected_errors()
