"""The model registry: the contract (``base``), its backends, and :func:`open_registry`.

A backend lives in its own module, which defines ``async def open_url(url: str) -> Registry``
(connecting eagerly) and is listed in ``_BACKENDS`` under each URL scheme it serves.  Backend
modules are imported only when their scheme is used, so optional client libraries (redis;
httpx2 and PyYAML for kubernetes) are needed only by those who use them.  What the backends
share (the contract, ``redact_url``) is in ``base``: they import that, never this package, so
loading a backend never loops back into the module that loads it.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from mxfs.registry.base import (
    PROVIDER,
    AlreadyExists,
    Claimed,
    ClaimOutcome,
    FinishNotifier,
    Holder,
    Record,
    RefRecord,
    Registry,
    RegistryError,
    Status,
    StatusCounts,
    redact_url,
)

__all__ = [
    "PROVIDER",
    "AlreadyExists",
    "ClaimOutcome",
    "Claimed",
    "FinishNotifier",
    "Holder",
    "Record",
    "RefRecord",
    "Registry",
    "RegistryError",
    "Status",
    "StatusCounts",
    "open_registry",
    "redact_url",
]

# URL scheme -> module implementing it; error messages list the schemes in this order.
_BACKENDS: dict[str, str] = {
    "sqlite": "mxfs.registry.sqlite",
    "redis": "mxfs.registry.redis",
    "rediss": "mxfs.registry.redis",
    "kubernetes": "mxfs.registry.kubernetes",
}


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
