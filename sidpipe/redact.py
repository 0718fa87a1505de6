"""Secrets out of what sidpipe shows or records: logs, manifests, error messages, parameters.

API keys are pydantic `SecretStr` (rendered `**********`); the other secret a setting can carry
is the userinfo of a URL (`http://user:password@host/v1`), which is replaced by `***` here
wherever a URL is logged or written down. The URL itself is kept for connecting.

This module imports nothing of sidpipe: every layer may use it.
"""

from __future__ import annotations

import re

# scheme://userinfo@host: userinfo runs to the last @ before the path (no / ? # or space in it).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]+@")


def redact_urls(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced: http://***@host/... ."""
    return _USERINFO.sub(r"\g<scheme>***@", text)
