"""The model registry: the contract (``base``), its backends, and :func:`open_registry`.

A backend lives in its own module, which defines ``async def open_url(url: str) -> Registry``
(connecting eagerly) and is listed in ``_BACKENDS`` under each URL scheme it serves.  Backend
modules are imported only when their scheme is used, so optional client libraries (redis;
httpx2 and PyYAML for kubernetes) are needed only by those who use them.
"""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl, urlencode, urlsplit

from mxfs.registry.base import (
    PROVIDER,
    AlreadyExists,
    Claimed,
    ClaimOutcome,
    FinishNotifier,
    Record,
    Registry,
    RegistryError,
    Status,
    StatusCounts,
    entry_name,
    parse_entry_name,
)

__all__ = [
    "PROVIDER",
    "AlreadyExists",
    "ClaimOutcome",
    "Claimed",
    "FinishNotifier",
    "Record",
    "Registry",
    "RegistryError",
    "Status",
    "StatusCounts",
    "entry_name",
    "open_registry",
    "parse_entry_name",
    "redact_url",
]

# URL scheme -> module implementing it; error messages list the schemes in this order.
_BACKENDS: dict[str, str] = {
    "sqlite": "mxfs.registry.sqlite",
    "redis": "mxfs.registry.redis",
    "rediss": "mxfs.registry.redis",
    "kubernetes": "mxfs.registry.kubernetes",
}

_REDACTED = "***"
# Query parameters that some clients (redis-py among them) accept in place of userinfo.
_SECRET_QUERY_KEYS = frozenset({"password"})


async def open_registry(url: str) -> Registry:
    """Connect to the registry named by ``url`` (creating its schema if needed).

    ValueError for a URL no backend accepts; :class:`RegistryError` when the backend cannot be
    reached.
    """
    scheme = urlsplit(url).scheme
    module_name = _BACKENDS.get(scheme)
    if module_name is None:
        supported = ", ".join(_BACKENDS)  # in _BACKENDS's order: the embedded default first
        named = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(f"registry URL {redact_url(url)!r} has {named}; supported schemes: {supported}")
    registry: Registry = await importlib.import_module(module_name).open_url(url)
    return registry


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages.

    Edits the text in place rather than rebuilding the URL, which would normalize it
    (``urlunsplit`` turns ``sqlite:///a`` into ``sqlite:/a``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparsable (say, an unbalanced IPv6 bracket): show nothing that could be a secret.
        return "<unparsable URL>"
    # Split as urlsplit does: the host after the last "@", the password after the first ":".
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        url = url.replace(f"//{parts.netloc}", f"//{user}:{_REDACTED}@{host}", 1)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key in _SECRET_QUERY_KEYS for key, _ in query):
        redacted = [(key, _REDACTED if key in _SECRET_QUERY_KEYS else value) for key, value in query]
        url = url.replace(f"?{parts.query}", f"?{urlencode(redacted, safe='*')}", 1)
    return url
