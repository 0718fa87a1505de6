"""What a SID is (its tokens) and how good a table of them is.

A SID is a code per level plus a collision suffix, written as tokens `<a_12><b_7><c_901><d_0>`
(one letter per level, the next letter for the suffix).

Quality metrics use the names users already know (TorchEasyRec's report, TIGER papers).

Per level: utilization (share of codes used), perplexity (exp of the usage entropy: the number of
equally used codes it is worth), dead codes. Whole table: distinct code tuples per item, share of
items whose tuple is unique (before the suffix), largest bucket, Gini of bucket sizes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def sid_string(codes: list[int], suffix: int) -> str:
    """Token string of a SID: <a_12><b_7><c_901><d_0> (the last letter is the suffix)."""
    return sid_strings(np.asarray([codes]), np.asarray([suffix]))[0].as_py()


def sid_strings(codes: np.ndarray, suffixes: np.ndarray) -> pa.Array:
    """`sid_string` of every row of codes [N, L] with its suffix [N], as one Arrow string
    array (built column by column: no Python string per item)."""
    parts = []
    for level, column in enumerate([*np.asarray(codes).T, np.asarray(suffixes)]):
        digits = pc.cast(pa.array(np.ascontiguousarray(column, np.int64)), pa.string())
        parts += [f"<{LEVEL_LETTERS[level]}_", digits, ">"]
    if len(parts[1]) == 0:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(*parts, "")


def codebook_tokens(codebook_sizes: list[int]) -> list[str]:
    """The SID tokens of every code of every level: <a_0> ... <c_1023>."""
    return [
        f"<{LEVEL_LETTERS[level]}_{code}>"
        for level, size in enumerate(codebook_sizes)
        for code in range(size)
    ]


def suffix_tokens(levels: int, max_suffix: int) -> list[str]:
    return [f"<{LEVEL_LETTERS[levels]}_{s}>" for s in range(max_suffix + 1)]


def level_stats(codes: np.ndarray, codebook_size: int) -> dict[str, float | int]:
    counts = np.bincount(codes, minlength=codebook_size).astype(np.float64)
    used = int((counts > 0).sum())
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {
        "codebook_size": codebook_size,
        "used_codes": used,
        "dead_codes": codebook_size - used,
        "utilization": used / codebook_size,
        "perplexity": float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0,
    }


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of bucket sizes: 0 when every bucket holds the same number of items."""
    if len(sizes) == 0:
        return 0.0
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def bucket_sizes(codes: np.ndarray) -> np.ndarray:
    """Items per distinct code tuple."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return counts


def sid_quality(codes: np.ndarray, codebook_sizes: list[int]) -> dict:
    """Quality of a code table [N, L] (before the collision suffix)."""
    n = len(codes)
    sizes = bucket_sizes(codes)
    return {
        "items": n,
        "levels": [level_stats(codes[:, i], k) for i, k in enumerate(codebook_sizes)],
        "distinct_tuples": int(len(sizes)),
        "distinct_tuple_rate": float(len(sizes) / n) if n else 0.0,
        "unique_item_rate": float((sizes == 1).sum() / n) if n else 0.0,
        "max_bucket": int(sizes.max()) if len(sizes) else 0,
        "bucket_gini": gini(sizes),
    }


def quality_warnings(quality: dict, min_distinct_rate: float, max_bucket: int) -> list[str]:
    """What is poor about a SID table's codes (before the collision suffix), in words."""
    before = quality.get("collisions", {}).get("before", quality)
    warnings = []
    if before["distinct_tuple_rate"] < min_distinct_rate:
        warnings.append(
            f"only {before['distinct_tuple_rate']:.0%} of items have a code tuple of their own "
            f"(warning below {min_distinct_rate:.0%}, tokenizer.warn_distinct_tuple_rate)"
        )
    if before["max_bucket"] > max_bucket:
        warnings.append(
            f"{before['max_bucket']} items share one code tuple (warning above {max_bucket}, "
            "tokenizer.warn_max_bucket)"
        )
    if warnings:
        sizes = "/".join(str(level["codebook_size"]) for level in quality["levels"])
        warnings.append(
            f"the suffix, not the codes, tells these items apart: with codebooks {sizes}, refit "
            "with larger tokenizer.codebook_sizes, another tokenizer.method or more items "
            "(sidpipe run --refit)"
        )
    return warnings


def quality_markdown(quality: dict) -> str:
    """The quality report as a short markdown table (Prefect artifact, CLI)."""
    lines = [
        f"**SID quality** for tokenizer `{quality['tokenizer_id']}` ({quality['items']:,} items)",
        "",
        "| level | codes | used | utilization | perplexity |",
        "|---|---|---|---|---|",
    ]
    for i, level in enumerate(quality["levels"]):
        lines.append(
            f"| {LEVEL_LETTERS[i]} | {level['codebook_size']} | {level['used_codes']} | "
            f"{level['utilization']:.1%} | {level['perplexity']:.1f} |"
        )
    cos = ", ".join(f"{c:.3f}" for c in quality["reconstruction_cosine_by_depth"])
    lines += [
        "",
        f"- distinct code tuples: {quality['distinct_tuples']:,} "
        f"({quality['distinct_tuple_rate']:.1%} of items); unique items "
        f"{quality['unique_item_rate']:.1%}",
        f"- largest bucket: {quality['max_bucket']} items; bucket Gini {quality['bucket_gini']:.3f}",
        f"- items needing a suffix: {quality['items_with_suffix']:,} (max suffix "
        f"{quality['max_suffix']})",
        f"- reconstruction cosine by depth: {cos}",
    ]
    if "reconstruction_cosine" in quality:
        lines.append(
            f"- reconstruction cosine of the codes items were given: "
            f"{quality['reconstruction_cosine']:.3f}"
        )
    collisions = quality.get("collisions")
    if collisions:
        b = collisions["before"]
        lines.append(
            f"- collision handling `{collisions['mode']}`: distinct tuples "
            f"{b['distinct_tuple_rate']:.1%} before -> {quality['distinct_tuple_rate']:.1%} after; "
            f"largest bucket {b['max_bucket']} -> {quality['max_bucket']}; "
            f"{collisions['reassigned']:,} items moved to a free nearby tuple"
            + (
                f", {collisions['reassign_declined']:,} kept a suffix (no free tuple close enough)"
                if collisions.get("reassign_declined")
                else ""
            )
        )
    if "kept_from_previous_run" in quality:
        lines.append(
            f"- SIDs kept from the previous run: {quality['kept_from_previous_run']:,}; "
            f"encoded this run: {quality['encoded_this_run']:,}"
        )
    drift = quality.get("drift")
    if drift:
        per_level = ", ".join(
            f"{LEVEL_LETTERS[i]} {v:.1%}" for i, v in enumerate(drift["code_changed_per_level"])
        )
        lines.append(
            f"- **drift** from `{drift['from_tokenizer']}`: {drift['sid_changed']:.1%} of "
            f"{drift['items_compared']:,} items changed SID (per level: {per_level})"
        )
    if quality.get("sizing_message"):
        lines.append(f"- sizing: {quality['sizing_message']}")
    for note in quality.get("notes", []):
        lines.append(f"- {note}")
    for warning in quality.get("warnings", []):
        lines.append(f"- **warning**: {warning}")
    return "\n".join(lines)
