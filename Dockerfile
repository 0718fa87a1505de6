# sidpipe project image: the pipeline, its CLI and a Prefect worker (`prefect worker start`).
# docker-compose.yml builds it for the bootstrap service and both workers.
#
#   CPU (default):  docker build -t sidpipe:0.1.0 .
#   GPU:            docker build -t sidpipe:0.1.0-gpu --build-arg EXTRAS=gpu,dask \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The GPU variant swaps faiss-cpu for faiss-gpu (a CUDA 12 build that brings its own CUDA runtime
# wheels) and takes a CUDA 12 torch so both use one CUDA major. vLLM is not in here: its fastapi and
# torch pins clash with Prefect's, so the model servers run as their own containers.

# Pinned to a patch release; pin a digest (python:3.11.14-slim-bookworm@sha256:...) for bit-for-bit rebuilds.
FROM python:3.11.14-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=cpu,dask

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=sidpipe \
    SIDPIPE_APP_DIR=/app

WORKDIR /app

# torch first and from its own index: left to pip, `torch>=2.2` in pyproject.toml resolves to the
# multi-GB CUDA build from PyPI even for the CPU image.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Dependencies in their own layer, so a code change does not reinstall them: install the project
# editable against empty package folders, which the real code then fills (the editable install
# points at the folders, not at their files).
COPY pyproject.toml README.md ./
RUN for pkg in sidpipe sidpipe/cli data flows flows/presets/genrec flows/presets/aktrec flows/presets/asymrec tasks tasks/training models storage; do \
        mkdir -p "$pkg" && touch "$pkg/__init__.py"; \
    done \
    && pip install -e ".[${EXTRAS}]"

COPY . .

# The workers run flows as subprocesses from /app (prefect.yaml's pull step: SIDPIPE_APP_DIR).
CMD ["prefect", "worker", "start", "--pool", "cpu-pool"]
