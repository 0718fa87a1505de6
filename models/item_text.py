"""An item's text, built the same way wherever the pipeline or a training flow needs it.

An item is a row of the ingested items table (a dict): `title`, `description`, and attribute
columns (`brand`, `categories`, ...); `attributes` names those columns in the catalog's order.
Empty values are always left out.
"""

from __future__ import annotations

from typing import Any


def attribute_text(item: dict[str, Any], attributes: list[str]) -> str:
    """An item's attribute columns as text, "brand: OPI; color: red"."""
    return "; ".join(f"{k}: {item[k]}" for k in attributes if item.get(k) not in (None, ""))


def description_text(item: dict[str, Any], attributes: list[str]) -> str | None:
    """Description, then attributes: "Long-lasting polish; brand: OPI; color: red"."""
    parts = [item.get("description"), attribute_text(item, attributes)]
    return "; ".join(p for p in parts if p) or None


def item_text(
    item: dict[str, Any],
    attributes: list[str],
    caption: str | None = None,
    interests: list[str] | None = None,
) -> str:
    """The enriched text an item is embedded from: title, description, caption (CMSA),
    interests (MDIM), then attributes, joined by ". "."""
    parts = [item.get("title"), item.get("description")]
    if caption:
        parts.append(f"Image: {caption}")
    if interests:
        parts.append("Interests: " + ", ".join(interests))
    attrs = attribute_text(item, attributes)
    if attrs:
        parts.append(attrs)
    return ". ".join(p for p in parts if p)
