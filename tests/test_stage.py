"""Stage plumbing: which failures Prefect retries."""

import pytest
from prefect.states import Failed

from sidpipe.errors import CatalogError, CatalogTooSmallError, StoreError
from sidpipe.tasks.stage import retry_if_transient


@pytest.mark.parametrize(
    "error,retried",
    [
        (StoreError("s3 503"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (CatalogError("no item_id column"), False),
        (CatalogTooSmallError("too small"), False),
        (FileNotFoundError("gone"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_transient_errors_are_retried(error, retried):
    assert retry_if_transient(None, None, Failed(data=error)) is retried
