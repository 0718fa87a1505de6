"""The `sidpipe` command line: commands parse options, call one function, render the result.

One module per command family (`run`: run and backfill; `inspect`; `tokenizers`: fit and the
registry; `train`; `admin`: bootstrap and config). Every expected failure is a `SidpipeError`:
the app prints it as an `error:` line and a `hint:` line and exits with its code, no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from typer.core import TyperGroup, TyperOption

from sidpipe.cli.render import console, err, print_error
from sidpipe.errors import SidpipeError
from sidpipe.redact import redact_urls

__all__ = ["app", "console", "err"]


class _Commands(TyperGroup):
    """Runs a command; an expected failure becomes two lines and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SidpipeError as exc:
            print_error(redact_urls(exc.message), exc.hint)
            raise typer.Exit(code=exc.exit_code) from None


def prefect_defaults() -> None:
    """Quiet, robust defaults for Prefect's ephemeral API; set before Prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sidpipe")
    # sidpipe's log lines outside a flow run (`sidpipe fit`, progress) stay local, silently.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _flags_show_no_value() -> None:
    """Typer's help prints `<bool>` after a flag as if it took a value: print nothing there."""
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_show_no_value()
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="sidpipe",
    cls=_Commands,
    help="Turn an item catalog into Semantic IDs (SIDs) for generative recommendation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings=HELP,
)


def _print_version(value: bool) -> None:
    if value:
        from sidpipe import __version__

        console.print(f"sidpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Turn an item catalog into Semantic IDs (SIDs) for generative recommendation."""


from sidpipe.cli import admin, inspect, run, tokenizers, train  # noqa: E402

for module in (run, inspect, tokenizers, admin):
    module.register(app)
app.add_typer(train.app, name="train")
