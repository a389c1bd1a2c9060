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

import logging
import os
import ssl
from pathlib import Path

import trio

from mxfs.config import ConfigError, Settings

log = logging.getLogger(__name__)

# The oldest TLS either end accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# How often the daemon looks for renewed certificate files.
RELOAD_INTERVAL = 60.0


class PeerTls:
    """The server's and the client's contexts, built when the daemon starts (blocking: file reads),
    so that a missing or mismatched file fails the start, not the first transfer.

    Renewed certificates (cert-manager rewrites the files in place) are taken up by
    :meth:`keep_current` without a restart: the contexts load the new pair, and new connections
    use it.  A new CA is added to the trusted ones; one that is gone stays trusted until a restart
    (a context cannot forget a CA).
    """

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.files = (cert, key, ca)
        self._seen = self._versions()
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)

    def _versions(self) -> tuple[tuple[int, int, int], ...]:
        """What the files are now: a rewrite or a replacement (a new inode) changes it."""
        versions = []
        for path in self.files:
            st = os.stat(path)
            versions.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(versions)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since last time (blocking); True if it did.
        Raises OSError or ssl.SSLError, the contexts unchanged, when the new files do not load
        (a key written after its certificate: the next round loads both)."""
        versions = self._versions()
        if versions == self._seen:
            return False
        cert, key, ca = self.files
        for context in (self.server, self.client):
            self._context(context.protocol, cert, key, ca)  # all of it loads, or nothing changes
        for context in (self.server, self.client):
            context.load_cert_chain(cert, key)
            context.load_verify_locations(cafile=ca)
        self._seen = versions
        return True

    async def keep_current(self, every: float = RELOAD_INTERVAL) -> None:
        """Look at the files every ``every`` seconds and reload them when they change."""
        failing = False
        while True:
            await trio.sleep(every)
            try:
                if await trio.to_thread.run_sync(self.reload_if_changed):
                    log.info("peer TLS: loaded the renewed %s", ", ".join(map(str, self.files)))
                failing = False
            except (OSError, ssl.SSLError) as exc:
                if not failing:
                    log.warning("peer TLS: the renewed files do not load (%s); keeping the ones loaded", exc)
                failing = True

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
