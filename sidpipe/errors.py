"""Every failure sidpipe expects, in one place: what went wrong, what to do, which exit code.

An expected failure (bad input, bad settings, a server or store that cannot be used) raises a
`SidpipeError` subclass. The CLI prints it as two lines (`error:` and `hint:`) and exits with its
code; a Prefect run fails with the same text as its state message; neither shows a traceback.
Anything else is a bug and keeps its traceback.

Per-item problems (an image that cannot be decoded, a malformed model answer) are not here: they
are recorded per item and the run goes on.

This module imports nothing of sidpipe: every layer may raise these.
"""

from __future__ import annotations

# Exit codes: 1 some of the work ran and failed (see the run log), 2 the input or the settings,
# 3 something the run needs is unavailable right now (try again later), 4 the result is below a
# quality bar the settings ask for.
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_QUALITY = 4


class SidpipeError(Exception):
    """An expected failure: a one-line `message`, a `hint` saying what to do, an exit code."""

    exit_code: int = EXIT_INPUT
    hint: str = ""
    # What a run stopped by this error had done ({"counts": ..., "stages": ...}): its run log
    # records it, so the counts of a run that published nothing still add up.
    accounting: dict | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable with its hint (process, Dask and Ray task runners)
        return (type(self), (self.message, self.hint))

    @property
    def one_line(self) -> str:
        """Message and hint on one line: a Prefect state message, a run log entry."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigError(SidpipeError, ValueError):
    """A configuration file or value that cannot be used."""

    hint = "`sidpipe config` prints the effective settings; see the README's Configuration"


class CatalogError(SidpipeError, ValueError):
    """The catalog as a whole cannot be read."""

    hint = (
        "a catalog is a Parquet, JSONL or CSV file (local or s3://) with an item_id column "
        "(rename your id column to item_id)"
    )


class CatalogSourceError(SidpipeError, ValueError):
    """A catalog name already stands for another source file."""

    hint = "give this catalog its own name with --catalog-name"


class CatalogTooSmallError(SidpipeError, ValueError):
    """Too few items for the tokenizer's codebooks, and the settings say not to shrink them."""

    hint = "use smaller tokenizer.codebook_sizes, or tokenizer.small_catalog=shrink"


class NoItemsLeftError(SidpipeError, RuntimeError):
    """Every item failed or was quarantined before the tokenizer: nothing can be published."""

    exit_code = EXIT_FAILED
    hint = (
        "each item's reason is in the run's errors.parquet (`sidpipe inspect --runs`); fix the "
        "cause and run again: finished work is kept and failed items are retried"
    )


class EmbeddingInputError(SidpipeError, ValueError):
    """Embeddings that cannot be tokenized at all (e.g. rows of different dimensions)."""

    hint = "an embeddings file has item_id and embedding (a list of floats of one length)"


class TokenizerMismatchError(SidpipeError, RuntimeError):
    """The pinned tokenizer was fitted on other embeddings than this run's."""

    hint = "refit (`sidpipe run --refit`, SIDs change and a drift report is written) or restore the embedding settings"


class QualityGateError(SidpipeError, RuntimeError):
    """A fitted tokenizer is below a configured quality threshold; it is not pinned."""

    exit_code = EXIT_QUALITY
    hint = "try smaller codebooks, more epochs or tokenizer.method=rqkmeans"


class TokenizerNotFound(SidpipeError, LookupError):
    """No such tokenizer version for a catalog."""

    hint = "`sidpipe tokenizers CATALOG` lists a catalog's versions"


class PublishedRunNotFound(SidpipeError, LookupError):
    """No published run (no _MANIFEST.json) for a catalog or date, or a file it lists is gone."""

    hint = "`sidpipe inspect` lists the published runs of a store"


class TrainingDataError(SidpipeError, ValueError):
    """The published artifacts or the interactions cannot be trained on."""

    hint = "interactions are a Parquet file with user_id, item_id and timestamp"


class SidDiffError(SidpipeError, ValueError):
    """Two SID tables that cannot be compared."""


class BackfillError(SidpipeError, RuntimeError):
    """Some dates of a backfill did not publish."""

    exit_code = EXIT_FAILED
    hint = "`sidpipe inspect` shows each date's run and its error; run the range again to retry"


class EndpointUnavailableError(SidpipeError, RuntimeError):
    """A model server cannot be used at all (down, wrong model): the stage must not start."""

    exit_code = EXIT_UNAVAILABLE
    hint = "check the server's URL and that it serves the configured model (GET <url>/models)"


class DeploymentNotFound(SidpipeError, LookupError):
    """The Prefect server has no such deployment."""

    exit_code = EXIT_UNAVAILABLE
    hint = "deploy sidpipe's flows there first: PREFECT_API_URL=... sidpipe bootstrap --deploy"


class PrefectServerUnavailable(SidpipeError, RuntimeError):
    """PREFECT_API_URL names a server that does not answer."""

    exit_code = EXIT_UNAVAILABLE
    hint = "start the server (prefect server start) or fix PREFECT_API_URL"


class StoreError(SidpipeError, RuntimeError):
    """The artifact store could not be read or written."""

    exit_code = EXIT_UNAVAILABLE
    hint = "check the store URI, that it is writable, and for s3:// the AWS_* credentials"


class CorruptArtifactError(StoreError):
    """A stored file is not what was written: truncated, or its bytes fail their checksum."""

    exit_code = EXIT_FAILED
    hint = "restore the file from a backup or delete it; cached work is recomputed"


class LockHeldError(SidpipeError, RuntimeError):
    """Another run holds the catalog's lock."""

    exit_code = EXIT_UNAVAILABLE
    hint = "wait for that run, or set orchestration.lock_wait_seconds to queue behind it"


class LockLostError(SidpipeError, RuntimeError):
    """This run's catalog lock lapsed and another run took it over; it must not write."""

    exit_code = EXIT_UNAVAILABLE
    hint = "raise orchestration.lock_ttl_seconds if runs stall longer than the lease"


class BootstrapError(SidpipeError, RuntimeError):
    """The Prefect server cannot be prepared as asked (no API, a clash with what exists)."""

    exit_code = EXIT_UNAVAILABLE
    hint = "set PREFECT_API_URL to a running Prefect server"
