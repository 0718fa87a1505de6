"""sidpipe: turn an item catalog into Semantic IDs (SIDs) for generative recommendation."""

__version__ = "0.1.0"
