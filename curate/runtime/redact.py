"""Strip credentials from anything recorded (manifests, reports, failure lists).

An endpoint given as `https://user:password@host/v1` works as typed, but only
`https://host/v1` is ever written down.
"""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/?#@\s]*@")


def strip_url(text: str) -> str:
    """TEXT with the `user:password@` part of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


def strip_credentials(value: Any) -> Any:
    """VALUE (strings, and dicts/lists/tuples of them, at any depth) with URL credentials removed."""
    if isinstance(value, str):
        return strip_url(value)
    if isinstance(value, dict):
        return {key: strip_credentials(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(strip_credentials(item) for item in value)
    return value
