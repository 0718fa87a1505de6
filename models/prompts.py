"""Versioned prompts for the model-served stages.

A prompt version is part of its stage's cache key: change the text, add a new version, and only
that stage (and what depends on it) is recomputed. Never edit a published version in place.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from pydantic import BaseModel, Field, ValidationError

CAPTION_PROMPTS: dict[str, dict[str, str]] = {
    # CMSA (TriAlignGR): a concise, attribute-rich description of what the image shows.
    "v1": {
        "system": "You describe product photos for an online shop's search and recommendation "
        "system. Be factual and specific; never invent details you cannot see.",
        "user": "Describe this product in 2-3 sentences: what it is, its colours, material, "
        "pattern, shape, style and any visible text or brand marks, and the occasion or "
        "user it suits.{title_hint}",
    },
}

INTEREST_PROMPTS: dict[str, dict[str, str]] = {
    # MDIM (TriAlignGR): reason step by step, then 2-4 latent interest tags.
    "v1": {
        "system": "You are an e-commerce analyst who infers the deeper interests, needs and "
        "lifestyles that lead people to buy a product. Answer in JSON only.",
        "user": "Product information:\n{fields}\n\nThink step by step about who buys this "
        "product and why: the need it meets, the lifestyle or identity it expresses, the "
        'situations it is used in. Write that reasoning in "reasoning". Then give 2 to '
        '4 short interest tags (2-5 words each, e.g. "productivity-focused lifestyle") '
        'in "interests".',
    },
}

REASONING_MAX_CHARS = 1000

INTERESTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    # "reasoning" comes first so the chain of thought is generated before the tags. It is
    # bounded (about 170 words) so that a constrained decoder always closes the JSON within the
    # stage's max_tokens: a model that rambles gets its tags rather than a truncated answer.
    "properties": {
        "reasoning": {"type": "string", "maxLength": REASONING_MAX_CHARS},
        "interests": {
            "type": "array",
            "items": {"type": "string", "minLength": 2, "maxLength": 80},
            "minItems": 2,
            "maxItems": 4,
        },
    },
    "required": ["reasoning", "interests"],
    "additionalProperties": False,
}

MAX_TAG_LENGTH = 60
_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


class MalformedOutputError(ValueError):
    """The model's answer does not match what was asked for."""


class _InterestAnswer(BaseModel):
    reasoning: str
    interests: list[str] = Field(min_length=1)


def caption_messages(version: str, image_url: str, title: str | None) -> list[dict[str, Any]]:
    prompt = CAPTION_PROMPTS[version]
    hint = f' The shop lists it as: "{title}".' if title else ""
    return [
        {"role": "system", "content": prompt["system"]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": prompt["user"].format(title_hint=hint)},
            ],
        },
    ]


def interest_messages(
    version: str,
    title: str | None,
    description: str | None,
    caption: str | None,
    attributes: str | None,
) -> list[dict[str, Any]]:
    prompt = INTEREST_PROMPTS[version]
    fields = "\n".join(
        f"- {name}: {value}"
        for name, value in (
            ("Title", title),
            ("Description", description),
            ("Image description", caption),
            ("Attributes", attributes),
        )
        if value
    )
    return [
        {"role": "system", "content": prompt["system"]},
        {"role": "user", "content": prompt["user"].format(fields=fields)},
    ]


def normalize_tag(tag: str) -> str:
    """Lower case, single spaces (control characters count as spaces), no punctuation at the
    ends, at most 60 characters."""
    tag = "".join(" " if unicodedata.category(c) == "Cc" else c for c in str(tag))
    tag = " ".join(tag.lower().split())
    tag = _PUNCT_EDGES.sub("", tag)
    if len(tag) > MAX_TAG_LENGTH:
        tag = tag[:MAX_TAG_LENGTH].rsplit(" ", 1)[0]
    return tag


def parse_interests(content: str, finish_reason: str) -> tuple[list[str], str]:
    """(2-4 normalized, de-duplicated tags, reasoning) from the model's JSON answer."""
    if finish_reason == "length":
        raise MalformedOutputError("output truncated (max_tokens reached)")
    try:
        # strict=False: a raw control character inside a JSON string (a constrained decoder's
        # grammar allows it) is kept, not a parse error; normalize_tag then drops it.
        answer = _InterestAnswer.model_validate(json.loads(content, strict=False))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise MalformedOutputError(f"not the requested JSON: {str(exc).splitlines()[0]}") from None
    tags = list(dict.fromkeys(t for t in map(normalize_tag, answer.interests) if t))[:4]
    if len(tags) < 2:
        raise MalformedOutputError(f"needs 2-4 distinct interest tags, got {tags}")
    return tags, answer.reasoning.strip()


def clean_caption(content: str) -> str:
    """One paragraph of text; a caption cut off by max_tokens ends at its last full sentence."""
    text = " ".join(content.split())
    if text and text[-1] not in ".!?\"'" and "." in text:
        text = text[: text.rfind(".") + 1]
    return text
