"""Pictures of SID quality: per-level code usage, bucket sizes, reconstruction by depth.

People judge a codebook faster from a picture than from a table: a collapsed level is a cliff in
the usage curve, a collision problem a long tail of buckets.
"""

from __future__ import annotations

import io

import numpy as np

from sidpipe.models.sids import LEVEL_LETTERS, bucket_sizes


def quality_png(codes: np.ndarray, quality: dict, title: str) -> bytes:
    """A 3-panel PNG: code usage per level (sorted), items per code tuple, cosine by depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    usage_ax, bucket_ax, cos_ax = axes
    for level, stats in enumerate(quality["levels"]):
        counts = np.sort(np.bincount(codes[:, level], minlength=stats["codebook_size"]))[::-1]
        usage_ax.plot(
            np.arange(1, len(counts) + 1),
            counts,
            label=f"{LEVEL_LETTERS[level]}: {stats['utilization']:.0%} used, "
            f"ppl {stats['perplexity']:.0f}",
        )
    usage_ax.set(title="items per code (sorted)", xlabel="code rank", ylabel="items", xscale="log")
    usage_ax.legend(fontsize=8)

    sizes = bucket_sizes(codes)
    if len(sizes):
        edges = np.arange(1, sizes.max() + 2) - 0.5
        bucket_ax.hist(sizes, bins=edges, color="tab:orange")
    bucket_ax.set(
        title=f"items per code tuple ({quality['distinct_tuple_rate']:.1%} distinct, "
        f"max {quality['max_bucket']})",
        xlabel="items sharing a tuple",
        ylabel="tuples",
        yscale="log",
    )

    cosine = quality.get("reconstruction_cosine_by_depth") or []
    cos_ax.plot(range(1, len(cosine) + 1), cosine, marker="o")
    cos_ax.set(
        title="reconstruction cosine by depth",
        xlabel="levels used",
        ylabel="cosine",
        ylim=(min(cosine + [0.5]) - 0.05, 1.0),
        xticks=range(1, len(cosine) + 1),
    )
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
