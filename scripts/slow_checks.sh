#!/usr/bin/env bash
# The real-server checks too slow or too big for CI, in one command:
# - the Prefect UI in a real browser: PostgreSQL + a Prefect server + a worker, then Deployments ->
#   backfill -> Custom run in Chromium, a backfill launched and finished, a bad range that fails
#   with a readable message; screenshots land in docs/prefect-ui-*.png;
# - the caption stage against a real vLLM server with a tiny Qwen2-VL-style model (its venv takes
#   the CUDA torch and torchvision wheels, 6.3 GB, built once under ~/.cache/sidpipe).
# Run after the README's test set-up (.venv). Installs Debian's chromium and Playwright's Python
# package when missing (no browser download: Playwright drives the system Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
fi
. "${VENV:-.venv}/bin/activate"
python -c "import playwright" 2>/dev/null || pip install -q -e ".[ui]"
python -m pytest -m "ui or vision" -q -s tests/test_prefect_ui.py tests/test_vllm_real.py "$@"
