"""A test double of a crash: runs the nightly flow and SIGKILLs its own process at a chosen point.

    python tests/crash_runner.py CONFIG_JSON RUN_DATE POINT

POINT is `embed-shard:N` (right after the N-th embed shard's checkpoint is written), or
`before:GLOB` / `after:GLOB`: right before / after the first store write whose path (relative
to the store root) matches GLOB, e.g. `after:tokenizers/*/model.safetensors` (the tokenizer's
weights are written, its config not yet) or `before:runs/*/sids.parquet` (fit is done, assign
has written nothing). SIGKILL runs no cleanup: no `finally`, no `except`, no Prefect state
change, as when a machine dies.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import sys
from datetime import date


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    config_json, run_date, point = sys.argv[1], date.fromisoformat(sys.argv[2]), sys.argv[3]
    from sidpipe.config import PipelineConfig
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks import shards as stage

    if point.startswith("embed-shard:"):
        after = int(point.split(":")[1])
        original = stage.save_checkpoint
        seen = []

        def save_then_maybe_die(store, run, outcome, items):
            original(store, run, outcome, items)
            if outcome.stage == "embed":
                seen.append(run.shard)
                if len(seen) == after:
                    die()

        stage.save_checkpoint = save_then_maybe_die
    else:
        when, pattern = point.split(":", 1)
        assert when in ("before", "after"), point
        original_write, original_copy = ArtifactStore.write_bytes, ArtifactStore.copy

        def maybe_die(parts, write):
            hit = fnmatch.fnmatch("/".join(parts), pattern)
            if hit and when == "before":
                die()
            result = write()
            if hit:
                die()
            return result

        # Publishing copies staged files to their names; everything else writes bytes.
        ArtifactStore.write_bytes = lambda self, data, *parts: maybe_die(
            parts, lambda: original_write(self, data, *parts)
        )
        ArtifactStore.copy = lambda self, source, target: maybe_die(
            target, lambda: original_copy(self, source, target)
        )

    from sidpipe.flows.nightly import nightly_tokenization

    nightly_tokenization(PipelineConfig.model_validate(json.loads(config_json)), run_date=run_date)
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main()
