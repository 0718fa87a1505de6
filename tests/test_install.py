"""sidpipe as a user installs it: a wheel (not an editable checkout), run from another folder.

The wheel goes into a fresh virtual environment that borrows this environment's third-party
packages (a .pth line, so torch is not installed twice) but not its editable sidpipe: everything
sidpipe needs at run time, the bundled sample and the training presets included, must come from
the wheel itself.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent
UNSHIPPED = (".git", ".venv", "build", "artifacts", "*.egg-info", "__pycache__", ".*_cache")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv with sidpipe installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("install")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        check=True,
    )
    [wheel] = (root / "dist").glob("sidpipe-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This environment's dependencies, without its editable sidpipe (.pth files in a folder
    # added this way are not run, so the editable finder is not installed).
    Path(purelib, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
    )
    return venv / "bin"


def test_the_wheel_carries_the_sample_and_the_presets(installed, tmp_path):
    script = (
        "import sidpipe, sidpipe.data as d, pathlib;"
        "from sidpipe.tasks.training.config import presets;"
        "print(sidpipe.__file__); print(pathlib.Path(d.SAMPLE_CATALOG).is_file());"
        "print(len(list(pathlib.Path(d.SAMPLE_CATALOG).parent.glob('images/*.jpg'))));"
        "print(','.join(presets('genrec'))); print(','.join(presets('asymrec')))"
    )
    out = subprocess.run(  # from elsewhere: `python -c` puts the current folder on sys.path
        [installed / "python", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not out[0].startswith(str(REPO))  # the installed copy, not this checkout
    assert out[1:3] == ["True", "1000"]
    assert "cpu-small" in out[3].split(",")
    assert "asymrec-cpu-small" in out[4].split(",")


def test_an_installed_sidpipe_publishes_the_sample_from_another_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [installed / "sidpipe", "run", "--store", "store", "--run-date", "2026-11-24"],
        cwd=elsewhere,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sids = pq.read_table(
        elsewhere / "store" / "sids" / "fashion-sample" / "2026-11-24" / "sids.parquet"
    )
    assert sids.num_rows == 1000
    assert "items: 1,000 in = 1,000 assigned" in result.stdout
