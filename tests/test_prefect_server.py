"""The README's production path on real servers: PostgreSQL, a Prefect server on it, a worker.

Done as an operator would (`real_servers.sidpipe_on_prefect`: `sidpipe bootstrap --deploy` with
a local results folder, a process worker with nothing but its settings), then runs through the
server's REST API, as the UI makes them: one nightly run, a two-date backfill with a competing
nightly run, and the expected failures. Asserts what an operator sees: states and their
messages, order and one-at-a-time, artifacts and sidpipe's log lines on the deployment's run,
the parameter form's defaults, no tracebacks for expected failures.
"""

from __future__ import annotations

import pytest
from conftest import sample_rows, write_catalog
from real_servers import Api, sidpipe_on_prefect

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_nightly_and_backfill_on_a_prefect_server_on_postgresql(tmp_path):
    catalog = write_catalog(tmp_path / "catalog", sample_rows(120))
    with sidpipe_on_prefect(tmp_path, catalog) as stack:
        check_the_production_path(stack)


def check_the_production_path(stack) -> None:
    assert "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=local-file-system/sidpipe-results" in (
        stack.bootstrap_output
    )
    api, store = Api(stack.api), stack.store
    nightly, backfill = (
        api.deployment("nightly-tokenization/nightly"),
        api.deployment("sidpipe-backfill/backfill"),
    )
    # The deployer's own SIDPIPE_STORE did not become the form's default.
    form = nightly["parameter_openapi_schema"]["properties"]["config"]
    assert form["default"]["store"] == "./artifacts", form["default"]

    first = api.start(nightly, {"run_date": "2026-11-01"})
    run = api.wait(first)
    assert run["state"]["type"] == "COMPLETED", (run["state"], stack.worker_log.read_text()[-5000:])
    # Artifacts and sidpipe's own lines are on the run the operator opens.
    keys = {a["key"] for a in api.artifacts(first)}
    assert {"tokenization-stages", "sid-table", "published-files", "sid-quality"} <= keys
    lines = api.logs_once(first, "published shop/2026-11-01")
    assert any("published shop/2026-11-01" in line["message"] for line in lines), lines
    (dag,) = api.runs_named("tokenize-shop-2026-11-01")  # the subflow, named for its day
    lines = api.logs_once(dag["id"], "ingest: 120 rows")
    assert any(line["name"].startswith("sidpipe") for line in lines), lines[:20]
    assert any(line["message"].startswith("ingest: 120 rows") for line in lines)

    # A two-date backfill and a nightly run started beside it: one at a time, in order.
    filled = api.start(backfill, {"start": "2026-11-02", "end": "2026-11-03"})
    # ... with every field of the form's config, as the UI's Custom run sends it: the
    # documented defaults in it must not hide the worker's store and catalog.
    beside = api.start(nightly, {"run_date": "2026-11-04", "config": form["default"]})
    run = api.wait(filled, 900)
    assert run["state"]["type"] == "COMPLETED", (run["state"], stack.worker_log.read_text()[-5000:])
    assert api.wait(beside)["state"]["type"] == "COMPLETED"
    assert "backfill-summary" in {a["key"] for a in api.artifacts(filled)}
    started = [r for r in api.runs_of(nightly) if r["start_time"]]  # not the cron's next
    runs = sorted(started, key=lambda r: r["start_time"])
    assert len(runs) == 4 and all(r["state"]["type"] == "COMPLETED" for r in runs)
    dates = [r["parameters"]["run_date"] for r in runs if r["name"].startswith("backfill-")]
    assert dates == ["2026-11-02", "2026-11-03"]
    for before, after in zip(runs, runs[1:], strict=False):
        assert before["end_time"] <= after["start_time"], (before, after)  # never two
    published = sorted(p.name for p in (store / "sids" / "shop").iterdir())
    assert published == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]

    # Expected failures: a readable state message, no traceback in any log line.
    empty = api.start(backfill, {"start": "2026-11-05", "end": "2026-11-04"})
    run = api.wait(empty, 300)
    assert run["state"]["type"] == "FAILED"
    assert "backfill range is empty" in run["state"]["message"]
    catalog_gone = {"uri": str(store.parent / "gone.csv"), "name": "gone"}
    failing = api.start(
        backfill,
        {"start": "2026-11-05", "end": "2026-11-05", "overrides": {"catalog": catalog_gone}},
    )
    run = api.wait(failing, 300)
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert "2026-11-05" in message and "gone.csv" in message, message  # which date and why
    (child,) = api.runs_named("backfill-2026-11-05")
    for run_id in (empty, failing, child["id"]):
        text = "\n".join(line["message"] for line in api.logs_once(run_id, "Finished"))
        assert "Traceback" not in text and "unexpected" not in text, text
