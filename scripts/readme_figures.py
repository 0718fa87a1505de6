"""Regenerate the README's figures on this machine, and say which machine and how busy it was.

    python scripts/readme_figures.py            # quick: the sample run (first and second), its
                                                # SID table head, the beam-search benchmark (~3 min)
    python scripts/readme_figures.py --long     # also Beauty: tokenize, then cpu-small training
                                                # (~30 min on 2 cores)

Every figure comes from a command the README shows, run here in a fresh folder with a fresh
PREFECT_HOME, so what a newcomer runs is what is measured. Wall times depend on the machine and on
what else runs on it: the load average before and after each step is printed beside it. Results
that do not depend on load (SIDs, tokenizer ids, file hashes, metrics) must match the README
exactly on a machine like this one (see the README's "Determinism").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATE = "2026-11-24"  # the README's example run


def machine() -> str:
    cpu = "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def run(title: str, command: list[str], cwd: Path, env: dict) -> tuple[str, float, float]:
    """Run a README command; returns its output, wall seconds and peak RSS (GB) of the child."""
    before = load()
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    done = subprocess.run(
        [*timer, *command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    rss = float(done.stderr.strip().splitlines()[-1]) / 2**20 if timer else float("nan")
    if done.returncode != 0:
        sys.exit(f"{title} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    print(f"\n## {title}\n$ {' '.join(command)}")
    print(f"wall {seconds:.1f} s, peak RSS {rss:.2f} GB ({before} before, {load()} after)")
    print(f"longest silence between log lines: {longest_silence(done.stderr):.1f} s")
    return done.stdout, seconds, rss


def longest_silence(log: str) -> float:
    """The longest gap between two timestamped log lines (Prefect's `HH:MM:SS.mmm | ...`)."""
    stamps = [
        int(h) * 3600 + int(m) * 60 + float(s)
        for h, m, s in re.findall(r"^(\d\d):(\d\d):(\d\d\.\d+) \|", log, re.MULTILINE)
    ]
    return max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=0.0)


def sample(folder: Path, env: dict) -> None:
    sidpipe = [sys.executable, "-m", "sidpipe.cli"]
    # A fixed date: `first_assigned` is part of the table, so only then can hashes be compared.
    command = [*sidpipe, "run", "--run-date", SAMPLE_DATE]
    out, _, _ = run("First run on the bundled sample", command, folder, env)
    print(out.strip())
    out, _, _ = run("The same command again", command, folder, env)
    print("\n".join(line for line in out.splitlines() if "embed" in line or "fit " in line))
    published = sorted((folder / "artifacts" / "sids" / "fashion-sample").iterdir())[0]
    digest = hashlib.sha256((published / "sids.parquet").read_bytes()).hexdigest()
    manifest = json.loads((published / "_MANIFEST.json").read_text())
    print(f"sids.parquet sha256 {digest}, tokenizer {manifest['tokenizer_id']}")
    out, _, _ = run(
        "SID table head", [*sidpipe, "inspect", "fashion-sample", "--rows", "3"], folder, env
    )
    start = out.find("sids.parquet")
    print(out[start : out.find("\n\n", start)].strip() if start >= 0 else out)


def beam_decode(folder: Path, env: dict) -> None:
    for extra in ([], ["--users", "128", "--threads", "1"]):
        command = [sys.executable, str(ROOT / "bench" / "beam_decode.py"), *extra]
        out, _, _ = run("Beam-search decoding benchmark", command, folder, env)
        print(out.strip())


def beauty(folder: Path, env: dict) -> None:
    data = ROOT / "data" / "amazon-beauty-2014"
    sidpipe = [sys.executable, "-m", "sidpipe.cli"]
    run(
        "Beauty: publish 3 x 256 SIDs",
        [*sidpipe, "run", "--catalog", str(data / "catalog.jsonl.gz"), "--catalog-name", "beauty"],
        folder,
        {**env, "SIDPIPE_TOKENIZER_CODEBOOK_SIZES": "[256,256,256]"},
    )
    out, _, _ = run(
        "cpu-small training",
        [*sidpipe, "train", "genrec", "--config", "cpu-small"],
        folder,
        env,
    )
    print(out.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also Beauty (~30 min on 2 cores)")
    args = parser.parse_args()
    print(f"# README figures, {time.strftime('%Y-%m-%d %H:%M %Z')}\n{machine()}\n{load()}")
    with tempfile.TemporaryDirectory(prefix="sidpipe-figures-") as tmp:
        folder = Path(tmp)
        env = {
            **os.environ,
            "PREFECT_HOME": str(folder / "prefect-home"),  # a newcomer's first start
            "SIDPIPE_PROGRESS": "log",  # progress as log lines: the silences are measurable
            "COLUMNS": "100",
        }
        sample(folder, env)
        beam_decode(folder, env)
        if args.long:
            beauty(folder, env)


if __name__ == "__main__":
    main()
