"""sidpipe: turn an item catalog into Semantic IDs (SIDs) for generative recommendation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sidpipe")  # one source: pyproject.toml
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
