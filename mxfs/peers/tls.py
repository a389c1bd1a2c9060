"""Mutual TLS between peers: the fleet's CA is who may fetch and who may serve.

Every byte a peer sends is checked against the Hub's checksum anyway, so TLS is not what keeps
the cache right; it keeps gated weights and the shared token off the wire in clear, and makes
"a peer" mean "a node holding a key the fleet's CA signed", on networks trusted less than the
fleet.  Both ends present their certificates and check the other's against ``peer_tls_ca``.

Host names are not checked: peers reach each other at the addresses they list themselves at
(IPs, mostly, which change with every reschedule), and the fleet's CA is the identity. Use a CA
that signs nothing but the fleet's node certificates (cert-manager's CA issuer, a private CA).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mxfs.config import ConfigError, Settings

# The oldest TLS either end accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class PeerTls:
    """The server's and the client's contexts, built when the daemon starts (blocking: file reads),
    so that a missing or mismatched file fails the start, not the first transfer."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)

    @staticmethod
    def _context(protocol: int, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = MINIMUM_VERSION
        context.check_hostname = False  # see the module's doc: the fleet's CA is the identity
        context.verify_mode = ssl.CERT_REQUIRED  # the client's certificate too, on the server
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
        return context

    @classmethod
    def from_settings(cls, settings: Settings) -> PeerTls | None:
        """The contexts ``peer_tls_*`` ask for; None when peers speak plain HTTP."""
        if settings.peer_tls_cert is None or settings.peer_tls_key is None or settings.peer_tls_ca is None:
            return None
        try:
            return cls(settings.peer_tls_cert, settings.peer_tls_key, settings.peer_tls_ca)
        except (OSError, ssl.SSLError) as exc:
            files = f"{settings.peer_tls_cert}, {settings.peer_tls_key}, {settings.peer_tls_ca}"
            raise ConfigError(f"peer TLS: cannot load {files}: {exc}") from None
