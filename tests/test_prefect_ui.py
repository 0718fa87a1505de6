"""A backfill launched from the Prefect UI, in a real browser (Chromium via Playwright).

The operator's path: Deployments -> backfill -> Run -> Custom run, the typed form (two date
pickers, the nightly deployment, the overrides), Submit, the finished run; then a range whose
end is before its start, which fails with a readable state message. Screenshots of each step go
to docs/ (`scripts/slow_checks.sh` runs this; `-m ui`, not part of the default test run).
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import date
from pathlib import Path

import pytest
from conftest import sample_rows, write_catalog
from real_servers import Api, sidpipe_on_prefect

pytestmark = [pytest.mark.ui, pytest.mark.slow]
DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = os.environ.get("SIDPIPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[ui]'")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium (apt-get install chromium, or set SIDPIPE_CHROMIUM)")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def pick_date(page, day: str) -> None:
    """Fill the first empty date picker (`day`: YYYY-MM-DD): open it, type the date, Apply."""
    page.get_by_text("Select date").first.click()
    page.locator("input[type=date]:visible").fill(day)  # the picker's "Selected Date" field
    page.get_by_role("button", name="Apply").locator("visible=true").click()
    when = date.fromisoformat(day)
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(when.day % 10 if when.day // 10 != 1 else 0, "th")
    page.get_by_text(f"{when:%b} {when.day}{suffix}, {when.year}").first.wait_for()  # Nov 1st


def custom_run(page, ui: str, deployment: str) -> None:
    """Deployments -> the deployment -> Run -> Custom run."""
    page.goto(f"{ui}/deployments")
    page.get_by_role("link", name=deployment, exact=True).first.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.wait_for_load_state("networkidle")
    page.locator("button", has_text="Run").filter(has_not_text="V2").first.click()
    page.get_by_text("Custom run").click()
    page.wait_for_url("**/run**")
    page.get_by_text("Parameters").first.wait_for()


def submit(page, api: Api, deployment: dict) -> str:
    """Press Submit; the id of the run it created."""
    before = {r["id"] for r in api.runs_of(deployment)}
    page.get_by_role("button", name="Submit", exact=True).click()
    for _ in range(30):
        new = [r for r in api.runs_of(deployment) if r["id"] not in before]
        if new:
            (run,) = new
            return run["id"]
        time.sleep(0.5)
    page.screenshot(path=str(DOCS / "prefect-ui-submit-failed.png"), full_page=True)
    raise AssertionError("Submit created no run (see docs/prefect-ui-submit-failed.png)")


def test_a_backfill_launched_from_the_prefect_ui(browser, tmp_path):
    catalog = write_catalog(tmp_path / "catalog", sample_rows(120))
    with sidpipe_on_prefect(tmp_path, catalog) as stack:
        api = Api(stack.api)
        backfill = api.deployment("sidpipe-backfill/backfill")
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        # The nightly form: config's sections and fields with their descriptions.
        custom_run(page, stack.ui, "nightly")
        page.get_by_text("Artifact store root").first.wait_for()
        page.get_by_text("Catalog (Optional)", exact=True).first.scroll_into_view_if_needed()
        page.screenshot(path=str(DOCS / "prefect-ui-nightly-form.png"))

        custom_run(page, stack.ui, "backfill")
        page.get_by_text("The first date to tokenize.").wait_for(timeout=10_000)
        pick_date(page, "2026-11-01")
        pick_date(page, "2026-11-02")
        page.screenshot(path=str(DOCS / "prefect-ui-custom-run.png"))
        launched = submit(page, api, backfill)
        run = api.wait(launched, 600)
        assert run["state"]["type"] == "COMPLETED", stack.worker_log.read_text()[-4000:]
        assert (
            run["parameters"]["start"] == "2026-11-01" and run["parameters"]["end"] == "2026-11-02"
        )
        published = sorted(p.name for p in (stack.store / "sids" / "shop").iterdir())
        assert published == ["2026-11-01", "2026-11-02"]  # in the worker's store
        api.logs_once(launched, "Finished")
        page.goto(f"{stack.ui}/runs/flow-run/{launched}")
        page.get_by_text("backfill 2026-11-02: Completed").first.wait_for()
        page.screenshot(path=str(DOCS / "prefect-ui-backfill-finished.png"))

        # A range whose end is before its start: a readable state message, no traceback.
        custom_run(page, stack.ui, "backfill")
        pick_date(page, "2026-11-05")
        pick_date(page, "2026-11-04")
        failed = submit(page, api, backfill)
        run = api.wait(failed, 300)
        assert run["state"]["type"] == "FAILED"
        assert "backfill range is empty" in run["state"]["message"]
        api.logs_once(failed, "Finished")
        page.goto(f"{stack.ui}/runs/flow-run/{failed}")
        page.get_by_text("backfill range is empty").first.wait_for()
        assert "Traceback" not in page.content()
        page.screenshot(path=str(DOCS / "prefect-ui-bad-range.png"))
